"""`python -m selfix.testing.fake_comfyui ...`: start the double like the real `python main.py ...`."""

import sys

from selfix.testing.fake_comfyui.cli import main

sys.exit(main())
