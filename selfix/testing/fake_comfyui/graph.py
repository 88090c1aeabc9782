"""Execution order (real: comfy_execution.graph.ExecutionList) and cache keys (real: caching.py)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from selfix.testing.fake_comfyui.core import is_link
from selfix.testing.fake_comfyui.nodes.base import NodeDef


class ExecutionList:
    """Which node runs next; the same output-first heuristic as ComfyUI, so node order matches the captures."""

    def __init__(
        self, prompt: dict[str, Any], registry: dict[str, NodeDef], is_cached: Callable[[str], bool]
    ) -> None:
        self.prompt = prompt
        self.registry = registry
        self.is_cached = is_cached
        self.pending: dict[str, bool] = {}
        self.block_count: dict[str, int] = {}
        self.blocking: dict[str, dict[str, dict[Any, bool]]] = {}

    def add_node(self, node_id: str) -> None:
        stack = [node_id]
        links: list[tuple[str, Any, str]] = []
        while stack:
            unique_id = stack.pop()
            if unique_id in self.pending:
                continue
            self.pending[unique_id] = True
            self.block_count[unique_id] = 0
            self.blocking[unique_id] = {}
            for value in self.prompt[unique_id]["inputs"].values():
                if is_link(value):
                    if not self.is_cached(value[0]):
                        stack.append(value[0])
                    links.append((value[0], value[1], unique_id))
        for from_id, socket_index, to_id in links:
            self._add_strong_link(from_id, socket_index, to_id)

    def _add_strong_link(self, from_id: str, socket_index: Any, to_id: str) -> None:
        if self.is_cached(from_id):
            return
        self.add_node(from_id)
        if to_id not in self.blocking[from_id]:
            self.blocking[from_id][to_id] = {}
            self.block_count[to_id] += 1
        self.blocking[from_id][to_id][socket_index] = True

    def is_empty(self) -> bool:
        return not self.pending

    def stage(self) -> str | None:
        ready = [n for n in self.pending if self.block_count[n] == 0]
        return self._pick(ready) if ready else None

    def _is_output(self, node_id: str) -> bool:
        return self.registry[self.prompt[node_id]["class_type"]].output_node

    def _pick(self, ready: list[str]) -> str:
        # real: ux_friendly_pick_node - outputs first, then nodes feeding an output within two hops
        for node_id in ready:
            if self._is_output(node_id):
                return node_id
        for node_id in ready:
            if any(self._is_output(b) for b in self.blocking[node_id]):
                return node_id
        for node_id in ready:
            if any(self._is_output(b2) for b in self.blocking[node_id] for b2 in self.blocking[b]):
                return node_id
        return ready[0]

    def complete(self, node_id: str) -> None:
        del self.pending[node_id]
        for blocked in self.blocking[node_id]:
            self.block_count[blocked] -= 1
        del self.blocking[node_id]


def ordered_ancestry(prompt: dict[str, Any], node_id: str) -> tuple[list[str], dict[str, int]]:
    ancestors: list[str] = []
    order: dict[str, int] = {}

    def visit(current: str) -> None:
        if current not in prompt:
            return
        inputs = prompt[current]["inputs"]
        for key in sorted(inputs):
            value = inputs[key]
            if is_link(value) and value[0] not in order:
                ancestors.append(value[0])
                order[value[0]] = len(ancestors) - 1
                visit(value[0])

    visit(node_id)
    return ancestors, order


def immediate_signature(
    prompt: dict[str, Any], node_id: str, order: dict[str, int], changed: dict[str, Any], with_id: bool
) -> list[Any]:
    if node_id not in prompt:
        return [uuid.uuid4().hex]  # real: NaN, which never matches
    node = prompt[node_id]
    signature: list[Any] = [node["class_type"], changed[node_id]]
    if with_id:
        signature.append(node_id)
    for key in sorted(node["inputs"]):
        value = node["inputs"][key]
        signature.append([key, ["ANCESTOR", order[value[0]], value[1]] if is_link(value) else value])
    return signature


def cache_key(prompt: dict[str, Any], node_id: str, changed: dict[str, Any], with_id: bool) -> str:
    """real: CacheKeySetInputSignature - the node and all its ancestors; node ids only matter with --cache-none."""
    ancestors, order = ordered_ancestry(prompt, node_id)
    parts = [immediate_signature(prompt, n, order, changed, with_id) for n in [node_id, *ancestors]]
    return json.dumps(parts, sort_keys=True, default=repr)
