"""A newcomer's first hour, tested as a person reads the README.

The quickstart's shell lines are pulled out of README.md and run as written, in a clean copy of the repository (no
var/) with an empty environment (PATH and HOME only: no selfix variable inherited), ComfyUI being the test double
that `./scripts/run --double` starts. The copy's .venv is a link to this checkout's, so the test does not reinstall
every package from PyPI; the node's line alone also gets free ports (COMFY_PORT, METRICS_PORT), so the test runs
beside other nodes on one machine, and the lines of the second shell find them through the node's run/node.json.
Then every command runs with no settings at all: each one says what to set, none prints a traceback, and none
creates /app outside a container.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.servers.node_plugin import Node, free_port, task, wait_until, write_safetensors

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LEFT_OUT = (".git", ".venv", "var", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", "*.egg-info",
            "build", "dist")


def quickstart(block: str) -> list[str]:
    """The shell lines of one of the README's quickstart blocks, as a person would copy them."""
    match = re.search(rf"<!-- quickstart:{block} -->\n```bash\n(.*?)\n```", README.read_text(), re.S)
    assert match, f"README.md lacks the quickstart:{block} block"
    return [line for line in match[1].splitlines() if line.strip() and not line.lstrip().startswith("#")]


def clean_environment(home: Path, **extra: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), **extra}


def venv_stamp() -> str:
    """What scripts/lib/venv.sh writes into .venv/.selfix-stamp for this setup.cfg and pyproject.toml."""
    digest = hashlib.sha256()
    for name in ("setup.cfg", "pyproject.toml"):  # = `sha256sum setup.cfg pyproject.toml | sha256sum`
        digest.update(f"{hashlib.sha256((ROOT / name).read_bytes()).hexdigest()}  {name}\n".encode())
    return digest.hexdigest()[:16]


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A fresh copy of the repository, as `git clone` leaves it: no var/, no caches; .venv links to this checkout's
    (scripts/run finds its stamp current and installs nothing, so the link is never written through)."""
    venv = ROOT / ".venv"
    stamp = venv / ".selfix-stamp"
    if not stamp.exists() or not stamp.read_text().startswith(venv_stamp()):
        pytest.skip("no current .venv made by scripts/test or scripts/run in this checkout")
    target = tmp_path / "selfix"
    shutil.copytree(ROOT, target, ignore=shutil.ignore_patterns(*LEFT_OUT), symlinks=True)
    (target / ".venv").symlink_to(venv)
    (tmp_path / "home").mkdir()
    return target


@contextlib.contextmanager
def running(line: str, cwd: Path, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["bash", "-c", line], cwd=cwd, env=env, stdout=open(log, "wb"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # Ctrl-C in the node's shell: supervisord drains and stops
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for child in psutil.wait_procs(children, timeout=10)[1]:
            child.kill()


@pytest.mark.e2e
def test_the_readme_quickstart_as_written_gives_a_completed_result_and_its_image(clone: Path) -> None:
    node_lines, client_lines = quickstart("node"), quickstart("client")
    assert len(node_lines) == 1, "the node's shell runs one command in the foreground"
    home = clone.parent / "home"
    ports = {"COMFY_PORT": str(free_port()), "METRICS_PORT": str(free_port()), "METRICS_HOST": "127.0.0.1"}
    log = clone.parent / "node.log"
    with running(node_lines[0], clone, clean_environment(home, **ports), log) as node:
        def up() -> bool:
            assert node.poll() is None, f"the node exited with {node.returncode}\n{log.read_text()[-4000:]}"
            return "the node is up" in log.read_text()

        wait_until(up, 120, lambda: f"the node's next steps\n{log.read_text()[-4000:]}", interval=0.2)
        said = log.read_text()
        assert "SYNTHETIC" in said, "the double's banner must say its images are synthetic"
        assert client_lines[0].split("#")[0].strip() in said, "the next steps name the README's submit line"

        outputs = []
        for line in client_lines:
            out = subprocess.run(["bash", "-c", line], cwd=clone, env=clean_environment(home), capture_output=True,
                                 text=True, timeout=120)
            assert out.returncode == 0, f"{line!r} exited {out.returncode}\n{out.stdout}\n{out.stderr}"
            assert "Traceback" not in out.stdout + out.stderr, line
            outputs.append(out.stdout)

    result = json.loads((clone / "var" / "spool" / "done" / "example-demo.json").read_text())
    assert result["status"] == "completed", result
    image = clone / "var" / "store" / result["imagePath"]
    assert image.read_bytes()[:8] == PNG_MAGIC
    assert f"var/store/{result['imagePath']}" in "\n".join(client_lines), "the README names where the image lands"
    submit, status, doctor = outputs[:3]
    assert f"image: {image}" in submit
    assert status.startswith(f"node: spool {clone / 'var' / 'spool'} (the checkout's var/"), status
    assert "runner RUNNING" in status and "done 1" in status, status
    # The client shell has no COMFY_PORT: doctor reports the port the running node was started with.
    assert f"COMFY_PORT={ports['COMFY_PORT']}" in doctor and "settings from its run/node.json" in doctor, doctor
    assert f"ok   comfyui: http://127.0.0.1:{ports['COMFY_PORT']} answers" in doctor, doctor


@pytest.mark.e2e
def test_submit_wait_shows_the_progress_then_the_result_and_fails_with_the_task(
        make_node: Callable[..., Node], tmp_path: Path) -> None:
    node = make_node(seconds_per_step=0.1).start()
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(task("wait-1", steps=20)))
    broken = task("wait-2")
    broken["workflow"]["3"]["inputs"]["sampler_name"] = "no-such-sampler"
    bad.write_text(json.dumps(broken))
    cli = [sys.executable, "-m", "selfix", "submit", "--wait", "--spool", node.env["SPOOL_DIR"]]
    ok = subprocess.run([*cli, str(good)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                        env=clean_environment(tmp_path))
    assert ok.returncode == 0, ok
    assert re.search(r"wait-1: running \[#+ *\] \d+/20", ok.stdout), ok.stdout
    assert '"status": "completed"' in ok.stdout
    assert f"image: {node.store / 'users' / 'u1' / 'images' / 'wait-1-0.png'}" in ok.stdout
    failed = subprocess.run([*cli, str(bad)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env=clean_environment(tmp_path))
    assert failed.returncode == 1, failed
    assert "wait-2: failed: invalid_workflow" in failed.stdout


@pytest.mark.e2e
def test_every_example_completes_on_a_fresh_node_given_what_examples_readme_names(
        make_node: Callable[..., Node], tmp_path: Path) -> None:
    node = make_node(seconds_per_step=0.01)
    # examples/README.md: the template's checkpoint in MODELS_DIR, the LoRA in the store under the user's prefix.
    write_safetensors(Path(node.env["MODELS_DIR"]) / "checkpoints" / "v1-5-pruned-emaonly.safetensors")
    write_safetensors(node.store / "users" / "demo" / "models" / "style.safetensors")
    node.start()
    examples = sorted((ROOT / "examples").glob("*.json"))
    assert {p.name for p in examples} == {"demo.json", "input-image.json", "txt2img-lora.json"}
    out = subprocess.run([sys.executable, "-m", "selfix", "submit", "--wait", "--spool", node.env["SPOOL_DIR"],
                          *map(str, examples)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env=clean_environment(tmp_path))
    assert out.returncode == 0, out
    for example in examples:
        task_id = json.loads(example.read_text())["taskId"]
        result = node.results()[task_id]
        assert result["status"] == "completed", result
        assert (node.store / result["imagePath"]).read_bytes()[:8] == PNG_MAGIC
        assert f"image: {node.store / result['imagePath']}" in out.stdout


NO_SETTINGS_COMMANDS = [
    ["up"], ["comfyui"], ["consumer"], ["runner"], ["uploader"], ["watchdog"], ["ctl", "status"],
    ["submit", "task.json"], ["submit", "--wait", "task.json"], ["status"], ["status", "--json"],
    ["status", "--watch"], ["doctor"], ["settings"],
]


def _tree(root: Path) -> set[str]:
    return {str(Path(d) / n) for d, dirs, files in os.walk(root) for n in dirs + files} if root.exists() else set()


def test_every_command_with_no_settings_says_what_to_set_and_creates_no_app_tree(tmp_path: Path) -> None:
    if Path("/app/spool").is_dir():
        pytest.skip("this machine is a container with a node in /app")
    app_before = _tree(Path("/app")) if Path("/app").exists() else None
    (tmp_path / "task.json").write_text((ROOT / "examples" / "demo.json").read_text())
    selfix = str(Path(sys.executable).parent / "selfix")
    env = clean_environment(tmp_path)
    for command in NO_SETTINGS_COMMANDS:
        out = subprocess.run([selfix, *command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        said = out.stdout + out.stderr
        assert "Traceback" not in said, f"{command}: {said}"
        if command == ["settings"]:
            assert out.returncode == 0 and "no node spool at /app/spool" not in out.stdout, said
            assert "SELFIX_HOME=/app  (default)" in out.stdout and "--spool DIR" in out.stderr, said
            continue
        assert out.returncode != 0, f"{command} exited 0: {said}"
        assert re.search(r"SELFIX_HOME|COMFYUI_DIR", out.stderr + out.stdout), f"{command} names no setting: {said}"
    if app_before is None:
        assert not Path("/app").exists(), "a command created /app outside a container"
    else:
        assert _tree(Path("/app")) == app_before, "a command created files under /app"
