"""A faithful test double of a ComfyUI 0.3.64 server: HTTP API, WebSocket events, queue, history, caching.

Run it like the real server:
    python -m selfix.testing.fake_comfyui --port P --output-dir D --input-dir I --models-dir M

Behaviour mirrors the real server as documented in comfyui-api.md and as recorded in the capture transcripts:
the same routes (also under /api), status codes, JSON bodies, WebSocket frame types and their order, the
validation errors, the execution order of nodes and ComfyUI's "classic" output cache. Nodes do cheap Pillow
work instead of running models. Comments starting with "real:" name the ComfyUI code path being mirrored.

Hooks the real server does not have live under /fake/ so they can never be mistaken for real routes:
GET /fake/stats, POST /fake/vram and POST /fake/oom. `--exec-log FILE` and `--startup-delay S` are test aids as well.

One module per concern (at run time a module imports only from those above it, so there is no cycle):
    core          the version it mimics, shared type aliases, helpers mirroring small real functions
    folder_paths  input/output/temp folders, model search paths, annotated names, file lists, save paths
    nodes/        the node catalogue (base, image, sampling, media) and its registry
    validation    POST /prompt validation and node_errors (real: execution.validate_prompt)
    graph         execution order and cache keys
    execution     the executor: one prompt's nodes, cache, progress and previews, interrupts
    server        FakeComfy: queue, history, WebSocket clients and frames, the worker
    routes        the HTTP and WebSocket routes, middlewares, make_app
    cli           the command line, Config, serve() and main() (`__main__` runs main)
"""

from selfix.testing.fake_comfyui.cli import build_parser, config_from_args, main, serve
from selfix.testing.fake_comfyui.folder_paths import FolderPaths
from selfix.testing.fake_comfyui.nodes.media import write_fake_flac, write_fake_mp4, write_fake_webm
from selfix.testing.fake_comfyui.nodes.registry import build_registry
from selfix.testing.fake_comfyui.routes import make_app
from selfix.testing.fake_comfyui.server import Config, FakeComfy
from selfix.testing.fake_comfyui.validation import Validator

__all__ = [
    "Config", "FakeComfy", "FolderPaths", "Validator", "build_parser", "build_registry", "config_from_args",
    "main", "make_app", "serve", "write_fake_flac", "write_fake_mp4", "write_fake_webm",
]
