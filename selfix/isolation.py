"""Tenant isolation: which file names a task's workflow may hand to ComfyUI. Pure, except `list_roots`.

ComfyUI resolves strings to files in three ways, none of which knows about users:
- model loaders (`ckpt_name`, `lora_name`, `lora_name_1`, `vae_name`, ...) look the name up in each folder of a
  kind (MODELS_DIR/<kind>/, the LoRA cache, output/<kind>/) with `folder_paths.get_full_path`;
- LoadImage and its kin join the name to the input folder, or to the output/temp folder when it ends with
  ` [output]` / ` [temp]` (`folder_paths.get_annotated_filepath`): an absolute or `..` name leaves the folder;
- custom nodes do either, under input names of their own (Efficiency Nodes' `lora_name_1..`, `<lora:name>` text).

So the check keys on the VALUE of every string input of every node, never on the input's name. A value is a file
reference when it ends with an annotation, has a file extension (FILE_EXTENSIONS), is path-shaped (one token with
`/` or `\\`), carries a `<lora:...>` tag, or names a file the node can see. Prompt text (several words, several lines,
or no extension and no path) is none of these and passes untouched. A file reference is then, in this order:

1. refused if it is not a plain relative name: absolute, `~`, `..` or `.` parts, `//`, backslashes, NUL, `file:` URLs;
2. refused if annotated ` [temp]` (previews are not attributable to a task), or ` [output]`/` [input]` outside the
   task's own `selfix/<taskId>/` subfolder;
3. allowed if it is in the task's own subfolder `selfix/<taskId>/` (its inputs, its output prefix), refused if it
   is under any other `selfix/` subfolder (other tasks' inputs and outputs, present or future);
4. allowed if it is one of the task's bindings (its loraModel keys and their basenames, its image names; after
   binding, the cached LoRA names and `selfix/<taskId>/<image>`);
5. refused if it is an object key under some user's prefix (`users/<id>/...`): a key the task did not bind;
6. allowed if it names an operator's model under MODELS_DIR (exactly, as ComfyUI lists it for a folder kind), unless
   a tenant folder lists the same name (then ComfyUI could pick either: refused);
7. refused if it names (case-insensitively, by path or any path suffix down to the basename) a file in the LoRA
   cache or in ComfyUI's input, output or temp folder: other tasks' files;
8. otherwise passed on: ComfyUI finds no file of that name and answers `value_not_in_list` (`invalid_workflow`).

Rules 3 and 5 hold whether or not the file exists yet, so a workflow queued before another task's files appear cannot
reach them later. Nodes that read files a task cannot bring are refused by class (NODE_DENYLIST; NODE_ALLOWLIST for
deployments that run only known templates).
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfix.messages import (
    INPUT_FORBIDDEN,
    INVALID_WORKFLOW,
    LORA_FORBIDDEN,
    MODEL_FORBIDDEN,
    TaskError,
)
from selfix.settings import DEFAULT_NODE_DENYLIST, Settings

TASK_ROOT = "selfix"  # = workflow.OUTPUT_ROOT; every task's input and output files live under selfix/<taskId>/
ANNOTATIONS = ("[output]", "[input]", "[temp]")  # folder_paths.annotated_filepath strips the suffix and one char

# What ComfyUI and the pinned custom nodes load by name: models (folder_paths.supported_pt_extensions and more),
# images, video, audio, latents, 3D, configs.
MODEL_EXTENSIONS = frozenset({".safetensors", ".sft", ".ckpt", ".pt", ".pt2", ".pth", ".bin", ".pkl", ".gguf",
                              ".onnx", ".torchscript", ".yaml", ".json", ".npz", ".npy"})
MEDIA_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif", ".mpo",
                              ".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".wav", ".mp3", ".flac", ".ogg",
                              ".m4a", ".opus", ".aac", ".latent", ".glb", ".gltf", ".obj", ".fbx", ".stl"})
FILE_EXTENSIONS = MODEL_EXTENSIONS | MEDIA_EXTENSIONS
IMAGE_INPUT_NAMES = frozenset({"image", "video", "audio", "latent", "file", "model_file", "folder", "mask"})
LORA_TAG_RE = re.compile(r"<lora:([^:>]+)", re.IGNORECASE)  # Impact Pack's wildcard syntax <lora:name:strength>

_LISTED_SKIP = frozenset({".git", ".selfix"})  # the LoRA cache's bookkeeping; ComfyUI lists no .json as a model


@dataclass(frozen=True)
class NodePolicy:
    deny: frozenset[str] = DEFAULT_NODE_DENYLIST
    allow: frozenset[str] = frozenset()  # empty: every class not denied

    def problem(self, class_type: str) -> str | None:
        if class_type in self.deny:
            return f"node class {class_type!r} is not allowed on this node (NODE_DENYLIST): it reads files a task " \
                   "does not bring"
        if self.allow and class_type not in self.allow:
            return f"node class {class_type!r} is not in this node's NODE_ALLOWLIST"
        return None


@dataclass(frozen=True)
class Grant:
    """What one task may name: its own subfolder, its bound LoRA and image names."""

    task_id: str
    user_id: str
    loras: frozenset[str] = frozenset()
    images: frozenset[str] = frozenset()

    @property
    def own_prefix(self) -> str:
        return f"{TASK_ROOT}/{self.task_id}/"


@dataclass(frozen=True)
class Listing:
    """Names through which ComfyUI could reach a file on this node, split by owner.

    `shared`: exact names of the operator's models (relative to a MODELS_DIR folder and its sub-folders).
    `tenant`: casefolded names (path and every path suffix down to the basename) of files in the LoRA cache, input,
    output and temp folders, each with the kind of place (lora, input, ...) that gives the refusal its code.
    """

    shared: frozenset[str] = frozenset()
    tenant: dict[str, str] = field(default_factory=dict)
    exact: frozenset[str] = frozenset()  # tenant names as a folder of ComfyUI lists them: refused even if shared


@dataclass(frozen=True)
class Violation:
    node_id: str
    class_type: str
    input_name: str
    value: str
    code: str
    reason: str

    def message(self) -> str:
        return f"node {self.node_id} ({self.class_type}) input {self.input_name!r}: {self.value[:200]!r} {self.reason}"


@dataclass(frozen=True)
class Roots:
    """The folders ComfyUI resolves names against on this node (None: not known here)."""

    models_dir: Path | None = None
    lora_cache_dir: Path | None = None
    input_dir: Path | None = None
    output_dir: Path | None = None
    temp_dir: Path | None = None


# --- the decision ------------------------------------------------------------------------------------------

def check_workflow(workflow: dict[str, Any], grant: Grant, listing: Listing, policy: NodePolicy,
                   user_prefix: str = "users/{userId}/", skip_inputs: frozenset[str] = frozenset()) -> None:
    """Raise TaskError naming the first refused node (and listing all of them in nodeErrors), else return."""
    found = violations(workflow, grant, listing, policy, user_prefix, skip_inputs)
    if not found:
        return
    first = found[0]
    extra = f" (and {len(found) - 1} more, see nodeErrors)" if len(found) > 1 else ""
    raise TaskError(first.code, first.message() + extra, node_errors=_node_errors(found))


def violations(workflow: dict[str, Any], grant: Grant, listing: Listing, policy: NodePolicy,
               user_prefix: str = "users/{userId}/", skip_inputs: frozenset[str] = frozenset()) -> list[Violation]:
    user_re = _user_key_re(user_prefix)
    found: list[Violation] = []
    for node_id, node in workflow.items():
        if not isinstance(node, dict):
            continue
        class_type = str(node.get("class_type"))
        why = policy.problem(class_type)
        if why:
            found.append(Violation(str(node_id), class_type, "class_type", class_type, INVALID_WORKFLOW, why))
            continue
        inputs = node.get("inputs")
        if not isinstance(inputs, dict):
            continue
        for input_name, value in inputs.items():
            if input_name in skip_inputs:
                continue
            for text in _strings(value):
                for code, reason in _judge_all(text, str(input_name), class_type, grant, listing, user_re):
                    found.append(Violation(str(node_id), class_type, str(input_name), text, code, reason))
    return found


def _judge_all(text: str, input_name: str, class_type: str, grant: Grant, listing: Listing,
               user_re: re.Pattern[str]) -> Iterator[tuple[str, str]]:
    verdict = judge(text, input_name, class_type, grant, listing, user_re)
    if verdict:
        yield verdict
    for name in LORA_TAG_RE.findall(text):  # <lora:name:1.0> inside prompt text
        name = name.strip()
        candidates = (name, name + ".safetensors")
        if any(c in grant.loras or c in listing.shared for c in candidates):
            continue
        for candidate in candidates:
            tag = judge(candidate, "lora_name", class_type, grant, listing, user_re)
            if tag:
                yield LORA_FORBIDDEN, f"(<lora:{name}> tag) {tag[1]}"
                break


def judge(value: str, input_name: str, class_type: str, grant: Grant, listing: Listing,
          user_re: re.Pattern[str] | None = None) -> tuple[str, str] | None:
    """(code, reason) when `value` must not reach ComfyUI, else None. See the module docstring for the rules."""
    user_re = user_re or _user_key_re("users/{userId}/")
    name, annotation = split_annotation(value)
    if not is_file_reference(value, name, annotation, listing):
        return None
    ctx = _context(input_name, class_type, name, annotation)
    bad = path_problem(name)
    if bad:
        return ctx, f"is not a plain relative file name ({bad})"
    own = name.startswith(grant.own_prefix)
    if annotation == "temp":
        return INPUT_FORBIDDEN, "reads ComfyUI's temp folder (previews of any task)"
    if annotation and not own:
        return INPUT_FORBIDDEN, f"reads ComfyUI's {annotation} folder outside this task's {grant.own_prefix}"
    if own:
        return None
    if name.casefold() == TASK_ROOT or name.casefold().startswith(TASK_ROOT + "/"):
        return INPUT_FORBIDDEN, f"is another task's file (this task's own folder is {grant.own_prefix})"
    if value in grant.loras or value in grant.images:
        return None
    match = user_re.match(name)
    if match:
        whose = "this user's" if match["user"] == grant.user_id else "another user's"
        return (INPUT_FORBIDDEN if ctx == INPUT_FORBIDDEN else LORA_FORBIDDEN,
                f"is {whose} object key but not one of this task's loraModel/images")
    kind = listing.tenant.get(name.casefold())
    if name in listing.shared and name.casefold() not in listing.exact:
        return None
    if kind is not None:
        code = LORA_FORBIDDEN if kind == "lora" else INPUT_FORBIDDEN
        what = "a cached LoRA" if kind == "lora" else f"a file in ComfyUI's {kind} folder"
        return code, f"names {what} that is not this task's (only its loraModel, images and MODELS_DIR models)"
    return None


def split_annotation(value: str) -> tuple[str, str | None]:
    """Like folder_paths.annotated_filepath: 'x.png [output]' -> ('x.png', 'output')."""
    for suffix in ANNOTATIONS:
        if value.endswith(suffix):
            return value[: -len(suffix) - 1], suffix[1:-1]
    return value, None


def is_file_reference(value: str, name: str, annotation: str | None, listing: Listing) -> bool:
    """Would ComfyUI (or a pinned custom node) treat this string as a file name? Prompt text is not."""
    if annotation is not None:
        return True
    if "\n" in value or "\r" in value:
        return False  # multi-line text: a prompt; no file of selfix or ComfyUI has a newline in its name
    if value.startswith("file:"):
        return True
    if "://" in value:
        return False  # a URL reaches the network, not this node's files
    if "\x00" in value:
        return True
    ext = posixpath.splitext(name)[1].lower()
    if ext in FILE_EXTENSIONS:
        return True
    if ("/" in value or "\\" in value) and not any(c.isspace() for c in value):
        return True  # one token with a path separator
    if value.startswith("~"):
        return True
    return value in listing.shared or value.casefold() in listing.tenant


def path_problem(name: str) -> str | None:
    if "\x00" in name:
        return "NUL byte"
    if "\\" in name:
        return "backslash"
    if name.startswith("file:"):
        return "file: URL"
    if name.startswith(("/", "~")) or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "'..' component"
    if name and (posixpath.normpath(name) != name.rstrip("/") or "" in parts[:-1]):
        return "not normalised ('.' or '//')"
    return None


def _context(input_name: str, class_type: str, name: str, annotation: str | None) -> str:
    """The code a malformed name gets: images/media → input_forbidden, LoRAs → lora_forbidden, else model."""
    ext = posixpath.splitext(name)[1].lower()
    if annotation or ext in MEDIA_EXTENSIONS or input_name.lower() in IMAGE_INPUT_NAMES:
        return INPUT_FORBIDDEN
    if "lora" in input_name.lower() or "lora" in class_type.lower():
        return LORA_FORBIDDEN
    return MODEL_FORBIDDEN


def _user_key_re(user_prefix: str) -> re.Pattern[str]:
    head, _, tail = user_prefix.partition("{userId}")
    return re.compile(re.escape(head) + r"(?P<user>[^/]+)" + re.escape(tail), re.IGNORECASE)


def _strings(value: Any) -> Iterator[str]:
    """Every string in an input value, links (["node", 0]) excepted; iterative (inputs may nest)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.values())
            stack.extend(k for k in item if isinstance(k, str))
        elif isinstance(item, list):
            if len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], int | float) \
                    and not isinstance(item[1], bool):
                continue  # a link to another node's output
            stack.extend(item)


def _node_errors(found: list[Violation]) -> dict[str, Any]:
    """The refusals in ComfyUI's node_errors shape, so clients parse one format."""
    out: dict[str, Any] = {}
    for v in found:
        entry = out.setdefault(v.node_id, {"errors": [], "dependent_outputs": [], "class_type": v.class_type})
        entry["errors"].append({"type": v.code, "message": v.reason, "details": f"{v.input_name}: {v.value[:200]!r}",
                                "extra_info": {"input_name": v.input_name, "received_value": v.value[:200]}})
    return out


# --- grants ---------------------------------------------------------------------------------------------

def grant_for_task(task_id: str, user_id: str, lora_keys: Iterable[str], image_names: Iterable[str]) -> Grant:
    """Names as the client writes them: each loraModel key and its basename, each image name."""
    keys = list(lora_keys)
    return Grant(task_id, user_id, frozenset(keys) | frozenset(posixpath.basename(k) for k in keys),
                 frozenset(image_names))


def grant_for_bound(task_id: str, user_id: str, bound_loras: Iterable[str], bound_images: Iterable[str]) -> Grant:
    """Names after binding: the cached LoRA names and selfix/<taskId>/<image>."""
    return Grant(task_id, user_id, frozenset(bound_loras), frozenset(bound_images))


# --- the one I/O edge: what the node's ComfyUI can see --------------------------------------------------

def list_roots(roots: Roots, lora_keys: Iterable[str] = ()) -> Listing:
    """Walk MODELS_DIR (shared) and the tenant folders. `lora_keys`: keys of the cached LoRAs (from the cache's
    metadata), so a key or its basename is recognised even when the cached file's own name is unrelated."""
    shared: set[str] = set()
    if roots.models_dir is not None:
        for rel in _walk(roots.models_dir, follow=True, dirs=True):
            parts = rel.split("/")  # relative to a kind's folder (checkpoints/) or a nested one (ultralytics/bbox/)
            shared.update("/".join(parts[i:]) for i in range(1, min(3, len(parts))))
    tenant: dict[str, str] = {}
    exact: set[str] = set()
    places = (("lora", roots.lora_cache_dir), ("input", roots.input_dir), ("output", roots.output_dir),
              ("temp", roots.temp_dir))
    for kind, root in places:
        if root is None:
            continue
        for rel in _walk(root, follow=False, dirs=False):
            _add_tenant(tenant, exact, rel, kind)
    for key in lora_keys:
        _add_tenant(tenant, exact, key, "lora")
    return Listing(frozenset(shared), tenant, frozenset(exact))


def _add_tenant(tenant: dict[str, str], exact: set[str], rel: str, kind: str) -> None:
    """Every path suffix down to the basename; the path itself and the one below a first-level folder (how
    ComfyUI lists output/loras/x as a LoRA) are exact."""
    parts = rel.split("/")
    for i in range(len(parts)):
        suffix = "/".join(parts[i:]).casefold()
        tenant.setdefault(suffix, kind)
        if i <= 1:
            exact.add(suffix)


def _walk(root: Path, *, follow: bool, dirs: bool) -> Iterator[str]:
    if not root.is_dir():
        return
    for dirpath, subdirs, files in os.walk(root, followlinks=follow):
        subdirs[:] = [d for d in subdirs if d not in _LISTED_SKIP]
        base = Path(dirpath)
        names = [*files, *subdirs] if dirs else files + [d for d in subdirs if (base / d).is_symlink()]
        for name in names:
            yield (base / name).relative_to(root).as_posix()


@dataclass(frozen=True)
class Guard:
    """The node's rule set: where ComfyUI looks for files, the node policy and the users' key prefix."""

    roots: Roots
    policy: NodePolicy = NodePolicy()
    user_prefix: str = "users/{userId}/"

    @classmethod
    def from_settings(cls, settings: Settings) -> Guard:
        roots = Roots(settings.models_dir, settings.lora_cache_dir, settings.comfy_input_dir,
                      settings.comfy_output_dir, settings.temp_dir)
        return cls(roots, NodePolicy(settings.node_denylist, settings.node_allowlist), settings.user_prefix)

    def listing(self, lora_keys: Iterable[str] = ()) -> Listing:
        return list_roots(self.roots, lora_keys)

    def check(self, workflow: dict[str, Any], grant: Grant, listing: Listing,
              skip_inputs: frozenset[str] = frozenset()) -> None:
        check_workflow(workflow, grant, listing, self.policy, self.user_prefix, skip_inputs)
