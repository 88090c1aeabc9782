"""The node table of one server (custom nodes left out with --disable-all-custom-nodes, as for real) and the
/object_info entry of a node."""

from __future__ import annotations

from typing import Any

from selfix.testing.fake_comfyui.folder_paths import FolderPaths
from selfix.testing.fake_comfyui.nodes.base import NodeDef
from selfix.testing.fake_comfyui.nodes.image import SAVE_IMAGE_WEBSOCKET, image_nodes
from selfix.testing.fake_comfyui.nodes.media import VHS_VIDEO_COMBINE, media_nodes
from selfix.testing.fake_comfyui.nodes.sampling import model_nodes, sampling_nodes


def build_registry(custom_nodes: bool) -> dict[str, NodeDef]:
    # SaveImageWebsocket ships as a custom node, so --disable-all-custom-nodes removes it (as for real).
    defs = image_nodes() + model_nodes() + sampling_nodes() + ([SAVE_IMAGE_WEBSOCKET] if custom_nodes else [])
    defs += media_nodes() + ([VHS_VIDEO_COMBINE] if custom_nodes else [])  # branch outputs
    return {d.name: d for d in defs}


def node_info(node: NodeDef, folders: FolderPaths) -> dict[str, Any]:
    # real: server.py node_info (key order matters for byte-identical answers)
    inputs = node.inputs(folders)
    info: dict[str, Any] = {
        "input": inputs,
        "input_order": {key: list(value) for key, value in inputs.items()},
        "output": list(node.returns),
        "output_is_list": [False] * len(node.returns),
        "output_name": list(node.returns),
        "name": node.name,
        "display_name": node.display_name,
        "description": node.description,
        "python_module": node.python_module,
        "category": node.category,
        "output_node": node.output_node,
    }
    if node.output_tooltips is not None:
        info["output_tooltips"] = list(node.output_tooltips)
    return info
