"""Model and sampling nodes (real: nodes.py): checkpoint and LoRA loaders, CLIPTextEncode, EmptyLatentImage,
KSampler (steps, latent previews, interrupts) and VAEDecode (a deterministic picture of seed, prompt and LoRAs)."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import random
from typing import Any

from PIL import Image, ImageDraw

from selfix.testing.fake_comfyui.core import InputTypes, Preview
from selfix.testing.fake_comfyui.folder_paths import FolderPaths, check_model_file
from selfix.testing.fake_comfyui.nodes.base import (
    MAX_RESOLUTION,
    ExecEnv,
    ModelRef,
    NodeCall,
    NodeDef,
    NodeOutput,
    int_input,
    static_inputs,
)

SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm",
    "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
]
SCHEDULERS = [
    "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic",
    "kl_optimal",
]


async def run_checkpoint_loader(call: NodeCall) -> NodeOutput:
    name = call.args["ckpt_name"]
    check_model_file(call.env.folders.full_path_or_raise("checkpoints", name))
    return NodeOutput((ModelRef("MODEL", name), ModelRef("CLIP", name), ModelRef("VAE", name)))


def _with_lora(ref: ModelRef, name: str, strength: float) -> ModelRef:
    return ModelRef(ref.kind, ref.ckpt, ref.loras + ((name, strength),))


async def run_lora_loader(call: NodeCall) -> NodeOutput:
    a = call.args
    if a["strength_model"] == 0 and a["strength_clip"] == 0:
        return NodeOutput((a["model"], a["clip"]))
    check_model_file(call.env.folders.full_path_or_raise("loras", a["lora_name"]))
    model = _with_lora(a["model"], a["lora_name"], a["strength_model"])
    return NodeOutput((model, _with_lora(a["clip"], a["lora_name"], a["strength_clip"])))


async def run_lora_loader_model_only(call: NodeCall) -> NodeOutput:
    a = call.args
    if a["strength_model"] == 0:
        return NodeOutput((a["model"],))
    check_model_file(call.env.folders.full_path_or_raise("loras", a["lora_name"]))
    return NodeOutput((_with_lora(a["model"], a["lora_name"], a["strength_model"]),))


async def run_clip_text_encode(call: NodeCall) -> NodeOutput:
    clip = call.args["clip"]
    if clip is None:
        raise RuntimeError(
            "ERROR: clip input is invalid: None\n\nIf the clip is from a checkpoint loader node your checkpoint "
            "does not contain a valid clip or text encoder model."
        )
    return NodeOutput(({"text": call.args["text"], "clip": clip},))


async def run_empty_latent(call: NodeCall) -> NodeOutput:
    a = call.args
    return NodeOutput(({"width": a["width"], "height": a["height"], "batch_size": a["batch_size"]},))


def latent_preview(env: ExecEnv, latent: dict[str, Any], seed: int, step: int) -> Preview | None:
    if env.preview_method == "none":
        return None
    size = (max(1, latent["width"] // 8), max(1, latent["height"] // 8))
    shade = (seed * 37 + step * 23) % 256
    return ("JPEG", Image.new("RGB", size, (shade, 255 - shade, (shade * 7) % 256)), env.preview_size)


async def run_ksampler(call: NodeCall) -> NodeOutput:
    a = call.args
    steps = int(a["steps"])
    latent = dict(a["latent_image"])
    for step in range(steps):
        call.check_interrupt()
        await asyncio.sleep(call.env.seconds_per_step)  # also yields, so HTTP requests are served meanwhile
        call.progress(step + 1, steps, latent_preview(call.env, latent, int(a["seed"]), step))
    latent.update(seed=a["seed"], steps=steps, model=a["model"], positive=a["positive"], negative=a["negative"])
    return NodeOutput((latent,))


def render_latent(latent: dict[str, Any]) -> Image.Image:
    """A cheap deterministic picture: background and shapes depend on seed, prompt text and LoRAs."""
    key = json.dumps([latent.get("seed"), str(latent.get("positive")), str(latent.get("model"))])
    rng = random.Random(hashlib.sha256(key.encode()).digest())
    width, height = latent["width"], latent["height"]
    img = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        box = (x0, y0, x0 + rng.randrange(1, width + 1), y0 + rng.randrange(1, height + 1))
        draw.ellipse(box, fill=tuple(rng.randrange(256) for _ in range(3)))
    return img


async def run_vae_decode(call: NodeCall) -> NodeOutput:
    latent = call.args["samples"]
    return NodeOutput(([render_latent(latent) for _ in range(latent["batch_size"])],))


LORA_LOADER_INPUTS = {
    "model": ("MODEL", {"tooltip": "The diffusion model the LoRA will be applied to."}),
    "clip": ("CLIP", {"tooltip": "The CLIP model the LoRA will be applied to."}),
    "strength_model": ("FLOAT", {
        "default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
        "tooltip": "How strongly to modify the diffusion model. This value can be negative.",
    }),
    "strength_clip": ("FLOAT", {
        "default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
        "tooltip": "How strongly to modify the CLIP model. This value can be negative.",
    }),
}


def lora_loader_inputs(folders: FolderPaths) -> InputTypes:
    # real: INPUT_TYPES() is called for every validation, so the list reflects the disk right now
    s = copy.deepcopy(LORA_LOADER_INPUTS)
    lora_name = (folders.filename_list("loras"), {"tooltip": "The name of the LoRA."})
    required = {"model": s["model"], "clip": s["clip"], "lora_name": lora_name}
    return {"required": {**required, "strength_model": s["strength_model"], "strength_clip": s["strength_clip"]}}


def lora_model_only_inputs(folders: FolderPaths) -> InputTypes:
    strength = ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01})
    lora_name = (folders.filename_list("loras"),)
    return {"required": {"model": ("MODEL",), "lora_name": lora_name, "strength_model": strength}}


def checkpoint_inputs(folders: FolderPaths) -> InputTypes:
    tooltip = {"tooltip": "The name of the checkpoint (model) to load."}
    return {"required": {"ckpt_name": (folders.filename_list("checkpoints"), tooltip)}}


KSAMPLER_INPUTS: InputTypes = {"required": {
    "model": ("MODEL", {"tooltip": "The model used for denoising the input latent."}),
    "seed": int_input(0, 0, 0xFFFFFFFFFFFFFFFF, None, control_after_generate=True,
                 tooltip="The random seed used for creating the noise."),
    "steps": int_input(20, 1, 10000, None, tooltip="The number of steps used in the denoising process."),
    "cfg": ("FLOAT", {
        "default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
        "tooltip": "The Classifier-Free Guidance scale balances creativity and adherence to the prompt. Higher "
        "values allow more flexibility in the generated image, but too high values can negatively impact prompt "
        "adherence.",
    }),
    "sampler_name": (SAMPLERS, {"tooltip": "The algorithm used when sampling, this can affect the quality, "
                                "speed, and style of the generated output."}),
    "scheduler": (SCHEDULERS, {"tooltip": "The scheduler controls how noise is gradually removed to form the "
                               "image."}),
    "positive": ("CONDITIONING", {"tooltip": "The conditioning describing the attributes you want to include "
                                  "in the image."}),
    "negative": ("CONDITIONING", {"tooltip": "The conditioning describing the attributes you want to exclude "
                                  "from the image."}),
    "latent_image": ("LATENT", {"tooltip": "The latent image to denoise."}),
    "denoise": ("FLOAT", {
        "default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
        "tooltip": "The amount of denoising applied, lower values will maintain the structure of the initial "
        "image allowing for image to image sampling.",
    }),
}}


def model_nodes() -> list[NodeDef]:
    lora_tooltips = ("The modified diffusion model.", "The modified CLIP model.")
    lora_description = (
        "LoRAs are used to modify diffusion and CLIP models, altering the way in which latents are denoised such "
        "as applying styles. Multiple LoRA nodes can be linked together."
    )
    return [
        NodeDef("CheckpointLoaderSimple", "Load Checkpoint", "loaders", checkpoint_inputs,
                ("MODEL", "CLIP", "VAE"), run_checkpoint_loader,
                "Loads a diffusion model checkpoint, diffusion models are used to denoise latents.",
                output_tooltips=("The model used for denoising latents.",
                                 "The CLIP model used for encoding text prompts.",
                                 "The VAE model used for encoding and decoding images to and from latent space.")),
        NodeDef("LoraLoader", "Load LoRA", "loaders", lora_loader_inputs, ("MODEL", "CLIP"), run_lora_loader,
                lora_description, output_tooltips=lora_tooltips),
        NodeDef("LoraLoaderModelOnly", "LoraLoaderModelOnly", "loaders", lora_model_only_inputs, ("MODEL",),
                run_lora_loader_model_only, lora_description, output_tooltips=lora_tooltips),
    ]


def sampling_nodes() -> list[NodeDef]:
    return [
        NodeDef("CLIPTextEncode", "CLIP Text Encode (Prompt)", "conditioning", static_inputs({"required": {
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "The text to be encoded."}),
            "clip": ("CLIP", {"tooltip": "The CLIP model used for encoding the text."}),
        }}), ("CONDITIONING",), run_clip_text_encode,
            "Encodes a text prompt using a CLIP model into an embedding that can be used to guide the diffusion "
            "model towards generating specific images.",
            output_tooltips=("A conditioning containing the embedded text used to guide the diffusion model.",)),
        NodeDef("EmptyLatentImage", "Empty Latent Image", "latent", static_inputs({"required": {
            "width": int_input(512, 16, MAX_RESOLUTION, 8, tooltip="The width of the latent images in pixels."),
            "height": int_input(512, 16, MAX_RESOLUTION, 8, tooltip="The height of the latent images in pixels."),
            "batch_size": int_input(1, 1, 4096, None, tooltip="The number of latent images in the batch."),
        }}), ("LATENT",), run_empty_latent, "Create a new batch of empty latent images to be denoised via sampling.",
            output_tooltips=("The empty latent image batch.",)),
        NodeDef("KSampler", "KSampler", "sampling", static_inputs(KSAMPLER_INPUTS), ("LATENT",), run_ksampler,
                "Uses the provided model, positive and negative conditioning to denoise the latent image.",
                output_tooltips=("The denoised latent.",)),
        NodeDef("VAEDecode", "VAE Decode", "latent", static_inputs({"required": {
            "samples": ("LATENT", {"tooltip": "The latent to be decoded."}),
            "vae": ("VAE", {"tooltip": "The VAE model used for decoding the latent."}),
        }}), ("IMAGE",), run_vae_decode, "Decodes latent images back into pixel space images.",
            output_tooltips=("The decoded image.",)),
    ]
