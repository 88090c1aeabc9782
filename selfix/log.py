"""Logging set-up shared by every process: loguru, text or JSON lines, task_id bound where there is one."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from loguru import logger

if TYPE_CHECKING:
    from selfix.settings import Settings

TEXT_FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> {level: <7} <cyan>{extra[process]}</cyan>"
    "{extra[task_tag]} {message}"
)


def _tag_task(record: dict) -> None:  # type: ignore[type-arg]
    task_id = record["extra"].get("task_id")
    record["extra"]["task_tag"] = f" [{task_id}]" if task_id else ""


def setup(process: str, settings: Settings | None = None) -> None:
    """Route loguru to stdout (supervisord collects it) in the configured format."""
    fmt = settings.log_format if settings else "text"
    level = settings.log_level if settings else "INFO"
    logger.remove()
    logger.configure(extra={"process": process, "task_id": None}, patcher=_tag_task)  # type: ignore[arg-type]
    if fmt == "json":
        logger.add(sys.stdout, level=level, serialize=True, backtrace=False, diagnose=False)
    else:
        logger.add(sys.stdout, level=level, format=TEXT_FORMAT, colorize=False, backtrace=False, diagnose=False)
