"""Executor (real: execution.PromptExecutor + progress.ProgressRegistry/WebUIProgressHandler).

Runs one prompt's nodes in ComfyUI's order with the "classic" output cache; sends the executing/executed/progress
frames and previews, honours interrupts, and records the execution_* messages and outputs that /history shows.
"""

from __future__ import annotations

import logging
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from selfix.testing.fake_comfyui.core import Preview, full_type_name, is_link
from selfix.testing.fake_comfyui.graph import ExecutionList, cache_key
from selfix.testing.fake_comfyui.nodes.base import NodeCall, NodeDef, NodeOutput, get_input_info

if TYPE_CHECKING:
    from selfix.testing.fake_comfyui.server import FakeComfy

log = logging.getLogger("comfyui")


class InterruptProcessingError(Exception):
    """real: comfy.model_management.InterruptProcessingException."""


class OutOfMemoryError(RuntimeError):
    """What POST /fake/oom makes the next KSampler raise; named like torch's, so exception_type reads the same."""


OutOfMemoryError.__module__ = "torch"


@dataclass
class Run:
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    keys: dict[str, str] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    ui_outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class NodeFailure:
    node_id: str
    details: dict[str, Any] | None  # None means interrupted


def format_value(value: Any) -> Any:
    if value is None or isinstance(value, (int, float, bool, str)):
        return value
    return str(value)


class Executor:
    def __init__(self, server: FakeComfy) -> None:
        self.server = server
        self.outputs: dict[str, tuple[Any, ...]] = {}
        self.ui: dict[str, dict[str, Any]] = {}
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.success = True
        self.status_messages: list[tuple[str, dict[str, Any]]] = []
        self.history_result: dict[str, Any] = {"outputs": {}, "meta": {}}

    def reset(self) -> None:
        """real: PromptExecutor.reset() after /free with free_memory - every cached output is forgotten."""
        self.outputs.clear()
        self.ui.clear()
        self.objects.clear()
        self.status_messages = []
        self.success = True

    def add_message(self, event: str, data: dict[str, Any], broadcast: bool) -> None:
        data = {**data, "timestamp": int(time.time() * 1000)}
        self.status_messages.append((event, data))
        if self.server.client_id is not None or broadcast:
            self.server.send_sync(event, data, self.server.client_id)

    async def execute(self, prompt: dict[str, Any], prompt_id: str, extra: dict[str, Any], outputs: list[str]) -> None:
        srv = self.server
        srv.interrupt_flag = False  # a stale interrupt must not kill this prompt
        srv.client_id = extra.get("client_id")
        self.status_messages = []
        self.success = True
        self.add_message("execution_start", {"prompt_id": prompt_id}, broadcast=False)
        run = Run(prompt_id, prompt, extra, self._set_prompt(prompt))
        cached = [n for n in prompt if run.keys[n] in self.outputs]
        self.add_message("execution_cached", {"nodes": cached, "prompt_id": prompt_id}, broadcast=False)
        await self._run_graph(run, outputs)
        self.history_result = {
            "outputs": {n: ui["output"] for n, ui in run.ui_outputs.items()},
            "meta": {n: ui["meta"] for n, ui in run.ui_outputs.items()},
        }
        srv.last_node_id = None

    def _set_prompt(self, prompt: dict[str, Any]) -> dict[str, str]:
        changed = {n: self._is_changed(prompt[n]) for n in prompt}
        with_id = self.server.cfg.cache_none
        keys = {n: cache_key(prompt, n, changed, with_id) for n in prompt}
        used = set(keys.values())
        # real: clean_unused() - only entries the new prompt can use survive ("classic" cache)
        for cache in (self.outputs, self.ui):
            for key in [k for k in cache if k not in used]:
                del cache[key]
        live = {(n, prompt[n]["class_type"]) for n in prompt}
        for obj_key in [k for k in self.objects if k not in live]:
            del self.objects[obj_key]
        return keys

    def _is_changed(self, node: dict[str, Any]) -> Any:
        definition = self.server.registry[node["class_type"]]
        if definition.is_changed is None:
            return False
        if "is_changed" in node:
            return node["is_changed"]
        try:
            return [definition.is_changed(self.server.folders, node["inputs"])]
        except Exception as ex:
            log.warning("WARNING: %s", ex)
            return uuid.uuid4().hex  # real: NaN, never equal to anything

    async def _run_graph(self, run: Run, outputs: list[str]) -> None:
        elist = ExecutionList(run.prompt, self.server.registry, lambda n: run.keys.get(n) in self.outputs)
        for output in outputs:
            elist.add_node(output)
        while not elist.is_empty():
            node_id = elist.stage()
            if node_id is None:  # only a dependency cycle leaves pending nodes with none ready
                blocked = next(iter(elist.pending))
                failure: NodeFailure | None = NodeFailure(blocked, _cycle_details(blocked))
            else:
                failure = await self._execute_node(run, node_id)
            self.success = failure is None
            if failure is not None or node_id is None:
                self._handle_error(run, failure or NodeFailure("", None))
                return
            elist.complete(node_id)
        self.add_message("execution_success", {"prompt_id": run.prompt_id}, broadcast=False)

    async def _execute_node(self, run: Run, node_id: str) -> NodeFailure | None:
        srv = self.server
        class_type = run.prompt[node_id]["class_type"]
        definition = srv.registry[class_type]
        key = run.keys[node_id]
        if key in self.outputs:
            self._send_cached(run, node_id, key)
            return None
        self._progress_start(run, node_id)
        data: dict[str, Any] | None = None
        try:
            data = self._input_data(run, node_id, definition)
            if srv.client_id is not None:
                srv.last_node_id = node_id
                srv.send_sync("executing", {"node": node_id, "display_node": node_id, "prompt_id": run.prompt_id},
                              srv.client_id)
            state = self.objects.setdefault((node_id, class_type), {})
            self.check_interrupt()  # real: before_node_execution()
            if class_type == "KSampler" and srv.oom_left > 0:
                srv.oom_left -= 1
                raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                       "of 79.19 GiB of which 1.06 GiB is free.")
            call = NodeCall(data, node_id, state, srv.env, self._progress_hook(run, node_id), self.check_interrupt,
                            srv.text_sender(node_id))
            result = await definition.run(call)
            self._store_result(run, node_id, key, result)
        except InterruptProcessingError:
            log.info("Processing interrupted")
            return NodeFailure(node_id, None)
        except Exception as ex:
            log.error("!!! Exception during processing !!! %s\n%s", ex, traceback.format_exc())
            return NodeFailure(node_id, _error_details(node_id, ex, data))
        self._progress_finish(run, node_id)
        run.executed.append(node_id)
        return None

    def _store_result(self, run: Run, node_id: str, key: str, result: NodeOutput) -> None:
        if result.ui:
            meta = {"node_id": node_id, "display_node": node_id, "parent_node": None, "real_node_id": node_id}
            run.ui_outputs[node_id] = self.ui[key] = {"meta": meta, "output": result.ui}
            if self.server.client_id is not None:
                self.server.send_sync("executed", {
                    "node": node_id, "display_node": node_id, "output": result.ui, "prompt_id": run.prompt_id,
                }, self.server.client_id)
        self.outputs[key] = result.result

    def _send_cached(self, run: Run, node_id: str, key: str) -> None:
        cached_ui = self.ui.get(key) or {}
        if self.server.client_id is not None:
            self.server.send_sync("executed", {
                "node": node_id, "display_node": node_id, "output": cached_ui.get("output"),
                "prompt_id": run.prompt_id,
            }, self.server.client_id)
        if cached_ui:
            run.ui_outputs[node_id] = cached_ui
        self._progress_finish(run, node_id)

    def _input_data(self, run: Run, node_id: str, definition: NodeDef) -> dict[str, Any]:
        # real: execution.get_input_data (links resolve to the upstream output, hidden inputs are injected)
        class_inputs = definition.inputs(self.server.folders)
        data: dict[str, Any] = {}
        for name, value in run.prompt[node_id]["inputs"].items():
            if is_link(value):
                upstream = self.outputs.get(run.keys.get(value[0], ""))
                index = int(value[1])
                data[name] = upstream[index] if upstream is not None and index < len(upstream) else None
            elif get_input_info(class_inputs, name)[1] is not None:
                data[name] = value
        hidden = {"PROMPT": run.prompt, "EXTRA_PNGINFO": run.extra_data.get("extra_pnginfo"), "UNIQUE_ID": node_id}
        for name, kind in class_inputs.get("hidden", {}).items():
            data[name] = hidden.get(kind)
        return data

    def check_interrupt(self) -> None:
        # real: throw_exception_if_processing_interrupted() - the flag is consumed when it fires
        if self.server.interrupt_flag:
            self.server.interrupt_flag = False
            raise InterruptProcessingError()

    def _progress_hook(self, run: Run, node_id: str) -> Callable[[int, int, Preview | None], None]:
        def hook(value: int, total: int, preview: Preview | None) -> None:
            # real: main.hijack_progress hook + WebUIProgressHandler.update_handler, in that frame order
            self.check_interrupt()
            self._progress_set(run, node_id, "running", value, total)
            srv = self.server
            new_style = srv.supports_preview_metadata(srv.client_id)
            if preview is not None and new_style:
                srv.send_preview_with_metadata(preview, run.prompt_id, node_id)
            progress = {"value": value, "max": total, "prompt_id": run.prompt_id, "node": node_id}
            srv.send_sync("progress", progress, srv.client_id)
            if preview is not None and not new_style:
                srv.send_preview_legacy(preview)

        return hook

    def _progress_start(self, run: Run, node_id: str) -> None:
        self._progress_set(run, node_id, "running", 0.0, 1.0)

    def _progress_finish(self, run: Run, node_id: str) -> None:
        entry = run.progress.get(node_id, {"max": 1})
        self._progress_set(run, node_id, "finished", entry["max"], entry["max"])

    def _progress_set(self, run: Run, node_id: str, state: str, value: float, total: float) -> None:
        run.progress[node_id] = {"value": value, "max": total, "state": state}
        nodes = {
            n: {**entry, "node_id": n, "prompt_id": run.prompt_id, "display_node_id": n, "parent_node_id": None,
                "real_node_id": n}
            for n, entry in run.progress.items()
        }
        self.server.send_sync("progress_state", {"prompt_id": run.prompt_id, "nodes": nodes}, self.server.client_id)

    def _handle_error(self, run: Run, failure: NodeFailure) -> None:
        message: dict[str, Any] = {
            "prompt_id": run.prompt_id,
            "node_id": failure.node_id,
            "node_type": run.prompt[failure.node_id]["class_type"],
            "executed": list(run.executed),
        }
        if failure.details is None:
            self.add_message("execution_interrupted", message, broadcast=True)
            return
        for name in ("exception_message", "exception_type", "traceback", "current_inputs"):
            message[name] = failure.details[name]
        message["current_outputs"] = list(run.prompt)[::-1]  # real: a set of all node ids in the prompt
        self.add_message("execution_error", message, broadcast=False)


def _error_details(node_id: str, ex: Exception, data: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "exception_message": f"{ex}\n",
        "exception_type": full_type_name(type(ex)),
        "traceback": traceback.format_tb(ex.__traceback__),
        "current_inputs": {k: [format_value(v)] for k, v in (data or {}).items()},
    }


def _cycle_details(node_id: str) -> dict[str, Any]:
    return {"node_id": node_id, "exception_message": "Dependency cycle detected",
            "exception_type": "graph.DependencyCycleError", "traceback": [], "current_inputs": []}
