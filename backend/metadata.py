"""Generation settings stored inside the PNG files the app writes, and read back.

Each image carries two text chunks:
- `parameters`: the AUTOMATIC1111 web UI layout (prompt, "Negative prompt: ..." line, then one
  line of `Key: value` pairs), which many image viewers and tools already understand;
- `kandinsky_studio`: JSON with every field of the request, so nothing is lost on the way back.

`read_settings` prefers the JSON chunk and falls back to parsing an A1111 `parameters` text, so
PNGs written by other tools fill the controls too, as far as their keys map onto ours.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

JSON_CHUNK = "kandinsky_studio"
PARAMETERS_CHUNK = "parameters"
FORMAT_VERSION = 1

# A1111 key -> our settings field, in the order they are written.
_A1111_KEYS = (
    ("Steps", "num_inference_steps", int),
    ("Sampler", "scheduler", str),
    ("CFG scale", "guidance_scale", float),
    ("Seed", "seed", int),
    ("Size", "size", str),
    ("Model", "model", str),
    ("Task", "task", str),
    ("Prior steps", "prior_num_inference_steps", int),
    ("Prior CFG scale", "prior_guidance_scale", float),
    ("Negative prior prompt", "negative_prior_prompt", str),
    ("Denoising strength", "strength", float),
    ("Batch size", "batch_size", int),
    ("Batch pos", "batch_position", int),
    ("Mask blur", "mask_blur", int),
    ("Mask grow", "mask_grow", int),
    ("Mask invert", "mask_invert", str),
    ("ControlNet mode", "controlnet_mode", str),
    ("Interpolation weights", "weights", str),
    ("Partial", "partial", str),
)
_FIELD_TYPES = {field: kind for _, field, kind in _A1111_KEYS}
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
    pairs = []
    for key, field, _ in _A1111_KEYS:
        value = values.get(field)
        if value is None or value == "" or (field == "partial" and not value):
            continue
        if field in ("strength",) and values.get("task") in ("text2img", "interpolate"):
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
    if extra:
        settings["extra"] = extra
    return settings


def png_info(settings: dict) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_itxt(PARAMETERS_CHUNK, parameters_text(settings))
    payload = {"format_version": FORMAT_VERSION, **settings}
    info.add_itxt(JSON_CHUNK, json.dumps(payload, ensure_ascii=False, sort_keys=True))
    return info


def encode_png(image: Image.Image, settings: dict) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(settings))
    return buffer.getvalue()


def read_settings(source) -> dict:
    """Settings stored in a PNG (a path, bytes or an opened PIL image).

    Returns {} when the image carries none. Raises ValueError when the JSON chunk is corrupt.
    """
    if isinstance(source, (bytes, bytearray)):
        image = Image.open(io.BytesIO(source))
    elif isinstance(source, Image.Image):
        image = source
    else:
        image = Image.open(source)
    text = getattr(image, "text", None) or image.info
    if text.get(JSON_CHUNK):
        try:
            settings = json.loads(text[JSON_CHUNK])
        except json.JSONDecodeError as error:
            raise ValueError(f"the {JSON_CHUNK!r} PNG chunk is not valid JSON: {error}") from error
        if not isinstance(settings, dict):
            raise ValueError(f"the {JSON_CHUNK!r} PNG chunk does not hold an object")
        return settings
    if text.get(PARAMETERS_CHUNK):
        return parse_parameters_text(text[PARAMETERS_CHUNK])
    return {}


def read_texts(source) -> tuple[str, str]:
    """The raw (`parameters`, JSON) chunk texts of a PNG, empty strings where absent."""
    image = source if isinstance(source, Image.Image) else Image.open(source)
    text = getattr(image, "text", None) or image.info
    return str(text.get(PARAMETERS_CHUNK, "")), str(text.get(JSON_CHUNK, ""))


_OWNER_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_owner(owner: str) -> str:
    """An owner names one browser (or API client): its images live in their own folder."""
    if not isinstance(owner, str) or not _OWNER_RE.match(owner):
        raise ValueError("owner must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'; "
                         f"got {owner!r}")
    return owner


class OutputStore:
    """The outputs directory: `<root>/<owner>/<time>-<n>-<seed>.png`, plus `<owner>/inputs/` for
    the images a request was given (referenced from the JSON chunk by file name).

    Safe to call from any thread; file names do not collide (a lock guards the counter).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._counter = 0

    def folder(self, owner: str) -> Path:
        folder = self.root / check_owner(owner)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def save(self, image: Image.Image, settings: dict, owner: str) -> Path:
        """Write `image` with `settings` in its PNG chunks; returns the path."""
        folder = self.folder(owner)
        with self._lock:
            self._counter += 1
            counter = self._counter
        stamp = time.strftime("%Y%m%d-%H%M%S")
        suffix = "-partial" if settings.get("partial") else ""
        # the random part keeps names unique across restarts of the app within one second
        path = folder / f"{stamp}-{counter:04d}{secrets.token_hex(2)}-{settings.get('seed', 0)}{suffix}.png"
        data = encode_png(image, settings)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)  # readers never see half a file
        return path

    def save_input(self, image: Image.Image, owner: str) -> str:
        """Store an input image once (named by its content hash); returns `inputs/<hash>.png`."""
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        name = hashlib.sha256(data).hexdigest()[:20] + ".png"
        folder = self.folder(owner) / "inputs"
        folder.mkdir(exist_ok=True)
        path = folder / name
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
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
