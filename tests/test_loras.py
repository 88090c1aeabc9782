"""The LoRA cache against a real MinIO: verification, HEAD/TTL, LRU budget, disk floor, in-use pinning, one download
per key across threads and processes, kill -9 mid-download, prefetch. Requests are counted by MinIO itself."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from selfix import messages as m
from selfix import stats
from selfix.clock import ManualClock
from selfix.job import Job
from selfix.loras import (
    LORA_TOO_LARGE,
    STORE_DOWN_S,
    CacheFull,
    LoraCache,
    Prefetcher,
    check_safetensors,
    keys_in_processing,
)
from selfix.prepare import ensure_loras
from selfix.spool import Spool
from selfix.storage import (
    LocalStore,
    ObjectInfo,
    ObjectStore,
    RetryPolicy,
    S3Store,
    StorageError,
    StorageUnavailable,
)
from tests.servers.minio_plugin import S3Bucket
from tests.servers.node_plugin import wait_until, write_safetensors

pytestmark = pytest.mark.s3

ROOT = Path(__file__).resolve().parents[1]
_FAST = RetryPolicy(attempts=2, deadline_s=2.0, base_s=0.05, cap_s=0.1)


def lora_bytes(tmp: Path, name: str, size: int, seed: int = 0) -> bytes:
    """A valid safetensors file of about `size` bytes, different per seed."""
    payload = random.Random(seed).randbytes(size)
    return write_safetensors(tmp / "src" / name, payload).read_bytes()


def put(bucket: S3Bucket, key: str, data: bytes, tmp: Path) -> None:
    src = tmp / "src" / f"put-{os.getpid()}-{time.monotonic_ns()}"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(data)
    bucket.client().fput_object(bucket.bucket, key, str(src))
    src.unlink()


class Requests:
    """MinIO's own request counters, as a difference from when this object was made."""

    def __init__(self, bucket: S3Bucket) -> None:
        self.server = bucket.server
        self.reset()

    def reset(self) -> None:
        self.base = self.server.requests()

    def delta(self) -> dict[str, int]:
        now = self.server.requests()
        return {k: v - self.base.get(k, 0) for k, v in now.items() if v != self.base.get(k, 0)}


def cache_of(bucket: S3Bucket, root: Path, **kw: Any) -> LoraCache:
    return LoraCache(root, S3Store(bucket.settings()), **kw)


RANDOM_NAME = re.compile(r"[0-9a-f]{32}\.safetensors")


def file_of(root: Path, key: str) -> Path:
    """Where the cache keeps `key` (its meta names a random file), or a path that does not exist."""
    path = LoraCache(root, None).path_of(key)  # type: ignore[arg-type]  # names only: no store needed
    return path if path is not None else root / ".selfix" / "not-cached"


def disk_bytes(root: Path) -> int:
    """Every byte under the cache root except its bookkeeping, *.part files included."""
    total = 0
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".selfix"]
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(dirpath, name)).st_size
    return total


# --------------------------------------------------------------------------------------------------- hits, HEADs


def test_miss_fetches_verified_file_then_hits_cost_no_request_within_ttl_and_one_head_after(
        s3_bucket: S3Bucket, tmp_path: Path) -> None:
    key = "users/u1/models/style.safetensors"
    data = lora_bytes(tmp_path, "a", 50_000)
    put(s3_bucket, key, data, tmp_path)
    cache = cache_of(s3_bucket, tmp_path / "cache", head_ttl_s=3600)
    reqs = Requests(s3_bucket)

    name = cache.ensure(key, "u1")
    assert RANDOM_NAME.fullmatch(name) and name == cache.comfy_name(key), "ComfyUI's name says nothing of the key"
    assert (tmp_path / "cache" / name).read_bytes() == data
    assert reqs.delta() == {"HeadObject": 1, "GetObject": 1}
    assert not list((tmp_path / "cache").rglob("*.part"))

    reqs.reset()
    for _ in range(5):
        assert cache.ensure(key, "u1") == name
    assert reqs.delta() == {}, "a hit inside LORA_HEAD_TTL_S must cost no request"

    stale = cache_of(s3_bucket, tmp_path / "cache", head_ttl_s=0)
    reqs.reset()
    assert stale.ensure(key, "u1") == name
    assert reqs.delta() == {"HeadObject": 1}, "a hit after the TTL costs exactly one HEAD"

    changed = lora_bytes(tmp_path, "b", 60_000, seed=1)
    put(s3_bucket, key, changed, tmp_path)
    reqs.reset()
    assert stale.ensure(key, "u1") == name, "a changed object keeps its cache name (queued jobs name it)"
    assert (tmp_path / "cache" / name).read_bytes() == changed, "a changed object is fetched again"
    assert reqs.delta() == {"HeadObject": 1, "GetObject": 1}


def test_hits_misses_and_bytes_are_counted_for_metrics(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    key = "users/u1/models/counted.safetensors"
    data = lora_bytes(tmp_path, "a", 7_000)
    put(s3_bucket, key, data, tmp_path)
    spool = Spool(tmp_path / "spool").ensure()
    stats.configure(spool, "runner")
    try:
        cache = cache_of(s3_bucket, tmp_path / "cache")
        for _ in range(3):
            cache.ensure(key, "u1")
        cache_of(s3_bucket, tmp_path / "cache", head_ttl_s=0).ensure(key, "u1")  # a hit confirmed by a HEAD
    finally:
        stats.reset_for_tests()
    counts = {name: value for (name, _labels), value in stats.read_all(spool).items()}
    assert counts == {"lora_cache_misses": 1, "lora_cache_hits": 3, "lora_download_bytes": len(data)}


def test_single_part_object_is_md5_verified(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    key = "users/u1/models/single.safetensors"
    put(s3_bucket, key, lora_bytes(tmp_path, "a", 10_000), tmp_path)
    seen: list[ObjectInfo] = []
    store = S3Store(s3_bucket.settings())
    real = store.get_to_file

    def spy(k: str, path: Path, max_bytes: int | None = None) -> ObjectInfo:
        info = real(k, path, max_bytes)
        seen.append(info)
        return info

    store.get_to_file = spy  # type: ignore[method-assign]
    LoraCache(tmp_path / "cache", store).ensure(key, "u1")
    assert seen and not seen[0].multipart and seen[0].md5 == seen[0].etag


def test_store_down_after_ttl_uses_the_cached_copy(s3_private_bucket: S3Bucket, tmp_path: Path) -> None:
    key = "users/u1/models/x.safetensors"
    data = lora_bytes(tmp_path, "a", 5_000)
    put(s3_private_bucket, key, data, tmp_path)
    store = S3Store(s3_private_bucket.settings(), retry=_FAST)
    LoraCache(tmp_path / "cache", store).ensure(key, "u1")
    s3_private_bucket.server.stop()
    assert LoraCache(tmp_path / "cache", store, head_ttl_s=0).ensure(key, "u1") == file_of(tmp_path / "cache", key).name
    with pytest.raises(StorageError) as missing:
        LoraCache(tmp_path / "cache", store).ensure("users/u1/models/absent.safetensors", "u1")
    assert missing.value.retriable, missing.value


class FlakyStore(LocalStore):
    """A local store that counts HEADs and, while `down`, fails them as an unreachable S3 would."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.heads = 0
        self.down = False

    def stat(self, key: str, *, retry: bool = True) -> ObjectInfo:
        self.heads += 1
        if self.down:
            raise StorageUnavailable("s3 down", key=key)
        return super().stat(key, retry=retry)


def test_the_head_ttl_and_the_store_down_window_run_on_the_cache_clock(tmp_path: Path) -> None:
    key = "users/u1/models/x.safetensors"
    store = FlakyStore(tmp_path / "store")
    write_safetensors(tmp_path / "store" / key, b"w" * 1000)
    clock = ManualClock(time.time())
    cache = LoraCache(tmp_path / "cache", store, head_ttl_s=60, clock=clock)
    cache.ensure(key, "u1")
    assert store.heads == 1
    clock.advance(59)
    cache.ensure(key, "u1")
    assert store.heads == 1, "confirmed less than LORA_HEAD_TTL_S ago: no HEAD"
    clock.advance(2)
    store.down = True
    cache.ensure(key, "u1")  # past the TTL: one HEAD, which fails; the cached copy serves
    assert store.heads == 2
    clock.advance(STORE_DOWN_S / 2)
    cache.ensure(key, "u1")
    assert store.heads == 2, "the store failed a moment ago: not asked again yet"
    clock.advance(STORE_DOWN_S)
    store.down = False
    cache.ensure(key, "u1")
    assert store.heads == 3
    clock.advance(59)
    cache.ensure(key, "u1")
    assert store.heads == 3, "that HEAD confirmed the copy: a fresh TTL from then"


# --------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("key", "code"), [
    ("users/u1/../u2/models/x.safetensors", m.LORA_FORBIDDEN),
    ("/users/u1/models/x.safetensors", m.LORA_FORBIDDEN),
    ("users/u2/models/x.safetensors", m.LORA_FORBIDDEN),
    ("users/u1/models/x.ckpt", m.LORA_FORBIDDEN),
    ("users/u1/models/x.pt", m.LORA_FORBIDDEN),
    ("users/u1/models/x.bin", m.LORA_FORBIDDEN),
    ("users/u1/models/x.safetensors\x00.bin", m.LORA_FORBIDDEN),
    ("users/u1//models/x.safetensors", m.LORA_FORBIDDEN),
    ("users/u1/models/x", m.LORA_FORBIDDEN),
])
def test_forbidden_keys_are_refused_without_any_request(s3_bucket: S3Bucket, tmp_path: Path, key: str,
                                                        code: str) -> None:
    # The objects exist: if a request were made it would succeed, so only the check can refuse them.
    for existing in ("users/u2/models/x.safetensors", "users/u1/models/x.ckpt", "users/u1/models/x.pt",
                     "users/u1/models/x.bin", "users/u1/models/x"):
        put(s3_bucket, existing, lora_bytes(tmp_path, "a", 100), tmp_path)
    cache = cache_of(s3_bucket, tmp_path / "cache")
    reqs = Requests(s3_bucket)
    with pytest.raises(m.TaskError) as err:
        ensure_loras(Job("t", "u1", lora_models=(key,)), cache)
    assert err.value.code == code
    assert not cache.prefetch(key, "u1")
    assert reqs.delta() == {}


@pytest.mark.parametrize(("content", "why"), [
    (b"PK\x03\x04 this is a zip/pickle, not safetensors" * 10, "bad header length"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64, "not JSON"),
    (None, "truncated"),
])
def test_a_file_that_is_not_whole_safetensors_fails_and_never_gets_its_final_name(
        s3_bucket: S3Bucket, tmp_path: Path, content: bytes | None, why: str) -> None:
    key = "users/u1/models/evil.safetensors"
    data = content if content is not None else lora_bytes(tmp_path, "a", 1000)[:-10]
    put(s3_bucket, key, data, tmp_path)
    cache = cache_of(s3_bucket, tmp_path / "cache")
    with pytest.raises(m.TaskError) as err:
        cache.ensure(key, "u1")
    assert err.value.code == m.LORA_INVALID and why in err.value.message
    assert not file_of(tmp_path / "cache", key).exists()
    assert not list((tmp_path / "cache").rglob("*.part"))


def test_check_safetensors_accepts_real_layouts(tmp_path: Path) -> None:
    check_safetensors(write_safetensors(tmp_path / "a.safetensors", b"\1" * 100, meta={"format": "pt"}))
    padded = tmp_path / "b.safetensors"
    padded.write_bytes(write_safetensors(tmp_path / "c.safetensors", b"\1" * 8).read_bytes() + b"junk")
    with pytest.raises(m.TaskError, match="truncated or padded"):
        check_safetensors(padded)


def test_keys_whose_paths_would_collide_on_a_filesystem_are_both_cached(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    outer, inner = "users/u1/a.safetensors", "users/u1/a.safetensors/b.safetensors"
    for key in (outer, inner):
        put(s3_bucket, key, lora_bytes(tmp_path, "a", 100), tmp_path)
    cache = cache_of(s3_bucket, tmp_path / "cache")
    names = {cache.ensure(outer, "u1"), cache.ensure(inner, "u1")}
    assert len(names) == 2 and all(RANDOM_NAME.fullmatch(n) for n in names), "flat random names cannot collide"


def test_missing_object_is_lora_not_found(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    with pytest.raises(m.TaskError) as err:
        cache_of(s3_bucket, tmp_path / "cache").ensure("users/u1/models/none.safetensors", "u1")
    assert err.value.code == m.LORA_NOT_FOUND


# --------------------------------------------------------------------------------------------------- budget


def test_in_use_files_are_never_evicted_cache_full_defers_and_too_large_fails(
        s3_bucket: S3Bucket, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool").ensure()
    a, b, c = (f"users/u1/models/{n}.safetensors" for n in "abc")
    for i, key in enumerate((a, b)):
        put(s3_bucket, key, lora_bytes(tmp_path, key[-13:], 40_000, seed=i), tmp_path)
    put(s3_bucket, c, lora_bytes(tmp_path, "c", 200_000, seed=3), tmp_path)
    cache = cache_of(s3_bucket, tmp_path / "cache", max_bytes=60_000, in_use=lambda: keys_in_processing(spool))

    spool.write_processing(Job("running", lora_models=(a,)))
    cache.ensure(a, "u1")
    with pytest.raises(CacheFull) as full:
        cache.ensure(b, "u1")
    assert full.value.retriable and full.value.blocking == {a}
    assert file_of(tmp_path / "cache", a).exists(), "the file of a job in processing/ was evicted"

    spool.drop_processing("running")
    cache.ensure(b, "u1")
    assert not file_of(tmp_path / "cache", a).exists() and file_of(tmp_path / "cache", b).exists()

    reqs = Requests(s3_bucket)
    with pytest.raises(m.TaskError) as err:
        cache.ensure(c, "u1")
    assert err.value.code == LORA_TOO_LARGE
    assert reqs.delta() == {"HeadObject": 1}, "a LoRA larger than the cache is refused before its body"

    job = Job("both", "u1", lora_models=(a, b))
    spool.write_processing(job)
    with pytest.raises(m.TaskError) as err:
        ensure_loras(job, cache)
    assert err.value.code == LORA_TOO_LARGE, "a job whose own LoRAs cannot fit together can never run"


def test_disk_free_floor_evicts_lru_and_refuses_when_nothing_can_go(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    keys = [f"users/u1/models/{i}.safetensors" for i in range(3)]
    for i, key in enumerate(keys):
        put(s3_bucket, key, lora_bytes(tmp_path, str(i), 30_000, seed=i), tmp_path)
    root = tmp_path / "cache"
    free = {"bytes": 10_000_000}
    pinned: set[str] = set()
    clock = ManualClock(time.time())
    cache = cache_of(s3_bucket, root, free_floor_bytes=9_950_000,
                     disk_free=lambda _p: free["bytes"] - disk_bytes(root), in_use=lambda: set(pinned), clock=clock)
    cache.ensure(keys[0], "u1")
    clock.advance(60)  # recency is the atime the cache's clock sets on each use
    cache.ensure(keys[1], "u1")  # 10M - 30k - 30k < floor + 30k: keys[0] (least recent) goes
    assert not file_of(root, keys[0]).exists() and file_of(root, keys[1]).exists()
    pinned.add(keys[1])
    with pytest.raises(CacheFull, match="free on disk"):
        cache.ensure(keys[2], "u1")


def test_fifty_tasks_over_eight_users_with_a_small_cache(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    """A runner's life in miniature: two jobs in processing/ at a time (one 'running', one being prepared), a
    prefetcher on inbox/, a cache that holds 3 of the 8 users' LoRAs, and a monitor that measures the disk."""
    users = [f"u{i}" for i in range(8)]
    keys = {u: f"users/{u}/models/style-{u}.safetensors" for u in users}
    content = {u: lora_bytes(tmp_path, u, 30_000 + 1000 * i, seed=i) for i, u in enumerate(users)}
    for u in users:
        put(s3_bucket, keys[u], content[u], tmp_path)
    budget = 3 * 40_000
    spool = Spool(tmp_path / "spool").ensure()
    root = tmp_path / "cache"
    store = CountingStore(S3Store(s3_bucket.settings()), root)
    cache = LoraCache(root, store, max_bytes=budget, in_use=lambda: keys_in_processing(spool))
    rng = random.Random(7)
    order = [rng.choice(users[:4]) if rng.random() < 0.6 else rng.choice(users) for _ in range(50)]
    for i, u in enumerate(order):
        spool.enqueue(Job(f"t{i:02d}", u, lora_models=(keys[u],), enqueued_at=1000 + i, workflow={}))

    peak = {"bytes": 0}
    stop = threading.Event()

    def monitor() -> None:
        while not stop.is_set():
            with cache.exclusive():  # a walk is no snapshot: without the lock it may see a victim and its successor
                on_disk = disk_bytes(root)
            peak["bytes"] = max(peak["bytes"], on_disk, cache.usage())

    prefetcher = Prefetcher(cache, spool).start()
    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()

    def run_job(job: Job) -> None:
        """The 'GPU': the LoRA must stay intact under its name for the whole run."""
        path = file_of(root, keys[str(job.user_id)])
        for _ in range(3):
            assert path.read_bytes() == content[str(job.user_id)], f"{path} changed or vanished while in use"
            time.sleep(0.005)
        spool.drop_processing(job.task_id)

    try:
        with ThreadPoolExecutor(1) as gpu:
            running = None
            while (entry := spool.next_ready()) is not None:
                job = spool.load_job(spool.claim(entry))  # type: ignore[arg-type]
                prefetcher.poke()
                while True:
                    try:
                        ensure_loras(job, cache)
                        break
                    except CacheFull:  # the runner would defer it; here we just wait for the GPU
                        assert running is not None, "cache full with nothing running"
                        running.result()
                if running is not None:
                    running.result()
                running = gpu.submit(run_job, job)
            assert running is not None
            running.result()
    finally:
        prefetcher.close()
        stop.set()
        watcher.join()

    assert store.present_at_get == [], f"downloaded although cached: {store.present_at_get}"
    assert 8 <= store.gets < 50, store.gets
    assert peak["bytes"] <= budget, f"cache reached {peak['bytes']} bytes, budget {budget}"
    assert disk_bytes(root) <= budget
    assert not list(root.rglob("*.part"))


class CountingStore:
    """Wraps a store: counts GETs and records any GET of a key whose file was in the cache at that moment."""

    def __init__(self, inner: ObjectStore, root: Path) -> None:
        self.inner = inner
        self.root = root
        self.gets = 0
        self.present_at_get: list[str] = []
        self.lock = threading.Lock()

    def stat(self, key: str, *, retry: bool = True) -> ObjectInfo:
        return self.inner.stat(key, retry=retry)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def get_to_file(self, key: str, path: Path, max_bytes: int | None = None) -> ObjectInfo:
        with self.lock:
            self.gets += 1
            if file_of(self.root, key).exists():
                self.present_at_get.append(key)
        return self.inner.get_to_file(key, path, max_bytes)

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        self.inner.put_file(key, path, content_type)

    def describe(self) -> str:
        return self.inner.describe()


# --------------------------------------------------------------------------------------------------- concurrency


WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from selfix.loras import LoraCache
    from selfix.settings import load
    from selfix.storage import S3Store
    import selfix.storage.s3 as storage
    env = dict(a.split("=", 1) for a in sys.argv[4:])
    root, key, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    if env.pop("SLOW", None):  # a download that takes a while, to be killed in the middle
        real = storage._stream_to_file
        def slow(response, path, md5=False):
            class Slow:
                def stream(self, n):
                    for chunk in response.stream(64 * 1024):
                        time.sleep(0.02)
                        yield chunk
            return real(Slow(), path, md5)
        storage._stream_to_file = slow
    cache = LoraCache(root, S3Store(load(env)))
    while not go.exists():
        time.sleep(0.001)
    print(cache.ensure(key, "u1"), flush=True)
""")


def spawn(bucket: S3Bucket, root: Path, key: str, go: Path, slow: bool = False) -> subprocess.Popen[str]:
    env_args = [f"{k}={v}" for k, v in bucket.env.items()] + (["SLOW=1"] if slow else [])
    return subprocess.Popen([sys.executable, "-c", WORKER, str(root), key, str(go), *env_args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_concurrent_requests_across_processes_and_threads_download_once(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    key = "users/u1/models/popular.safetensors"
    data = lora_bytes(tmp_path, "p", 8 << 20)
    put(s3_bucket, key, data, tmp_path)
    root, go = tmp_path / "cache", tmp_path / "go"
    procs = [spawn(s3_bucket, root, key, go) for _ in range(3)]
    cache = cache_of(s3_bucket, root)
    time.sleep(1.0)  # the workers are importing and then spinning on `go`
    reqs = Requests(s3_bucket)
    go.touch()
    with ThreadPoolExecutor(3) as pool:
        names = list(pool.map(lambda _: cache.ensure(key, "u1"), range(3)))
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        names.append(out.strip())
    assert names == [cache.comfy_name(key)] * 6
    assert reqs.delta().get("GetObject") == 1, reqs.delta()
    assert file_of(root, key).read_bytes() == data


def test_kill_9_mid_download_never_leaves_a_file_under_its_final_name(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    key = "users/u1/models/big.safetensors"
    data = lora_bytes(tmp_path, "big", 4 << 20)
    put(s3_bucket, key, data, tmp_path)
    root, go = tmp_path / "cache", tmp_path / "go"
    go.touch()
    proc = spawn(s3_bucket, root, key, go, slow=True)
    part = LoraCache(root, None).part_path(key)  # type: ignore[arg-type]
    wait_until(lambda: part.exists() and part.stat().st_size > 256 * 1024, 30, "a download in progress")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert not list(root.glob("*.safetensors")), "a killed download left a file under a final name"
    assert part.exists()

    cache = cache_of(s3_bucket, root, max_bytes=len(data) + 1000)
    assert cache.usage() == 0, "the dead download's reservation still counts"
    assert not part.exists(), "the scan removes what a killed download left"
    assert cache.ensure(key, "u1") == cache.comfy_name(key)
    assert file_of(root, key).read_bytes() == data


# --------------------------------------------------------------------------------------------------- prefetch


def test_prefetch_fetches_next_jobs_loras_in_its_thread_and_poke_never_blocks(
        s3_bucket: S3Bucket, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool").ensure()
    keys = [f"users/u{i}/models/p.safetensors" for i in range(3)]
    for i, key in enumerate(keys):
        put(s3_bucket, key, lora_bytes(tmp_path, str(i), 2 << 20, seed=i), tmp_path)
        spool.enqueue(Job(f"t{i}", f"u{i}", lora_models=(key,), enqueued_at=100 + i, workflow={}))
    # First in line: a hand-edited job naming another user's LoRA. The object exists; it must not be fetched.
    spool.enqueue(Job("evil", "u9", lora_models=(keys[1],), enqueued_at=50, workflow={}, priority=5))
    cache = cache_of(s3_bucket, tmp_path / "cache")
    prefetcher = Prefetcher(cache, spool, depth=2).start()
    try:
        began = time.perf_counter()
        for _ in range(100):
            prefetcher.poke()
        assert time.perf_counter() - began < 0.05
        wait_until(lambda: prefetcher.fetched == 1, 30, "the LoRA of the next job prefetched")
        time.sleep(0.3)
    finally:
        prefetcher.close()
    assert prefetcher.fetched == 1
    assert [file_of(tmp_path / "cache", k).exists() for k in keys] == [True, False, False], "only the next 2 jobs' keys"
    reqs = Requests(s3_bucket)
    assert cache.ensure(keys[0], "u0") == cache.comfy_name(keys[0])
    assert reqs.delta() == {}, "the job finds its prefetched LoRA: no request"


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    before = {t.name for t in threading.enumerate()}
    yield
    wait_until(lambda: not ({t.name for t in threading.enumerate() if t.name == "lora-prefetch"} - before), 5,
               "prefetch threads to end")
