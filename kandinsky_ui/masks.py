"""The inpainting mask from Gradio's ImageEditor value, and the overlay that shows it.

The editor returns {"background", "layers", "composite"}; what the user painted is in the
layers, so the mask is their alpha (anything painted, in any colour, is "repaint"). A separate
mask image (white = repaint) may be uploaded instead, e.g. by API clients.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from backend import masks

OVERLAY_COLOUR = np.array([255, 40, 40], np.float32)


def editor_background(value) -> Image.Image | None:
    if not isinstance(value, dict) or value.get("background") is None:
        return None
    return _as_pil(value["background"]).convert("RGB")


def painted_mask(value) -> Image.Image | None:
    """Mode "L" mask, background size: 255 where any layer has paint; None without a background."""
    background = editor_background(value)
    if background is None:
        return None
    mask = np.zeros((background.height, background.width), np.uint8)
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        layer = _as_pil(layer)
        if layer.size != background.size:
            layer = layer.resize(background.size, Image.NEAREST)
        alpha = np.asarray(layer.convert("RGBA"))[..., 3]
        mask = np.maximum(mask, np.where(alpha > 0, 255, 0).astype(np.uint8))
    return Image.fromarray(mask, "L")


def uploaded_mask(mask, size: tuple[int, int]) -> Image.Image:
    """An uploaded mask image (white = repaint) as mode L at `size`; transparent pixels count as black."""
    mask = _as_pil(mask)
    if mask.mode in ("RGBA", "LA", "PA") or "transparency" in mask.info:
        rgba = mask.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        mask = Image.alpha_composite(flat, rgba)
    return mask.convert("L").resize(size, Image.NEAREST)


def overlay(image: Image.Image, mask: Image.Image, invert: bool, grow: int, blur: int) -> Image.Image:
    """The image with the region the model repaints (backend/masks.py: inverted, grown, blurred as
    the request will be) tinted red."""
    image = image.convert("RGB")
    blend = np.asarray(masks.blend_mask(mask, image.size, invert, grow, blur), np.float32)[..., None] / 255.0 * 0.6
    pixels = np.asarray(image, np.float32)
    mixed = pixels * (1 - blend) + OVERLAY_COLOUR * blend
    return Image.fromarray(np.clip(mixed + 0.5, 0, 255).astype(np.uint8))


def _as_pil(value) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    return Image.open(value)
