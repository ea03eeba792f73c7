"""Image preprocessing for the CLIP image encoder, without transformers.

numpy/PIL port of transformers 4.57.1 `CLIPImageProcessor`
(transformers/models/clip/image_processing_clip.py with image_transforms.py): convert to RGB,
resize the shortest side with PIL (bicubic for the Kandinsky configs), center crop, rescale by
1/255, normalise with the CLIP mean/std, return channels-first float32. Each step does the
same arithmetic in the same dtypes as transformers, so outputs agree to float32 rounding.

Inputs: PIL images in any mode PIL can convert to RGB (RGBA, L, P, I;16, CMYK, ...; alpha is
dropped, as `Image.convert("RGB")` does), or numpy arrays (H, W, 3) / (3, H, W) holding 0-255
values (uint8, or floats with integer values), (H, W) grey or (H, W, 4) RGBA uint8 arrays.
Float arrays scaled to [0, 1] are refused: transformers would rescale them twice.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL resampling filters by the integer transformers stores in `resample`.
_RESAMPLE = {
    0: Image.Resampling.NEAREST,
    1: Image.Resampling.LANCZOS,
    2: Image.Resampling.BILINEAR,
    3: Image.Resampling.BICUBIC,
    4: Image.Resampling.BOX,
    5: Image.Resampling.HAMMING,
}

CONFIG_NAMES = ("preprocessor_config.json", "image_processor.json", "config.json")


def _size_dict(size, default_to_square: bool, name: str) -> dict:
    """transformers `get_size_dict`: an int becomes {shortest_edge} or {height, width}."""
    if isinstance(size, bool) or size is None:
        raise ValueError(f"{name} must be an int or a dict; got {size!r}")
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"{name} must be positive; got {size}")
        return {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    if isinstance(size, dict):
        if set(size) == {"shortest_edge"} or set(size) == {"height", "width"}:
            if any(not isinstance(v, int) or v <= 0 for v in size.values()):
                raise ValueError(f"{name} values must be positive integers; got {size!r}")
            return dict(size)
    raise ValueError(f"{name} must be an int, {{'shortest_edge': int}} or {{'height': int, 'width': int}}; "
                     f"got {size!r}")


@dataclass
class CLIPImageProcessorConfig:
    """Fields of a transformers `preprocessor_config.json` for CLIPImageProcessor (defaults are transformers')."""

    do_resize: bool = True  # resize before cropping
    size: Any = field(default_factory=lambda: {"shortest_edge": 224})  # int = shortest side
    resample: int = 3  # PIL filter number: 3 = bicubic
    do_center_crop: bool = True  # crop the center to crop_size
    crop_size: Any = 224  # int = square crop
    do_rescale: bool = True  # multiply by rescale_factor
    rescale_factor: float = 1 / 255  # uint8 -> [0, 1]
    do_normalize: bool = True  # (x - mean) / std per channel
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN  # per-channel mean
    image_std: Sequence[float] = OPENAI_CLIP_STD  # per-channel std
    do_convert_rgb: bool = True  # convert PIL images of other modes to RGB

    @classmethod
    def from_dict(cls, config: dict) -> "CLIPImageProcessorConfig":
        known = {f for f in cls.__dataclass_fields__}
        result = cls(**{k: v for k, v in config.items() if k in known and not k.startswith("_")})
        result.size = _size_dict(result.size, default_to_square=False, name="size")
        result.crop_size = _size_dict(result.crop_size, default_to_square=True, name="crop_size")
        if result.resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)} (PIL filter numbers); "
                             f"got {result.resample!r}")
        for name in ("image_mean", "image_std"):
            value = getattr(result, name)
            values = [value] * 3 if isinstance(value, (int, float)) else list(value)
            if len(values) != 3:
                raise ValueError(f"{name} must have 3 values (RGB); got {value!r}")
            setattr(result, name, tuple(float(v) for v in values))
        if any(s == 0 for s in result.image_std):
            raise ValueError(f"image_std must not contain 0; got {result.image_std!r}")
        return result


class ImageProcessorOutput(NamedTuple):
    pixel_values: np.ndarray  # (B, 3, H, W) float32


class CLIPImageProcessor:
    """numpy/PIL equivalent of transformers' (slow) CLIPImageProcessor."""

    def __init__(self, config: CLIPImageProcessorConfig | None = None):
        self.config = config or CLIPImageProcessorConfig.from_dict({})

    @classmethod
    def from_config(cls, config: dict) -> "CLIPImageProcessor":
        return cls(CLIPImageProcessorConfig.from_dict(config))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "CLIPImageProcessor":
        """Read `preprocessor_config.json` from a pipeline's `image_processor/` folder."""
        directory = Path(directory)
        for name in CONFIG_NAMES:
            path = directory / name
            if path.is_file():
                with open(path, encoding="utf-8") as f:
                    return cls.from_config(json.load(f))
        raise FileNotFoundError(f"no {' or '.join(CONFIG_NAMES)} in {directory}")

    def __call__(self, images, return_tensors: str | None = None) -> ImageProcessorOutput:
        """transformers-style call: `processor(images).pixel_values` is the (B, 3, H, W) float32 array."""
        if return_tensors not in (None, "np"):
            raise ValueError(f"return_tensors must be None or 'np' (numpy); got {return_tensors!r}")
        return ImageProcessorOutput(pixel_values=self.preprocess(images))

    def preprocess(self, images) -> np.ndarray:
        """One image or a list of images -> (B, 3, H, W) float32."""
        arrays = [self._to_hwc(image) for image in _flat_list(images)]
        return np.stack([self._process_one(a) for a in arrays]).astype(np.float32)

    # -- steps ----------------------------------------------------------------------------------

    def _to_hwc(self, image) -> np.ndarray:
        """RGB (H, W, 3) array with 0-255 values (uint8, or the caller's float dtype)."""
        if isinstance(image, Image.Image):
            if self.config.do_convert_rgb and image.mode != "RGB":
                image = image.convert("RGB")
            array = np.array(image)
            if array.ndim != 3 or array.shape[-1] != 3:
                raise ValueError(f"images must be RGB after conversion; got PIL mode {image.mode!r}")
            return array
        if not isinstance(image, np.ndarray):
            raise ValueError(f"images must be PIL images or numpy arrays; got {type(image).__name__}")
        if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 4 and image.shape[0] not in (1, 3)):
            if image.dtype != np.uint8:
                raise ValueError(f"grey (H, W) and RGBA (H, W, 4) arrays must be uint8; got {image.dtype}")
            mode = "L" if image.ndim == 2 else "RGBA"
            return np.array(Image.fromarray(image, mode=mode).convert("RGB"))
        if image.ndim != 3:
            raise ValueError(f"image arrays must be (H, W, 3), (3, H, W), (H, W) or (H, W, 4); got {image.shape}")
        # transformers `infer_channel_dimension_format`: channels first wins when ambiguous.
        if image.shape[0] == 3:
            image = image.transpose(1, 2, 0)
        elif image.shape[-1] != 3:
            raise ValueError(f"image arrays must be (H, W, 3), (3, H, W), (H, W) or (H, W, 4); got {image.shape}")
        if image.dtype != np.uint8:
            if not np.issubdtype(image.dtype, np.number):
                raise ValueError(f"image arrays must be numeric; got {image.dtype}")
            if not np.allclose(image, image.astype(int)):
                raise ValueError("float image arrays must hold 0-255 values (got non-integers; arrays scaled to "
                                 "[0, 1] would be rescaled twice, as in transformers): pass uint8 or multiply by 255")
            if image.min() < 0 or image.max() > 255:
                raise ValueError(f"image values must lie in [0, 255]; got [{image.min()}, {image.max()}]")
        return image

    def _process_one(self, image: np.ndarray) -> np.ndarray:
        config = self.config
        if config.do_resize:
            image = self._resize(image)
        if config.do_center_crop:
            image = _center_crop(image, config.crop_size["height"], config.crop_size["width"])
        if config.do_rescale:
            # transformers `rescale`: float64 product, then float32.
            image = (image.astype(np.float64) * config.rescale_factor).astype(np.float32)
        if config.do_normalize:
            if not np.issubdtype(image.dtype, np.floating):
                image = image.astype(np.float32)
            mean = np.array(config.image_mean, dtype=image.dtype)
            std = np.array(config.image_std, dtype=image.dtype)
            image = (image - mean) / std
        return image.transpose(2, 0, 1)  # (3, H, W)

    def _resize(self, image: np.ndarray) -> np.ndarray:
        size = self.config.size
        height, width = image.shape[:2]
        if "shortest_edge" in size:
            # transformers `get_resize_output_image_size(default_to_square=False)`.
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
            out_h, out_w = (new_long, new_short) if width <= height else (new_short, new_long)
        else:
            out_h, out_w = size["height"], size["width"]
        # PIL holds uint8 only; 0-255 floats are cast as transformers' `to_pil_image` does.
        pil = Image.fromarray(image.astype(np.uint8))
        resized = pil.resize((out_w, out_h), resample=_RESAMPLE[self.config.resample])
        return np.array(resized)


def _center_crop(image: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """transformers `center_crop` on (H, W, C): zero-pads first when the image is smaller."""
    height, width = image.shape[:2]
    top = (height - crop_h) // 2
    left = (width - crop_w) // 2
    if top >= 0 and left >= 0 and top + crop_h <= height and left + crop_w <= width:
        return image[top:top + crop_h, left:left + crop_w]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    padded = np.zeros((new_h, new_w) + image.shape[2:], dtype=image.dtype)
    top_pad = math.ceil((new_h - height) / 2)
    left_pad = math.ceil((new_w - width) / 2)
    padded[top_pad:top_pad + height, left_pad:left_pad + width] = image
    top += top_pad
    left += left_pad
    return padded[max(0, top):min(new_h, top + crop_h), max(0, left):min(new_w, left + crop_w)]


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
