"""The README stays true: its settings table is the one generated from the code."""

from __future__ import annotations

import re
from pathlib import Path

from selfix.cli import settings_table
from selfix.metrics import metrics_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_settings_table_matches_code() -> None:
    text = README.read_text()
    match = re.search(r"<!-- settings:begin -->\n(.*?)\n<!-- settings:end -->", text, re.S)
    assert match, "README lacks the settings markers"
    assert match[1] == settings_table(), "README settings table is stale: regenerate with `selfix settings --markdown`"


def test_readme_names_the_two_commands() -> None:
    text = README.read_text()
    assert "./scripts/run" in text and "./scripts/test" in text


def test_readme_metrics_table_matches_code() -> None:
    text = README.read_text()
    match = re.search(r"<!-- metrics:begin -->\n(.*?)\n<!-- metrics:end -->", text, re.S)
    assert match, "README lacks the metrics markers"
    assert match[1] == metrics_table(), "README metrics table is stale: regenerate it from selfix.metrics.metrics_table"
    assert "selfix_unresolved_tasks" in match[1]
