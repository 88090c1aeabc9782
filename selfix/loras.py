"""LoRA files for ComfyUI: fetched from the object store into LORA_CACHE_DIR, which ComfyUI lists.

Layout (ComfyUI lists only the `*.safetensors` files; everything else is invisible to it):

    <root>/<random>.safetensors       the LoRA, under a random name chosen when first cached (ComfyUI lists it)
    <root>/<h>.part                   a download in progress (or left by a killed one: removed by the next scan)
    <root>/.selfix/meta/<h>.json      what was fetched: key, file name, ETag, size, when S3 last confirmed it
    <root>/.selfix/locks/<h>.lock     fcntl lock of one key; while a download runs it also holds its reserved size
    <root>/.selfix/cache.lock         held briefly while space is reserved and files are evicted

Rules:
- The name ComfyUI lists says nothing about the key: a workflow can reach a cached LoRA only through the name the
  runner binds for the task that brought the key (selfix.isolation refuses every other name first). Files of the
  older layout (named by their key, meta without a file name) are still read and get a random name at their next
  use. Symbolic links in the cache are never a valid copy, and the scan removes them.
- A file appears under its final name only whole and verified: size (and MD5 where the ETag is one, see
  storage.S3Store), safetensors header and data length; written as *.part, renamed, directory fsynced. A process
  killed mid-download leaves only a *.part, which the next scan removes.
- One download per key across threads and processes: the downloader holds the key's lock exclusively; a reader
  takes it shared, so it waits for a download in progress and then finds the file fresh.
- A hit costs no request while S3 confirmed the object less than LORA_HEAD_TTL_S ago, else one HEAD (a changed
  ETag fetches it again; S3 down: the cached copy is used).
- Bytes in the cache plus the bytes reserved by downloads in progress never exceed LORA_CACHE_MAX_GB, and a download
  never takes the disk below DISK_FREE_FLOOR_GB. Room is made by evicting the least recently used files (recency =
  the file's atime, set on every use), never one a job in processing/ names, one pinned in this process (prefetch
  window) or one whose lock is held. When no room can be made the caller gets CacheFull (retriable: the runner
  defers the job until running jobs release their LoRAs).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import stat as stat_mod
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from selfix import stats
from selfix.clock import Clock, SystemClock
from selfix.files import fsync_dir as _fsync_dir
from selfix.files import is_disk_full
from selfix.messages import (
    LORA_FORBIDDEN,
    LORA_INVALID,
    LORA_NOT_FOUND,
    LORA_TOO_LARGE,
    Limits,
    TaskError,
    check_lora_key,
)
from selfix.settings import Settings
from selfix.spool import Spool
from selfix.storage import (
    ChecksumMismatch,
    InvalidKey,
    ObjectNotFound,
    ObjectStore,
    ObjectTooLarge,
    StorageError,
    StorageUnavailable,
    validate_key,
)

MAX_HEADER = 100 << 20
GB = 1 << 30  # LORA_CACHE_MAX_GB and DISK_FREE_FLOOR_GB count GiB
STATE = ".selfix"
PART = ".part"
SUFFIX = ".safetensors"
PREFETCH_DEPTH = 2
PREFETCH_RETRY_S = 5.0
STORE_DOWN_S = 5.0  # after a failed HEAD, cached copies are used without asking the store for this long


class CacheFull(StorageError):
    """No room for a LoRA without evicting one that a job in processing/ uses: retry once jobs have finished.

    `blocking` names the in-use keys that could not be evicted, so a job whose own LoRAs together exceed the
    budget can be told apart (that one can never run) from a job that merely has to wait.
    """

    kind = "cache_full"
    retriable = True

    def __init__(self, message: str, *, key: str | None = None, blocking: Iterable[str] = ()) -> None:
        super().__init__(message, key=key)
        self.blocking = frozenset(blocking)


def check_safetensors(path: Path) -> None:
    """Raise TaskError(lora_invalid) unless the file is whole safetensors: u64 header length, a JSON object header,
    and tensor data that ends exactly at the end of the file (so a truncated or padded file is refused too)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise TaskError(LORA_INVALID, "file is too short to be safetensors")
        (length,) = struct.unpack("<Q", head)
        if length < 2 or length > min(MAX_HEADER, size - 8):
            raise TaskError(LORA_INVALID, "file is not safetensors (bad header length)")
        header = fh.read(length)
    try:
        meta = json.loads(header)
    except (ValueError, UnicodeDecodeError):
        raise TaskError(LORA_INVALID, "file is not safetensors (header is not JSON)") from None
    if not isinstance(meta, dict):
        raise TaskError(LORA_INVALID, "file is not safetensors (header is not an object)")
    end = 0
    for name, tensor in meta.items():
        if name == "__metadata__":
            continue
        offsets = tensor.get("data_offsets") if isinstance(tensor, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise TaskError(LORA_INVALID, f"file is not safetensors (tensor {str(name)[:80]!r} has bad data_offsets)")
        end = max(end, offsets[1])
    if 8 + length + end != size:
        raise TaskError(LORA_INVALID, f"safetensors file is truncated or padded: {size} bytes, the header "
                                      f"describes {8 + length + end}")


@dataclass(frozen=True)
class Meta:
    key: str
    etag: str
    size: int
    checked_at: float  # wall clock: when the store last confirmed this ETag (download or HEAD)
    file: str = ""  # the cached file's name under the root; "" = the older layout, where it is the key itself

    @property
    def name(self) -> str:
        return self.file or self.key

    def dumps(self) -> bytes:
        return json.dumps({"key": self.key, "etag": self.etag, "size": self.size,
                           "checkedAt": self.checked_at, "file": self.file}).encode()

    @staticmethod
    def loads(raw: bytes) -> Meta:
        obj = json.loads(raw)
        file = str(obj.get("file") or "")
        if file and (not _RANDOM_NAME_RE.fullmatch(file)):
            raise ValueError(f"meta names an unexpected file {file[:80]!r}")
        return Meta(str(obj["key"]), str(obj["etag"]), int(obj["size"]), float(obj["checkedAt"]), file)


# fullmatch() only: `$` would also match before a final "\n"
_RANDOM_NAME_RE = re.compile(r"[0-9a-f]{32}\.safetensors")
_PART_RE = re.compile(r"[0-9a-f]{40}\.part")


def random_name() -> str:
    """A cached file's name: 128 random bits, unrelated to the key."""
    return f"{secrets.token_hex(16)}{SUFFIX}"


@dataclass(frozen=True)
class Entry:
    """A cached file, as the scan found it."""

    key: str
    path: Path
    size: int
    used_at: float


def keys_in_processing(spool: Spool) -> set[str]:
    """LoRA keys of the jobs in processing/ (claimed, being prepared, queued in or running inside ComfyUI)."""
    keys: set[str] = set()
    for job in spool.processing_jobs():  # a file gone meanwhile, or being quarantined, is skipped
        keys.update(job.lora_models)
    return keys


class _Lock:
    """An fcntl (flock) lock on a file that may be unlinked by a pruner: re-opened until the inode is current."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    @staticmethod
    def take(path: Path, exclusive: bool) -> _Lock:
        """Wait for the lock."""
        lock = _Lock._take(path, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH))
        assert lock is not None
        return lock

    @staticmethod
    def try_take(path: Path) -> _Lock | None:
        """The exclusive lock if nobody holds the file locked in any mode, else None at once."""
        return _Lock._take(path, fcntl.LOCK_EX | fcntl.LOCK_NB)

    @staticmethod
    def _take(path: Path, flags: int) -> _Lock | None:
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, flags)
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return _Lock(path, fd)
            os.close(fd)  # unlinked (pruned) between open and flock: lock the current file instead

    def write(self, text: str) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text.encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = -1

    def __enter__(self) -> _Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class LoraCache:
    """Key → verified file under the cache root, under a random name kept in the key's meta (module docstring)."""

    def __init__(
        self,
        root: Path,
        store: ObjectStore,
        *,
        max_bytes: int = 50 * GB,
        free_floor_bytes: int = 0,
        head_ttl_s: float = 60.0,
        user_prefix: str = "users/{userId}/",
        in_use: Callable[[], set[str]] | None = None,
        disk_free: Callable[[Path], int] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.root = Path(root)
        self.store = store
        self.max_bytes = max_bytes
        self.free_floor_bytes = free_floor_bytes
        self.head_ttl_s = head_ttl_s
        self.limits = Limits(user_prefix=user_prefix)
        self.in_use = in_use or set
        self.disk_free = disk_free or _disk_free
        self.clock: Clock = clock or SystemClock()  # TTLs, the store-down window, recency (atime) for eviction
        self._pins: Counter[str] = Counter()
        self._pins_lock = threading.Lock()
        self.state = self.root / STATE
        self._made = False
        self._store_down_until = 0.0  # monotonic

    def _make_dirs(self) -> None:
        if not self._made:  # at first use, not in __init__: constructing a cache touches no disk
            (self.state / "meta").mkdir(parents=True, exist_ok=True)
            (self.state / "locks").mkdir(parents=True, exist_ok=True)
            self._made = True

    @classmethod
    def from_settings(cls, settings: Settings, store: ObjectStore, spool: Spool | None = None) -> LoraCache:
        """The cache a node uses: its budget, floor and TTL from settings; in-use keys read from processing/."""
        return cls(
            settings.lora_cache_dir, store,
            max_bytes=int(settings.lora_cache_max_gb * GB),
            free_floor_bytes=int(settings.disk_free_floor_gb * GB),
            head_ttl_s=settings.lora_head_ttl_s,
            user_prefix=settings.user_prefix,
            in_use=(lambda: keys_in_processing(spool)) if spool is not None else None,
        )

    # --- names -----------------------------------------------------------------------------------------
    def comfy_name(self, key: str) -> str:
        """The name ComfyUI lists the cached copy of `key` under ("" when it is not cached)."""
        meta = self._read_meta(key)
        return meta.name if meta is not None else ""

    def path_of(self, key: str) -> Path | None:
        """The cached file of `key` (per its meta), or None."""
        meta = self._read_meta(key)
        return self.root / meta.name if meta is not None else None

    def cached_keys(self) -> dict[str, str]:
        """key -> the name ComfyUI lists, for every cached LoRA with a meta (selfix.isolation refuses these names
        for every task that did not bring the key)."""
        out: dict[str, str] = {}
        meta_dir = self.state / "meta"
        if not meta_dir.is_dir():
            return out
        for path in meta_dir.glob("*.json"):
            try:
                meta = Meta.loads(path.read_bytes())
            except (OSError, ValueError, KeyError, TypeError):
                continue
            out[meta.key] = meta.name
        return out

    def _hash(self, key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()[:40]

    def _meta_path(self, key: str) -> Path:
        return self.state / "meta" / f"{self._hash(key)}.json"

    def _lock_path(self, key: str) -> Path:
        return self.state / "locks" / f"{self._hash(key)}.lock"

    def part_path(self, key: str) -> Path:
        return self.root / f"{self._hash(key)}{PART}"

    def check_key(self, key: str, user_id: str | None = None) -> None:
        """Only `.safetensors` keys under the user's prefix; raises TaskError(lora_forbidden) before any I/O."""
        try:
            validate_key(key)
        except InvalidKey as exc:
            raise TaskError(LORA_FORBIDDEN, f"loraModel {key[:200]!r}: {exc}") from None
        if user_id is not None:
            check_lora_key(key, user_id, self.limits)
        elif not key.lower().endswith(SUFFIX) or key.split("/", 1)[0] == STATE:
            raise TaskError(LORA_FORBIDDEN, f"loraModel {key[:200]!r} must be a .safetensors file")

    # --- pins (this process) ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def pinned(self, keys: Iterable[str]) -> Iterator[None]:
        """Keys no eviction by this cache object may remove while the block runs (on top of processing/)."""
        keys = list(keys)
        with self._pins_lock:
            self._pins.update(keys)
        try:
            yield
        finally:
            with self._pins_lock:
                self._pins.subtract(keys)
                self._pins = +self._pins

    def _protected(self, extra: Iterable[str] = ()) -> set[str]:
        with self._pins_lock:
            pins = set(self._pins)
        return pins | set(extra) | set(self.in_use())

    # --- the one entry point ---------------------------------------------------------------------------
    def ensure(self, key: str, user_id: str | None = None) -> str:
        """Make the LoRA for `key` present and verified; return the name ComfyUI lists it under.

        Raises TaskError (not retriable: not found, forbidden, not safetensors, too large), CacheFull or a retriable
        StorageError (the runner defers the job).
        """
        self.check_key(key, user_id)
        self._make_dirs()
        with _Lock.take(self._lock_path(key), exclusive=False):
            meta = self.fresh(key)
            if meta is not None and meta.file:  # an older-layout copy takes the exclusive path to be renamed
                stats.incr("lora_cache_hits")
                return self._used(key)
        with _Lock.take(self._lock_path(key), exclusive=True) as lock:
            if not self._ensure_locked(key, lock):
                stats.incr("lora_cache_hits")
            return self._used(key)

    def prefetch(self, key: str, user_id: str | None, window: Iterable[str] = ()) -> bool:
        """Best effort, for the prefetch thread: fetch `key` unless someone else is fetching it already or there is
        no room without evicting in-use files or the other `window` keys (the LoRAs of the next jobs, so fetching one
        does not evict another). Never raises; True when the file is there."""
        try:
            self.check_key(key, user_id)
            self._make_dirs()
            lock = _Lock.try_take(self._lock_path(key))
            if lock is None:
                return False  # a download of it is running right now
            with lock:
                self._ensure_locked(key, lock, frozenset(window))
                self._used(key)
                return True
        except (TaskError, StorageError) as exc:
            logger.debug("prefetch of {} skipped: {}", key, exc)
            return False

    def remove(self, key: str) -> bool:
        """Drop the cached copy of `key` (for operators and benchmarks); False when there was none."""
        self._make_dirs()
        with _Lock.take(self._lock_path(key), exclusive=True):
            path = self.path_of(key)
            present = path is not None and path.exists()
            if path is not None:
                path.unlink(missing_ok=True)
            self._meta_path(key).unlink(missing_ok=True)
        return present

    # --- internals -------------------------------------------------------------------------------------
    def _read_meta(self, key: str) -> Meta | None:
        try:
            meta = Meta.loads(self._meta_path(key).read_bytes())
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return meta if meta.key == key else None

    def _write_meta(self, meta: Meta) -> None:
        path = self._meta_path(meta.key)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(meta.dumps())
        os.replace(tmp, path)

    def _cached(self, key: str) -> Meta | None:
        """The meta of a complete cached copy (file present, size as recorded), else None."""
        meta = self._read_meta(key)
        if meta is None:
            return None
        try:
            st = (self.root / meta.name).lstat()  # lstat: a symlink planted in the cache is never a valid copy
        except (FileNotFoundError, NotADirectoryError):
            return None
        return meta if stat_mod.S_ISREG(st.st_mode) and st.st_size == meta.size else None

    def fresh(self, key: str) -> Meta | None:
        meta = self._cached(key)
        if meta is not None and self.clock.time() - meta.checked_at < self.head_ttl_s:
            return meta
        return None

    def _used(self, key: str) -> str:
        """Record the use (atime = now, mtime kept) for LRU; return ComfyUI's name."""
        meta = self._read_meta(key)
        if meta is None:
            return ""
        path = self.root / meta.name
        with contextlib.suppress(OSError):
            os.utime(path, ns=(int(self.clock.time() * 1e9), path.stat().st_mtime_ns), follow_symlinks=False)
        return meta.name

    def _ensure_locked(self, key: str, lock: _Lock, keep: frozenset[str] = frozenset()) -> bool:
        """With the key's lock held exclusively: confirm the cached copy (HEAD after the TTL) or download.
        True when it downloaded."""
        meta = self.fresh(key)
        if meta is not None and meta.file:
            return False  # fetched by another process or thread while we waited for the lock
        meta = self._cached(key)
        if meta is not None and not meta.file:
            meta = self._migrate(meta)
        size: int | None = None
        if meta is not None:
            if self.clock.monotonic() < self._store_down_until:
                return False  # the store failed a moment ago: the copy it last confirmed will do
            try:
                info = self.store.stat(key, retry=False)  # one try: there is a good fallback
            except StorageError as exc:
                if exc.retriable:
                    self._store_down_until = self.clock.monotonic() + STORE_DOWN_S
                    logger.warning("LoRA {}: store unreachable ({}); using the cached copy", key, exc)
                    return False
                raise _task_error(key, exc) from None
            if info.etag == meta.etag and info.size == meta.size:
                self._write_meta(Meta(key, meta.etag, meta.size, self.clock.time(), meta.file))
                return False
            logger.info("LoRA {} changed in the store (ETag {} -> {}): fetching it again", key, meta.etag, info.etag)
            size = info.size
        self._download(key, lock, size, keep)
        return True

    def _migrate(self, meta: Meta) -> Meta:
        """An older-layout copy (named by its key) gets a random name; the key's lock is held exclusively."""
        new = Meta(meta.key, meta.etag, meta.size, meta.checked_at, random_name())
        old = self.root / meta.key
        with self.exclusive():
            os.replace(old, self.root / new.file)
            self._write_meta(new)
        _fsync_dir(self.root)
        _prune_empty_dirs(old.parent, self.root)
        logger.info("LoRA {} renamed to the random-name layout", meta.key)
        return new

    def _download(self, key: str, lock: _Lock, size: int | None, keep: frozenset[str]) -> None:
        old = self._read_meta(key)
        # A changed object replaces its file under the same name (a job queued in ComfyUI with that name reads the
        # new bytes, as before); a new object gets a new random name.
        target = self.root / (old.file if old is not None and old.file else random_name())
        part = self.part_path(key)
        for _ in range(3):
            if size is None:
                if self.clock.monotonic() < self._store_down_until:
                    raise StorageUnavailable(f"loraModel {key!r}: the store failed less than {STORE_DOWN_S:g}s ago",
                                             key=key)
                try:
                    size = self.store.stat(key).size
                except StorageError as exc:
                    if exc.retriable:
                        self._store_down_until = self.clock.monotonic() + STORE_DOWN_S
                        raise
                    raise _task_error(key, exc) from None
            if size > self.max_bytes:
                raise TaskError(LORA_TOO_LARGE, f"loraModel {key!r} is {size} bytes, larger than the whole LoRA "
                                                f"cache (LORA_CACHE_MAX_GB={self.max_bytes / GB:g})")
            self.root.mkdir(parents=True, exist_ok=True)
            self._reserve(key, size, lock, keep)
            started = self.clock.monotonic()
            try:
                info = self.store.get_to_file(key, part, max_bytes=size)
                check_safetensors(part)
                with self.exclusive():  # the file starts counting as the reservation stops: never both
                    # Meta after the rename: a crash between leaves a file without meta (fetched again on its next
                    # use), never a meta that vouches for bytes it did not check.
                    os.replace(part, target)
                    self._write_meta(Meta(key, info.etag, info.size, self.clock.time(), target.name))
                    lock.write("")
                _fsync_dir(target.parent)
            except ObjectTooLarge:
                size = None  # replaced by a larger object since the HEAD: reserve again
                continue
            except StorageError as exc:
                if exc.retriable:
                    raise
                raise _task_error(key, exc) from None
            except OSError as exc:  # the local disk (full, read-only, failing): the job waits, the runner lives
                raise CacheFull(f"cannot write loraModel {key!r} into the cache: {exc}", key=key) from exc
            finally:
                with contextlib.suppress(OSError):
                    part.unlink(missing_ok=True)
                lock.write("")
            took = self.clock.monotonic() - started
            stats.incr("lora_cache_misses")
            stats.incr("lora_download_bytes", info.size)
            logger.info("LoRA {} fetched: {} bytes in {:.2f}s ({:.0f} MB/s)", key, info.size, took,
                        info.size / max(took, 1e-6) / 1e6)
            return
        raise StorageUnavailable(f"loraModel {key!r} keeps changing size while being fetched", key=key)

    def _reserve(self, key: str, size: int, lock: _Lock, keep: frozenset[str]) -> None:
        """Under the cache lock: evict LRU files (not `keep`) until `size` more bytes fit the budget and the disk
        floor, then record the reservation in the key's lock file (seen by every other process's scan)."""
        with self.exclusive():
            entries, reserved = self.scan()
            used = sum(e.size for e in entries) + reserved
            over = used + size - self.max_bytes
            free = self.disk_free(self.root)
            short = self.free_floor_bytes + size - free
            if over > 0 or short > 0:
                freed, blocking = self._evict(entries, keep | {key}, max(over, short))
                over -= freed
                short -= freed
                if over > 0 or short > 0:
                    why = (f"{used} of {self.max_bytes} bytes used" if over > 0 else
                           f"{free} bytes free on disk, floor {self.free_floor_bytes}")
                    raise CacheFull(f"no room for loraModel {key!r} ({size} bytes): {why}; in use: "
                                    f"{sorted(blocking)[:5]}", key=key, blocking=blocking)
            lock.write(f"{size} {key}")

    def _evict(self, entries: list[Entry], keep: frozenset[str], need: int) -> tuple[int, set[str]]:
        """Remove least recently used files until `need` bytes are freed; returns (freed, in-use keys skipped)."""
        freed = 0
        blocking: set[str] = set()
        protected = self._protected(keep)
        for entry in sorted(entries, key=lambda e: e.used_at):
            if freed >= need:
                break
            if entry.key in protected:
                blocking.add(entry.key)
                continue
            victim = _Lock.try_take(self._lock_path(entry.key))
            if victim is None:
                blocking.add(entry.key)  # being read or fetched right now
                continue
            with victim:
                if entry.key in self._protected():  # claimed by a job since we looked: keep it
                    blocking.add(entry.key)
                    continue
                entry.path.unlink(missing_ok=True)
                self._meta_path(entry.key).unlink(missing_ok=True)
                victim.path.unlink(missing_ok=True)  # waiters on the old inode notice and lock the new file
            freed += entry.size
            logger.info("LoRA {} evicted ({} bytes, unused for {:.0f}s)", entry.key, entry.size,
                        self.clock.time() - entry.used_at)
        return freed, blocking

    def scan(self) -> tuple[list[Entry], int]:
        """Cached files we own (with a meta) and the bytes reserved by downloads in progress. Removes what killed
        downloads left: *.part files of keys nobody holds, stale reservations. Files without a meta (put there
        by hand) count toward the budget but are never evicted."""
        self._make_dirs()
        owner = {name: key for key, name in self.cached_keys().items()}
        entries: list[Entry] = []
        foreign = 0
        for dirpath, dirs, files in os.walk(self.root):  # never follows links
            if Path(dirpath) == self.root:
                dirs[:] = [d for d in dirs if d != STATE]
            for name in [*files, *dirs]:
                path = Path(dirpath) / name
                if path.is_symlink():
                    self._drop_symlink(path)
            dirs[:] = [d for d in dirs if not (Path(dirpath) / d).is_symlink()]
            for name in files:
                path = Path(dirpath) / name
                rel = path.relative_to(self.root).as_posix()
                if _PART_RE.fullmatch(rel):
                    self._drop_stale_part(self.state / "locks" / f"{name[: -len(PART)]}.lock", path)
                    continue
                if name.endswith(SUFFIX + PART):  # the older layout's <key>.part
                    self._drop_stale_part(self._lock_path(rel[: -len(PART)]), path)
                    continue
                if not name.endswith(SUFFIX):
                    continue
                try:
                    st = path.lstat()
                except FileNotFoundError:
                    continue
                key = owner.get(rel)
                if key is None or not stat_mod.S_ISREG(st.st_mode):
                    foreign += st.st_size
                    continue
                entries.append(Entry(key, path, st.st_size, st.st_atime))
        return entries, foreign + self._reserved()

    def _drop_symlink(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            path.unlink()
            logger.warning("removed symbolic link {} from the LoRA cache: only files selfix fetched belong there",
                           path)

    def _drop_stale_part(self, lock_path: Path, part: Path) -> None:
        lock = _Lock.try_take(lock_path)
        if lock is None:
            return  # its download is running
        with lock:
            part.unlink(missing_ok=True)
            lock.write("")
        logger.info("removed {} left by an interrupted download", part)

    def _reserved(self) -> int:
        total = 0
        for path in (self.state / "locks").iterdir():
            try:
                text = path.read_text()
            except (FileNotFoundError, UnicodeDecodeError):
                continue
            if not text:
                continue
            lock = _Lock.try_take(path)
            if lock is None:
                with contextlib.suppress(ValueError):
                    total += int(text.split(" ", 1)[0])  # a download in progress
                continue
            with lock:
                lock.write("")  # its downloader died: the reservation is void
        return total

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the cache lock: no reservation or eviction happens meanwhile (for consistent measurements)."""
        self._make_dirs()
        with _Lock.take(self.state / "cache.lock", exclusive=True):
            yield

    def usage(self) -> int:
        """Bytes the budget counts right now (cached files + reservations of downloads in progress)."""
        with self.exclusive():
            entries, reserved = self.scan()
        return sum(e.size for e in entries) + reserved


def _task_error(key: str, exc: StorageError) -> TaskError:
    if isinstance(exc, ObjectNotFound):
        return TaskError(LORA_NOT_FOUND, f"loraModel {key!r} does not exist in the store")
    if isinstance(exc, InvalidKey):
        return TaskError(LORA_FORBIDDEN, f"loraModel {key!r}: {exc}")
    if isinstance(exc, ChecksumMismatch):
        return TaskError(LORA_INVALID, f"loraModel {key!r}: the stored object is damaged ({exc})")
    return TaskError(exc.result_code("lora"), f"loraModel {key!r}: {exc}")


def _prune_empty_dirs(folder: Path, root: Path) -> None:
    """Remove empty folders from `folder` up to (not including) `root` (left by the older key-named layout)."""
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def _disk_free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class Prefetcher:
    """Fetches the LoRAs of the next jobs in inbox/ in a background thread while the GPU works.

    `poke()` is all the event loop ever calls: it sets a flag and returns. The thread reads the first few inbox
    entries, pins their keys (so prefetching one does not evict another) and fetches what is missing, skipping keys
    another process is fetching and anything that would need an in-use file evicted.
    """

    def __init__(self, cache: LoraCache, spool: Spool, depth: int = PREFETCH_DEPTH) -> None:
        self.cache = cache
        self.spool = spool
        self.depth = depth
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._skipped: dict[str, float] = {}
        self.fetched = 0  # keys made present by this prefetcher (for tests and logs)

    def start(self) -> Prefetcher:
        if self.depth > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lora-prefetch", daemon=True)
            self._thread.start()
        return self

    def poke(self) -> None:
        self._wake.set()

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)  # a download in progress is left to finish (daemon thread)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.once()
            except Exception as exc:  # noqa: BLE001 - prefetching is an optimisation; never let it die
                if is_disk_full(exc):  # the runner's own disk-full episode says it, once
                    logger.debug("LoRA prefetch postponed: {}", exc)
                else:
                    logger.exception("LoRA prefetch failed")

    def upcoming(self) -> list[tuple[str, str]]:
        """(key, userId) of the LoRAs of the next `depth` jobs in inbox/, in run order."""
        wanted: list[tuple[str, str]] = []
        for entry in self.spool.inbox_entries()[: self.depth]:
            job = self.spool.read_inbox_job(entry)
            if job is None or job.user_id is None:
                continue  # not a job the runner would run: nothing to fetch for it
            for key in job.lora_models:
                if (key, job.user_id) not in wanted:
                    wanted.append((key, job.user_id))
        return wanted

    def once(self) -> None:
        wanted = self.upcoming()
        window = [key for key, _ in wanted]
        now = time.monotonic()
        for key, user in wanted:
            if self._stop.is_set():
                return
            if self.cache.fresh(key) is not None or self._skipped.get(key, 0.0) > now:
                continue
            if self.cache.prefetch(key, user, window):
                self.fetched += 1
            else:
                self._skipped[key] = now + PREFETCH_RETRY_S
        self._skipped = {k: t for k, t in self._skipped.items() if t > now}


__all__ = ["GB", "LORA_TOO_LARGE", "CacheFull", "LoraCache", "Prefetcher", "check_safetensors",
           "keys_in_processing"]
