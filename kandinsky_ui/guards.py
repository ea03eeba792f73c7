"""Input components whose errors name the request field, and image uploads checked before decoding.

Gradio checks and decodes every input before a handler runs, and its messages name neither the
field nor the reason in words a user reads ("Could not preprocess input component at index 12",
"Value inf is greater than maximum value 20."). `name_errors` wraps a component's `preprocess`
so any such error becomes "<field>: <reason>"; it also answers what an API client may send instead
of a number (text, a list) or of a file (a string, a dict without the file's fields: Gradio's pydantic
check runs before `preprocess`, so the component's data model is wrapped too) with the field and what
it takes. `guard_image` does that for image inputs and also
- reads the file's header first and refuses an image of more than MAX_INPUT_PIXELS (a PNG of a
  few hundred bytes may claim 20000x20000 pixels: 1.2 GB once decoded) before anything is decoded;
- keeps the file's own mode (the component is built with image_mode=None) and converts it here:
  16-bit and float images are scaled to 8 bits (Gradio's convert clips them, so a 16-bit depth
  map became white), CMYK and other colour spaces become RGB, palettes keep their transparency.
A file that is not an image by its content (PIL reads its header; `guard_png` reads the PNG
signature) is refused naming the field and deleted from Gradio's cache at once (kandinsky_ui/cache.py
bounds the rest).
"""
from __future__ import annotations

import functools
import math
from io import BytesIO
from pathlib import Path

import gradio as gr
import numpy as np
import pydantic
from PIL import Image

from backend.limits import MAX_INPUT_PIXELS
from backend.fields import check_image_size
from kandinsky_ui import cache

# Kept as they are: what the requests and pipelines take (alpha is handled where it matters).
PLAIN_MODES = ("RGB", "RGBA", "L", "LA")
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _reason(error: BaseException) -> str:
    if isinstance(error, Image.DecompressionBombError):
        return f"the image has more than {MAX_INPUT_PIXELS:,} pixels; refused before decoding it"
    text = str(error).strip() or type(error).__name__
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image file that can be read (PNG, JPEG, WebP, ...)"
    if isinstance(error, FileNotFoundError):
        return (f"the uploaded file is no longer on the server (uploads are kept for "
                f"{cache.DELETE_CACHE[1] // 60} minutes, less when the cache is full); upload it again")
    if isinstance(error, (OSError, SyntaxError)):
        return f"the image file is damaged or cut short ({text})"
    return text


# What a file input takes, for the message when an API client sends something else (gradio_client's
# handle_file(path) makes such a file value).
FILE_VALUE = "a file as gradio_client's handle_file(path) sends it ({'path': ..., 'meta': {'_type': 'gradio.FileData'}})"
ALLOWED_VALUES = {gr.ImageEditor: "the image editor's value {'background': file, 'layers': [file, ...], "
                                  "'composite': file or None}, each file as gradio_client's handle_file(path) sends it",
                  gr.Image: f"an image file: {FILE_VALUE}", gr.File: FILE_VALUE}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _NamedModel:
    """A component's data model (ImageData, EditorData, FileData) whose validation errors name the field and
    what it takes. Gradio validates a payload with it before `preprocess` runs, and its pydantic message
    names the model ("1 validation error for ImageData"), not the field."""

    def __init__(self, model, field: str, allowed: str):
        self._model, self._field, self._allowed = model, field, allowed

    def __getattr__(self, name):
        return getattr(self._model, name)

    def model_validate(self, value, *args, **kwargs):
        try:
            return self._model.model_validate(value, *args, **kwargs)
        except pydantic.ValidationError as error:
            first = error.errors(include_url=False)[0]
            where = ".".join(str(part) for part in first.get("loc", ()))
            got = f"got {where}={_short(first.get('input'))}" if where else f"got {_short(value)}"
            raise gr.Error(f"{self._field}: must be {self._allowed}; {got}") from None


def _allowed_number(component) -> str:
    low, high = getattr(component, "minimum", None), getattr(component, "maximum", None)
    kind = "a finite whole number" if getattr(component, "precision", None) == 0 else "a number"
    if low is not None and high is not None:
        return f"{kind} between {low} and {high}"
    if low is not None or high is not None:
        return f"{kind} of at least {low}" if low is not None else f"{kind} of at most {high}"
    return kind


def _check_number(component, field: str, payload) -> None:
    """A number input takes a number: text, a list or a bool (sent by an API client) would reach Gradio's
    bounds check as `'<' not supported between instances of 'str' and 'int'`; a whole-number input takes a
    finite one (Gradio rounds it: `cannot convert float NaN to integer`). NaN and infinity in other number
    inputs go on to the request's own check, which names the field and its range."""
    if payload is None:
        return
    number = isinstance(payload, (int, float)) and not isinstance(payload, bool)
    if number and (math.isfinite(payload) or getattr(component, "precision", None) != 0):
        return
    raise gr.Error(f"{field}: must be {_allowed_number(component)}; got {_short(payload)}")


def name_errors(component, field: str):
    """Make `component`'s input errors start with `field` (the request field / API parameter)."""
    original = component.preprocess
    allowed = next((text for kind, text in ALLOWED_VALUES.items() if isinstance(component, kind)), None)
    if allowed is not None and getattr(component, "data_model", None) is not None:
        component.data_model = _NamedModel(component.data_model, field, allowed)
    numeric = isinstance(component, (gr.Number, gr.Slider))

    @functools.wraps(original)
    def preprocess(payload):
        if numeric:
            _check_number(component, field, payload)
        try:
            return original(payload)
        except gr.Error as error:
            message = str(error.message) if hasattr(error, "message") else str(error)
            raise gr.Error(message if message.startswith(f"{field}:") else f"{field}: {message}") from None
        except Exception as error:  # noqa: BLE001 - every decoding failure becomes a message
            raise gr.Error(f"{field}: {_reason(error)}") from None

    component.preprocess = preprocess
    return component


def check_image_file(field: str, path) -> None:
    """Refuse an unreadable file, an empty image or one beyond MAX_INPUT_PIXELS (the requests' own
    rule), reading its header only."""
    try:
        with Image.open(path) as image:  # lazy: the header only
            width, height = image.size
    except Exception as error:  # noqa: BLE001
        if isinstance(error, Image.UnidentifiedImageError) and isinstance(path, (str, Path)):
            cache.remove_file(path, cache.cache_folder())  # not an image: no reason to keep it
        raise gr.Error(f"{field}: {_reason(error)}") from None
    try:
        check_image_size("the image", width, height)
    except ValueError as error:
        raise gr.Error(f"{field}: {error}. It was refused before decoding.") from None


def normalize_mode(image: Image.Image) -> Image.Image:
    """An 8-bit mode the app can store and convert further (see the module docstring)."""
    if image.mode in PLAIN_MODES:
        return image
    if image.mode in WIDE_MODES:
        array = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            peak = 1.0 if array.size == 0 or array.max() <= 1.0 else 255.0
        else:
            peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("P", "PA"):
        transparent = image.mode == "PA" or "transparency" in image.info
        return image.convert("RGBA" if transparent else "RGB")
    if image.mode == "1":
        return image.convert("L")
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ...


def _payload_paths(payload) -> list:
    """Local files of an image payload (ImageData, or the editor's background/layers/composite)."""
    paths = []
    for name in ("background", "composite"):
        part = getattr(payload, name, None)
        if part is not None:
            paths.append(getattr(part, "path", None))
    for part in getattr(payload, "layers", None) or []:
        paths.append(getattr(part, "path", None))
    if hasattr(payload, "path"):
        paths.append(payload.path)
    return [p for p in paths if isinstance(p, str)]


def guard_image(component, field: str):
    """An image input (gr.Image with image_mode=None, or gr.ImageEditor) that checks the file's
    header before decoding, normalises the mode, and names `field` in every error."""
    original = component.preprocess

    def preprocess(payload):
        if payload is None:
            return None
        if isinstance(component, gr.Image) and not getattr(payload, "path", None):  # e.g. {"url": "x"} unfetched
            raise gr.Error(f"{field}: must be {ALLOWED_VALUES[gr.Image]}; the file value has no path")
        for path in _payload_paths(payload):
            check_image_file(field, path)
        value = original(payload)
        if isinstance(value, Image.Image):
            try:  # e.g. a data: URL, checked only now
                check_image_size("the image", value.width, value.height)
            except ValueError as error:
                raise gr.Error(f"{field}: {error}") from None
            value = normalize_mode(value)
        return value

    component.preprocess = preprocess
    if isinstance(component, gr.ImageEditor):
        convert = component.convert_and_format_image

        def convert_and_format_image(file, flatten_on_white: bool = False):
            if file is None:
                return convert(file, flatten_on_white)
            # a file, or bytes when the browser sent the image in pieces: checked from the header too
            source = file.path if hasattr(file, "path") else BytesIO(bytes(file))
            check_image_file(field, source)
            if isinstance(source, BytesIO):
                source.seek(0)
            with Image.open(source) as image:
                if image.mode in WIDE_MODES:  # 16-bit: scale to 8 bits before the editor converts (clips) it
                    buffer = BytesIO()
                    normalize_mode(image).save(buffer, format="PNG")
                    return convert(buffer.getvalue(), flatten_on_white)
            return convert(file, flatten_on_white)

        component.convert_and_format_image = convert_and_format_image
    return name_errors(component, field)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def guard_png(component, field: str):
    """A file input that takes PNGs (PNG info): the content must start with the PNG signature, whatever the
    file is called; anything else is refused naming `field` and deleted from Gradio's cache."""
    original = component.preprocess

    def preprocess(payload):
        value = original(payload)  # Gradio's own checks first (a name not ending in .png: 'Invalid file type')
        path = getattr(payload, "path", None)
        if isinstance(path, str):
            try:
                with open(path, "rb") as file:
                    head = file.read(len(PNG_SIGNATURE))
            except FileNotFoundError as error:
                raise gr.Error(f"{field}: {_reason(error)}") from None
            if head != PNG_SIGNATURE:
                cache.remove_file(path, cache.cache_folder())
                raise gr.Error(f"{field}: not a PNG file (it does not start with the PNG signature); "
                               f"PNG info reads PNG images only")
        return value

    component.preprocess = preprocess
    return name_errors(component, field)
