"""A randomly initialised SD1.5 checkpoint and a LoRA for it, so that tests can run a real sampler in a REAL
ComfyUI without downloading weights (tests/test_real_comfyui.py).

Two halves in one file:
- `ensure_models(comfyui_dir, python)` runs in the test's interpreter (no torch there): it returns the cached files,
  building them first by running this file as a script with ComfyUI's interpreter, cwd at the ComfyUI checkout.
- The script builds every tensor from ComfyUI's own model classes (comfy.supported_models.SD15's UNet, the sd1_clip
  CLIP-L, the SD VAE), instantiated on torch's meta device for their keys and shapes only, so the checkpoint is the
  layout CheckpointLoaderSimple detects as SD1.5, and the LoRA holds only keys ComfyUI's LoRA key map knows (it checks
  them against comfy.lora's map before writing, so the real LoraLoader never logs "lora key not loaded").

The files are fp16 safetensors (~630 MB for the checkpoint, ~100 KB for the LoRA) in $SELFIX_CACHE/real-comfy (default
~/.cache/selfix/real-comfy), written as *.part then renamed, and reused across runs; VERSION names them, so a change
here builds new ones instead of trusting old files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VERSION = 1
CHECKPOINT = f"selfix-random-sd15-v{VERSION}.safetensors"
LORA = f"selfix-random-sd15-lora-v{VERSION}.safetensors"
SEED = 1202
LORA_RANK = 4
# Kohya-style names, as SD1.5 LoRAs in the wild spell them (diffusers module paths with "_"): UNet self- and
# cross-attention, a feed-forward, and the text encoder's first and last layers (both used by CLIPTextEncode).
LORA_MODULES = (
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0",
    "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_2",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_te_text_model_encoder_layers_11_mlp_fc1",
)
# SD1.5's UNet (comfy/model_detection.py:unet_config_from_diffusers_unet, SD15) cut to two levels of one res block:
# ComfyUI detects the block structure from the keys and matches SD15 on model_channels, context_dim and the rest of
# comfy.supported_models.SD15.unet_config, so it loads as SD1.5 (EPS, SD15 latents). The full UNet (860 M weights,
# 3.3 GB as fp32 on a CPU) takes 2-12 s a step on a shared 2-core CPU; this one (~60 M) a fraction of a second.
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1], "use_temporal_attention": False, "use_temporal_resblock": False,
}
# The default SD1.x VAE (comfy/sd.py:VAE.__init__ picks it for a checkpoint with these keys).
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


@dataclass(frozen=True)
class TinyModels:
    checkpoint: Path
    lora: Path
    lora_modules: tuple[str, ...]


def cache_dir() -> Path:
    return Path(os.environ.get("SELFIX_CACHE") or Path.home() / ".cache" / "selfix") / "real-comfy"


def ensure_models(comfyui_dir: str, python: str, timeout: float = 900) -> TinyModels:
    """The cached checkpoint and LoRA, built first (a minute or two on a CPU) when either is missing."""
    folder = cache_dir()
    models = TinyModels(folder / CHECKPOINT, folder / LORA, LORA_MODULES)
    if not (models.checkpoint.exists() and models.lora.exists()):
        subprocess.run([python, str(Path(__file__).resolve()), "--out", str(folder)], cwd=comfyui_dir, check=True,
                       timeout=timeout)
    return models


# --- the builder, run with ComfyUI's interpreter ---------------------------------------------------------------


def comfy_on_cpu() -> None:
    """ComfyUI importable from its checkout (the cwd), its device fixed to the CPU before model_management looks
    for a GPU at import."""
    here = Path(__file__).resolve().parent  # run as a script: its folder (tests/servers) would shadow modules
    sys.path[:] = [os.getcwd()] + [p for p in sys.path if Path(p or ".").resolve() != here]
    import comfy.cli_args

    comfy.cli_args.args.cpu = True


def layout() -> tuple[dict[str, Any], dict[str, str], Any]:
    """The checkpoint's keys → meta tensors, ComfyUI's LoRA key → model key map, and the model config ComfyUI
    detects from those keys."""
    import comfy.lora
    import comfy.model_detection
    import comfy.sd1_clip
    import comfy.supported_models
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.device("meta"):
        model = comfy.supported_models.SD15(dict(SD15_UNET)).get_model({})
        clip = comfy.sd1_clip.SD1ClipModel(device="meta")
        vae = AutoencoderKL(ddconfig=dict(SD_VAE), embed_dim=4)
    state = model.state_dict_for_saving(clip.state_dict(), vae.state_dict())
    key_map = comfy.lora.model_lora_keys_clip(clip, comfy.lora.model_lora_keys_unet(model, {}))
    detected = comfy.model_detection.model_config_from_unet(state, "model.diffusion_model.")
    return state, key_map, detected


def random_like(name: str, shape: tuple[int, ...], gen: Any) -> Any:
    """Norm weights 1, biases 0, matrices N(0, 1/fan_in): activations stay O(1) through every layer, so the
    sampler and the VAE produce finite pictures (noise, but no NaN) from random weights."""
    import torch

    if len(shape) == 1 and name.endswith(".weight"):
        return torch.ones(shape, dtype=torch.float16)
    if len(shape) <= 1:
        return torch.zeros(shape, dtype=torch.float16)
    fan_in = 1
    for dim in shape[1:]:
        fan_in *= dim
    return (torch.randn(shape, generator=gen) / fan_in ** 0.5).to(torch.float16)


def build_checkpoint(state: dict[str, Any], target: Path, gen: Any) -> None:
    from safetensors.torch import save_file

    tensors = {name: random_like(name, tuple(meta.shape), gen) for name, meta in sorted(state.items())}
    write(target, lambda part: save_file(tensors, str(part), metadata={"selfix": "random SD1.5 for tests"}))


def build_lora(state: dict[str, Any], key_map: dict[str, str], target: Path, gen: Any) -> None:
    """Rank-LORA_RANK down/up pairs (alpha = rank) whose product is as large as the weight it patches, so the
    image visibly changes with the LoRA applied."""
    import torch
    from safetensors.torch import save_file

    unknown = [m for m in LORA_MODULES if m not in key_map]
    if unknown:
        raise SystemExit(f"ComfyUI's LoRA key map has no {unknown}")
    tensors = {}
    for module in LORA_MODULES:
        out_features, in_features = state[prefixed(key_map[module])].shape
        down = torch.randn((LORA_RANK, in_features), generator=gen) / in_features ** 0.5
        up = torch.randn((out_features, LORA_RANK), generator=gen) / LORA_RANK ** 0.5
        tensors[f"{module}.lora_down.weight"] = down.to(torch.float16)
        tensors[f"{module}.lora_up.weight"] = up.to(torch.float16)
        tensors[f"{module}.alpha"] = torch.tensor(float(LORA_RANK), dtype=torch.float16)
    write(target, lambda part: save_file(tensors, str(part), metadata={"ss_network_dim": str(LORA_RANK)}))


def prefixed(model_key: str) -> str:
    """A LoRA map value (a key of the model objects) as the checkpoint spells it."""
    if model_key.startswith("diffusion_model."):
        return "model." + model_key
    return "cond_stage_model." + model_key.removeprefix("clip_l.")


def write(target: Path, save: Any) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f"{target.name}.{os.getpid()}.part")  # two test sessions may build at once
    save(part)
    os.replace(part, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=cache_dir())
    args = parser.parse_args(argv)
    comfy_on_cpu()
    import comfy.supported_models
    import torch

    state, key_map, detected = layout()
    if type(detected) is not comfy.supported_models.SD15 or any(
            detected.unet_config.get(k) != v for k, v in SD15_UNET.items()):
        raise SystemExit(f"ComfyUI detects these keys as {type(detected).__name__} {detected.unet_config}")
    gen = torch.Generator().manual_seed(SEED)
    build_checkpoint(state, args.out / CHECKPOINT, gen)
    build_lora(state, key_map, args.out / LORA, gen)
    print(json.dumps({"checkpoint": str(args.out / CHECKPOINT), "tensors": len(state), "lora": str(args.out / LORA),
                      "loraModules": list(LORA_MODULES)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
