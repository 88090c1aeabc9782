"""selfix.isolation: which file names a workflow may give ComfyUI. Pure cases on a real small folder tree (the node's
MODELS_DIR, LoRA cache, input, output and temp folders), then the LoRA cache's structural side (random names, the
older layout renamed, planted symlinks) on a local store."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from selfix import isolation as iso
from selfix import messages as m
from selfix.loras import LoraCache
from selfix.messages import Limits, TaskError, parse_task, redact_node_errors
from selfix.settings import DEFAULT_NODE_DENYLIST, load
from selfix.storage import LocalStore
from selfix.templates import Catalog
from tests.servers.node_plugin import write_safetensors

VICTIM_KEY = "users/u1/models/tiny_lora.safetensors"
CACHED = "0123456789abcdef0123456789abcdef.safetensors"  # the random name the cache gave u1's LoRA
OWN_KEY = "users/u2/models/mine.safetensors"


@pytest.fixture
def roots(tmp_path: Path) -> iso.Roots:
    """A node in the middle of work: u1's task t1 has a LoRA cached, an input photo, an output and a preview."""
    r = iso.Roots(tmp_path / "models", tmp_path / "loras", tmp_path / "input", tmp_path / "output", tmp_path / "temp")
    assert r.models_dir and r.lora_cache_dir and r.input_dir and r.output_dir and r.temp_dir
    for rel in ("checkpoints/tiny.safetensors", "checkpoints/sd15/v1-5.safetensors", "vae/ae.safetensors",
                "loras/base-style.safetensors", "loras/style.safetensors", "controlnet/canny.safetensors",
                "ultralytics/bbox/face_yolov8m.pt", "upscale_models/4x.pth"):
        write_safetensors(r.models_dir / rel)
    write_safetensors(r.lora_cache_dir / CACHED)
    (r.lora_cache_dir / ".selfix" / "meta").mkdir(parents=True)
    for rel in ("selfix/t1/pose.png",):
        (r.input_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (r.input_dir / rel).write_bytes(b"\x89PNG\r\n\x1a\n")
    (r.output_dir / "selfix" / "t1").mkdir(parents=True)
    (r.output_dir / "selfix" / "t1" / "face_00001_.png").write_bytes(b"png")
    r.temp_dir.mkdir()
    (r.temp_dir / "ComfyUI_temp_abcde_00001_.png").write_bytes(b"png")
    return r


@pytest.fixture
def listing(roots: iso.Roots) -> iso.Listing:
    return iso.list_roots(roots, lora_keys=[VICTIM_KEY, "users/u2/models/style.safetensors"])


GRANT = iso.grant_for_task("t2", "u2", [OWN_KEY], ["photo.png"])
POLICY = iso.NodePolicy()


def node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}


def verdicts(wf: dict[str, Any], listing: iso.Listing, grant: iso.Grant = GRANT,
             policy: iso.NodePolicy = POLICY) -> list[tuple[str, str]]:
    return [(v.node_id, v.code) for v in iso.violations(wf, grant, listing, policy)]


# (class_type, input, value, code): every one would make ComfyUI read a file that is not this task's
REFUSED: list[tuple[str, str, str, str]] = [
    # another user's cached LoRA: by key, by basename, by case variants, by the cache's own file name
    ("LoraLoader", "lora_name", VICTIM_KEY, m.LORA_FORBIDDEN),
    ("LoraLoader", "lora_name", "tiny_lora.safetensors", m.LORA_FORBIDDEN),
    ("LoraLoader", "lora_name", "USERS/U1/models/tiny_lora.safetensors", m.LORA_FORBIDDEN),
    ("LoraLoader", "lora_name", "Tiny_Lora.SAFETENSORS", m.LORA_FORBIDDEN),
    ("LoraLoader", "lora_name", CACHED, m.LORA_FORBIDDEN),
    ("LoraLoader", "lora_name", CACHED.upper(), m.LORA_FORBIDDEN),
    ("LoraLoaderModelOnly", "lora_name", VICTIM_KEY, m.LORA_FORBIDDEN),
    ("LoraLoader", "lora_name", "users/u1/models/not-cached-yet.safetensors", m.LORA_FORBIDDEN),
    ("LoraLoader", "lora_name", "users/u2/models/other-of-mine.safetensors", m.LORA_FORBIDDEN),  # not bound
    # the same through custom loaders' other input names
    ("LoRA Stacker", "lora_name_1", VICTIM_KEY, m.LORA_FORBIDDEN),
    ("LoRA Stacker", "lora_name_3", "tiny_lora.safetensors", m.LORA_FORBIDDEN),
    ("Efficient Loader", "lora_name", CACHED, m.LORA_FORBIDDEN),
    ("XY Input: LoRA", "lora_name_2", VICTIM_KEY, m.LORA_FORBIDDEN),
    ("SomeCustomLoader", "weights", VICTIM_KEY, m.LORA_FORBIDDEN),
    ("CLIPTextEncode", "text", "a portrait <lora:users/u1/models/tiny_lora:0.9>", m.LORA_FORBIDDEN),
    ("CLIPTextEncode", "text", "a portrait <lora:tiny_lora:0.9>", m.LORA_FORBIDDEN),
    # another task's input, output and temp files, plain and annotated
    ("LoadImage", "image", "selfix/t1/pose.png", m.INPUT_FORBIDDEN),
    ("LoadImage", "image", "selfix/t9/not-there-yet.png", m.INPUT_FORBIDDEN),
    ("LoadImage", "image", "SELFIX/t1/pose.png", m.INPUT_FORBIDDEN),
    ("LoadImage", "image", "selfix/t1/pose.png [input]", m.INPUT_FORBIDDEN),
    ("LoadImage", "image", "selfix/t1/face_00001_.png [output]", m.INPUT_FORBIDDEN),
    ("LoadImage", "image", "face_00001_.png [output]", m.INPUT_FORBIDDEN),
    ("LoadImage", "image", "ComfyUI_temp_abcde_00001_.png [temp]", m.INPUT_FORBIDDEN),
    ("LoadImage", "image", "selfix/t2/own-preview.png [temp]", m.INPUT_FORBIDDEN),
    ("LoadImage", "image", "pose.png", m.INPUT_FORBIDDEN),  # not this task's image; another task's file name
    ("LoadImageMask", "image", "selfix/t1/pose.png", m.INPUT_FORBIDDEN),
    # paths that leave a folder
    ("LoadImage", "image", "/etc/passwd", m.INPUT_FORBIDDEN),
    ("LoadImage", "image", "../output/selfix/t1/face_00001_.png", m.INPUT_FORBIDDEN),
    ("LoadImage", "image", "selfix/t2/../t1/pose.png", m.INPUT_FORBIDDEN),
    ("LoadImage", "image", "selfix/./t1/pose.png", m.INPUT_FORBIDDEN),
    ("LoadImage", "image", "selfix//t1/pose.png", m.INPUT_FORBIDDEN),
    ("LoadImage", "image", "selfix\\t1\\pose.png", m.INPUT_FORBIDDEN),
    ("LoadImage", "image", "file:///app/comfy/input/selfix/t1/pose.png", m.INPUT_FORBIDDEN),
    ("LoadImage", "image", "pose.png\x00.png", m.INPUT_FORBIDDEN),
    ("CheckpointLoaderSimple", "ckpt_name", "../loras/users/u1/models/tiny_lora.safetensors", m.MODEL_FORBIDDEN),
    ("CheckpointLoaderSimple", "ckpt_name", "../../output/checkpoints/x.safetensors", m.MODEL_FORBIDDEN),
    ("CheckpointLoaderSimple", "ckpt_name", "/app/loras/" + CACHED, m.MODEL_FORBIDDEN),
    ("CheckpointLoaderSimple", "ckpt_name", "~/models/x.safetensors", m.MODEL_FORBIDDEN),
    ("CheckpointLoaderSimple", "ckpt_name", "C:/models/x.safetensors", m.MODEL_FORBIDDEN),
    ("VAELoader", "vae_name", "..\\vae\\ae.safetensors", m.MODEL_FORBIDDEN),
    ("UNETLoader", "unet_name", "selfix/t1/face_00001_.png", m.INPUT_FORBIDDEN),
    ("ControlNetLoader", "control_net_name", "../../loras/" + CACHED, m.MODEL_FORBIDDEN),
    ("CheckpointLoaderSimple", "ckpt_name", CACHED, m.LORA_FORBIDDEN),  # a cached LoRA through another loader
    ("LoraLoader", "lora_name", "../" + VICTIM_KEY, m.LORA_FORBIDDEN),
]


@pytest.mark.parametrize(("class_type", "name", "value", "code"), REFUSED)
def test_refused_with_the_specific_code_naming_node_and_input(listing: iso.Listing, class_type: str, name: str,
                                                               value: str, code: str) -> None:
    wf = {"4": node("CheckpointLoaderSimple", ckpt_name="tiny.safetensors"), "17": node(class_type, **{name: value})}
    with pytest.raises(TaskError) as err:
        iso.check_workflow(wf, GRANT, listing, POLICY)
    assert err.value.code == code, err.value.message
    assert f"node 17 ({class_type}) input {name!r}" in err.value.message
    assert err.value.node_errors["17"]["errors"][0]["type"] == code
    assert err.value.node_errors["17"]["class_type"] == class_type


def test_there_are_many_refused_cases() -> None:
    assert len(REFUSED) >= 40


# values ComfyUI resolves to the operator's models, to this task's own files, or to nothing: all pass
ALLOWED: list[tuple[str, str, Any]] = [
    ("CheckpointLoaderSimple", "ckpt_name", "tiny.safetensors"),
    ("CheckpointLoaderSimple", "ckpt_name", "sd15/v1-5.safetensors"),
    ("VAELoader", "vae_name", "ae.safetensors"),
    ("LoraLoader", "lora_name", "base-style.safetensors"),  # an operator's base LoRA
    ("LoraLoader", "lora_name", "style.safetensors"),  # shared wins: MODELS_DIR is listed first for loras
    ("ControlNetLoader", "control_net_name", "canny.safetensors"),
    ("UltralyticsDetectorProvider", "model_name", "bbox/face_yolov8m.pt"),
    ("UpscaleModelLoader", "model_name", "4x.pth"),
    ("LoraLoader", "lora_name", OWN_KEY),
    ("LoraLoader", "lora_name", "mine.safetensors"),
    ("LoRA Stacker", "lora_name_1", "mine.safetensors"),
    ("LoadImage", "image", "photo.png"),
    ("LoadImage", "image", "selfix/t2/photo.png"),
    ("LoadImage", "image", "selfix/t2/face_00001_.png [output]"),
    ("SaveImage", "filename_prefix", "selfix/t2/face"),
    ("CheckpointLoaderSimple", "ckpt_name", "missing.safetensors"),  # ComfyUI answers value_not_in_list
    ("CheckpointLoaderSimple", "ckpt_name", "nope"),
    ("Efficient Loader", "lora_name", "None"),
    ("Efficient Loader", "vae_name", "Baked VAE"),
    ("DWPreprocessor", "bbox_detector", "yolox_l.onnx"),  # controlnet_aux's own fixed choices
    ("CLIPTextEncode", "text", "a photo of a cat / dog, 8k, highly detailed"),
    ("CLIPTextEncode", "text", "portrait of a woman\nstyle: selfix/t1/pose.png"),  # multi-line prose
    ("CLIPTextEncode", "text", "pose"),
    ("CLIPTextEncode", "text", "photo.png is what I uploaded"),
    ("CLIPTextEncode", "text", "<lora:mine:0.8> a portrait"),
    ("CLIPTextEncode", "text", "<lora:base-style:0.5> a portrait"),
    ("KSampler", "sampler_name", "dpmpp_2m"),
    ("ImageScale", "upscale_method", "nearest-exact"),
    ("LoadImageFromUrl", "url", "https://example.com/a.png"),
    ("KSampler", "model", ["4", 0]),
    ("CustomList", "choices", ["a cat", 3, {"nested": "mine.safetensors"}]),
]


@pytest.mark.parametrize(("class_type", "name", "value"), ALLOWED)
def test_allowed_names_and_prompt_text_pass(listing: iso.Listing, class_type: str, name: str, value: Any) -> None:
    iso.check_workflow({"1": node(class_type, **{name: value})}, GRANT, listing, POLICY)


def test_every_violation_is_listed_in_node_errors(listing: iso.Listing) -> None:
    wf = {"1": node("LoraLoader", lora_name=VICTIM_KEY), "2": node("LoadImage", image="selfix/t1/pose.png"),
          "3": node("LoadLatent", latent="x.latent"), "4": node("CLIPTextEncode", text="a cat")}
    assert verdicts(wf, listing) == [("1", m.LORA_FORBIDDEN), ("2", m.INPUT_FORBIDDEN), ("3", m.INVALID_WORKFLOW)]
    with pytest.raises(TaskError) as err:
        iso.check_workflow(wf, GRANT, listing, POLICY)
    assert "(and 2 more, see nodeErrors)" in err.value.message and set(err.value.node_errors) == {"1", "2", "3"}


@pytest.mark.parametrize("class_type", ["LoadImageOutput", "LoadLatent", "LoadVideo", "LoadAudio", "Load3D",
                                        "ImpactWildcardEncode", "XY Input: Manual XY Entry", "SaveLoRANode"])
def test_denied_nodes_are_invalid_workflow_naming_the_node(listing: iso.Listing, class_type: str) -> None:
    with pytest.raises(TaskError) as err:
        iso.check_workflow({"5": node(class_type, image="x.png")}, GRANT, listing, POLICY)
    assert err.value.code == m.INVALID_WORKFLOW and f"node 5 ({class_type})" in err.value.message
    assert "NODE_DENYLIST" in err.value.message


def test_allowlist_refuses_every_other_class(listing: iso.Listing) -> None:
    strict = iso.NodePolicy(frozenset(), frozenset({"EmptyImage", "SaveImage"}))
    iso.check_workflow({"1": node("EmptyImage", width=8), "2": node("SaveImage", filename_prefix="x")}, GRANT,
                       listing, strict)
    with pytest.raises(TaskError) as err:
        iso.check_workflow({"1": node("ImageScale", width=8)}, GRANT, listing, strict)
    assert err.value.code == m.INVALID_WORKFLOW and "NODE_ALLOWLIST" in err.value.message


def test_node_policy_settings() -> None:
    s = load({})
    assert s.node_denylist == DEFAULT_NODE_DENYLIST and s.node_allowlist == frozenset()
    assert {"LoadImageOutput", "LoadLatent", "LoadVideo"} <= DEFAULT_NODE_DENYLIST
    s = load({"NODE_DENYLIST": "default, MyFileLoader", "NODE_ALLOWLIST": "EmptyImage,SaveImage"})
    assert s.node_denylist == DEFAULT_NODE_DENYLIST | {"MyFileLoader"}
    assert s.node_allowlist == {"EmptyImage", "SaveImage"}
    assert load({"NODE_DENYLIST": ""}).node_denylist == frozenset()
    guard = iso.Guard.from_settings(s)
    assert guard.policy.allow == {"EmptyImage", "SaveImage"} and guard.roots.models_dir == s.models_dir


def test_after_binding_only_the_bound_names_pass(listing: iso.Listing) -> None:
    bound = iso.grant_for_bound("t2", "u2", [CACHED], ["selfix/t2/photo.png"])
    iso.check_workflow({"1": node("LoraLoader", lora_name=CACHED), "2": node("LoadImage", image="selfix/t2/photo.png"),
                        "3": node("SaveImage", filename_prefix="selfix/t2/face")}, bound, listing, POLICY)
    with pytest.raises(TaskError) as err:  # a name left unbound by the patch (the S1 hole) never passes
        iso.check_workflow({"1": node("LoraLoader", lora_name="mine.safetensors")}, bound,
                           iso.list_roots(iso.Roots(), [OWN_KEY]), POLICY)
    assert err.value.code == m.LORA_FORBIDDEN


def test_listing_covers_every_place_comfyui_resolves(roots: iso.Roots, listing: iso.Listing) -> None:
    assert {"tiny.safetensors", "sd15/v1-5.safetensors", "bbox/face_yolov8m.pt"} <= listing.shared
    assert listing.tenant[CACHED] == "lora" and listing.tenant["tiny_lora.safetensors"] == "lora"
    assert listing.tenant["selfix/t1/pose.png"] == "input" and listing.tenant["pose.png"] == "input"
    assert listing.tenant["comfyui_temp_abcde_00001_.png"] == "temp"
    assert roots.lora_cache_dir is not None and roots.models_dir is not None
    planted = roots.lora_cache_dir / "planted.safetensors"
    planted.symlink_to(roots.input_dir / "selfix" / "t1" / "pose.png")  # type: ignore[operator]
    os.symlink(roots.models_dir / "checkpoints", roots.lora_cache_dir / "linked-dir")
    again = iso.list_roots(roots)
    assert again.tenant["planted.safetensors"] == "lora" and again.tenant["linked-dir"] == "lora"
    with pytest.raises(TaskError) as err:
        iso.check_workflow({"1": node("LoraLoader", lora_name="planted.safetensors")}, GRANT, again, POLICY)
    assert err.value.code == m.LORA_FORBIDDEN


def test_the_rule_for_what_is_a_file_name() -> None:
    empty = iso.Listing()
    file_like = ["x.safetensors", "x.png [output]", "a/b", "selfix/t1/x", "/etc/passwd", "C:\\x", "x.PNG",
                 "file:///etc/passwd", "~/x"]
    prose = ["a cat", "a/b c", "euler", "nearest-exact", "masterpiece, best quality", "line one\nline.png",
             "https://example.com/x.png", "None", "Baked VAE", ""]
    for value in file_like:
        name, ann = iso.split_annotation(value)
        assert iso.is_file_reference(value, name, ann, empty), value
    for value in prose:
        name, ann = iso.split_annotation(value)
        assert not iso.is_file_reference(value, name, ann, empty), value
    assert iso.split_annotation("x.png [output]") == ("x.png", "output")
    assert iso.split_annotation("x.png[temp]") == ("x.pn", "temp")  # like ComfyUI: the suffix and one more char


# --- intake: the same rules before the job is even spooled ----------------------------------------------

def _message(workflow: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps({"taskId": "t2", "userId": "u2", "workflow": workflow, **extra}).encode()


@pytest.mark.parametrize(("wf", "code"), [
    ({"1": node("LoraLoader", lora_name=VICTIM_KEY)}, m.LORA_FORBIDDEN),
    ({"1": node("LoRA Stacker", lora_name_1=VICTIM_KEY)}, m.LORA_FORBIDDEN),
    ({"1": node("LoadImage", image="selfix/t1/pose.png")}, m.INPUT_FORBIDDEN),
    ({"1": node("LoadImage", image="x.png [temp]")}, m.INPUT_FORBIDDEN),
    ({"1": node("CheckpointLoaderSimple", ckpt_name="../x.safetensors")}, m.MODEL_FORBIDDEN),
    ({"1": node("LoadImageOutput", image="x.png [output]")}, m.INVALID_WORKFLOW),
])
def test_intake_refuses_without_looking_at_the_disk(wf: dict[str, Any], code: str) -> None:
    with pytest.raises(m.InvalidTask) as err:
        parse_task(_message(wf), Limits(), Catalog.load())
    assert err.value.code == code and err.value.task_id == "t2" and err.value.user_id == "u2"


def test_intake_uses_the_configured_node_policy() -> None:
    wf = {"1": node("EmptyImage", width=8), "2": node("SaveImage", filename_prefix="../../x")}
    parse_task(_message(wf), Limits(), Catalog.load())  # filename_prefix is rewritten, never refused
    with pytest.raises(m.InvalidTask) as err:
        parse_task(_message(wf), Limits(node_deny=frozenset({"EmptyImage"})), Catalog.load())
    assert err.value.code == m.INVALID_WORKFLOW


def test_custom_loader_inputs_are_bound_and_counted_as_used() -> None:
    from selfix.workflow import patch

    wf = {"1": node("LoRA Stacker", lora_name_1="mine.safetensors", lora_name_2="None"),
          "2": node("LoadImage", image="photo.png")}
    task = parse_task(_message(wf, loraModel=OWN_KEY, images={"photo.png": "users/u2/in/p.png"}), Limits(),
                      Catalog.load())
    patched = patch(task.workflow, "t2", {OWN_KEY: CACHED}, {"photo.png": "selfix/t2/photo.png"})
    assert patched["1"]["inputs"] == {"lora_name_1": CACHED, "lora_name_2": "None"}
    assert patched["2"]["inputs"]["image"] == "selfix/t2/photo.png"


def test_builtin_templates_and_readme_examples_pass_unchanged() -> None:
    catalog = Catalog.load()
    key = "users/u1/models/style.safetensors"
    for name in catalog.names():
        params: dict[str, Any] = {"prompt": "a portrait, 35mm"} if name != "demo" else {}
        raw = {"taskId": "t-1", "userId": "u1", "template": name, "params": params}
        if "lora" in name:
            raw["loraModel"] = key
        parse_task(json.dumps(raw).encode(), Limits(), catalog)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = json.loads(re.search(r'```json\n(\{"taskId": "t-1".*?)\n```', readme, re.S)[1])  # type: ignore[index]
    example["workflow"] = {"10": node("LoraLoader", lora_name="style.safetensors"),
                           "11": node("LoadImage", image="pose.png"), "12": node("SaveImage", filename_prefix="x")}
    parse_task(json.dumps(example).encode(), Limits(), catalog)
    for path in sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.json")):
        parse_task(path.read_bytes(), Limits(), catalog)  # the examples a newcomer submits first


def test_value_not_in_list_errors_lose_the_list_of_cached_names() -> None:
    errors = {"10": {"errors": [{"type": "value_not_in_list", "message": "Value not in list",
                                 "details": f"lora_name: 'x.safetensors' not in ['{CACHED}', 'b.safetensors']",
                                 "extra_info": {"input_name": "lora_name", "input_config": [[CACHED]],
                                                "received_value": "x.safetensors"}},
                                {"type": "required_input_missing", "message": "m", "details": "d"}],
                     "class_type": "LoraLoader", "dependent_outputs": ["9"]}}
    shown = json.dumps(redact_node_errors(errors))
    assert CACHED not in shown and "'x.safetensors' not in the list of choices" in shown
    assert "required_input_missing" in shown
    error = TaskError(m.INVALID_WORKFLOW, "x", node_errors=errors).as_error()
    assert CACHED not in json.dumps(error)


# --- the LoRA cache: names that say nothing of the key ---------------------------------------------------

def _store_with(tmp_path: Path, key: str) -> LocalStore:
    store = LocalStore(tmp_path / "store")
    write_safetensors(tmp_path / "store" / key, b"\1" * 256)
    return store


def test_cached_names_are_random_and_the_old_layout_is_renamed(tmp_path: Path) -> None:
    store = _store_with(tmp_path, VICTIM_KEY)
    root = tmp_path / "loras"
    cache = LoraCache(root, store)
    first = cache.ensure(VICTIM_KEY, "u1")
    assert re.fullmatch(r"[0-9a-f]{32}\.safetensors", first) and not (root / "users").exists()
    assert cache.cached_keys() == {VICTIM_KEY: first}
    # a cache written by an older selfix: the file under its key, a meta without a file name
    legacy = LoraCache(tmp_path / "old", store)
    legacy._make_dirs()
    write_safetensors(tmp_path / "old" / VICTIM_KEY, b"\1" * 256)
    size = (tmp_path / "old" / VICTIM_KEY).stat().st_size
    meta = {"key": VICTIM_KEY, "etag": store.stat(VICTIM_KEY).etag, "size": size, "checkedAt": 4e9}
    legacy._meta_path(VICTIM_KEY).write_text(json.dumps(meta))
    assert legacy.comfy_name(VICTIM_KEY) == VICTIM_KEY  # still readable
    renamed = legacy.ensure(VICTIM_KEY, "u1")
    assert re.fullmatch(r"[0-9a-f]{32}\.safetensors", renamed), renamed
    assert not (tmp_path / "old" / "users").exists(), "the key-named file and its folders are gone"
    assert (tmp_path / "old" / renamed).stat().st_size == size


def test_a_symlink_planted_in_the_cache_is_never_a_valid_copy(tmp_path: Path) -> None:
    store = _store_with(tmp_path, VICTIM_KEY)
    root = tmp_path / "loras"
    cache = LoraCache(root, store, head_ttl_s=3600)
    name = cache.ensure(VICTIM_KEY, "u1")
    secret = tmp_path / "secret.safetensors"
    write_safetensors(secret, b"\2" * 256)
    (root / name).unlink()
    (root / name).symlink_to(secret)  # same size: only lstat tells it apart
    (root / "planted.safetensors").symlink_to(secret)
    assert cache.ensure(VICTIM_KEY, "u1") == name
    assert not (root / name).is_symlink(), "the link was replaced by a verified download, not followed"
    assert (root / name).read_bytes() == (tmp_path / "store" / VICTIM_KEY).read_bytes()
    cache.usage()  # a scan removes planted links
    assert not (root / "planted.safetensors").is_symlink() and secret.exists()


def test_a_shared_name_that_a_tenant_folder_also_lists_is_refused(roots: iso.Roots) -> None:
    """ComfyUI searches every folder of a kind: a LoRA in output/loras/ (written by a denied trainer, say) under the
    same name as an operator's base LoRA could be the one it loads."""
    assert roots.output_dir is not None
    write_safetensors(roots.output_dir / "loras" / "base-style.safetensors")
    listing = iso.list_roots(roots)
    with pytest.raises(TaskError) as err:
        iso.check_workflow({"1": node("LoraLoader", lora_name="base-style.safetensors")}, GRANT, listing, POLICY)
    assert err.value.code == m.INPUT_FORBIDDEN
    iso.check_workflow({"1": node("LoraLoader", lora_name="style.safetensors")}, GRANT, listing, POLICY)
