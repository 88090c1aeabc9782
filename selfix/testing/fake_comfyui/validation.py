"""Validation of a posted prompt (real: execution.validate_prompt / validate_inputs): the same error types,
node_errors and dependent_outputs as ComfyUI, and literal inputs converted in place like the real one does."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from selfix.testing.fake_comfyui.core import InputTypes, api_error, full_type_name
from selfix.testing.fake_comfyui.folder_paths import FolderPaths
from selfix.testing.fake_comfyui.nodes.base import NodeDef, get_input_info

log = logging.getLogger("comfyui")

NodeValidation = tuple[bool, list[dict[str, Any]], str]

CONVERTERS: dict[str, Callable[[Any], Any]] = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}


def validate_node_input(received_type: Any, input_type: Any) -> bool:
    if received_type == input_type:
        return True
    if not isinstance(received_type, str) or not isinstance(input_type, str):
        return False
    received = {t.strip() for t in received_type.split(",")}
    wanted = {t.strip() for t in input_type.split(",")}
    return "*" in received or "*" in wanted or bool(received & wanted)


@dataclass
class Validation:
    ok: bool
    error: dict[str, Any] | None
    outputs: list[str]
    node_errors: dict[str, Any]


class Validator:
    """One validation pass over a prompt; mutates literal inputs into their converted values like the real one."""

    def __init__(self, registry: dict[str, NodeDef], folders: FolderPaths, prompt: Any) -> None:
        self.registry = registry
        self.folders = folders
        self.prompt = prompt
        self.validated: dict[Any, NodeValidation] = {}

    def run(self, partial: Any) -> Validation:
        outputs = self._collect_outputs(partial)
        if isinstance(outputs, dict):
            return Validation(False, outputs, [], {})
        if not outputs:
            return Validation(False, api_error("prompt_no_outputs", "Prompt has no outputs", "", {}), [], {})
        good: list[str] = []
        failed: list[tuple[str, list[dict[str, Any]]]] = []
        node_errors: dict[str, Any] = {}
        for output in outputs:
            valid, reasons = self._validate_output(output)
            if valid:
                good.append(output)
                continue
            log.error("Failed to validate prompt for output %s:", output)
            failed.append((output, reasons))
            self._collect_node_errors(output, node_errors)
            log.error("Output will be ignored")
        if good:
            return Validation(True, None, good, node_errors)
        details = "\n".join(f"{r['message']}: {r['details']}" for _, reasons in failed for r in reasons)
        error = api_error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details, {})
        return Validation(False, error, [], node_errors)

    def _collect_outputs(self, partial: Any) -> list[str] | dict[str, Any]:
        outputs: list[str] = []
        for node_id in self.prompt:
            if "class_type" not in self.prompt[node_id]:
                message = "Cannot execute because a node is missing the class_type property."
                return api_error("invalid_prompt", message, f"Node ID '#{node_id}'", {})
            class_type = self.prompt[node_id]["class_type"]
            node = self.registry.get(class_type)
            if node is None:
                message = f"Cannot execute because node {class_type} does not exist."
                return api_error("invalid_prompt", message, f"Node ID '#{node_id}'", {})
            if node.output_node and (partial is None or node_id in partial):
                outputs.append(node_id)
        # real: a set; reversed prompt order is what every capture shows (e.g. ["4", "3"]).
        return outputs[::-1]

    def _validate_output(self, output: str) -> tuple[bool, list[dict[str, Any]]]:
        try:
            valid, reasons, _ = self.validate_inputs(output)
            return valid, reasons
        except Exception as ex:
            reasons = [api_error("exception_during_validation", "Exception when validating node", str(ex), {
                "exception_type": full_type_name(type(ex)),
                "traceback": traceback.format_tb(ex.__traceback__),
            })]
            self.validated[output] = (False, reasons, output)
            return False, reasons

    def _collect_node_errors(self, output: str, node_errors: dict[str, Any]) -> None:
        # real quirk kept: every failed node seen so far gets this output appended to dependent_outputs
        for node_id, (valid, reasons, _) in self.validated.items():
            if valid is not True and reasons:
                if node_id not in node_errors:
                    class_type = self.prompt[node_id]["class_type"]
                    node_errors[node_id] = {"errors": reasons, "dependent_outputs": [], "class_type": class_type}
                    for reason in reasons:
                        log.error("* %s %s: %s: %s", class_type, node_id, reason["message"], reason["details"])
                node_errors[node_id]["dependent_outputs"].append(output)

    def validate_inputs(self, unique_id: Any) -> NodeValidation:
        if unique_id in self.validated:
            return self.validated[unique_id]
        inputs = self.prompt[unique_id]["inputs"]
        node = self.registry[self.prompt[unique_id]["class_type"]]
        class_inputs = node.inputs(self.folders)
        errors: list[dict[str, Any]] = []
        valid = True
        for name in [*class_inputs.get("required", {}), *class_inputs.get("optional", {})]:
            outcome = self._check_input(node, class_inputs, inputs, name)
            if outcome is False:
                valid = False
            elif isinstance(outcome, dict):
                errors.append(outcome)
        errors.extend(self._custom_validation(node, inputs))
        result: NodeValidation = (not errors and valid, errors, unique_id)
        self.validated[unique_id] = result
        return result

    def _check_input(
        self, node: NodeDef, class_inputs: InputTypes, inputs: dict[str, Any], name: str
    ) -> dict[str, Any] | bool:
        input_type, category, extra = get_input_info(class_inputs, name)
        if name not in inputs:
            if category == "required":
                return api_error("required_input_missing", "Required input is missing", name, {"input_name": name})
            return True
        info = (input_type, extra)
        if isinstance(inputs[name], list):
            return self._check_link(node, name, inputs[name], info)
        return self._check_value(node, inputs, name, info)

    def _check_link(self, node: NodeDef, name: str, val: list[Any], info: tuple[Any, Any]) -> dict[str, Any] | bool:
        if len(val) != 2:
            message = "Bad linked input, must be a length-2 list of [node_id, slot_index]"
            return api_error("bad_linked_input", message, name,
                        {"input_name": name, "input_config": info, "received_value": val})
        o_id = val[0]
        received_type = self.registry[self.prompt[o_id]["class_type"]].returns[val[1]]
        if "input_types" not in node.validate_args and not validate_node_input(received_type, info[0]):
            details = f"{name}, received_type({received_type}) mismatch input_type({info[0]})"
            return api_error("return_type_mismatch", "Return type mismatch between linked nodes", details, {
                "input_name": name, "input_config": info, "received_type": received_type, "linked_node": val,
            })
        try:
            return self.validate_inputs(o_id)[0] is not False
        except Exception as ex:
            self.validated[o_id] = (False, [_inner_exception(name, info, val, ex)], o_id)
            return False

    def _check_value(
        self, node: NodeDef, inputs: dict[str, Any], name: str, info: tuple[Any, Any]
    ) -> dict[str, Any] | bool:
        input_type, extra = info
        val = inputs[name]
        try:
            if isinstance(val, dict) and "__value__" in val:
                val = inputs[name] = val["__value__"]
            if isinstance(input_type, str) and input_type in CONVERTERS:
                val = inputs[name] = CONVERTERS[input_type](val)
        except Exception as ex:
            return api_error("invalid_input_type", f"Failed to convert an input value to a {input_type} value",
                        f"{name}, {val}, {ex}", {"input_name": name, "input_config": info, "received_value": val,
                                                 "exception_message": str(ex)})
        if name in node.validate_args:
            return True
        return _range_or_combo_error(name, val, input_type, extra, info) or True

    def _custom_validation(self, node: NodeDef, inputs: dict[str, Any]) -> list[dict[str, Any]]:
        if node.validate is None:
            return []
        missing = [x for x in node.validate_args if x not in inputs]
        if missing:  # real: VALIDATE_INPUTS is called without the argument and raises
            raise TypeError(f"{node.name}.VALIDATE_INPUTS() missing 1 required positional argument: '{missing[0]}'")
        args = {x: inputs[x] for x in node.validate_args if not isinstance(inputs[x], list)}
        result = node.validate(self.folders, args)
        if result is True:
            return []
        suffix = "" if result is False else f" - {result}"
        return [api_error("custom_validation_failed", "Custom validation failed for node", f"{x}{suffix}",
                     {"input_name": x}) for x in args]


def _range_or_combo_error(
    name: str, val: Any, input_type: Any, extra: dict[str, Any], info: tuple[Any, Any]
) -> dict[str, Any] | None:
    extra_info = {"input_name": name, "input_config": info, "received_value": val}
    if "min" in extra and val < extra["min"]:
        return api_error("value_smaller_than_min", f"Value {val} smaller than min of {extra['min']}", name, extra_info)
    if "max" in extra and val > extra["max"]:
        return api_error("value_bigger_than_max", f"Value {val} bigger than max of {extra['max']}", name, extra_info)
    if isinstance(input_type, list) and val not in input_type:
        # Long lists (scanned model files) are not echoed back.
        listed = f"(list of length {len(input_type)})" if len(input_type) > 20 else str(input_type)
        config = None if len(input_type) > 20 else info
        return api_error("value_not_in_list", "Value not in list", f"{name}: '{val}' not in {listed}",
                    {"input_name": name, "input_config": config, "received_value": val})
    return None


def _inner_exception(name: str, info: tuple[Any, Any], val: Any, ex: Exception) -> dict[str, Any]:
    return api_error("exception_during_inner_validation", "Exception when validating inner node", str(ex), {
        "input_name": name, "input_config": info, "exception_message": str(ex),
        "exception_type": full_type_name(type(ex)), "traceback": traceback.format_tb(ex.__traceback__),
        "linked_node": val,
    })
