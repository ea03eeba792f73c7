"""Inpainting mask geometry: the mask the pipeline gets, and the one the result is blended with.

Shared by the requests (backend/requests.py) and the page's overlay (kandinsky_ui/masks.py), so
the red region the user sees is exactly what the model repaints. PIL only.
"""
from __future__ import annotations

from PIL import Image, ImageFilter, ImageOps


def repaint_mask(mask: Image.Image, size: tuple[int, int], invert: bool = False, grow: int = 0) -> Image.Image:
    """Mode "L", `size` (width, height): white = repaint, thresholded at half, inverted and grown."""
    mask = mask.convert("L").resize(size, Image.NEAREST)
    mask = mask.point(lambda v: 255 if v >= 128 else 0)
    if invert:
        mask = ImageOps.invert(mask)
    for _ in range(grow):  # a 3x3 max filter grows the region by one pixel a pass
        mask = mask.filter(ImageFilter.MaxFilter(3))
    return mask


def blend_mask(mask: Image.Image, size: tuple[int, int], invert: bool = False, grow: int = 0,
               blur: int = 0) -> Image.Image:
    """How much of the generated image to keep at each pixel: the repaint mask, its edge blurred."""
    mask = repaint_mask(mask, size, invert, grow)
    if blur:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    return mask
