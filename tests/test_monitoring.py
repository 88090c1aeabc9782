"""The monitoring kit: Prometheus alert rules (deploy/prometheus/alerts.yml), the Grafana dashboard
(deploy/grafana/selfix.json) and a real Prometheus scraping a running node.

`promtool` and `prometheus` come from Debian's `prometheus` package (scripts/lib/install-prometheus unpacks it into
the cache; SELFIX_PROMETHEUS_BIN names the directory, else PATH is searched). Where neither has them, these tests
skip and say so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from selfix.metrics import BY_NAME
from tests.servers.node_plugin import Node, free_port, task, wait_until
from tests.test_console import fake_vram

pytestmark = pytest.mark.monitoring

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
ALERT_TESTS = PROM_DIR / "alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "selfix.json"
README = ROOT / "README.md"
# Metrics that other work adds; a rule may name them (it stays silent where a node does not export them yet).
PENDING_METRICS: set[str] = set()
# Series Prometheus itself makes for every target.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
METRIC_RE = re.compile(r"\b(selfix_[a-z0-9_]+)\b")


def tool(name: str) -> str:
    where = os.environ.get("SELFIX_PROMETHEUS_BIN")
    found = shutil.which(name, path=where) if where else shutil.which(name)
    if not found:
        pytest.skip(f"{name} not found (SELFIX_PROMETHEUS_BIN or PATH): scripts/lib/install-prometheus installs "
                    "Debian's prometheus package where apt works")
    return found


def metric_names(expr: str) -> set[str]:
    """selfix metric names an expression uses, histogram series (_bucket/_sum/_count) mapped to their family."""
    names = set()
    for name in METRIC_RE.findall(expr):
        for suffix in ("_bucket", "_sum", "_count"):
            base = name.removesuffix(suffix)
            if base != name and BY_NAME.get(base) and BY_NAME[base].kind == "histogram":
                name = base
        names.add(name)
    return names


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def what_to_watch_metrics() -> set[str]:
    text = README.read_text()
    section = text.split("### What to watch", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    return set(METRIC_RE.findall(section))


# --- alert rules ------------------------------------------------------------------------------------------------

def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    promtool = tool("promtool")
    check = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    run = subprocess.run([promtool, "test", "rules", ALERT_TESTS.name], capture_output=True, text=True, timeout=120,
                         cwd=PROM_DIR)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout + run.stderr


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    alerts = {r["alert"] for r in alert_rules()}
    cases: dict[str, dict[str, int]] = {a: {"firing": 0, "silent": 0} for a in alerts}
    for group in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for case in group.get("alert_rule_test", []):
            assert case["alertname"] in alerts, f"{group['name']}: tests an alert that does not exist"
            cases[case["alertname"]]["firing" if case.get("exp_alerts") else "silent"] += 1
    missing = {a: c for a, c in cases.items() if not c["firing"] or not c["silent"]}
    assert not missing, f"alerts without a firing or a silent case: {missing}"


def test_alert_rules_name_only_known_metrics_and_cover_what_to_watch() -> None:
    used: set[str] = set()
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        unknown = names - set(BY_NAME) - PENDING_METRICS
        assert not unknown, f"{rule['alert']} names metrics selfix does not export: {unknown}"
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert {"summary", "description"} <= set(rule["annotations"])
        used |= names
    watched = what_to_watch_metrics()
    assert {"selfix_ready", "selfix_program_up", "selfix_gpu_xid_errors_total"} <= watched  # the parser works
    dashboard = {n for e in dashboard_exprs() for n in metric_names(e)}
    # Everything "What to watch" names is alerted on or (ratios such as cache hits/misses) on the dashboard.
    assert not watched - used - dashboard, f"What to watch names metrics no rule or panel uses: {watched - used}"
    alerting = {"selfix_ready", "selfix_program_up", "selfix_jobs_total", "selfix_job_retries_total",
                "selfix_spool_oldest_inbox_age_seconds", "selfix_spool_jobs", "selfix_comfyui_restarts_total",
                "selfix_process_restarts_total", "selfix_gpu_xid_errors_total", "selfix_gpu_ecc_errors_total",
                "selfix_disk_free_bytes"}
    assert alerting <= used, f"no alert on {alerting - used}"


def test_prometheus_config_of_the_compose_profile_is_valid() -> None:
    promtool = tool("promtool")
    run = subprocess.run([promtool, "check", "config", str(PROM_DIR / "prometheus.yml")], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 rule files found" in run.stdout + run.stderr


# --- the dashboard ----------------------------------------------------------------------------------------------

def dashboard_panels() -> list[dict[str, Any]]:
    doc = json.loads(DASHBOARD.read_text())
    panels: list[dict[str, Any]] = []
    for panel in doc["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows
    return [p for p in panels if p.get("type") != "row"]


def dashboard_exprs() -> list[str]:
    if not DASHBOARD.exists():
        return []
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]


def concrete(expr: str, node: str = "n1:9400") -> str:
    """A dashboard query with Grafana's variables filled in, as Prometheus receives it."""
    return (expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$__range", "1h")
            .replace("$node", re.escape(node).replace("\\", "\\\\")))  # Grafana escapes regex and string


def promtool_parses(exprs: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """PromQL parse + type check through promtool: each expression becomes a recording rule of a temp rule file."""
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:{re.sub(r'[^A-Za-z0-9_]', '_', k)}",
                                                          "expr": e} for k, e in exprs.items()]}]}
    path = tmp_path / "dashboard-exprs.yml"
    path.write_text(yaml.safe_dump(rules))
    return subprocess.run([tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    exprs = {f"p{p['id']}_{t['refId']}": concrete(t["expr"]) for p in dashboard_panels() for t in p["targets"]}
    assert len(exprs) >= 20
    run = promtool_parses(exprs, tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in run.stdout
    # The check itself catches a broken query.
    bad = promtool_parses({"broken": 'sum by (code (rate(selfix_jobs_total[5m]))'}, tmp_path)
    assert bad.returncode != 0, bad.stdout


def test_dashboard_names_only_documented_metrics_and_filters_by_node() -> None:
    doc = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["node"]["type"] == "query" and variables["node"]["multi"] and variables["node"]["includeAll"]
    assert "label_values(selfix_ready, instance)" in json.dumps(variables["node"]["query"])
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    used: set[str] = set()
    for panel in dashboard_panels():
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            names = metric_names(expr)
            unknown = names - set(BY_NAME)
            assert names and not unknown, f"panel {panel['title']!r} names unknown metrics {unknown}: {expr}"
            # every selector is narrowed to the chosen nodes
            selectors = re.findall(r"\bselfix_[a-z0-9_]+(\{[^}]*\})?", expr)
            assert all('instance=~"$node"' in sel for sel in selectors), f"{panel['title']!r}: {expr}"
            used |= names
    # The topics the dashboard is for: throughput, failures by code, queue, latency histograms, GPU, restarts.
    topics = {"selfix_jobs_total", "selfix_job_retries_total", "selfix_spool_jobs",
              "selfix_spool_oldest_inbox_age_seconds", "selfix_job_duration_seconds", "selfix_job_queue_seconds",
              "selfix_job_generation_seconds", "selfix_gpu_memory_used_bytes", "selfix_gpu_memory_total_bytes",
              "selfix_gpu_utilization_ratio", "selfix_gpu_temperature_celsius", "selfix_comfyui_restarts_total",
              "selfix_process_restarts_total"}
    assert topics <= used, f"no panel for {topics - used}"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_compose_monitoring_profile_is_provisioned_with_both_files() -> None:
    from tests.test_deploy import COMPOSE, NODE, compose_model, node_environment, volume_mounts

    services = compose_model(COMPOSE)["services"]
    for name in ("prometheus", "grafana"):
        assert services[name].get("profiles") == ["monitoring"], f"{name} must be optional (profile monitoring)"
        assert all(str(p).startswith("127.0.0.1:") for p in services[name]["ports"]), services[name]["ports"]
    assert all(not s.get("profiles") for n, s in services.items() if n not in {"prometheus", "grafana"})

    def binds(service: str) -> dict[str, Path]:
        out = {}
        for m in volume_mounts(services[service]):
            if str(m["source"]).startswith("./"):
                assert m["read_only"], f"{service} mounts {m['source']} writable"
                source = ROOT / m["source"]
                assert source.exists(), f"{service} mounts {m['source']}, which does not exist"
                out[m["target"]] = source
        return out

    prom = binds("prometheus")
    config_target = next(a.split("=", 1)[1] for a in services["prometheus"]["command"] if a.startswith("--config"))
    config = yaml.safe_load(prom[config_target].read_text())
    rule_targets = [str(Path(config_target).parent / r) for r in config["rule_files"]]
    assert [prom[t] for t in rule_targets] == [ALERTS]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "selfix")
    port = node_environment(COMPOSE)["METRICS_PORT"]
    assert job["static_configs"][0]["targets"] == [f"{NODE}:{port}"]

    graf = binds("grafana")
    provisioning = graf["/etc/grafana/provisioning"]
    provider = yaml.safe_load((provisioning / "dashboards" / "selfix.yml").read_text())["providers"][0]
    dashboards = {t: s for t, s in graf.items() if t.startswith(provider["options"]["path"].rstrip("/") + "/")}
    assert list(dashboards.values()) == [DASHBOARD]
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert source["type"] == "prometheus" and source["isDefault"]
    assert source["url"] == f"http://prometheus:{services['prometheus']['ports'][0].rsplit(':', 1)[1]}"


# --- a running node ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One node (the double) with results of both kinds in done/."""
    n = Node(tmp_path_factory.mktemp("monitoring") / "node", seconds_per_step=0.02,
             env={"WATCHDOG_INTERVAL_S": "0.2", "DISK_FREE_FLOOR_GB": "0"})
    try:
        n.start()
        fake_vram(n, 0.4)  # the double reports a CUDA device: the GPU families are exposed (and linted) too
        bad = task("bad-1")
        bad["workflow"]["4"]["inputs"]["ckpt_name"] = "missing.safetensors"  # ComfyUI refuses it: invalid_workflow
        for tid, msg in (("ok-1", task("ok-1")), ("ok-2", task("ok-2")), ("bad-1", bad)):
            n.drop(f"{tid}.json", msg)
        results = n.wait_results({"ok-1", "ok-2", "bad-1"})
        assert results["bad-1"]["status"] == "failed" and results["ok-1"]["status"] == "completed", results
        yield n
    finally:
        n.stop()


def scrape(n: Node) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{n.env['METRICS_PORT']}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def job_counts(n: Node) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for result in n.results().values():
        key = (result["status"], result.get("error", {}).get("code", "none"))
        counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.e2e
def test_live_metrics_pass_promtool_check_metrics(node: Node) -> None:
    promtool = tool("promtool")
    wait_until(lambda: all(s in scrape(node) for s in ('selfix_jobs_total{code="invalid_workflow"',
                                                      "selfix_gpu_memory_used_bytes{")),
               30, "the failed job and the GPU in /metrics")
    body = scrape(node)
    run = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"promtool check metrics:\n{run.stdout}{run.stderr}"
    exposed = {s.split("{")[0].split(" ")[0] for s in body.splitlines() if s.startswith("selfix_")}
    assert {"selfix_jobs_total", "selfix_ready", "selfix_gpu_memory_used_bytes", "selfix_gpu_info"} <= exposed


class Prometheus:
    """A real Prometheus server on a free loopback port, scraping one node every second, with the alert rules."""

    def __init__(self, root: Path, target: str) -> None:
        self.root = root
        self.port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        shutil.copy(ALERTS, root / "alerts.yml")
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "rule_files": ["alerts.yml"],
                  "scrape_configs": [{"job_name": "selfix", "static_configs": [{"targets": [target]}]}]}
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = root / "prometheus.log"
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        wait_until(self.ready, 60, lambda: f"Prometheus ready\n{self.log.read_text()[-3000:]}", interval=0.2)

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}\n{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as resp:
                return int(resp.status) == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read())
        return body

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = self.api("query", query=expr)
        assert body["status"] == "success", f"{expr}: {body}"
        return list(body["data"]["result"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def prometheus(node: Node, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    prom = Prometheus(tmp_path_factory.mktemp("prometheus"), f"127.0.0.1:{node.env['METRICS_PORT']}")
    yield prom
    prom.stop()


@pytest.mark.e2e
def test_real_prometheus_scrapes_the_node_and_returns_its_job_counts(node: Node, prometheus: Prometheus) -> None:
    want = job_counts(node)
    assert want == {("completed", "none"): 2, ("failed", "invalid_workflow"): 1}, want

    def counts() -> dict[tuple[str, str], int] | None:
        got = {(r["metric"]["status"], r["metric"]["code"]): int(float(r["value"][1]))
               for r in prometheus.query('sum by (status, code) (selfix_jobs_total{job="selfix"})')}
        return got if got == want else None

    wait_until(counts, 60, lambda: f"Prometheus to return {want}", interval=0.5)
    up = prometheus.query('up{job="selfix"}')
    assert [r["value"][1] for r in up] == ["1"]
    groups = prometheus.api("rules")["data"]["groups"]
    loaded = {r["name"]: r["health"] for g in groups for r in g["rules"]}
    assert set(loaded) == {r["alert"] for r in alert_rules()}
    assert set(loaded.values()) <= {"ok", "unknown"}, loaded


@pytest.mark.e2e
def test_every_dashboard_query_runs_on_a_real_prometheus(node: Node, prometheus: Prometheus) -> None:
    instance = f"127.0.0.1:{node.env['METRICS_PORT']}"
    wait_until(lambda: prometheus.query(f'count_over_time(up{{instance="{instance}"}}[1m]) >= 3'), 60,
               "three scrapes of the node")
    empty = []
    for panel in dashboard_panels():
        for target in panel["targets"]:
            if not prometheus.query(concrete(target["expr"], instance)):
                empty.append(panel["title"])
    # Panels over NVML-only metrics, or counters that did not move (retries, restarts), may be empty here;
    # the core ones must show this node.
    shown = {"Ready nodes", "Results per minute", "Spool", "Oldest job waiting in inbox/", "Latency quantiles",
             "Failure rate by code", "Free disk", "ComfyUI RSS", "ComfyUI and NVML", "GPUs", "GPU memory used"}
    assert not shown & set(empty), f"panels without data for a running node: {sorted(shown & set(empty))}"
