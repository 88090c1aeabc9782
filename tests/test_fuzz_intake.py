"""Poison values as a class, generated: thousands of seeded mutations of a valid task (values of every JSON type in
every field, control characters, lone surrogates, NaN, duplicate keys, huge integers, BOMs, UTF-16, truncation,
invalid UTF-8) go through the same `accept()` that the consumer and hand-dropped files use.

The checks are properties, not expected outputs, so they hold for inputs nobody listed:
- accept() never raises and always gives one of its four outcomes;
- whenever a reader could tell the taskId (an independent lenient parse finds a valid one), the client gets an answer
  (a failed result or an accepted job), never `unaddressable`;
- a failed result carries a documented code and a message, and is itself strict JSON;
- an accepted job holds only values that are safe downstream: a valid taskId and userId, object keys that pass
  `validate_key` under the user's prefix, plain image names, strict-JSON content.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

import pytest

from selfix import messages as m
from selfix.admission import accept, ingest_dropped_files
from selfix.messages import Limits, strict_loads
from selfix.spool import RESULT_FILE, Spool
from selfix.storage import validate_key
from selfix.templates import Catalog

SEED, CASES = 20261202, 2500
USER = "alice"
LORA = "users/alice/models/style.safetensors"
# Written out here, not imported: the oracle must not share the code under test.
ID_RE = re.compile(r"(?!\.)[A-Za-z0-9._-]{1,128}")
IMAGE_RE = re.compile(r"(?!\.)[A-Za-z0-9._-]{1,128}\.(png|jpg|jpeg|webp)", re.IGNORECASE)
CODES = {v for k, v in vars(m).items() if k.isupper() and isinstance(v, str) and re.fullmatch(r"[a-z_]+", v)}
FIELDS = ("taskId", "userId", "priority", "loraModel", "images", "workflow", "template", "params", "output",
          "timeoutS", "ttlS", "expiresAt", "extra")
NASTY = ["\n", "\r", "\t", "\x00", "\x1b", "\x7f", "\x85", "\u2028", "\u202e", "\u200b", "\ufeff", "\ud800", "\udfff",
         "/", "\\", "..", ".", " ", "é", "中", "\U0001f600", "%2e", "users/bob/", "[input]", "'", '"', "{", "$"]
PNG_URL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8/5+hHgAHggJ/"
           "PchI7wAAAABJRU5ErkJggg==")


def base(task_id: str) -> dict[str, Any]:
    return {
        "taskId": task_id, "userId": USER, "priority": 0, "loraModel": LORA,
        "images": {"in.png": PNG_URL},
        "workflow": {
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5.safetensors"}},
            "10": {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1],
                                                          "lora_name": "style.safetensors", "strength_model": 1.0}},
            "11": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["10", 1], "text": "a cat"}},
            "9": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "out"}},
        },
    }


def text(rng: random.Random) -> str:
    pool = [rng.choice("abcXYZ019._-") for _ in range(rng.randint(0, 12))]
    for _ in range(rng.randint(0, 3)):
        pool.insert(rng.randint(0, len(pool)), rng.choice(NASTY))
    return "".join(pool)


def value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return text(rng)
    if kind == 1:
        return rng.choice([0, -1, 1, 2**31, -(2**63), 10**300, 999_999, 1_000_000])
    if kind == 2:
        return rng.choice([0.5, -0.0, 1e308, 1e-320, 3.0])
    if kind == 3:
        return rng.choice([True, False])
    if kind == 4:
        return None
    if kind == 5:
        return "users/alice/" + text(rng)
    if kind == 6:
        return [value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == 7:
        return {text(rng) or "k": value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return {"class_type": text(rng), "inputs": {text(rng) or "x": value(rng, depth + 1)}}


def mutate(rng: random.Random, msg: dict[str, Any]) -> None:
    op = rng.randrange(7)
    wf = msg.get("workflow") if isinstance(msg.get("workflow"), dict) else None
    if op == 0:
        msg[rng.choice(FIELDS)] = value(rng)
    elif op == 1:
        msg.pop(rng.choice(FIELDS), None)
    elif op == 2:
        field = rng.choice(["taskId", "userId"])
        base_id = str(msg.get(field, "x"))
        at = rng.randint(0, len(base_id))
        msg[field] = base_id[:at] + rng.choice(NASTY) + base_id[at:]
    elif op == 3 and wf:
        node = wf[rng.choice(list(wf))]
        if isinstance(node, dict) and isinstance(node.get("inputs"), dict):
            node["inputs"][rng.choice([*node["inputs"], text(rng) or "y"])] = value(rng)
    elif op == 4 and wf:
        wf[text(rng) or "99"] = value(rng)
    elif op == 5:
        images: dict[str, Any] = msg["images"] if isinstance(msg.get("images"), dict) else {}
        images[text(rng) + rng.choice([".png", ".jpg", ""])] = rng.choice([PNG_URL, "users/alice/x.png",
                                                                            "users/bob/x.png", text(rng)])
        msg["images"] = images
    else:
        keys = [LORA, "users/bob/a.safetensors", "users/alice/" + text(rng) + ".safetensors",
                "users/alice/a.ckpt", text(rng)]
        msg["loraModel"] = rng.choice([rng.choice(keys), rng.sample(keys, rng.randint(0, 3))])


def serialize(rng: random.Random, msg: dict[str, Any]) -> bytes:
    raw = json.dumps(msg, ensure_ascii=rng.random() < 0.5, allow_nan=True)
    op = rng.randrange(20)  # 8 of 20 damage the bytes
    if op == 0:
        raw = raw.replace("1.0", rng.choice(["NaN", "Infinity", "-Infinity", "1e999"]), 1)
    elif op == 1:
        raw = raw.replace('"priority": 0', '"priority": 1' + "0" * rng.choice([10, 4400]), 1)
    elif op == 2:
        raw = raw.replace("{", '{"userId": "mallory", ', 1)  # a key given twice
    elif op == 3:
        return raw.encode("utf-16", "surrogatepass")
    elif op == 4:
        return b"\xef\xbb\xbf" + raw.encode("utf-8", "surrogatepass")
    elif op == 5:
        data = raw.encode("utf-8", "surrogatepass")
        return data[: rng.randint(0, len(data))]
    elif op == 6:
        buf = bytearray(raw.encode("utf-8", "surrogatepass"))
        buf.insert(rng.randint(0, len(buf)), rng.choice([0xFF, 0xC0, 0x80, 0xED]))
        return bytes(buf)
    elif op == 7:
        raw = "[" + raw + "]"
    return raw.encode("utf-8", "surrogatepass")


def readable_task_id(raw: bytes) -> str | None:
    """What any reader could take as the taskId: a lenient parse (Python's own json, which guesses UTF-16 and
    accepts NaN), a valid id at the top level, given once."""
    try:
        obj = json.loads(raw, object_pairs_hook=lambda pairs: pairs)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, list) or not all(isinstance(p, tuple) for p in obj):
        return None
    ids = [v for k, v in obj if k == "taskId"]
    if len(ids) != 1 or not isinstance(ids[0], str) or not ID_RE.fullmatch(ids[0]):
        return None
    return ids[0]


def check_job(job: dict[str, Any], limits: Limits) -> None:
    assert ID_RE.fullmatch(job["taskId"]) and ID_RE.fullmatch(job["userId"]), job
    prefix = limits.prefix(job["userId"])
    for key in job["loraModels"]:
        assert validate_key(key) == key and key.startswith(prefix), key
    for name, ref in job["images"].items():
        assert IMAGE_RE.fullmatch(name), name
        assert ref.startswith("data:image/") or (validate_key(ref) == ref and ref.startswith(prefix)), ref
    validate_key(m.output_key(prefix, job["taskId"], 0))
    strict_loads(json.dumps(job, ensure_ascii=False, allow_nan=False).encode())


def check_failed(result: dict[str, Any], task_id: str) -> None:
    assert result["taskId"] == task_id and result["status"] == "failed", result
    error = result["error"]
    assert error["code"] in CODES, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["retriable"] is False, error


@pytest.mark.parametrize("chunk", range(5))
def test_generated_poison_is_answered_or_refused_and_never_stops_intake(tmp_path: Path, chunk: int) -> None:
    rng = random.Random(SEED + chunk)
    sp = Spool(tmp_path / "spool").ensure()
    limits, catalog = Limits(), Catalog.load()
    kinds: dict[str, int] = {}
    for n in range(CASES // 5):
        msg = base(f"t{chunk}-{n}")
        for _ in range(rng.randint(1, 3)):
            mutate(rng, msg)
        raw = serialize(rng, msg)
        outcome = accept(sp, raw, limits, catalog)
        kinds[outcome.kind] = kinds.get(outcome.kind, 0) + 1
        readable = readable_task_id(raw)
        if readable is not None and outcome.kind != "duplicate":
            assert outcome.kind in ("accepted", "failed"), (raw[:300], outcome)
            assert outcome.task_id == readable
        if outcome.kind == "failed":
            assert outcome.task_id is not None
            result = strict_loads((sp.outbox_dir(outcome.task_id) / RESULT_FILE).read_bytes())
            check_failed(result, outcome.task_id)
        elif outcome.kind == "accepted":
            entry = sp.inbox_entry_of(str(outcome.task_id))
            assert entry is not None
            check_job(strict_loads(sp.read_inbox(entry) or b""), limits)
        else:
            assert outcome.kind in ("unaddressable", "duplicate"), outcome
    # The generator must reach every outcome, or the properties above were never exercised.
    assert kinds.get("accepted", 0) > 10 and kinds.get("failed", 0) > 100 and kinds.get("unaddressable", 0) > 5, kinds


def dropped_name(rng: random.Random, n: int) -> bytes:
    """A file name a person (or a broken script) could leave in inbox/: any bytes but "/" and NUL."""
    junk = bytes(rng.choice([0xFF, 0xC3, 0x0A, 0x0D, 0x1B, 0x20, 0x7F, 0x2E, 0x5C, 0x3A, 0x2A]) for _ in range(3))
    stem = rng.choice([b"task", b"", b"-", b"0000001.", b"..x", "été".encode(), b"a" * 200])
    return stem + junk + str(n).encode() + rng.choice([b".json", b"", b".JSON", b".tmp", b".json\n"])


def test_generated_dropped_files_each_end_answered_or_in_corrupt(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    sp = Spool(tmp_path / "spool").ensure()
    limits, catalog = Limits(), Catalog.load()
    dropped = 0
    for n in range(300):
        msg = base(f"d-{n}")
        for _ in range(rng.randint(0, 2)):
            mutate(rng, msg)
        path = os.path.join(os.fsencode(sp.inbox), dropped_name(rng, n))
        with open(path, "wb") as fh:
            fh.write(serialize(rng, msg))
        dropped += not path.rsplit(b"/", 1)[1].startswith(b".")  # dot files are copies still being written
    outcomes = ingest_dropped_files(sp, limits, catalog)
    assert len(outcomes) == dropped and sp.foreign_inbox_files() == []
    answered = {o.task_id for o in outcomes if o.kind in ("accepted", "failed")}
    corrupt = sp.corrupt_entries()
    assert len(answered) + len(corrupt) == dropped, (len(answered), len(corrupt))
    assert all(reason for _, reason in corrupt)
    assert 50 < len(answered) < dropped < 300, (len(answered), dropped)
