"""pytest fixtures for a whole selfix node and the ComfyUI double (the classes and builders live in node.py).

- `make_node` (function): factory(name="node", **kw) -> Node under the test's tmp_path; every node is stopped after
  the test (no program outlives it).
- `comfy_double` (function): a started ComfyDouble under the test's tmp_path.

The names of node.py stay importable from here for the test modules that import them from this plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers.node import (
    PROGRAMS,
    ROOT,
    ComfyDouble,
    Double,
    Node,
    double_command,
    free_port,
    t2i_workflow,
    task,
    wait_until,
    write_safetensors,
)

__all__ = ["PROGRAMS", "ROOT", "ComfyDouble", "Double", "Node", "double_command", "free_port", "t2i_workflow",
           "task", "wait_until", "write_safetensors"]


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def factory(name: str = "node", **kw: Any) -> Node:
        node = Node(tmp_path / name, **kw)
        nodes.append(node)
        return node

    yield factory
    for node in nodes:
        node.stop()


@pytest.fixture
def comfy_double(tmp_path: Path) -> Iterator[Double]:
    double = Double(tmp_path / "double").start()
    yield double
    double.stop()
