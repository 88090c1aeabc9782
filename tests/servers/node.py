"""A whole selfix node for tests, the ComfyUI double, and the task builders the tests share.

- `Node`: `selfix up` (real supervisord, all five programs) with the double as ComfyUI, everything under one
  directory, free loopback ports.
- `ComfyDouble`: the one launcher of the double (selfix/testing/fake_comfyui/): `argv()` for a subprocess of the
  test's own, `command()` for COMFY_COMMAND (placeholders that `selfix comfyui` fills in).
- `task`, `t2i_workflow`, `write_safetensors`, `wait_until`: builders and the polling helper;
  `sample_message`, `sample_workflow`: the small task that validation tests (messages, poison) vary.

The fixtures that use these live in node_plugin.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import xmlrpc.client
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

from tests.servers import free_ports

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = ("comfyui", "consumer", "runner", "uploader", "watchdog")


def free_port() -> int:
    return free_ports(1)[0]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str | Callable[[], str],
               interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what() if callable(what) else what}")
        time.sleep(interval)


def write_safetensors(path: Path, payload: bytes = b"\0" * 64, meta: dict[str, Any] | None = None) -> Path:
    """A small but valid safetensors file (header + one uint8 tensor)."""
    header = {"w": {"dtype": "U8", "shape": [len(payload)], "data_offsets": [0, len(payload)]}}
    if meta:
        header["__metadata__"] = meta  # type: ignore[assignment]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + payload)
    return path


def t2i_workflow(steps: int = 2, lora: str | None = None, prefix: str = "t2i", batch: int = 1,
                 seed: int = 1) -> dict[str, Any]:
    """checkpoint → (LoRA) → text → KSampler(steps) → VAE → SaveImage: the double spends steps × seconds-per-step."""
    model, clip = ["4", 0], ["4", 1]
    wf: dict[str, Any] = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}}}
    if lora:
        wf["10"] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": clip, "lora_name": lora,
                                                           "strength_model": 0.8, "strength_clip": 0.8}}
        model, clip = ["10", 0], ["10", 1]
    wf.update({
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "a cat"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "blurry"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "3": {"class_type": "KSampler", "inputs": {"model": model, "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0], "seed": seed, "steps": steps, "cfg": 7.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
    })
    return wf


SAMPLE_TASK, SAMPLE_USER = "task-001", "alice"
SAMPLE_LORA = "users/alice/models/style.safetensors"
DROP = object()  # sample_message(key=DROP) leaves the key out


def sample_workflow(lora_name: str | None = SAMPLE_LORA, image: str | None = None,
                    text: str = "a cat") -> dict[str, Any]:
    """A small workflow for validation tests (not runnable: it decodes no latent): checkpoint, prompt, SaveImage,
    and a LoraLoader / LoadImage when named."""
    wf: dict[str, Any] = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": text}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "out"}},
    }
    if lora_name is not None:
        wf["10"] = {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1],
                                                          "lora_name": lora_name, "strength_model": 1.0}}
    if image is not None:
        wf["11"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    return wf


def sample_message(**changes: Any) -> dict[str, Any]:
    """SAMPLE_USER's task SAMPLE_TASK with SAMPLE_LORA, for validation tests; `changes` replace (DROP: remove) keys."""
    msg: dict[str, Any] = {"taskId": SAMPLE_TASK, "userId": SAMPLE_USER, "workflow": sample_workflow(),
                           "loraModel": SAMPLE_LORA}
    for key, value in changes.items():
        if value is DROP:
            msg.pop(key, None)
        else:
            msg[key] = value
    return msg


def task(task_id: str, *, user: str = "u1", priority: int = 0, steps: int = 2, lora: str | None = None,
         batch: int = 1, **extra: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"taskId": task_id, "userId": user, "priority": priority,
                           "workflow": t2i_workflow(steps, lora=lora and lora.rsplit("/", 1)[-1], batch=batch,
                                                    seed=zlib.crc32(task_id.encode()))}
    if lora:
        msg["loraModel"] = lora
    msg.update(extra)
    return msg


class ComfyDouble:
    """The ComfyUI double as a process: its directories under `root`, a free port, an execution log (the ids of
    the prompts it started, one a line). One launcher for every test: `argv()` runs it here, `command()` is the
    same command as COMFY_COMMAND with `selfix comfyui`'s placeholders instead of this double's paths."""

    DIRS = ("output", "input", "models", "temp")

    def __init__(self, root: Path, seconds_per_step: float = 0.0, *, exec_log: Path | None = None,
                 extra: Sequence[str] = (), checkpoint: bool = True, port: int | None = None) -> None:
        self.root = root
        self.seconds_per_step = seconds_per_step
        self.exec_log = exec_log or root / "exec.log"
        self.extra = tuple(extra)
        self.checkpoint = checkpoint
        self.port = port or free_port()
        self.dirs = {k: root / k for k in self.DIRS}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def path(self, name: str) -> Path:
        return self.root / name

    def argv(self, *, template: bool = False) -> list[str]:
        """The double's command line; `template`: with {port}, {output_dir}, ... for `selfix comfyui` to fill."""
        def where(name: str) -> str:
            return f"{{{name}_dir}}" if template else str(self.dirs[name])

        argv = [sys.executable, "-m", "selfix.testing.fake_comfyui", "--listen", "127.0.0.1",
                "--port", "{port}" if template else str(self.port), "--output-dir", where("output"),
                "--input-dir", where("input"), "--models-dir", where("models"), "--temp-dir", where("temp")]
        if template:
            argv += ["--extra-model-paths-config", "{extra_model_paths}"]
        return [*argv, "--exec-log", str(self.exec_log), "--seconds-per-step", str(self.seconds_per_step),
                *self.extra]

    def command(self) -> str:
        """COMFY_COMMAND for a node that runs this double under supervisord (selfix comfyui fills the fields)."""
        return " ".join(a if re.fullmatch(r"[\w@%+=:,./{}-]+", a) else shlex.quote(a)
                        for a in self.argv(template=True))

    def start(self, timeout: float = 30) -> ComfyDouble:
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        if self.checkpoint:
            write_safetensors(self.dirs["models"] / "checkpoints" / "tiny.safetensors")
        with open(self.root / "double.log", "ab") as log_file:
            self.proc = subprocess.Popen(self.argv(), cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
        wait_until(self._up, timeout, lambda: f"ComfyUI double answering\n{self.log()}")
        return self

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"double exited with {self.proc.returncode}:\n{self.log()}")
        return self.answers()

    def answers(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(self.url + "/system_stats", timeout=1):
                return True
        except OSError:
            return False

    def log(self) -> str:
        path = self.root / "double.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> int | None:
        """SIGTERM, SIGKILL after 10 s; the exit status (None if it never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


Double = ComfyDouble  # the name the tests of single processes use


def double_command(exec_log: Path, seconds_per_step: float) -> str:
    """COMFY_COMMAND running the double with this execution log."""
    return ComfyDouble(exec_log.parent, seconds_per_step, exec_log=exec_log).command()


class Node:
    """One selfix node under real supervisord. Everything lives under `root`; ports are free loopback ports."""

    def __init__(self, root: Path, seconds_per_step: float = 0.05, env: dict[str, str] | None = None,
                 comfy_args: Sequence[str] = ()) -> None:
        """`comfy_args`: more arguments for the double (e.g. `--preview-method latent2rgb`)."""
        self.root = root
        self.exec_log = root / "comfy-exec.log"
        self.env = {
            **os.environ,
            "SPOOL_DIR": str(root / "spool"), "STORE_DIR": str(root / "store"), "MODELS_DIR": str(root / "models"),
            "TEMP_DIR": str(root / "temp"), "LORA_CACHE_DIR": str(root / "loras"),
            "COMFY_OUTPUT_DIR": str(root / "comfy" / "output"), "COMFY_INPUT_DIR": str(root / "comfy" / "input"),
            "COMFY_LOG_DIR": str(root / "logs"), "COMFY_PORT": str(free_port()), "METRICS_PORT": str(free_port()),
            "COMFY_COMMAND": ComfyDouble(root / "comfy", seconds_per_step, exec_log=self.exec_log,
                                         extra=comfy_args).command(),
            "RETRY_BASE_S": "0.2", "RETRY_MAX_S": "1", "WS_SILENCE_S": "2", "LOG_LEVEL": "DEBUG",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.env.update(env or {})
        write_safetensors(Path(self.env["MODELS_DIR"]) / "checkpoints" / "tiny.safetensors")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = root / "node.log"
        self.groups: set[int] = set()  # process groups of every program pid seen (each program leads its own)

    @property
    def spool(self) -> Any:
        from selfix.spool import Spool

        return Spool(Path(self.env["SPOOL_DIR"]))

    @property
    def store(self) -> Path:
        return Path(self.env["STORE_DIR"])

    def start(self, wait_programs: tuple[str, ...] = PROGRAMS) -> Node:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "selfix", "up"], env=self.env, cwd=ROOT,
            stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True)  # noqa: SIM115
        wait_until(lambda: self._running(wait_programs), 60, lambda: f"{wait_programs} RUNNING\n{self.log_tail()}")
        wait_until(self.comfy_answers, 90, lambda: f"ComfyUI answering\n{self.log_tail()}")
        return self

    def comfy_answers(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.env['COMFY_PORT']}/system_stats", timeout=1):
                return True
        except OSError:
            return False

    def rpc(self) -> Any:
        transport = SupervisorTransport(None, None, serverurl=f"unix://{self.env['SPOOL_DIR']}/run/supervisor.sock")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def info(self) -> dict[str, dict[str, Any]]:
        try:
            info = {p["name"]: p for p in self.rpc().supervisor.getAllProcessInfo()}
        except (OSError, xmlrpc.client.Fault):
            return {}
        self.groups.update(int(p["pid"]) for p in info.values() if p.get("pid"))
        return info

    def _running(self, programs: tuple[str, ...]) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"selfix up exited with {self.proc.returncode}\n{self.log_tail()}")
        info = self.info()
        fatal = [p for p in programs if info.get(p, {}).get("statename") == "FATAL"]
        if fatal:
            raise AssertionError(f"programs {fatal} FATAL\n{self.log_tail()}")
        return all(info.get(p, {}).get("statename") == "RUNNING" for p in programs)

    def pid(self, program: str) -> int:
        return int(self.info()[program]["pid"])

    def kill(self, program: str, sig: int = signal.SIGKILL) -> int:
        """Kill one program for real; returns the old pid. supervisord restarts it (autorestart)."""
        pid = self.pid(program)
        os.kill(pid, sig)
        return pid

    def wait_restarted(self, program: str, old_pid: int, timeout: float = 30) -> int:
        def restarted() -> int | None:
            info = self.info().get(program, {})
            ok = info.get("statename") == "RUNNING" and info.get("pid") not in (0, old_pid)
            return int(info["pid"]) if ok else None

        return int(wait_until(restarted, timeout, f"{program} restarted"))

    def drop(self, name: str, message: dict[str, Any] | bytes) -> Path:
        """Drop a job file into inbox/ the way a person would (write elsewhere, then rename in)."""
        inbox = Path(self.env["SPOOL_DIR"]) / "inbox"
        inbox.mkdir(parents=True, exist_ok=True)
        raw = message if isinstance(message, bytes) else json.dumps(message).encode()
        tmp = self.root / f".{name}.tmp"
        tmp.write_bytes(raw)
        target = inbox / name
        os.rename(tmp, target)
        return target

    def results(self) -> dict[str, dict[str, Any]]:
        done = Path(self.env["SPOOL_DIR"]) / "done"
        out = {}
        for path in done.glob("*.json") if done.exists() else []:
            try:
                out[path.stem] = json.loads(path.read_bytes())
            except ValueError:
                continue
        return out

    def wait_results(self, task_ids: set[str], timeout: float = 120) -> dict[str, dict[str, Any]]:
        def all_done() -> dict[str, dict[str, Any]] | None:
            res = self.results()
            return res if task_ids <= set(res) else None

        def missing() -> str:
            left = sorted(task_ids - set(self.results()))
            return f"results of {len(left)} task(s), e.g. {left[:5]}\n{self.log_tail()}"

        return dict(wait_until(all_done, timeout, missing, interval=0.2))

    def executions(self) -> list[str]:
        return self.exec_log.read_text().split() if self.exec_log.exists() else []

    def log_tail(self, n: int = 60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        """SIGTERM to `selfix up` (supervisord drains the programs); then SIGKILL to every process group of a
        program ever seen, so nothing outlives the test even where supervisord was killed (a test that kills it,
        or a parent-death signal that did not work)."""
        if self.proc is not None and self.proc.poll() is None:
            self.info()
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        for pid in self.leftovers():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def leftovers(self) -> list[int]:
        """Live processes in a program's process group that carry this node's SPOOL_DIR (a pid number reused by
        an unrelated process since is left alone)."""
        mark = f"SPOOL_DIR={self.env['SPOOL_DIR']}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) in self.groups and fields[0] != "Z" and \
                        mark in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
        return found
