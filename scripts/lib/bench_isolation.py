"""Cost of selfix.isolation per job on a synthetic node (see scripts/bench-isolation)."""

from __future__ import annotations

import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from selfix import isolation as iso  # noqa: E402


def build(root: Path, loras: int, tasks: int) -> iso.Roots:
    roots = iso.Roots(root / "models", root / "loras", root / "input", root / "output", root / "temp")
    for kind, count in (("checkpoints", 40), ("loras", 200), ("vae", 10), ("controlnet", 30), ("upscale_models", 10)):
        folder = root / "models" / kind
        folder.mkdir(parents=True)
        for i in range(count):
            (folder / f"{kind}-{i}.safetensors").write_bytes(b"")
    (root / "loras").mkdir()
    for _ in range(loras):
        (root / "loras" / f"{secrets.token_hex(16)}.safetensors").write_bytes(b"")
    for t in range(tasks):
        for place, names in (("input", ("pose.png", "face.png")), ("output", ("out_00001_.png", "out_00002_.png"))):
            folder = root / place / "selfix" / f"task-{t}"
            folder.mkdir(parents=True)
            for name in names:
                (folder / name).write_bytes(b"")
    (root / "temp" / "temp").mkdir(parents=True)
    return roots


def workflow(nodes: int) -> dict[str, object]:
    wf: dict[str, object] = {}
    for i in range(nodes):
        wf[str(i)] = {"class_type": "LoraLoader", "inputs": {
            "model": [str(max(i - 1, 0)), 0], "lora_name": "mine.safetensors", "strength_model": 0.8,
            "text": "a portrait, 35mm, soft light", "ckpt_name": "checkpoints-3.safetensors"}}
    return wf


def main() -> None:
    loras = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    tasks = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    with tempfile.TemporaryDirectory() as tmp:
        roots = build(Path(tmp), loras, tasks)
        keys = [f"users/u{i}/models/style-{i}.safetensors" for i in range(loras)]
        grant = iso.grant_for_task("t-x", "u-x", ["users/u-x/models/mine.safetensors"], [])
        wf = workflow(40)
        list_s, check_s = [], []
        for _ in range(20):
            began = time.perf_counter()
            listing = iso.list_roots(roots, keys)
            list_s.append(time.perf_counter() - began)
            began = time.perf_counter()
            iso.check_workflow(wf, grant, listing, iso.NodePolicy())
            check_s.append(time.perf_counter() - began)
        print(f"node: {loras} cached LoRAs, {tasks} task folders (2 inputs + 2 outputs each), 290 base models")
        print(f"listing: median {statistics.median(list_s) * 1e3:.1f} ms, max {max(list_s) * 1e3:.1f} ms; "
              f"check of a 40-node workflow: median {statistics.median(check_s) * 1e3:.2f} ms "
              f"({len(listing.tenant)} tenant names, {len(listing.shared)} shared)")


if __name__ == "__main__":
    main()
