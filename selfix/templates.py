"""Workflow templates: ComfyUI API graphs with {{name}} placeholders, filled from a task's params.

A placeholder that is a whole string ("{{seed}}") takes the parameter's JSON value with its type (a number stays a
number); inside a longer string it is substituted as text. `{{lora}}` defaults to the task's first loraModel.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from selfix.messages import INVALID_PARAMS, UNKNOWN_TEMPLATE, TaskError, strict_loads

BUILTIN_DIR = Path(__file__).parent / "templates"
WHOLE_RE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")  # WHOLE_RE and NAME_RE: fullmatch() only
PART_RE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Catalog:
    """Templates by name, loaded once at start-up (built-in, then TEMPLATES_DIR overriding by name)."""

    def __init__(self, templates: dict[str, dict[str, Any]]) -> None:
        self.templates = templates

    @classmethod
    def load(cls, extra_dir: Path | None = None) -> Catalog:
        found: dict[str, dict[str, Any]] = {}
        for directory in (BUILTIN_DIR, extra_dir):
            if directory is None or not directory.is_dir():
                continue
            for path in sorted(directory.glob("*.json")):
                found[path.stem] = _load_one(path)
        return cls(found)

    def names(self) -> list[str]:
        return sorted(self.templates)

    def render(self, name: str, params: dict[str, Any], loras: list[str]) -> dict[str, Any]:
        if not NAME_RE.fullmatch(name) or name not in self.templates:
            raise TaskError(UNKNOWN_TEMPLATE, f"unknown template {name[:64]!r}; known: {', '.join(self.names())}")
        tpl = self.templates[name]
        declared: dict[str, Any] = tpl.get("params", {})
        unknown = sorted(set(params) - set(declared))
        if unknown:
            raise TaskError(INVALID_PARAMS, f"template {name!r} has no parameter(s) {unknown}; "
                                            f"it takes {sorted(declared)}")
        values = {k: spec.get("default") for k, spec in declared.items() if "default" in spec}
        if loras and "lora" in declared:
            values["lora"] = loras[0]
        values.update(params)
        missing = sorted(k for k in declared if k not in values)
        if missing:
            raise TaskError(INVALID_PARAMS, f"template {name!r} needs parameter(s) {missing}")
        for key, spec in declared.items():
            _check_type(name, key, values[key], spec.get("type"))
        return dict(fill(copy.deepcopy(tpl["workflow"]), values))


def _load_one(path: Path) -> dict[str, Any]:
    """Parse and check a template once at start-up, so a broken one stops the process instead of every task."""
    data = strict_loads(path.read_bytes())  # the same strict JSON as a task: a NaN would reach ComfyUI
    if not isinstance(data, dict) or not isinstance(data.get("workflow"), dict):
        raise ValueError(f"template {path} must be an object with a 'workflow' graph")
    declared = data.setdefault("params", {})
    for key, spec in declared.items():
        if not isinstance(spec, dict) or spec.get("type", "string") not in _TYPES:
            raise ValueError(f"template {path}: parameter {key!r} needs a type among {sorted(_TYPES)}")
    undeclared = sorted(placeholders(data["workflow"]) - set(declared))
    if undeclared:
        raise ValueError(f"template {path} uses undeclared placeholder(s) {undeclared}")
    return data


def placeholders(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set().union(*(placeholders(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(placeholders(v) for v in node))
    return set(PART_RE.findall(node)) if isinstance(node, str) else set()


_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,)}


def _check_type(template: str, key: str, value: Any, expected: str | None) -> None:
    if expected is None:
        return
    ok = isinstance(value, _TYPES[expected]) and not (expected in ("integer", "number") and isinstance(value, bool))
    if not ok:
        raise TaskError(INVALID_PARAMS, f"template {template!r}: parameter {key!r} must be {expected}, "
                                        f"got {type(value).__name__}")


def fill(node: Any, values: dict[str, Any]) -> Any:
    """Replace placeholders recursively; whole-string placeholders keep the value's JSON type."""
    if isinstance(node, dict):
        return {k: fill(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [fill(v, values) for v in node]
    if isinstance(node, str):
        whole = WHOLE_RE.fullmatch(node)
        if whole:
            return values[whole[1]]
        return PART_RE.sub(lambda m: str(values[m[1]]), node)
    return node
