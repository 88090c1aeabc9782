"""The `selfix` command line and process start-up, as a person or supervisord runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from selfix.cli import comfy_argv, extra_model_paths, merge_record, node_record, preview_method
from selfix.settings import SettingsError, load
from selfix.spool import Spool
from tests.servers.node_plugin import task


def run(args: list[str], env: dict[str, str], stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "selfix", *args], env={**os.environ, **env}, input=stdin and
                          stdin.decode(), capture_output=True, text=True, timeout=60)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    Spool(tmp_path / "spool").ensure()  # a node's spool: the client commands never create one
    return {"SPOOL_DIR": str(tmp_path / "spool"), "STORE_DIR": str(tmp_path / "store"),
            "COMFY_PORT": "1", "LORA_CACHE_DIR": str(tmp_path / "loras")}


@pytest.mark.parametrize("program", ["consumer", "runner", "uploader", "watchdog"])
def test_a_bad_setting_stops_each_process_with_exit_78_naming_the_variable(program: str, env: dict[str, str]) -> None:
    out = run([program], {**env, "MAX_ATTEMPTS": "zero", "S3_SECRET_KEY": "hunter2-secret"})
    assert out.returncode == 78, out
    assert "MAX_ATTEMPTS" in out.stderr and "hunter2-secret" not in out.stderr + out.stdout


def test_submit_prints_task_ids_and_specific_rejections(env: dict[str, str], tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(task("t-good")))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**task("t-bad"), "loraModel": "users/other/x.safetensors"}))
    junk = tmp_path / "junk.json"
    junk.write_text("{nope")
    out = run(["submit", str(good), str(bad), str(junk)], env)
    assert out.returncode == 2
    lines = out.stdout.splitlines()
    assert lines[0] == "t-good"
    assert lines[1].startswith("t-bad: rejected: lora_forbidden")
    assert "no usable taskId" in lines[2] and "corrupt" in lines[2]
    again = run(["submit", "-"], env, stdin=good.read_bytes())
    assert again.returncode == 0 and "duplicate" in again.stdout


def test_status_json_counts_every_state(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(task("a")))
    run(["submit", str(tmp_path / "a.json")], env)
    snap = json.loads(run(["status", "--json"], env).stdout)
    assert snap["counts"]["inbox"] == 1 and snap["counts"]["done"] == 0


def test_doctor_reports_each_check_and_fails_without_comfyui(env: dict[str, str]) -> None:
    out = run(["doctor"], {**env, "S3_SECRET_KEY": "hunter2-secret", "COMFY_COMMAND": "true",
                           "CONSOLE_PREVIEWS": "true"})
    assert out.returncode == 1
    assert "ok   spool" in out.stdout and "FAIL comfyui:" in out.stdout
    assert "ok   console previews: on, ComfyUI's --preview-method is none: ComfyUI sends none" in out.stdout
    assert "ok   gpu: " in out.stdout
    assert "S3_SECRET_KEY=***" in out.stdout and "hunter2-secret" not in out.stdout


def test_comfy_command_placeholders_and_missing_comfyui_dir_message(tmp_path: Path) -> None:
    settings = load({"COMFY_COMMAND": "fake --port {port} --out {output_dir}", "COMFY_PORT": "9999",
                     "COMFY_OUTPUT_DIR": str(tmp_path / "o")})
    assert comfy_argv(settings) == ["fake", "--port", "9999", "--out", str(tmp_path / "o")]
    with pytest.raises(SettingsError, match="COMFYUI_DIR"):
        comfy_argv(load({}))
    with pytest.raises(SettingsError, match="no main.py"):
        comfy_argv(load({"COMFYUI_DIR": str(tmp_path)}))
    (tmp_path / "main.py").touch()
    argv = comfy_argv(load({"COMFYUI_DIR": str(tmp_path), "COMFY_ARGS": "--cpu --lowvram"}))
    assert argv[1] == str(tmp_path / "main.py") and argv[-2:] == ["--cpu", "--lowvram"]
    assert argv[2:4] == ["--listen", "127.0.0.1"]


def test_preview_method_is_read_from_the_comfyui_command() -> None:
    assert preview_method(["main.py", "--preview-method", "taesd", "--cpu"]) == "taesd"
    assert preview_method(["main.py", "--preview-method=latent2rgb"]) == "latent2rgb"
    assert preview_method(["main.py", "--cpu"]) == preview_method(["main.py", "--preview-method"]) == "none"


def test_extra_model_paths_lists_base_models_and_lora_cache(tmp_path: Path) -> None:
    import yaml

    text = extra_model_paths(load({"MODELS_DIR": str(tmp_path / "m"), "LORA_CACHE_DIR": str(tmp_path / "l")}))
    parsed: dict[str, Any] = yaml.safe_load(text)
    assert parsed["selfix_models"]["base_path"] == str(tmp_path / "m")
    assert parsed["selfix_models"]["checkpoints"] == "checkpoints/"
    assert parsed["selfix_lora_cache"]["loras"] == str(tmp_path / "l")


def test_json_logs_carry_task_id(tmp_path: Path) -> None:
    code = ("from loguru import logger; from selfix import log; from selfix.settings import load;"
            "log.setup('runner', load({'LOG_FORMAT': 'json'})); logger.bind(task_id='t-9').info('hello')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    record = json.loads(out.stdout.strip().splitlines()[-1])["record"]
    assert record["extra"]["task_id"] == "t-9" and record["extra"]["process"] == "runner"
    assert record["message"] == "hello"


@pytest.mark.parametrize("command", [["submit", "x.json"], ["status"], ["ctl", "status"]])
def test_a_command_without_a_spool_names_what_to_set_and_creates_nothing(command: list[str], tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text(json.dumps(task("x")))
    out = subprocess.run([sys.executable, "-m", "selfix", *command], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "SELFIX_HOME": str(tmp_path / "home")})
    assert out.returncode == 78, out
    assert f"no node spool at {tmp_path / 'home' / 'spool'}" in out.stderr and "Traceback" not in out.stderr
    assert "--spool DIR" in out.stderr and "SELFIX_HOME" in out.stderr
    assert not (tmp_path / "home").exists()


def test_commands_beside_a_node_use_the_settings_it_recorded(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool").ensure()
    node_env = {"SPOOL_DIR": str(spool.root), "COMFY_COMMAND": "true", "COMFY_PORT": "1",
                "STORE_DIR": str(tmp_path / "store"), "S3_SECRET_KEY": "hunter2-secret", "HOME": "/home/someone"}
    record = node_record(node_env)
    assert b"hunter2-secret" not in record and b"HOME" not in record
    spool.write_run_file("node.json", record)
    shell = {k: v for k, v in os.environ.items() if k not in load({}).redacted()}
    out = subprocess.run([sys.executable, "-m", "selfix", "doctor", "--spool", str(spool.root)], cwd=tmp_path,
                         env={**shell, "COMFY_PORT": "2"}, capture_output=True, text=True, timeout=60)
    assert "ok   comfyui command: true" in out.stdout, out.stdout  # the node's COMFY_COMMAND, not this shell's none
    assert "FAIL comfyui: http://127.0.0.1:1 " in out.stdout
    assert "note: this shell sets COMFY_PORT=2, which the node does not run with" in out.stdout
    assert "settings from its run/node.json" in out.stdout.splitlines()[0]
    assert "note: the node runs with S3_SECRET_KEY set" in out.stdout and "hunter2-secret" not in out.stdout


def test_merge_record_keeps_the_node_values_and_takes_masked_secrets_from_the_shell(tmp_path: Path) -> None:
    node = {"COMFY_PORT": "8100", "S3_SECRET_KEY": "***", "KAFKA_SASL_PASSWORD": "***", "SELFIX_HOME": "/srv/n"}
    env, ignored, missing = merge_record({"COMFY_PORT": "9", "S3_SECRET_KEY": "s", "MODELS_DIR": "/srv/n/models"},
                                         node, tmp_path / "spool")
    assert env["COMFY_PORT"] == "8100" and env["S3_SECRET_KEY"] == "s" and env["SPOOL_DIR"] == str(tmp_path / "spool")
    assert ignored == {"COMFY_PORT": "9"}  # MODELS_DIR equals the node's default under its home
    assert missing == ["KAFKA_SASL_PASSWORD"]


def test_a_node_program_without_selfix_home_refuses_to_create_the_container_tree(tmp_path: Path) -> None:
    if Path("/app/spool").is_dir():
        pytest.skip("this machine has a container home with a node in /app")
    shell = {k: v for k, v in os.environ.items() if k not in load({}).redacted()}
    out = subprocess.run([sys.executable, "-m", "selfix", "runner"], cwd=tmp_path, env=shell, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 78 and "SELFIX_HOME is not set" in out.stderr and "SPOOL_DIR" in out.stderr, out


def test_wait_ready_says_what_fails_when_the_node_never_takes_work(env: dict[str, str]) -> None:
    out = run(["status", "--wait-ready", "1"], {**env, "METRICS_PORT": "1"})
    assert out.returncode == 1, out
    assert "not ready after 1s (the watchdog does not answer on http://127.0.0.1:1/readyz)" in out.stderr
