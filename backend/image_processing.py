"""Image preprocessing for the CLIP image encoder: transformers' `CLIPImageProcessorPil`.

transformers 5 runs `CLIPImageProcessor` on PIL + numpy without torch as `CLIPImageProcessorPil`
(resize the shortest side with PIL, center crop, rescale by 1/255, normalise with the CLIP
mean/std, channels first). The parity reference is transformers 4.57.1's `CLIPImageProcessor`;
measured on tests/test_image_processing.py's inputs, the two agree exactly except in one step,
which this module does as 4.57.1 did:

- Transparency. transformers 5 composites an image with transparency (an alpha band, a
  "transparency" entry of a palette, grey or RGB image (a PNG colour key), an (H, W, 4) array)
  onto white; 4.57.1 converts with `Image.convert("RGB")`, which drops it (the RGBA test image
  differs by up to 219 grey levels). Every image is therefore made an RGB array here first.

This module also keeps what the pipelines and the library's users rely on: only PIL images and
numpy arrays are taken (transformers would also open a string as a path or URL); (H, W) grey and
(H, W, 4) RGBA uint8 arrays are converted as their PIL images are; float arrays must hold 0-255
values (transformers would rescale an array already scaled to [0, 1] a second time); and
`preprocess` returns the (B, 3, H, W) float32 array itself.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from transformers import CLIPImageProcessorPil

# PIL resampling filters by the integer transformers stores in `resample`.
_RESAMPLE = {
    0: Image.Resampling.NEAREST,
    1: Image.Resampling.LANCZOS,
    2: Image.Resampling.BILINEAR,
    3: Image.Resampling.BICUBIC,
    4: Image.Resampling.BOX,
    5: Image.Resampling.HAMMING,
}


class ImageProcessorOutput(NamedTuple):
    pixel_values: np.ndarray  # (B, 3, H, W) float32


class CLIPImageProcessor:
    """transformers' CLIPImageProcessorPil, fed RGB images (see the module docstring)."""

    def __init__(self, processor: CLIPImageProcessorPil):
        self.processor = processor

    @classmethod
    def from_config(cls, config: dict) -> "CLIPImageProcessor":
        """From the fields of a `preprocessor_config.json`."""
        resample = config.get("resample", CLIPImageProcessorPil.resample)
        if resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)} (PIL filter numbers); got {resample!r}")
        for name in ("image_mean", "image_std"):
            value = config.get(name, getattr(CLIPImageProcessorPil, name))
            if not isinstance(value, (int, float)) and len(value) != 3:
                raise ValueError(f"{name} must be one number or 3 (RGB); got {value!r}")
        std = config.get("image_std", CLIPImageProcessorPil.image_std)
        if 0 in (std if isinstance(std, (list, tuple)) else [std]):
            raise ValueError(f"image_std must not contain 0; got {std!r}")
        return cls(CLIPImageProcessorPil.from_dict(config))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "CLIPImageProcessor":
        """Read `preprocessor_config.json` from a pipeline's `image_processor/` folder."""
        path = Path(directory) / "preprocessor_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no preprocessor_config.json in {directory}")
        with open(path, encoding="utf-8") as f:
            return cls.from_config(json.load(f))

    def __call__(self, images, return_tensors: str | None = None) -> ImageProcessorOutput:
        """transformers-style call: `processor(images).pixel_values` is the (B, 3, H, W) float32 array."""
        if return_tensors not in (None, "np"):
            raise ValueError(f"return_tensors must be None or 'np' (numpy); got {return_tensors!r}")
        return ImageProcessorOutput(pixel_values=self.preprocess(images))

    def preprocess(self, images) -> np.ndarray:
        """One image or a list of images -> (B, 3, H, W) float32."""
        rgb = [_rgb(image) for image in _flat_list(images)]
        pixel_values = self.processor(rgb, return_tensors="np", input_data_format="channels_last").pixel_values
        return pixel_values.astype(np.float32, copy=False)


def _rgb(image) -> np.ndarray:
    """An (H, W, 3) uint8 RGB array (handed to transformers as channels-last, so that no shape is
    taken for channels-first by mistake)."""
    if isinstance(image, Image.Image):
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))  # drops alpha, as 4.57.1
    if not isinstance(image, np.ndarray):
        raise ValueError(f"images must be PIL images or numpy arrays; got {type(image).__name__}")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 4 and image.shape[0] not in (1, 3)):
        if image.dtype != np.uint8:
            raise ValueError(f"grey (H, W) and RGBA (H, W, 4) arrays must be uint8; got {image.dtype}")
        return np.asarray(Image.fromarray(image, mode="L" if image.ndim == 2 else "RGBA").convert("RGB"))
    if image.ndim != 3 or 3 not in (image.shape[0], image.shape[-1]):
        raise ValueError(f"image arrays must be (H, W, 3), (3, H, W), (H, W) or (H, W, 4); got {image.shape}")
    if image.shape[0] == 3:  # channels first wins when ambiguous, as transformers infers it
        image = image.transpose(1, 2, 0)
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.number):
            raise ValueError(f"image arrays must be numeric; got {image.dtype}")
        if not np.allclose(image, image.astype(int)):
            raise ValueError("float image arrays must hold 0-255 values (got non-integers; arrays scaled to "
                             "[0, 1] would be rescaled twice, as in transformers): pass uint8 or multiply by 255")
        if image.min() < 0 or image.max() > 255:
            raise ValueError(f"image values must lie in [0, 255]; got [{image.min()}, {image.max()}]")
        image = image.astype(np.uint8)  # what transformers' PIL resize works on
    return image


def _flat_list(images) -> list:
    if isinstance(images, (Image.Image, np.ndarray)):
        if isinstance(images, np.ndarray) and images.ndim == 4:
            return list(images)  # (B, H, W, C) or (B, C, H, W)
        return [images]
    if isinstance(images, (list, tuple)) and images:
        flat = []
        for item in images:
            flat.extend(_flat_list(item) if isinstance(item, (list, tuple)) else [item])
        return flat
    raise ValueError(f"images must be a PIL image, a numpy array or a non-empty list of them; "
                     f"got {type(images).__name__}")
