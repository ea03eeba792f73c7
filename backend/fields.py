"""Field checks: each takes the field's name and a value from a page, an API call or a PNG, and returns it
in its type or raises ValueError naming the field and what is allowed (the limits of backend/limits.py).
The request types (backend/requests.py) validate with them; so do the engine (owners, images), the model
manager (choices), the saved images' metadata (owners) and the page's upload guard (image sizes)."""
from __future__ import annotations

import math
import re
import uuid

from PIL import Image

from backend.limits import MAX_INPUT_PIXELS, MAX_TEXT_CHARS

# An owner names one browser (or API client): its images live in a folder of that name, so the
# id is made here, from random hex digits only, and anything else a client sends is refused.
_OWNER_RE = re.compile(r"[0-9a-f]{32}")


def new_owner() -> str:
    return uuid.uuid4().hex


def is_owner(owner) -> bool:
    return isinstance(owner, str) and _OWNER_RE.fullmatch(owner) is not None


def check_owner(owner) -> str:
    if not is_owner(owner):
        raise ValueError(f"owner must be 32 hexadecimal digits (0-9, a-f); got {owner!r}")
    return owner


def check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{name} must be an integer between {low} and {high}; got {value!r}")
    if not low <= int(value) <= high:
        raise ValueError(f"{name} must be between {low} and {high}; got {int(value)}")
    return int(value)


def check_float(name: str, value, low: float, high: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number between {low} and {high}; got {value!r}") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must be between {low} and {high}; got {value}")
    return value


def check_text(name: str, value) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text; got {type(value).__name__}")
    if len(value) > MAX_TEXT_CHARS:
        raise ValueError(f"{name} is {len(value)} characters long; at most {MAX_TEXT_CHARS} are allowed "
                         f"(CLIP reads only the first 77 tokens)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:  # a lone surrogate, e.g. half of an emoji: not storable in the PNG
        raise ValueError(f"{name} is not valid Unicode text: character {error.start} is a lone surrogate "
                         f"(U+{ord(value[error.start]):04X})") from None
    return value


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}; got {value!r}")
    return value


def check_image(name: str, value) -> Image.Image:
    if not isinstance(value, Image.Image):
        raise ValueError(f"{name} is required: an image" + ("" if value is None else
                                                            f" (got {type(value).__name__})"))
    check_image_size(name, value.width, value.height)
    return value


def check_image_size(name: str, width: int, height: int) -> None:
    """The one rule for input images (the page applies it to a file's header before decoding)."""
    if width < 1 or height < 1:
        raise ValueError(f"{name} is empty ({width}x{height} pixels)")
    if width * height > MAX_INPUT_PIXELS:
        raise ValueError(f"{name} is {width}x{height} pixels; at most {MAX_INPUT_PIXELS:,} pixels "
                         f"(8192x8192) are allowed")
