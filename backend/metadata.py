"""Generation settings stored inside the PNG files the app writes, and read back.

Each image carries two text chunks:
- `parameters`: the AUTOMATIC1111 web UI layout (prompt, "Negative prompt: ..." line, then one
  line of `Key: value` pairs), which many image viewers and tools already understand;
- `kandinsky_studio`: JSON with every field of the request, so nothing is lost on the way back.

`read_settings` prefers the JSON chunk and falls back to parsing an A1111 `parameters` text, so
PNGs written by other tools fill the controls too, as far as their keys map onto ours.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import operator
import os
import re
import secrets
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from backend.fields import check_owner

JSON_CHUNK = "kandinsky_studio"
PARAMETERS_CHUNK = "parameters"
FORMAT_VERSION = 1

# Reading settings back from a file someone dropped: only the text chunks are read (the pixels
# never are), and what is read is bounded.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_BYTES = 50 * 2**20         # the app's upload limit (app.py, max_file_size)
MAX_TEXT_CHUNK_BYTES = 2**20       # one text chunk, as stored and once unpacked; ours take a few kB
MAX_PNG_CHUNKS = 100_000           # chunks walked before giving up (a 50 MB file of empty chunks has 4 M)

# A1111 key -> our settings field, in the order they are written.
_A1111_KEYS = (
    ("Steps", "num_inference_steps", int),
    ("Sampler", "scheduler", str),
    ("CFG scale", "guidance_scale", float),
    ("Seed", "seed", int),
    ("Variation seed", "variation_seed", int),              # A1111's names; only with a variation strength
    ("Variation seed strength", "variation_strength", float),
    ("Size", "size", str),
    ("Model", "model", str),
    ("Task", "task", str),
    ("Prior steps", "prior_num_inference_steps", int),
    ("Prior CFG scale", "prior_guidance_scale", float),
    ("Negative prior prompt", "negative_prior_prompt", str),
    ("Denoising strength", "strength", float),              # text-to-image: the hi-res pass's, as A1111 writes it
    ("Hires upscale", "hires_scale", float),                 # only with a hi-res pass
    ("Hires steps", "hires_steps", int),
    ("Hires upscaler", "hires_upscaler", str),
    ("Batch size", "batch_size", int),
    ("Batch pos", "batch_position", int),
    ("Mask blur", "mask_blur", int),
    ("Mask grow", "mask_grow", int),
    ("Mask invert", "mask_invert", str),
    ("ControlNet mode", "mode", str),
    ("Interpolation weights", "weights", str),
    ("Partial", "partial", str),
)
_FIELD_TYPES = {field: kind for _, field, kind in _A1111_KEYS}
HIRES_UPSCALER = "Lanczos"      # how the hi-res pass upscales (PIL's Lanczos; A1111's "Hires upscaler" key)
_KEY_TO_FIELD = {key: field for key, field, _ in _A1111_KEYS}

# The A1111 `Key: value` list: values with commas are written JSON-quoted (modules/infotext_utils.py).
_PARAM_RE = re.compile(r'\s*([\w ./()-]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _quote(value: Any) -> str:
    text = str(value)
    if any(c in text for c in ',:"\n'):
        return json.dumps(text, ensure_ascii=False)
    return text


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text[1:-1]
    return text


def parameters_text(settings: dict) -> str:
    """The A1111-style `parameters` text for one image's settings."""
    lines = [str(settings.get("prompt", ""))]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    values = dict(settings)
    if "width" in values and "height" in values:
        values["size"] = f"{values['width']}x{values['height']}"
    if values.get("weights") is not None:
        values["weights"] = ", ".join(f"{w:g}" for w in values["weights"])
    hires = values.get("task") == "text2img" and (values.get("hires_scale") or 1) > 1
    if hires:
        values.update(strength=values.get("hires_strength"), hires_upscaler=HIRES_UPSCALER)
    unused = () if hires else ("hires_scale", "hires_steps")     # A1111 writes these only when they act
    if not values.get("variation_strength"):
        unused += ("variation_seed", "variation_strength")
    for field in unused:
        values.pop(field, None)
    pairs = []
    for key, field, _ in _A1111_KEYS:
        value = values.get(field)
        if value is None or value == "" or (field == "partial" and not value):
            continue
        if field in ("strength",) and values.get("task") in ("text2img", "interpolate") and not hires:
            continue
        if field.startswith("mask_") and values.get("task") != "inpaint":
            continue
        pairs.append(f"{key}: {_quote(value)}")
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def parse_parameters_text(text: str) -> dict:
    """Settings from an A1111 `parameters` text (ours or another tool's); unknown keys are kept
    under "extra"."""
    lines = text.strip().split("\n")
    last = lines[-1] if lines else ""
    matches = _PARAM_RE.findall(last)
    if len(matches) < 2:  # the last line is prompt text, not a key-value line
        matches = []
    else:
        lines = lines[:-1]
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    settings: dict[str, Any] = {"prompt": "\n".join(prompt_lines).strip(),
                                "negative_prompt": "\n".join(negative_lines).strip()}
    extra = {}
    for key, raw in matches:
        key, value = key.strip(), _unquote(raw)
        field = _KEY_TO_FIELD.get(key)
        if field is None:
            extra[key] = value
            continue
        try:
            if field == "size":
                width, height = value.lower().split("x")
                settings["width"], settings["height"] = int(width), int(height)
            elif field == "weights":
                settings["weights"] = [float(w) for w in value.split(",") if w.strip()]
            elif field in ("mask_invert", "partial"):
                settings[field] = value.strip().lower() in ("true", "1", "yes")
            else:
                settings[field] = _FIELD_TYPES[field](value)
        except ValueError:
            extra[key] = value
    if "hires_scale" in settings and "strength" in settings and settings.get("task", "text2img") == "text2img":
        settings["hires_strength"] = settings.pop("strength")   # A1111's hi-res fix writes its strength so
    settings.pop("hires_upscaler", None)                         # (always Lanczos here)
    if extra:
        settings["extra"] = extra
    return settings


def settings_texts(settings: dict) -> dict[str, str]:
    """The two text chunks of an image's PNG: {PARAMETERS_CHUNK: A1111 text, JSON_CHUNK: JSON}."""
    payload = {"format_version": FORMAT_VERSION, **settings}
    return {PARAMETERS_CHUNK: parameters_text(settings),
            JSON_CHUNK: json.dumps(payload, ensure_ascii=False, sort_keys=True)}


def png_info(settings: dict) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key, text in settings_texts(settings).items():
        info.add_itxt(key, text)
    return info


def encode_png(image: Image.Image, settings: dict) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(settings))
    return buffer.getvalue()


def read_settings(source) -> dict:
    """Settings stored in a PNG (a path, bytes or an opened PIL image).

    Returns {} when the image carries none. Raises ValueError when the file is not a PNG, is
    beyond the size limits, or its JSON chunk is corrupt.
    """
    texts = _texts(source)
    if texts.get(JSON_CHUNK):
        try:
            settings = json.loads(texts[JSON_CHUNK])
        except json.JSONDecodeError as error:
            raise ValueError(f"the {JSON_CHUNK!r} PNG chunk is not valid JSON: {error}") from error
        if not isinstance(settings, dict):
            raise ValueError(f"the {JSON_CHUNK!r} PNG chunk does not hold an object")
        return settings
    if texts.get(PARAMETERS_CHUNK):
        return parse_parameters_text(texts[PARAMETERS_CHUNK])
    return {}


def read_texts(source) -> tuple[str, str]:
    """The raw (`parameters`, JSON) chunk texts of a PNG, empty strings where absent."""
    texts = _texts(source)
    return str(texts.get(PARAMETERS_CHUNK, "")), str(texts.get(JSON_CHUNK, ""))


def _texts(source) -> dict:
    if isinstance(source, Image.Image):  # already decoded by the caller
        text = getattr(source, "text", None) or source.info
        return {key: text[key] for key in (PARAMETERS_CHUNK, JSON_CHUNK) if key in text}
    return read_png_texts(source)


def read_png_texts(source, keys=(PARAMETERS_CHUNK, JSON_CHUNK)) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) named `keys` of a PNG file (a path or bytes), read by
    walking the chunk list: the image data is skipped, never decoded, and every size is bounded
    (MAX_PNG_BYTES, MAX_TEXT_CHUNK_BYTES, MAX_PNG_CHUNKS). Raises ValueError naming the problem."""
    wanted = {key.encode("latin-1") for key in keys}
    if isinstance(source, (bytes, bytearray)):
        stream, size = io.BytesIO(source), len(source)
    else:
        stream = open(source, "rb")
        size = os.fstat(stream.fileno()).st_size
    with stream:
        if size > MAX_PNG_BYTES:
            raise ValueError(f"the file is {size / 2**20:.1f} MB; PNG info reads files up to "
                             f"{MAX_PNG_BYTES // 2**20} MB")
        if stream.read(8) != PNG_SIGNATURE:
            raise ValueError("not a PNG file (it does not start with the PNG signature)")
        texts: dict[str, str] = {}
        for index in range(MAX_PNG_CHUNKS):
            head = stream.read(8)
            if len(head) < 8:
                if index == 0:
                    raise ValueError("the PNG file is cut short before its header chunk")
                return texts  # a file cut short: what came before still counts (PIL reads it too)
            length, kind = struct.unpack(">I4s", head)
            if not kind.isalpha() or (index == 0 and kind != b"IHDR"):
                raise ValueError(f"the PNG file is damaged (no valid chunk at byte {stream.tell() - 8})")
            if kind == b"IEND":
                return texts
            if kind not in (b"tEXt", b"zTXt", b"iTXt"):
                stream.seek(length + 4, os.SEEK_CUR)  # skip the data and the CRC unread
                continue
            start = stream.read(min(length, 80))  # keyword: 1-79 Latin-1 bytes, then a zero byte
            keyword = start.split(b"\0", 1)[0]
            if keyword not in wanted or b"\0" not in start:
                stream.seek(length - len(start) + 4, os.SEEK_CUR)
                continue
            name = keyword.decode("latin-1")
            if length > MAX_TEXT_CHUNK_BYTES:
                raise ValueError(f"the {name!r} text chunk is {length:,} bytes; at most "
                                 f"{MAX_TEXT_CHUNK_BYTES:,} are read")
            data = start + stream.read(length - len(start))
            if len(data) < length:
                raise ValueError(f"the file is truncated inside the {name!r} text chunk")
            stream.seek(4, os.SEEK_CUR)
            texts[name] = _chunk_text(kind, name, data[len(keyword) + 1:])
        raise ValueError(f"the file has more than {MAX_PNG_CHUNKS:,} chunks; not read further")


def _chunk_text(kind: bytes, name: str, body: bytes) -> str:
    """The text of one tEXt / zTXt / iTXt chunk, `body` being what follows the keyword's zero byte."""
    if kind == b"tEXt":
        return body.decode("latin-1")
    if kind == b"zTXt":
        if body[:1] != b"\0":
            raise ValueError(f"the {name!r} text chunk uses an unknown compression method")
        return _inflate(name, body[1:]).decode("latin-1")
    # iTXt: compression flag, method, language tag \0, translated keyword \0, UTF-8 text
    if len(body) < 2:
        raise ValueError(f"the {name!r} text chunk is cut short")
    compressed, method, rest = body[0], body[1], body[2:]
    parts = rest.split(b"\0", 2)
    if len(parts) < 3:
        raise ValueError(f"the {name!r} text chunk is malformed")
    text = parts[2]
    if compressed:
        if method != 0:
            raise ValueError(f"the {name!r} text chunk uses an unknown compression method")
        text = _inflate(name, text)
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"the {name!r} text chunk is not UTF-8 text: {error}") from None


def _inflate(name: str, data: bytes) -> bytes:
    """zlib data unpacked to at most MAX_TEXT_CHUNK_BYTES (a small chunk may unpack to gigabytes)."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_TEXT_CHUNK_BYTES + 1)
    except zlib.error as error:
        raise ValueError(f"the {name!r} text chunk is not valid compressed data: {error}") from None
    if len(out) > MAX_TEXT_CHUNK_BYTES or inflater.unconsumed_tail:
        raise ValueError(f"the {name!r} text chunk unpacks to more than {MAX_TEXT_CHUNK_BYTES:,} bytes")
    return out


class SaveError(OSError):
    """A file the outputs folder could not take; str() names the problem and the folder, e.g.
    "disk full at /srv/outputs/<owner> (No space left on device)". An OSError with the cause's errno."""

    def __init__(self, cause: OSError, folder: Path):
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.folder = folder
        problem = _PROBLEMS.get(cause.errno, "could not write")
        self.reason = f"{problem} at {folder} ({cause.strerror or cause})"

    def __str__(self) -> str:
        return self.reason


_PROBLEMS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
             errno.EACCES: "no permission to write", errno.EPERM: "no permission to write"}


def _write(file, data: bytes) -> None:
    """The one place the store's bytes reach a file (tests inject a full disk here)."""
    file.write(data)


def write_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file of a unique name in the same folder, renamed
    into place: readers never see half a file, and on any failure (a full or read-only disk, no
    permission, ...) the temporary file is removed and the error raised as a SaveError."""
    tmp = path.parent / f".{path.stem}.{secrets.token_hex(6)}.tmp"
    try:
        with open(tmp, "xb") as file:  # O_EXCL: never another writer's file; the umask's permissions
            _write(file, data)
        os.replace(tmp, path)
    except BaseException as error:
        try:
            tmp.unlink()
        except OSError:  # never created, or the disk refuses even this: nothing more to do
            pass
        if isinstance(error, OSError) and not isinstance(error, SaveError):
            raise SaveError(error, path.parent) from error
        raise


class OutputStore:
    """The outputs directory: `<root>/<owner>/<time>-<n>-<seed>.png`, plus `<owner>/inputs/` for
    the images a request was given (referenced from the JSON chunk by file name). Owner ids are
    checked by backend/requests.py `check_owner` before any becomes a folder name.

    Safe to call from any thread; file names do not collide (a lock guards the counter). A file that
    cannot be written (full or read-only disk) raises SaveError and leaves no temporary file behind.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._counter = 0

    def folder(self, owner: str) -> Path:
        folder = self.root / check_owner(owner)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SaveError(error, folder.parent) from error
        return folder

    def save(self, image: Image.Image, settings: dict, owner: str) -> Path:
        """Write `image` with `settings` in its PNG chunks; returns the path."""
        folder = self.folder(owner)
        try:  # the name is made here from numbers only: nothing a caller passes can reach the path
            seed = operator.index(settings.get("seed", 0))
        except TypeError:
            raise ValueError(f"seed must be an integer; got {settings.get('seed')!r}") from None
        with self._lock:
            self._counter += 1
            counter = self._counter
        stamp = time.strftime("%Y%m%d-%H%M%S")
        suffix = "-partial" if settings.get("partial") else ""
        # the random part keeps names unique across restarts of the app within one second
        path = folder / f"{stamp}-{counter:04d}{secrets.token_hex(2)}-{seed}{suffix}.png"
        write_file(path, encode_png(image, settings))
        return path

    def save_input(self, image: Image.Image, owner: str) -> str:
        """Store an input image once (named by its content hash); returns `inputs/<hash>.png`."""
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        name = hashlib.sha256(data).hexdigest()[:20] + ".png"
        folder = self.folder(owner) / "inputs"
        try:
            folder.mkdir(exist_ok=True)
        except OSError as error:
            raise SaveError(error, folder.parent) from error
        path = folder / name
        if not path.exists():
            write_file(path, data)
        return f"inputs/{name}"

    def input_path(self, owner: str, reference: str) -> Path:
        """The file behind a reference written by `save_input`; refuses anything else."""
        if not re.fullmatch(r"inputs/[0-9a-f]{20}\.png", reference or ""):
            raise ValueError(f"not an input image reference: {reference!r}")
        return self.folder(owner) / reference

    def list(self, owner: str, limit: int = 200) -> list[Path]:
        """This owner's images, newest first."""
        folder = self.root / check_owner(owner)
        if not folder.is_dir():
            return []
        files = [p for p in folder.glob("*.png") if p.is_file()]
        files.sort(key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
        return files[:limit]

    def owns(self, owner: str, path: str | os.PathLike) -> bool:
        """Whether `path` is one of `owner`'s images (guards paths that come from a browser)."""
        try:
            resolved = Path(path).resolve()
        except OSError:
            return False
        return resolved.parent == self.root / check_owner(owner) and resolved.suffix == ".png"
