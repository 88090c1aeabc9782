"""The watchdog in a whole node under real supervisord (ComfyUI = the double).

GPU memory is faked through the double's POST /fake/vram, which turns its /system_stats device into a CUDA one:
the watchdog reads ComfyUI's view of the GPU in every mode (and takes the fuller of it and NVML's), so the same
production code path is exercised on machines with and without a GPU, and no test-only switch exists in the
watchdog. The NVML code itself is driven by a fake pynvml in test_watchdog_units.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from selfix.metrics import CATALOGUE
from tests.servers.node_plugin import Node, task, wait_until, write_safetensors

pytestmark = [pytest.mark.watchdog, pytest.mark.e2e]

FAST = {"WATCHDOG_INTERVAL_S": "0.2", "HEARTBEAT_STALE_S": "2", "RESTART_MIN_INTERVAL_S": "0",
        "RESTART_GRACE_S": "0", "DISK_FREE_FLOOR_GB": "0"}
VRAM_TOTAL = 24 << 30


def http(node: Node, path: str) -> tuple[int, bytes]:
    url = f"http://127.0.0.1:{node.env['METRICS_PORT']}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except OSError:
        return 0, b""


def comfy(node: Node, path: str, body: dict[str, Any] | None = None) -> Any:
    url = f"http://127.0.0.1:{node.env['COMFY_PORT']}{path}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def set_vram(node: Node, used_fraction: float) -> None:
    comfy(node, "/fake/vram", {"vram_total": VRAM_TOTAL, "vram_free": int(VRAM_TOTAL * (1 - used_fraction))})


def metrics(node: Node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = http(node, "/metrics")
    assert status == 200, body
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


def metric(node: Node, name: str, **labels: str) -> float | None:
    return metrics(node).get((name, tuple(sorted(labels.items()))))


def wait_running(node: Node, task_id: str) -> None:
    def started() -> bool:
        path = node.spool.processing_path(task_id)
        try:
            return bool(json.loads(path.read_bytes()).get("startedAt"))
        except (OSError, ValueError):
            return False

    wait_until(started, 30, f"{task_id} running inside ComfyUI")


def test_soft_mark_frees_idle_comfyui_metrics_health_and_status(make_node: Any, tmp_path: Path) -> None:
    node: Node = make_node(seconds_per_step=0.05, env=FAST).start()
    comfy_pid = node.pid("comfyui")
    cpu_mode_lines = [ln for ln in node.log_path.read_text().splitlines() if "CPU mode" in ln]

    # soft mark while a job runs: no /free (it would unload the model under the job)
    node.drop("busy.json", task("busy", steps=40))
    wait_running(node, "busy")
    set_vram(node, 0.90)
    wait_until(lambda: metric(node, "selfix_gpu_memory_used_bytes", gpu="0") is not None, 10, "GPU gauge")
    assert comfy(node, "/fake/stats")["free_calls"] == []
    node.wait_results({"busy"}, 30)
    # idle now: the watchdog frees, once
    frees = wait_until(lambda: comfy(node, "/fake/stats")["free_calls"], 10, "POST /free reaching the double")
    assert frees == [{"unload_models": True, "free_memory": True}]
    assert node.pid("comfyui") == comfy_pid, "a soft mark never restarts ComfyUI"

    # an end-to-end run: a LoRA job, a plain one, an invalid one
    set_vram(node, 0.50)
    write_safetensors(node.store / "users/u1/models/style.safetensors", b"\1" * 4096)
    bad = task("bad")
    bad["workflow"]["4"]["inputs"]["ckpt_name"] = "missing.safetensors"
    node.drop("lora.json", task("lora", lora="users/u1/models/style.safetensors"))
    node.drop("plain.json", task("plain"))
    node.drop("bad.json", bad)
    results = node.wait_results({"lora", "plain", "bad"}, 60)
    assert results["lora"]["status"] == "completed" and results["bad"]["error"]["code"] == "invalid_workflow"

    def settled() -> Any:
        m = metrics(node)
        return m if m.get(("selfix_job_duration_seconds_count", ())) == 4 else None

    m = wait_until(settled, 10, "4 results counted")
    names = {fam.name + ("_total" if fam.type == "counter" else "")
             for fam in text_string_to_metric_families(http(node, "/metrics")[1].decode()) if fam.samples}
    nvml = m[("selfix_nvml_up", ())] == 1
    expected = {d.name for d in CATALOGUE if nvml or not d.nvml_only} - {"selfix_job_retries_total"}
    assert expected <= names, f"missing: {sorted(expected - names)}"
    assert m[("selfix_jobs_total", (("code", "none"), ("status", "completed")))] == 3
    assert m[("selfix_jobs_total", (("code", "invalid_workflow"), ("status", "failed")))] == 1
    assert m[("selfix_job_generation_seconds_count", ())] == 3
    assert 0 < m[("selfix_job_generation_seconds_sum", ())] < 60
    assert m[("selfix_job_queue_seconds_count", ())] == 4
    assert m[("selfix_spool_jobs", (("state", "done"),))] == 4
    assert m[("selfix_spool_jobs", (("state", "inbox"),))] == 0
    assert m[("selfix_comfyui_up", ())] == 1 and m[("selfix_ready", ())] == 1
    assert m[("selfix_comfyui_frees_total", (("reason", "gpu_soft_mark"),))] == 1
    assert m[("selfix_comfyui_restarts_total", (("reason", "gpu_hard_mark"),))] == 0
    assert m[("selfix_comfyui_rss_bytes", ())] > 10 << 20
    assert m[("selfix_lora_cache_bytes", ())] >= 4096
    if m[("selfix_lora_cache_hits_total", ())] + m[("selfix_lora_cache_misses_total", ())] > 0:  # once wired
        assert m[("selfix_lora_cache_misses_total", ())] >= 1 and m[("selfix_lora_download_bytes_total", ())] >= 4096
    assert m[("selfix_gpu_memory_total_bytes", (("gpu", "0"),))] >= (VRAM_TOTAL if not nvml else 1)
    assert m[("selfix_gpu_memory_used_bytes", (("gpu", "0"),))] >= (VRAM_TOTAL // 2 - (1 << 20) if not nvml else 1)
    assert all(m[("selfix_program_up", (("program", p),))] == 1
               for p in ("comfyui", "consumer", "runner", "uploader", "watchdog"))
    assert all(0 <= m[("selfix_heartbeat_age_seconds", (("program", p),))] < 5
               for p in ("consumer", "runner", "uploader", "watchdog"))
    assert m[("selfix_disk_free_bytes", (("path", "spool"),))] > 0
    if not nvml:
        assert len(cpu_mode_lines) == 1 and "CPU mode" in node.log_tail(400).split("GPU mode")[0]

    # selfix status: a person's view of the same
    status = subprocess.run([sys.executable, "-m", "selfix", "status"], env=node.env, capture_output=True,
                            text=True, timeout=30)
    assert status.returncode == 0, status.stderr
    assert "comfyui: up" in status.stdout and "gpu 0" in status.stdout and "bad: invalid_workflow" in status.stdout
    assert "free comfyui (gpu_soft_mark)" in status.stdout
    snap = json.loads(subprocess.run([sys.executable, "-m", "selfix", "status", "--json"], env=node.env,
                                     capture_output=True, text=True, timeout=30).stdout)
    assert snap["watchdog"]["gpus"][0]["memory_total"] >= VRAM_TOTAL or nvml
    assert snap["programs"]["runner"] == "RUNNING"

    # /readyz and /healthz follow ComfyUI down and up again
    assert http(node, "/readyz")[0] == 200 and http(node, "/healthz")[0] == 200
    node.rpc().supervisor.stopProcess("comfyui")
    status_code, body = http(node, "/readyz")
    assert status_code == 503 and "comfyui" in json.loads(body)["failing"]
    status_code, body = http(node, "/healthz")
    assert status_code == 503 and json.loads(body)["programs"]["comfyui"] == "STOPPED"
    node.rpc().supervisor.startProcess("comfyui")
    wait_until(lambda: http(node, "/readyz")[0] == 200, 30, "/readyz recovering")
    wait_until(lambda: http(node, "/healthz")[0] == 200, 30, "/healthz recovering")
    assert node.info()["comfyui"]["statename"] == "RUNNING"


def test_hard_mark_restarts_comfyui_and_the_running_job_completes_on_retry(make_node: Any) -> None:
    node: Node = make_node(seconds_per_step=0.05, env=FAST).start()
    node.drop("victim.json", task("victim", steps=60))
    wait_running(node, "victim")
    old = node.pid("comfyui")
    set_vram(node, 0.99)
    node.wait_restarted("comfyui", old, timeout=30)
    result = node.wait_results({"victim"}, 60)["victim"]
    assert result["status"] == "completed" and result["metadata"]["attempts"] == 2, result
    assert "restarting ComfyUI (gpu_hard_mark)" in node.log_tail(400)
    m = wait_until(lambda: (lambda m: m if m.get(("selfix_jobs_total", (("code", "none"), ("status", "completed"))))
                            else None)(metrics(node)), 10, "the result counted")
    assert m[("selfix_comfyui_restarts_total", (("reason", "gpu_hard_mark"),))] == 1
    assert m[("selfix_comfyui_restarts_total", (("reason", "exited"),))] == 0, "its own restart is not a crash"
    assert m[("selfix_job_retries_total", (("code", "comfyui_unavailable"),))] == 1


def test_frozen_runner_is_restarted_and_its_job_completes(make_node: Any) -> None:
    node: Node = make_node(seconds_per_step=0.05, env=FAST).start()
    node.drop("frozen.json", task("frozen", steps=60))
    wait_running(node, "frozen")
    old = node.kill("runner", signal.SIGSTOP)
    new = node.wait_restarted("runner", old, timeout=30)
    assert new != old
    result = node.wait_results({"frozen"}, 60)["frozen"]
    assert result["status"] == "completed" and result["metadata"]["attempts"] == 1, result
    assert "restarting runner (heartbeat_stale)" in node.log_tail(400)
    assert metric(node, "selfix_process_restarts_total", program="runner", reason="heartbeat_stale") == 1
    assert node.executions().count(result["metadata"]["promptId"]) == 1, "the job ran once"
