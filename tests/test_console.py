"""The operator's console (selfix/console.py): the watchdog's `/` page and `/api/status`, on a whole node (the
double), read by a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by Selenium).

scripts/lib/install-chromium installs both where apt works; SELFIX_CHROMIUM / SELFIX_CHROMEDRIVER name them
elsewhere. The browser tests skip, saying why, only where neither exists. Screenshots are written to the test's
tmp dir (and to SELFIX_SCREENSHOT_DIR when set) and checked not to be blank.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageStat

from selfix.job import Job, JobState
from selfix.spool import Spool
from tests.servers.node_plugin import Node, task, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.watchdog]

FAST = {"WATCHDOG_INTERVAL_S": "0.5", "DISK_FREE_FLOOR_GB": "0", "KAFKA_SASL_PASSWORD": "sekrit-never-shown"}
PROMPT_TEXT = "a cat"  # what t2i_workflow's CLIPTextEncode says
LATENT_PREVIEWS = ("--preview-method", "latent2rgb")  # the double then sends a preview frame per sampler step


def get(node: Node, path: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.env['METRICS_PORT']}{path}", timeout=10) as resp:
            return int(resp.status), dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), dict(exc.headers), exc.read()


def api(node: Node) -> dict[str, Any]:
    status, _, body = get(node, "/api/status")
    assert status == 200
    return dict(json.loads(body))


def failing_task(task_id: str) -> dict[str, Any]:
    bad = task(task_id)
    bad["workflow"]["4"]["inputs"]["ckpt_name"] = "missing.safetensors"  # ComfyUI refuses it: invalid_workflow
    return bad


@pytest.fixture
def node(make_node: Any) -> Node:
    """CONSOLE_PREVIEWS at its default (off), although ComfyUI sends previews."""
    return make_node(seconds_per_step=0.15, env=FAST, comfy_args=LATENT_PREVIEWS).start()  # type: ignore[no-any-return]


@pytest.fixture
def preview_node(make_node: Any) -> Node:
    env = {**FAST, "CONSOLE_PREVIEWS": "true"}
    return make_node(seconds_per_step=0.15, env=env, comfy_args=LATENT_PREVIEWS).start()  # type: ignore[no-any-return]


def running_entry(node: Node, task_id: str) -> dict[str, Any] | None:
    return next((j for j in api(node)["running"] if j["taskId"] == task_id), None)


def preview_files(node: Node) -> list[Path]:
    folder = node.spool.previews
    return sorted(folder.iterdir()) if folder.exists() else []


def test_api_status_shows_the_node_and_no_secret_prompt_or_user(node: Node) -> None:
    node.drop("ok-1.json", task("ok-1", steps=20))  # 3 s: seen running
    node.drop("bad-1.json", failing_task("bad-1"))
    # Previews off: while ok-1 runs (ComfyUI sending a preview a step) nothing is written, nothing is served.
    entry = wait_until(lambda: (j := running_entry(node, "ok-1")) and (j["progress"] or {}).get("max") and j, 30,
                       "ok-1 running with progress")
    assert entry["preview"] is False and entry["previewVersion"] is None
    assert preview_files(node) == [] and get(node, "/api/preview/ok-1")[0] == 404
    node.wait_results({"ok-1", "bad-1"})

    def listed() -> dict[str, Any] | None:
        doc = api(node)
        ids = {r["taskId"] for r in doc["recentResults"]}
        return doc if {"ok-1", "bad-1"} <= ids and doc["programs"] else None

    doc = wait_until(listed, 30, "both results in /api/status")
    assert doc["source"] == "watchdog" and doc["counts"]["done"] == 2
    assert set(doc["programs"]) == {"comfyui", "consumer", "runner", "uploader", "watchdog"}
    ok = next(r for r in doc["recentResults"] if r["taskId"] == "ok-1")
    assert ok["status"] == "completed" and ok["totalTime"] > 0 and ok["images"] == 1
    assert doc["recentFailures"][0]["taskId"] == "bad-1" and doc["recentFailures"][0]["code"] == "invalid_workflow"
    assert doc["jobs"] == {"completed": 1, "failed": 1}
    raw = json.dumps(doc)
    for forbidden in ("sekrit-never-shown", PROMPT_TEXT, '"userId"', "imagePath", '"workflow"'):
        assert forbidden not in raw, f"/api/status exposes {forbidden!r}"

    status, headers, page = get(node, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    # Self-contained: no URL of another origin anywhere in the page.
    assert b"http://" not in page.replace(b"http://www.w3.org/2000/svg", b"") and b"https://" not in page

    # `selfix status --json` prints the same document.
    out = subprocess.run([sys.executable, "-m", "selfix", "status", "--json"], env=node.env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    cli = json.loads(out.stdout)
    assert cli["source"] == "watchdog" and set(cli) == set(doc)
    assert {r["taskId"] for r in cli["recentResults"]} >= {"ok-1", "bad-1"}
    # A watchdog on that port that watches another spool is not taken for this one's: the spool is read instead.
    other = {**node.env, "SPOOL_DIR": str(node.root / "other-spool")}
    Spool(node.root / "other-spool").ensure()  # status never creates a spool; this one exists but is idle
    out = subprocess.run([sys.executable, "-m", "selfix", "status", "--json"], env=other, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["source"] == "spool"


def test_preview_of_the_running_task_is_served_while_it_runs_then_gone(preview_node: Node) -> None:
    node = preview_node
    node.drop("pv-1.json", task("pv-1", steps=40))  # 40 × 0.15 s
    first = wait_until(lambda: (j := running_entry(node, "pv-1")) and j["preview"] and j["previewVersion"], 30,
                       "pv-1 running with a preview")
    status, headers, image = get(node, "/api/preview/pv-1")
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and image.startswith(b"\xff\xd8\xff")
    assert headers["Cache-Control"] == "no-store"
    assert [p.name for p in preview_files(node)] == ["pv-1.preview"]
    wait_until(lambda: (j := running_entry(node, "pv-1")) and j["previewVersion"] not in (None, first), 10,
               "a newer preview of pv-1")
    for bad in ("nope", ".hidden", "a%2F..%2Fb", "x" * 129):  # unknown, not task ids, escaping: all 404
        assert get(node, f"/api/preview/{bad}")[0] == 404, bad
    assert node.wait_results({"pv-1"})["pv-1"]["status"] == "completed"
    assert preview_files(node) == [] and get(node, "/api/preview/pv-1")[0] == 404


# --- the browser ---------------------------------------------------------------------------------------------------

def executable(env: str, *names: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    return next((found for n in names if (found := shutil.which(n))), None)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    chromium = executable("SELFIX_CHROMIUM", "chromium", "chromium-browser", "google-chrome")
    driver_bin = executable("SELFIX_CHROMEDRIVER", "chromedriver")
    if not chromium or not driver_bin:
        pytest.skip("chromium and chromedriver not found: scripts/lib/install-chromium installs Debian's chromium "
                    "and chromium-driver where apt works (or set SELFIX_CHROMIUM, SELFIX_CHROMEDRIVER)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1500", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_bin, log_output=str(tmp_path / "chromedriver.log")),
                              options=options)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: Any, path: Path) -> Path:
    driver.save_screenshot(str(path))
    if os.environ.get("SELFIX_SCREENSHOT_DIR"):
        target = Path(os.environ["SELFIX_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
    print(f"screenshot: {path}")
    return path


def assert_not_blank(path: Path) -> None:
    with Image.open(path) as img:
        rgb = img.convert("RGB")
        colors = rgb.getcolors(maxcolors=1 << 20) or []
        spread = ImageStat.Stat(rgb).stddev
    assert rgb.size[0] >= 800 and rgb.size[1] >= 600, rgb.size
    assert len(colors) > 50, f"{path.name}: only {len(colors)} colours, a blank page"
    assert max(spread) > 10, f"{path.name}: no contrast ({spread})"


def js(driver: Any, script: str) -> Any:
    return driver.execute_script(script)


PREVIEW_RECT = ("const r = document.querySelector('img[data-preview=\"slow-1\"]').getBoundingClientRect();"
                "const k = window.devicePixelRatio; return [r.left * k, r.top * k, r.right * k, r.bottom * k];")


def preview_shown(driver: Any, task_id: str) -> str | None:
    """The version of the task's preview <img> once the browser has decoded it, None before."""
    return js(driver, f"const i = document.querySelector('img[data-preview=\"{task_id}\"]');"  # type: ignore[no-any-return]
                      "return i && i.complete && i.naturalWidth > 0 ? i.dataset.version : null;")


def assert_preview_not_blank(shot: Path, rect: list[float]) -> None:
    """The double's latent2rgb preview is one colour per step, with one channel at 128 or more: far from the
    page's dark card behind it."""
    with Image.open(shot) as img:
        left, top, right, bottom = (int(v) for v in rect)
        crop = img.convert("RGB").crop((left, top, right, bottom))
        mean = ImageStat.Stat(crop).mean
    assert crop.size[0] >= 64 and crop.size[1] >= 64, crop.size
    assert max(mean) > 100, f"the preview in {shot.name} looks blank: mean colour {mean}"


def fake_vram(node: Node, used_fraction: float) -> None:
    """The double's /system_stats then reports a CUDA device, which the watchdog reads as GPU 0 (source comfyui)."""
    total = 24 << 30
    body = json.dumps({"vram_total": total, "vram_free": int(total * (1 - used_fraction))}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{node.env['COMFY_PORT']}/fake/vram", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).close()


@pytest.mark.browser
def test_page_in_chromium_shows_progress_results_and_failures(preview_node: Node, browser: Any,
                                                              tmp_path: Path) -> None:
    node = preview_node  # CONSOLE_PREVIEWS=true: the running task's preview beside its progress bar
    fake_vram(node, 0.3)
    browser.get(f"http://127.0.0.1:{node.env['METRICS_PORT']}/")
    # The GPU's memory chart fills point by point, one per watchdog tick, without a reload.
    wait_until(lambda: js(browser, "const l = document.querySelector('[data-gpu=\"0\"] svg polyline');"
                                   "return l && l.getAttribute('points').split(' ').length >= 3;"), 30,
               "GPU 0's memory chart with three points")
    fake_vram(node, 0.6)
    wait_until(lambda: js(browser, "return document.querySelectorAll('[data-program]').length") == 5, 30,
               "the five programs on the page")
    assert "ready" in js(browser, "return document.getElementById('ready').textContent")

    node.drop("slow-1.json", task("slow-1", steps=40))  # 40 steps × 0.15 s: six seconds of progress

    def progress() -> int | None:
        value = js(browser, "const f = document.querySelector('.job[data-task=\"slow-1\"] .fill');"
                            "return f && Number(f.dataset.max) > 0 ? Number(f.dataset.value) : null;")
        return None if value is None else int(value)

    first = wait_until(lambda: (p := progress()) is not None and p >= 3 and p, 60, "slow-1's progress bar")
    later = wait_until(lambda: (p := progress()) is not None and p > first + 3 and p, 30,
                       f"the progress bar moving past {first} without a reload")
    width = js(browser, "return document.querySelector('.job[data-task=\"slow-1\"] .fill').style.width")
    assert 0 < float(width.rstrip("%")) < 100, width
    shown = wait_until(lambda: preview_shown(browser, "slow-1"), 30, "slow-1's preview image loaded")
    wait_until(lambda: (now := preview_shown(browser, "slow-1")) and now != shown, 30,
               "slow-1's preview replaced by a newer one without a reload")
    mid = screenshot(browser, tmp_path / "console-mid-task.png")
    assert later < 40
    assert_preview_not_blank(mid, js(browser, PREVIEW_RECT))

    wait_until(lambda: js(browser, "return !!document.querySelector('#results tr[data-task=\"slow-1\"]"
                                   "[data-status=\"completed\"]')"), 60, "slow-1 completed on the page")
    node.drop("bad-1.json", failing_task("bad-1"))
    code = wait_until(lambda: js(browser, "const c = document.querySelector('#failures tr[data-task=\"bad-1\"] "
                                          "td.code'); return c && c.textContent;"), 60, "bad-1's failure on the page")
    assert code == "invalid_workflow"
    failed = screenshot(browser, tmp_path / "console-after-failure.png")
    assert not js(browser, "return document.querySelector('.job[data-task=\"slow-1\"]')")  # gone from Running

    # Nothing was loaded from anywhere but the node.
    origin = f"http://127.0.0.1:{node.env['METRICS_PORT']}"
    urls = js(browser, "return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(u.startswith(origin) for u in urls), urls
    for shot in (mid, failed):
        assert_not_blank(shot)
    with Image.open(mid) as a, Image.open(failed) as b:
        assert a.convert("RGB").tobytes() != b.convert("RGB").tobytes()


# --- the pure parts ------------------------------------------------------------------------------------------------

def test_result_summary_keeps_timings_and_codes_only() -> None:
    from selfix.console import MESSAGE_MAX, result_summary

    done = {"taskId": "t", "userId": "u-secret", "status": "completed", "imagePaths": ["users/u/images/t-0.png"],
            "metadata": {"generationTime": 1.5, "queueTime": 0.2, "totalTime": 2.0, "attempts": 1, "promptId": "p"}}
    s = result_summary("t", done, 100.0)
    assert s == {"taskId": "t", "status": "completed", "at": 100.0, "totalTime": 2.0, "generationTime": 1.5,
                 "queueTime": 0.2, "attempts": 1.0, "images": 1}
    failed = {"taskId": "f", "status": "failed", "error": {"code": "timeout", "message": "m" * 1000},
              "metadata": "not a dict"}
    s = result_summary("f", failed, 1.0)
    assert s["code"] == "timeout" and len(s["message"]) == MESSAGE_MAX and s["totalTime"] is None


def test_running_jobs_leave_the_workflow_out(tmp_path: Path) -> None:
    from selfix.console import running_jobs
    spool = Spool(tmp_path / "spool").ensure()
    job = {"taskId": "t", "state": "submitted", "attempt": 2, "startedAt": 90.0, "userId": "u",
           "progress": {"value": 3, "max": 10, "node": "3", "extra": "x"},
           "workflow": {"6": {"inputs": {"text": PROMPT_TEXT}}}}
    spool.processing_path("t").write_text(json.dumps(job))
    spool.processing_path("broken").write_text("{")
    jobs = running_jobs(spool.processing_jobs(), 100.0)
    assert jobs == [{"taskId": "t", "state": "submitted", "attempt": 2,
                     "progress": {"value": 3, "max": 10, "node": "3"}, "startedAt": 90.0, "elapsedS": 10.0,
                     "preview": False, "previewVersion": None}]


def test_running_jobs_say_whether_a_preview_exists(tmp_path: Path) -> None:
    from selfix.console import running_jobs, sniff

    spool = Spool(tmp_path / "spool").ensure()
    for task_id in ("a", "b"):
        spool.write_processing(Job(task_id, state=JobState.SUBMITTED))
    spool.write_preview("a", b"\xff\xd8\xff\xe0 a jpeg")
    jobs = {j["taskId"]: j for j in running_jobs(spool.processing_jobs(), 1.0, spool)}
    assert jobs["a"]["preview"] is True and jobs["a"]["previewVersion"] == spool.preview_version("a")
    assert jobs["b"]["preview"] is False and jobs["b"]["previewVersion"] is None
    off = running_jobs(spool.processing_jobs(), 1.0)  # CONSOLE_PREVIEWS off: the file is not even looked at
    assert [j["preview"] for j in off] == [False, False]
    assert sniff(b"\x89PNG\r\n\x1a\n...") == "image/png" and sniff(b"\xff\xd8\xff") == "image/jpeg"
    assert sniff(b"") is None and sniff(b"GIF89a") is None


def test_gpu_history_keeps_ten_minutes() -> None:
    from selfix.console import HISTORY_S, GpuHistory
    from selfix.gpu import GpuReading

    history = GpuHistory()
    for t in range(0, 1200, 5):
        history.add(float(t), [GpuReading(index=0, name="g", memory_used=t, memory_total=100, source="nvml",
                                          utilization=0.5, temperature_c=60.0)])
    dump = history.dump()["0"]
    assert dump["memTotal"] == 100 and dump["t"][-1] == 1195.0
    assert dump["t"][0] >= 1195.0 - HISTORY_S and len(dump["t"]) == len(dump["memUsed"]) == len(dump["util"])
