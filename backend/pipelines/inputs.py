"""Argument checks and image conversions shared by the pipelines.

Every check raises ValueError naming the argument and what is allowed (diffusers philosophy:
a concise error beats silently correcting bad input). The only silent change is the one
diffusers also makes: sizes are rounded up to what the MoVQ can decode.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

from backend.limits import MAX_BATCH, MAX_SIDE, MAX_STEPS  # the library's limits (the app's are lower)


def check_positive_int(name: str, value, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(f"`{name}` must be an integer between 1 and {maximum}; got {value!r}")
    if not 1 <= int(value) <= maximum:
        raise ValueError(f"`{name}` must be between 1 and {maximum}; got {value}")
    return int(value)


def check_size(name: str, value) -> int:
    return check_positive_int(name, value, MAX_SIDE)


def check_steps(name: str, value) -> int:
    return check_positive_int(name, value, MAX_STEPS)


def check_batch(name: str, value) -> int:
    return check_positive_int(name, value, MAX_BATCH)


def check_guidance(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a finite number >= 0; got {value!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0; got {value}")
    return value


def check_strength(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`strength` must be a number in [0, 1]; got {value!r}") from None
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        raise ValueError(f"`strength` must be in [0, 1]; got {value}")
    return value


def check_output_type(value: str, allowed=("pil", "np", "latent")) -> str:
    if value not in allowed:
        raise ValueError(f"`output_type` must be one of {list(allowed)}; got {value!r}")
    return value


def as_embeds(name: str, value, dim: int) -> np.ndarray:
    """Image embeddings as float32 (B, dim); a list of (dim,) or (1, dim) arrays is stacked."""
    if value is None:
        raise ValueError(f"`{name}` is required: an array of shape (batch, {dim})")
    if isinstance(value, (list, tuple)):
        value = np.concatenate([np.asarray(as_numpy(v), dtype=np.float32).reshape(-1, dim)
                                if np.asarray(as_numpy(v)).size % dim == 0 else np.asarray(as_numpy(v))
                                for v in value], axis=0)
    array = np.asarray(as_numpy(value), dtype=np.float32)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(f"`{name}` must have shape (batch, {dim}); got {tuple(array.shape)}")
    if array.shape[0] < 1:
        raise ValueError(f"`{name}` is empty")
    if not np.isfinite(array).all():
        raise ValueError(f"`{name}` contains NaN or infinite values")
    return array


def as_latents(name: str, value, shape: tuple) -> np.ndarray:
    array = np.asarray(as_numpy(value), dtype=np.float32)
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"`{name}` must have shape {tuple(shape)}; got {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"`{name}` contains NaN or infinite values")
    return array


def as_numpy(value):
    """A MindSpore Tensor as a numpy array; anything else as it is."""
    if hasattr(value, "asnumpy"):
        return value.asnumpy()
    return value


def as_array(name: str, value, ndim: int) -> np.ndarray:
    """An array (or Tensor) argument with `ndim` dimensions, as numpy."""
    array = np.asarray(as_numpy(value))
    if array.ndim != ndim:
        raise ValueError(f"`{name}` must have {ndim} dimensions; got shape {tuple(array.shape)}")
    return array


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """Any PIL mode as RGB: alpha dropped as PIL does, 16-bit scaled (not clipped) to 8 bits."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"`{name}` must be a PIL image; got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"`{name}` is empty ({image.width}x{image.height})")
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        peak = 1.0 if array.max() <= 1.0 else 255.0
        return Image.fromarray(np.clip(array / peak * 255 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


def to_mask(mask, name: str = "mask_image") -> Image.Image | np.ndarray:
    """A PIL mask as mode L (alpha of an RGBA mask ignored, as diffusers' convert("L") does)."""
    if isinstance(mask, Image.Image):
        if mask.width < 1 or mask.height < 1:
            raise ValueError(f"`{name}` is empty ({mask.width}x{mask.height})")
        if mask.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            return to_rgb(mask, name).convert("L")
        return mask.convert("L")
    try:
        array = np.asarray(as_numpy(mask), dtype=np.float32)
    except (TypeError, ValueError):  # e.g. a file name: say which argument, not "could not convert"
        raise ValueError(f"`{name}` must be a PIL image or a (H, W) array in [0, 1]; "
                         f"got {type(mask).__name__}") from None
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"`{name}` must be a PIL image or a (H, W) array in [0, 1]; got shape {array.shape}")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise ValueError(f"`{name}` array values must be finite and in [0, 1]")
    return array


def images_list(name: str, value) -> list:
    if value is None:
        raise ValueError(f"`{name}` is required")
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"`{name}` is an empty list")
        return list(value)
    return [value]


def prompts_list(name: str, value) -> list[str]:
    if isinstance(value, str):
        prompts = [value]
    elif isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value):
        prompts = list(value)
    else:
        raise ValueError(f"`{name}` must be a string or a non-empty list of strings; got {type(value).__name__}")
    for prompt in prompts:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as error:  # the tokenizer would fail with a TypeError naming nothing
            raise ValueError(f"`{name}` is not valid Unicode text: character {error.start} is a lone "
                             f"surrogate (U+{ord(prompt[error.start]):04X})") from None
    return prompts


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, H, W, 3) floats in [0, 1] -> PIL images (rounded as diffusers does)."""
    images = (images * 255).round().astype("uint8")
    return [Image.fromarray(image) for image in images]
