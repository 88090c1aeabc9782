"""What a downloaded output file is, and the still-image encodings a task can ask for.

The file type comes from the file's first bytes, never from its name: a custom node may save anything under any
extension. Everything here reads files in bounded pieces (at most a few MiB), except Pillow decoding a still,
which only happens for still images a task asked to re-encode.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from selfix import messages as m
from selfix.workflow import OutputItem

HEAD_BYTES = 64
TEXT_TYPE = "text/plain; charset=utf-8"
STILL_TYPES = {"image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "image/tiff"}
EXTENSIONS = {
    "image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif", "image/bmp": "bmp",
    "image/tiff": "tiff", "video/mp4": "mp4", "video/quicktime": "mov", "video/webm": "webm",
    "video/x-matroska": "mkv", "video/x-msvideo": "avi", "audio/flac": "flac", "audio/wav": "wav",
    "audio/ogg": "ogg", "audio/mpeg": "mp3", "audio/mp4": "m4a", "model/gltf-binary": "glb",
    "model/gltf+json": "gltf", "text/plain; charset=utf-8": "txt",
}
ENCODINGS = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
# PNG chunks that carry text: ComfyUI's SaveImage writes the prompt and workflow (LoRA names included) as tEXt.
PNG_TEXT_CHUNKS = {b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"}
MP4_MAX_BOXES = 4096  # top-level boxes scanned for moov; real files have < 10
MAX_DURATION_FRAMES = 1000  # an animation's duration needs a seek (a decode) per frame: skipped beyond this


def sniff(head: bytes) -> str:
    """Content type from magic bytes (the first HEAD_BYTES of a file)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head[:4] == b"RIFF" and len(head) >= 12:
        return {b"WEBP": "image/webp", b"WAVE": "audio/wav", b"AVI ": "video/x-msvideo"}.get(
            head[8:12], "application/octet-stream")
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        return "video/quicktime" if brand == b"qt  " else "audio/mp4" if brand == b"M4A " else "video/mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # EBML: Matroska family; the DocType says which
        return "video/x-matroska" if b"matroska" in head else "video/webm"
    if head.startswith(b"fLaC"):
        return "audio/flac"
    if head.startswith(b"OggS"):
        return "audio/ogg"
    if head.startswith(b"ID3") or head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return "audio/mpeg"
    if head.startswith(b"glTF"):
        return "model/gltf-binary"
    if head.startswith(b"BM"):
        return "image/bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    return "application/octet-stream"


def kind_of(content_type: str, animated: bool) -> str:
    """image, animation, video, audio, mesh or file."""
    major = content_type.split("/", 1)[0]
    if major == "image":
        return "animation" if animated else "image"
    return {"video": "video", "audio": "audio", "model": "mesh"}.get(major, "file")


def extension(content_type: str, filename: str) -> str:
    """The object key's extension: from the detected type; else the file's own (sanitised), else bin."""
    if content_type in EXTENSIONS:
        return EXTENSIONS[content_type]
    own = Path(filename).suffix.lstrip(".").lower()
    return own if own.isalnum() and len(own) <= 10 else "bin"


@dataclass(frozen=True)
class Probe:
    content_type: str
    size: int
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    duration: float | None = None

    def facts(self) -> dict[str, Any]:
        """The known ones, for the result's `outputs` entry."""
        frames = self.frames if (self.frames or 1) > 1 else None
        found = {"width": self.width, "height": self.height, "frames": frames, "duration": self.duration}
        return {k: v for k, v in found.items() if v is not None}


def probe(path: Path) -> Probe:
    """Type, size, and what is cheap to know: dimensions and frames of images, duration of MP4/FLAC/WAV."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(HEAD_BYTES)
    content_type = sniff(head)
    if content_type.startswith("image/"):
        return _probe_image(path, content_type, size)
    if content_type in ("video/mp4", "video/quicktime", "audio/mp4"):
        return Probe(content_type, size, *_mp4_facts(path))
    if content_type == "audio/flac":
        return Probe(content_type, size, duration=_flac_duration(path))
    if content_type == "audio/wav":
        return Probe(content_type, size, duration=_wav_duration(path))
    return Probe(content_type, size)


def _probe_image(path: Path, content_type: str, size: int) -> Probe:
    try:
        with Image.open(path) as img:  # lazy: reads the header, not the pixels
            frames = int(getattr(img, "n_frames", 1))
            duration = None
            if 1 < frames <= MAX_DURATION_FRAMES:
                total = 0
                for index in range(frames):
                    img.seek(index)
                    total += int(img.info.get("duration", 0) or 0)
                duration = round(total / 1000, 3)
            return Probe(content_type, size, img.width, img.height, frames, duration)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        return Probe(content_type, size)


def is_animated(p: Probe, animated_flag: bool) -> bool:
    return animated_flag or (p.frames or 1) > 1 or p.content_type.startswith(("video/", "audio/"))


# --- MP4 / FLAC / WAV headers -------------------------------------------------------------------------

def _boxes(fh: BinaryIO, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload offset, payload end) of the ISO-BMFF boxes between start and end; seeks, reads 16 bytes each."""
    pos = start
    for _ in range(MP4_MAX_BOXES):
        if pos + 8 > end:
            return
        fh.seek(pos)
        header = fh.read(16)
        if len(header) < 8:
            return
        length, kind = struct.unpack(">I4s", header[:8])
        offset = 8
        if length == 1 and len(header) >= 16:
            length, offset = struct.unpack(">Q", header[8:16])[0], 16
        elif length == 0:
            length = end - pos
        if length < offset:
            return
        yield kind, pos + offset, min(pos + length, end)
        pos += length


def _mp4_facts(path: Path) -> tuple[int | None, int | None, int | None, float | None]:
    """(width, height, frames, duration) from moov/mvhd and the first video track's tkhd."""
    width = height = None
    duration = None
    try:
        with open(path, "rb") as fh:
            end = os.fstat(fh.fileno()).st_size
            moov = next(((s, e) for k, s, e in _boxes(fh, 0, end) if k == b"moov"), None)
            if moov is None:
                return None, None, None, None
            for kind, start, stop in _boxes(fh, *moov):
                if kind == b"mvhd":
                    fh.seek(start)
                    body = fh.read(min(stop - start, 32))
                    if body[:1] == b"\x01" and len(body) >= 32:
                        scale, length = struct.unpack(">IQ", body[20:32])
                    elif len(body) >= 20:
                        scale, length = struct.unpack(">II", body[12:20])
                    else:
                        continue
                    duration = round(length / scale, 3) if scale else None
                elif kind == b"trak" and width is None:
                    width, height = _tkhd_size(fh, start, stop)
    except OSError:
        return None, None, None, None
    return width, height, None, duration


def _tkhd_size(fh: BinaryIO, start: int, stop: int) -> tuple[int | None, int | None]:
    for kind, s, e in _boxes(fh, start, stop):
        if kind == b"tkhd" and e - s >= 8:
            fh.seek(e - 8)
            w, h = struct.unpack(">II", fh.read(8))
            if w and h:  # audio tracks have 0 x 0
                return w >> 16, h >> 16
    return None, None


def _flac_duration(path: Path) -> float | None:
    with open(path, "rb") as fh:
        head = fh.read(4 + 4 + 34)
    if len(head) < 42 or head[4] & 0x7F != 0:  # first block must be STREAMINFO
        return None
    info = int.from_bytes(head[18:26], "big")
    rate, samples = info >> 44, info & ((1 << 36) - 1)
    return round(samples / rate, 3) if rate and samples else None


def _wav_duration(path: Path) -> float | None:
    with open(path, "rb") as fh:
        head = fh.read(1 << 12)
    fmt = head.find(b"fmt ")
    data = head.find(b"data")
    if fmt < 0 or data < 0 or len(head) < data + 8:
        return None
    byte_rate = struct.unpack("<I", head[fmt + 16: fmt + 20])[0]
    length = struct.unpack("<I", head[data + 4: data + 8])[0]
    return round(length / byte_rate, 3) if byte_rate else None


# --- still encodings ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Encoding:
    """What a task asked for its stills (`output` field); format None keeps the file's own format."""

    format: str | None = None
    quality: int | None = None
    strip_metadata: bool = True

    @classmethod
    def of(cls, spec: dict[str, Any] | None, strip_default: bool) -> Encoding:
        spec = spec or {}
        strip = spec.get("stripMetadata")
        return cls(spec.get("format"), spec.get("quality"), strip_default if strip is None else bool(strip))


def encode_still(source: Path, target: Path, content_type: str, enc: Encoding) -> str:
    """Write `source` to `target` as the task asked; return the target's content type.

    Same format + strip: PNG text chunks are dropped byte for byte (no decode, the pixels stay identical).
    Another format: decoded and re-encoded with Pillow; kept metadata goes where ComfyUI itself puts it (PNG text
    chunks; for WebP/JPEG the EXIF fields ComfyUI's SaveAnimatedWEBP uses).
    """
    wanted = ENCODINGS.get(enc.format or "", content_type)
    if wanted == content_type and enc.quality is None:
        strip = {"image/png": strip_png_text, "image/webp": strip_webp_metadata, "image/jpeg": strip_jpeg_metadata}
        if enc.strip_metadata and content_type in strip:
            strip[content_type](source, target)
        else:
            shutil.copyfile(source, target)
        return content_type
    with Image.open(source) as img:
        img.load()
        text = {} if enc.strip_metadata else _text_of(img)
        _save(img, target, wanted, enc.quality, text)
    return wanted


def _text_of(img: Image.Image) -> dict[str, str]:
    return {k: v for k, v in img.info.items() if isinstance(k, str) and isinstance(v, str)}


def _save(img: Image.Image, target: Path, content_type: str, quality: int | None, text: dict[str, str]) -> None:
    if content_type == "image/png":
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
        img.save(target, format="PNG", pnginfo=info, compress_level=4)
        return
    exif = Image.Exif()
    for index, (key, value) in enumerate(text.items()):
        # real: comfy_extras/nodes_images.SaveAnimatedWEBP: 0x0110 "prompt:{...}", 0x010F - i "{key}:{...}"
        exif[0x0110 if key == "prompt" else 0x010F - index] = f"{key}:{value}"
    if content_type == "image/jpeg":
        rgb = img.convert("RGB") if img.mode != "RGB" else img
        rgb.save(target, format="JPEG", quality=quality or 90, exif=exif.tobytes() if text else b"")
        return
    kwargs: dict[str, Any] = {"quality": quality} if quality is not None else {"lossless": True}
    img.save(target, format="WEBP", exif=exif.tobytes() if text else b"", **kwargs)


def strip_png_text(source: Path, target: Path) -> None:
    """Copy a PNG without its text/time chunks, one chunk at a time (IDAT chunks are at most a few MiB)."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        dst.write(src.read(8))
        while True:
            header = src.read(8)
            if len(header) < 8:
                break
            length, kind = struct.unpack(">I4s", header)
            keep = kind not in PNG_TEXT_CHUNKS
            if keep:
                dst.write(header)
            _copy_or_skip(src, dst, length + 4, keep)  # payload + CRC
            if kind == b"IEND":
                break


WEBP_META_CHUNKS = {b"EXIF": 0x08, b"XMP ": 0x04}  # chunk -> its VP8X flag bit


def strip_webp_metadata(source: Path, target: Path) -> None:
    """Copy a (possibly animated) WebP without its EXIF/XMP chunks, where ComfyUI's SaveAnimatedWEBP puts the
    prompt and workflow; the VP8X flags and the RIFF size are fixed up. Two passes over the chunk headers."""
    with open(source, "rb") as src:
        end = os.fstat(src.fileno()).st_size
        chunks = []
        pos = 12
        while pos + 8 <= end:
            src.seek(pos)
            kind, length = struct.unpack("<4sI", src.read(8))
            chunks.append((kind, pos, 8 + length + (length & 1)))
            pos += 8 + length + (length & 1)
        kept = [c for c in chunks if c[0] not in WEBP_META_CHUNKS]
        with open(target, "wb") as dst:
            dst.write(b"RIFF" + struct.pack("<I", 4 + sum(size for _, _, size in kept)) + b"WEBP")
            for kind, start, size in kept:
                src.seek(start)
                if kind == b"VP8X":
                    head = bytearray(src.read(size))
                    head[8] &= ~(WEBP_META_CHUNKS[b"EXIF"] | WEBP_META_CHUNKS[b"XMP "]) & 0xFF
                    dst.write(head)
                else:
                    _copy_or_skip(src, dst, size, True)


JPEG_DROPPED = {0xE1, 0xED, 0xFE}  # APP1 (EXIF, XMP), APP13 (IPTC), COM; ICC (APP2) and Adobe (APP14) stay


def strip_jpeg_metadata(source: Path, target: Path) -> None:
    """Copy a JPEG without its EXIF/XMP/IPTC/comment segments; from the first SOS on, the bytes are copied as is."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        dst.write(src.read(2))  # SOI
        while True:
            marker = src.read(2)
            if len(marker) < 2 or marker[0] != 0xFF or marker[1] in (0xDA, 0xD9):
                dst.write(marker)
                break
            length_bytes = src.read(2)
            if len(length_bytes) < 2:
                dst.write(marker + length_bytes)
                break
            length = struct.unpack(">H", length_bytes)[0]
            keep = marker[1] not in JPEG_DROPPED
            if keep:
                dst.write(marker + length_bytes)
            _copy_or_skip(src, dst, length - 2, keep)
        shutil.copyfileobj(src, dst, 1 << 20)


def strip_animation(source: Path, target: Path, content_type: str) -> bool:
    """Metadata out of an animated PNG/WebP, frames untouched; False for other types (copied as they are)."""
    if content_type == "image/png":
        strip_png_text(source, target)
    elif content_type == "image/webp":
        strip_webp_metadata(source, target)
    else:
        return False
    return True


def _copy_or_skip(src: BinaryIO, dst: BinaryIO, count: int, keep: bool) -> None:
    if not keep:
        src.seek(count, os.SEEK_CUR)
        return
    while count > 0:
        chunk = src.read(min(count, 1 << 20))
        if not chunk:
            return
        dst.write(chunk)
        count -= len(chunk)


def png_text(path: Path) -> dict[str, str]:
    """The text chunks of a PNG (tests and `selfix` tools use it to check what was stripped)."""
    with Image.open(path) as img:
        return {k: v for k, v in img.info.items() if isinstance(k, str) and isinstance(v, str)}


# --- staging a finished prompt's outputs --------------------------------------------------------------

Download = Callable[[dict[str, str], Path, int | None], Awaitable[int]]


@dataclass(frozen=True)
class Plan:
    """Where a task's outputs go and how: key prefix, encodings, limits."""

    prefix: str
    task_id: str
    encoding: Encoding
    max_bytes: int
    max_text_bytes: int


@dataclass
class Staged:
    image_paths: list[str] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    stills: int = 0
    others: int = 0
    inline_bytes: int = 0

    def next_still(self, plan: Plan, ext: str) -> str:
        self.stills += 1
        return m.output_key(plan.prefix, plan.task_id, self.stills - 1, ext)

    def next_other(self, plan: Plan, ext: str) -> str:
        self.others += 1
        return m.media_key(plan.prefix, plan.task_id, self.others - 1, ext)


async def stage_outputs(items: list[OutputItem], download: Download, folder: Path, plan: Plan) -> Staged:
    """Download every file output into `folder` (named by messages.staged_name of its object key), encode the
    stills as the task asked, and describe each output. Keys are numbered in `items` order: stills
    users/<u>/images/<taskId>-<n>.<ext> (as before), everything else users/<u>/outputs/<taskId>-<n>.<ext>.
    Raises comfy.OutputTooLarge past plan.max_bytes."""
    staged = Staged()
    for index, item in enumerate(items):
        if item.file is None:
            _stage_text(item, folder, plan, staged)
            continue
        raw = folder / f"download-{index}"
        await download(item.file, raw, plan.max_bytes)
        found = await asyncio.to_thread(probe, raw)
        kind = kind_of(found.content_type, is_animated(found, item.animated))
        if kind == "image":
            await _stage_still(item, raw, found, folder, plan, staged)
            continue
        key = staged.next_other(plan, extension(found.content_type, item.file["filename"]))
        target = folder / m.staged_name(key)
        size = found.size
        if kind == "animation" and plan.encoding.strip_metadata and await asyncio.to_thread(
                strip_animation, raw, target, found.content_type):
            raw.unlink()
            size = target.stat().st_size
        else:
            os.replace(raw, target)  # videos, audio, meshes: as the node wrote them
        staged.outputs.append(m.output_entry(item.node, item.key, kind, object_key=key,
                                             content_type=found.content_type, size=size,
                                             facts=found.facts(), hints=item.hints))
    return staged


async def _stage_still(item: OutputItem, raw: Path, found: Probe, folder: Path, plan: Plan, staged: Staged) -> None:
    encodable = found.content_type in ENCODINGS.values()
    wanted = ENCODINGS.get(plan.encoding.format or "", found.content_type) if encodable else found.content_type
    key = staged.next_still(plan, extension(wanted, item.file["filename"] if item.file else ""))
    target = folder / m.staged_name(key)
    if encodable:
        await asyncio.to_thread(encode_still, raw, target, found.content_type, plan.encoding)
        raw.unlink()
    else:
        os.replace(raw, target)
    final = await asyncio.to_thread(probe, target)
    staged.image_paths.append(key)
    staged.outputs.append(m.output_entry(item.node, item.key, "image", object_key=key,
                                         content_type=final.content_type, size=final.size, facts=final.facts(),
                                         hints=item.hints))


def _stage_text(item: OutputItem, folder: Path, plan: Plan, staged: Staged) -> None:
    text = item.text or ""
    data = text.encode("utf-8")
    if staged.inline_bytes + len(data) <= plan.max_text_bytes:  # a bound for the whole result (Kafka message)
        staged.inline_bytes += len(data)
        staged.outputs.append(m.output_entry(item.node, item.key, "text", text=text, content_type=TEXT_TYPE,
                                             size=len(data)))
        return
    key = staged.next_other(plan, "txt")
    (folder / m.staged_name(key)).write_bytes(data)
    staged.outputs.append(m.output_entry(item.node, item.key, "text", object_key=key, content_type=TEXT_TYPE,
                                         size=len(data)))
