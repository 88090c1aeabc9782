from selfix.cli import main

raise SystemExit(main())
