"""A real MinIO server (single drive) for tests, on free 127.0.0.1 ports, with real SigV4 authentication.

The binary comes from `scripts/lib/install-minio` (built from source through the Go module proxy, cached by
version), or from SELFIX_MINIO_BIN when the test runner already installed it. A server owns a base directory:
`data/` (the drive), `certs/` (kept out of $HOME), `minio.log` (stdout+stderr, quoted in every failure).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from minio import Minio

from tests.servers import ServerLifecycle, die_with_parent, free_ports

REPO = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO / "scripts" / "lib" / "install-minio"
ROOT_USER = "selfix-test"
ROOT_PASSWORD = "selfix-test-secret-0123"  # MinIO wants >= 8 characters
REGION = "us-east-1"


class MinioServerError(RuntimeError):
    """MinIO could not be installed, started or stopped; the message carries the log's tail."""


def minio_binary() -> Path:
    """SELFIX_MINIO_BIN if set (scripts/test exports it), else install (cached: instant after the first time)."""
    configured = os.environ.get("SELFIX_MINIO_BIN")
    if configured:
        path = Path(configured)
        if not os.access(path, os.X_OK):
            raise MinioServerError(f"SELFIX_MINIO_BIN={configured} is not an executable file")
        return path
    proc = subprocess.run([str(INSTALL_SCRIPT)], capture_output=True, text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise MinioServerError(f"{INSTALL_SCRIPT} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    os.environ["SELFIX_MINIO_BIN"] = lines[-1]  # later servers in this session skip the script
    return Path(lines[-1])


class MinioServer(ServerLifecycle):
    def __init__(self, base_dir: Path | str | None = None, *, binary: Path | None = None,
                 access_key: str = ROOT_USER, secret_key: str = ROOT_PASSWORD) -> None:
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="selfix-minio-"))
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "minio.log"
        self._binary = binary
        self._access_key = access_key
        self._secret_key = secret_key
        self.port, self.console_port = free_ports(2)
        self._proc: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None  # how long the last start() took, for the curious

    # -- what tests use

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def access_key(self) -> str:
        return self._access_key

    @property
    def secret_key(self) -> str:
        return self._secret_key

    @property
    def region(self) -> str:
        return REGION

    def client(self, access_key: str | None = None, secret_key: str | None = None) -> Minio:
        return Minio(self.endpoint, access_key=access_key or self.access_key,
                     secret_key=secret_key or self.secret_key, secure=False, region=REGION)

    def make_bucket(self, name: str) -> None:
        self.client().make_bucket(name)

    def requests(self) -> dict[str, int]:
        """S3 requests this server has answered since it started, by API (`GetObject`, `HeadObject`, ...).

        Counts are server-wide: take the difference of two snapshots around the code under test.
        """
        url = f"http://{self.endpoint}/minio/metrics/v3/api/requests"
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = resp.read().decode()
        counts: dict[str, int] = {}
        for line in body.splitlines():
            match = _REQUESTS_RE.match(line)
            if match:
                counts[match["api"]] = counts.get(match["api"], 0) + int(float(match["n"]))
        return counts

    # -- lifecycle

    def start(self, timeout: float = 60.0) -> None:
        if self.running:
            return
        began = time.monotonic()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._launch()
        self._wait_live(began + timeout)
        self.start_seconds = time.monotonic() - began

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (MinIO shuts down cleanly), SIGKILL if it does not within `timeout`."""
        if not self._proc:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-request, as on a crashed host."""
        if self._proc and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)
        self._proc = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- internals

    def _launch(self) -> None:
        binary = self._binary or minio_binary()
        env = {
            **os.environ,
            "MINIO_ROOT_USER": self._access_key,
            "MINIO_ROOT_PASSWORD": self._secret_key,
            "MINIO_REGION": REGION,
            "MINIO_UPDATE": "off",  # never phone home for updates
            "MINIO_CI_CD": "1",  # tolerate a drive on the root disk, as temp dirs are
            "MINIO_PROMETHEUS_AUTH_TYPE": "public",  # requests() reads the request counters without a token
        }
        cmd = [str(binary), "server", str(self.data_dir), "--address", self.endpoint,
               "--console-address", f"127.0.0.1:{self.console_port}",
               "--certs-dir", str(self.base_dir / "certs"), "--quiet"]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          stdin=subprocess.DEVNULL, preexec_fn=die_with_parent())

    def _wait_live(self, deadline: float) -> None:
        url = f"http://{self.endpoint}/minio/health/live"
        delay = 0.02
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                self._proc = None
                raise MinioServerError(f"minio exited during start (rc={code}):\n{self.log_tail()}")
            if _http_ok(url):
                return
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)
        self.kill()
        raise MinioServerError(f"minio not live on {self.endpoint} within the deadline:\n{self.log_tail()}")

    def __repr__(self) -> str:
        return f"MinioServer({self.endpoint}, dir={self.base_dir}, running={self.running})"


_REQUESTS_RE = re.compile(r'^minio_api_requests_total\{.*?name="(?P<api>[^"]+)".*?type="s3".*\}\s+(?P<n>[0-9.e+]+)$')


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False
