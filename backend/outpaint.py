"""Outpainting geometry: an image on a larger canvas, the new area filled, and the mask the inpainting
model repaints (white = new area, feathered into the old image over a blend band). PIL and numpy only.

The fill is the image's border pixels repeated outwards (numpy's `np.pad(..., mode="edge")`), as
Fooocus does for its outpainting (modules/async_worker.py `apply_outpaint`). The inpainting models
never see those pixels as content: Kandinsky 2.1 zeroes the repaint region before the MoVQ encode,
2.2 starts it from noise and masks its latents. What the fill decides is what the MoVQ encoder's
convolutions see next to the old image's edge, where the kept latents come from: the border's own
colours, not the hard edge a constant fill (black, grey) would put there and leave as a dark seam.

The band: the old image's pixels within `blend` pixels of the new area get a linear ramp, 255 next to
the new area down to 0 at `blend` pixels in. The pipeline repaints where the mask is at least half
(it thresholds at 0.5, as diffusers does), i.e. the band's outer half, so the model redraws the seam;
the result is then composited over the canvas through the ramp (`composite`), so beyond the band the
old image's pixels are exactly the original's.

Sizes: the canvas is the image's size plus the extensions, each side rounded up to SIZE_MULTIPLE
(the MoVQ needs multiples of 64 pixels): an axis's missing pixels go to its extended sides (half
each, the odd one right or bottom, when both are extended), or split over both of its sides when it
was not extended but the image is not a multiple (then those strips are new area too).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from backend.limits import SIZE_MULTIPLE


@dataclass(frozen=True)
class Outpaint:
    canvas: Image.Image            # RGB, the extended size: the image in `box`, the new area edge-filled
    mask: Image.Image              # L, same size: 255 = new area, the ramp over the band, 0 = kept as it is
    box: tuple[int, int, int, int]  # (left, top, right, bottom) of the old image on the canvas

    @property
    def size(self) -> tuple[int, int]:
        return self.canvas.size

    def composite(self, image: Image.Image) -> Image.Image:
        """A generated canvas-size image blended over the canvas through the feathered mask."""
        return Image.composite(image.convert("RGB"), self.canvas, self.mask)


def padded_extension(width: int, height: int, left: int, right: int, top: int, bottom: int,
                     multiple: int = SIZE_MULTIPLE) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) grown so that the canvas is a multiple of `multiple` each way."""
    left, right = _pad_axis(width, left, right, multiple)
    top, bottom = _pad_axis(height, top, bottom, multiple)
    return left, right, top, bottom


def _pad_axis(size: int, before: int, after: int, multiple: int) -> tuple[int, int]:
    missing = -(size + before + after) % multiple
    if before and after or not (before or after):
        return before + missing // 2, after + missing - missing // 2
    return (before + missing, after) if before else (before, after + missing)


def canvas_size(width: int, height: int, left: int, right: int, top: int, bottom: int,
                multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """The (width, height) of the canvas `extend` makes for an image of width x height."""
    left, right, top, bottom = padded_extension(width, height, left, right, top, bottom, multiple)
    return width + left + right, height + top + bottom


def extension_for_aspect(width: int, height: int, aspect: float) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) that widen or heighten an image of width x height, centred, to the aspect
    ratio `aspect` (width / height), before the rounding to multiples that `extend` adds."""
    if aspect <= 0:
        raise ValueError(f"aspect must be a positive width / height ratio; got {aspect}")
    if width / height < aspect:      # too narrow: add columns
        extra = round(height * aspect) - width
        return extra // 2, extra - extra // 2, 0, 0
    extra = round(width / aspect) - height
    return 0, 0, extra // 2, extra - extra // 2


def extend(image: Image.Image, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0, blend: int = 16,
           multiple: int = SIZE_MULTIPLE) -> Outpaint:
    """`image` on a canvas extended by (at least) these pixels per side: see the module docstring."""
    if min(left, right, top, bottom, blend) < 0:
        raise ValueError("outpaint extensions and blend must be >= 0 pixels")
    pixels = np.asarray(image.convert("RGB"))
    height, width = pixels.shape[:2]
    left, right, top, bottom = padded_extension(width, height, left, right, top, bottom, multiple)
    canvas = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(canvas.shape[:2], 1.0, np.float32)
    old = np.zeros((height, width), np.float32)
    if blend:
        # depth of each old pixel from the edges that border new area: 0 for the outermost row or column
        columns, rows = np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
        edges = [(left, columns[None, :]), (right, columns[::-1][None, :]),
                 (top, rows[:, None]), (bottom, rows[::-1][:, None])]
        for extended, depth in edges:
            if extended:
                old = np.maximum(old, np.clip(1.0 - (depth + 0.5) / blend, 0.0, 1.0))
    mask[top:top + height, left:left + width] = old
    mask_image = Image.fromarray(np.round(mask * 255).astype(np.uint8), "L")
    return Outpaint(canvas=Image.fromarray(canvas, "RGB"), mask=mask_image,
                    box=(left, top, left + width, top + height))
