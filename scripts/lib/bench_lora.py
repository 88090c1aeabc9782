"""Benchmark: LoRA cache download throughput vs a plain MinIO fget of the same object, and requests per cache hit.

Two objects of the same bytes: one uploaded the usual way (multipart: only the size can be checked) and one as a
single part (its ETag is the MD5, which the cache verifies, hashing in a second thread beside the download). Each
round downloads with fget_object and with LoraCache.ensure into fresh files on the same filesystem, alternating;
the medians are compared. Requests are counted by MinIO itself.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from loguru import logger  # noqa: E402

from selfix.loras import LoraCache  # noqa: E402
from selfix.settings import load  # noqa: E402
from selfix.storage import S3Store  # noqa: E402
from tests.servers.minio_server import MinioServer  # noqa: E402
from tests.servers.node_plugin import write_safetensors  # noqa: E402

BUCKET = "bench-lora"


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def main() -> None:
    megabytes = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 9
    logger.remove()
    work = Path(tempfile.mkdtemp(prefix="selfix-bench-lora-"))
    server = MinioServer(work / "minio")
    try:
        server.start()
        client = server.client()
        client.make_bucket(BUCKET)
        src = write_safetensors(work / "src.safetensors", os.urandom(megabytes * 1_000_000))
        size = src.stat().st_size
        keys = {"multipart": "users/bench/models/multipart.safetensors",
                "single-part": "users/bench/models/single.safetensors"}
        client.fput_object(BUCKET, keys["multipart"], str(src))
        client.fput_object(BUCKET, keys["single-part"], str(src), part_size=max(size, 5 << 20) + (1 << 20))
        src.unlink()
        settings = load({"S3_ENDPOINT": server.endpoint, "S3_ACCESS_KEY": server.access_key,
                         "S3_SECRET_KEY": server.secret_key, "S3_BUCKET": BUCKET})
        stores = {"multipart": S3Store(settings), "single-part": S3Store(settings),
                  "single-part, MD5 check off": S3Store(settings, verify_md5=False)}
        keys["single-part, MD5 check off"] = keys["single-part"]
        print(f"object: {size / 1e6:.0f} MB, {rounds} rounds each, MinIO on 127.0.0.1, {os.cpu_count()} CPUs",
              flush=True)
        for kind, key in keys.items():
            etag = client.stat_object(BUCKET, key).etag
            fget_s, cache_s = [], []
            cache = LoraCache(work / "cache", stores[kind])
            (work / "fget").mkdir(exist_ok=True)
            for i in range(rounds):
                target = work / "fget" / f"{i}.safetensors"

                def fget(target: Path = target, key: str = key) -> None:
                    client.fget_object(BUCKET, key, str(target))

                def cached(key: str = key, cache: LoraCache = cache) -> None:
                    cache.ensure(key)

                # Alternate which goes first, so page-cache and writeback effects fall on both alike.
                for fn, times in ([(fget, fget_s), (cached, cache_s)] if i % 2 == 0 else
                                  [(cached, cache_s), (fget, fget_s)]):
                    began = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - began)
                target.unlink()
                assert cache.remove(key), "the cache did not keep the file"
            fget_mbs = size / statistics.median(fget_s) / 1e6
            cache_mbs = size / statistics.median(cache_s) / 1e6
            best = min(fget_s) / min(cache_s)
            what = "MD5 verified" if "-" not in etag and stores[kind].verify_md5 else "size verified"
            print(f"{kind:<12} ({what}, ETag {etag[:12]}…): "
                  f"fget {fget_mbs:6.0f} MB/s  cache {cache_mbs:6.0f} MB/s  ratio {cache_mbs / fget_mbs:.2f} "
                  f"(medians; best-of-{rounds} ratio {best:.2f})", flush=True)
            print(f"{'':<12} fget  s: {' '.join(f'{s:.3f}' for s in fget_s)}\n"
                  f"{'':<12} cache s: {' '.join(f'{s:.3f}' for s in cache_s)}", flush=True)

        key, store = keys["multipart"], stores["multipart"]
        root = work / "cache-hits"
        before = server.requests()
        LoraCache(root, store).ensure(key)
        miss = delta(before, server.requests())
        before = server.requests()
        for _ in range(10):
            LoraCache(root, store, head_ttl_s=60).ensure(key)
        fresh = delta(before, server.requests())
        before = server.requests()
        for _ in range(10):
            LoraCache(root, store, head_ttl_s=0).ensure(key)
        stale = delta(before, server.requests())
        print(f"requests: miss {miss or 'none'}; 10 hits inside LORA_HEAD_TTL_S {fresh or 'none'}; "
              f"10 hits after it {stale or 'none'}", flush=True)
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
