"""Step previews: the predicted clean latent x0 (B, 4, h, w) -> a small RGB image, cheaply.

A full MoVQ decode costs about two UNet steps (DESIGN.md, "Previews must be cheap"), so the
default preview is a linear map: rgb = x0 . W + b per latent pixel, (4, 3) weights plus a bias,
then upscaled. W and b are fitted once per checkpoint from the loaded MoVQ itself, the way
InvokeAI derives its latent-RGB factors: encode the sample images in assets/samples/, average
the pixels over each latent cell, and solve least squares. backend/derived.py keeps them (kind
`PREVIEW_FACTORS`) in memory and on disk keyed by the MoVQ's fingerprint (backend/fingerprints.py),
so the fit (a few MoVQ encodes) runs once per checkpoint: the published decoder, inpainting and
ControlNet repos ship the same MoVQ and share one fit.

Everything here except `fit_factors_from_pipeline` is numpy/PIL; that one runs the MoVQ and
so belongs on the engine thread.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from backend import derived

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "samples"
# The depth map is grey only; the others cover the colour cube (assets/make_samples.py).
FIT_SAMPLES = ("landscape", "hue_wheel", "blocks", "texture", "portrait")
FIT_SIZE = 128          # pixels per side the samples are encoded at (16x16 latents: 1280 rows to fit 15 numbers)
PREVIEW_SIDE = 256      # previews are upscaled so their long side is this many pixels
FACTORS_VERSION = 1


@dataclass
class LatentRGBFactors:
    """rgb (in [0, 1]) = latent (C,) @ weight (C, 3) + bias (3,)."""

    weight: np.ndarray   # (C, 3) float32
    bias: np.ndarray     # (3,) float32
    residual: float      # root mean square error of the fit on the samples, in [0, 1] units

    def to_json(self) -> dict:
        return {"version": FACTORS_VERSION, "weight": self.weight.tolist(), "bias": self.bias.tolist(),
                "residual": self.residual}

    @classmethod
    def from_json(cls, data: dict) -> "LatentRGBFactors":
        if not isinstance(data, dict):
            raise ValueError(f"preview factors must be a JSON object; got {type(data).__name__}")
        if data.get("version") != FACTORS_VERSION:
            raise ValueError(f"preview factors version {data.get('version')} is not {FACTORS_VERSION}")
        weight = np.asarray(data["weight"], np.float32)
        bias = np.asarray(data["bias"], np.float32)
        if weight.ndim != 2 or weight.shape[1] != 3 or bias.shape != (3,):
            raise ValueError(f"preview factors have shapes {weight.shape} and {bias.shape}")
        return cls(weight, bias, float(data.get("residual", 0.0)))


def area_downsample(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, H, W, 3) -> (N, h, w, 3) by averaging each (H/h, W/w) cell: what one latent pixel sees."""
    n, height, width, channels = pixels.shape
    h, w = size
    if height % h or width % w:
        raise ValueError(f"image size {width}x{height} is not a multiple of the latent size {w}x{h}")
    return pixels.reshape(n, h, height // h, w, width // w, channels).mean(axis=(2, 4))


def fit_factors(latents: np.ndarray, pixels: np.ndarray) -> LatentRGBFactors:
    """Least squares fit of [latent, 1] @ [[W], [b]] = rgb.

    latents (N, C, h, w); pixels (N, H, W, 3) in [0, 1] with H, W multiples of h, w.
    """
    latents = np.asarray(latents, np.float64)
    n, channels, h, w = latents.shape
    target = area_downsample(np.asarray(pixels, np.float64), (h, w)).reshape(-1, 3)   # (N*h*w, 3)
    design = latents.transpose(0, 2, 3, 1).reshape(-1, channels)                      # (N*h*w, C)
    design = np.concatenate([design, np.ones((design.shape[0], 1))], axis=1)
    solution, *_ = np.linalg.lstsq(design, target, rcond=None)                         # (C+1, 3)
    residual = float(np.sqrt(np.mean((design @ solution - target) ** 2)))
    return LatentRGBFactors(solution[:-1].astype(np.float32), solution[-1].astype(np.float32), residual)


def latents_to_rgb(x0: np.ndarray, factors: LatentRGBFactors) -> np.ndarray:
    """(B, C, h, w) -> uint8 (B, h, w, 3)."""
    rgb = np.einsum("bchw,ck->bhwk", np.asarray(x0, np.float32), factors.weight) + factors.bias
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def tile(images: list[Image.Image]) -> Image.Image:
    """Side by side in one row (a batch shown as one preview)."""
    if len(images) == 1:
        return images[0]
    width = sum(i.width for i in images)
    height = max(i.height for i in images)
    sheet = Image.new("RGB", (width, height))
    x = 0
    for image in images:
        sheet.paste(image, (x, 0))
        x += image.width
    return sheet


def preview_image(x0: np.ndarray, factors: LatentRGBFactors, side: int = PREVIEW_SIDE) -> Image.Image:
    """The batch's previews in one row, each upscaled (bilinear) so its long side is `side`."""
    rgb = latents_to_rgb(x0, factors)
    h, w = rgb.shape[1:3]
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return tile([Image.fromarray(image).resize(size, Image.BILINEAR) for image in rgb])


def sample_pixels(size: int = FIT_SIZE, names=FIT_SAMPLES) -> list[Image.Image]:
    images = []
    for name in names:
        path = SAMPLES_DIR / f"{name}.png"
        if not path.is_file():
            raise FileNotFoundError(f"preview sample image missing: {path} (run assets/make_samples.py)")
        images.append(Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC))
    return images


def fit_factors_from_pipeline(pipe, size: int = FIT_SIZE) -> LatentRGBFactors:
    """Encode the sample images with the pipeline's MoVQ and fit. Runs MindSpore: engine thread only."""
    images = sample_pixels(size)
    latents = np.concatenate([pipe.encode_images([image], size, size) for image in images])
    pixels = np.stack([np.asarray(image, np.float32) / 255.0 for image in images])
    return fit_factors(latents, pixels)


def _read_factors(path: Path) -> LatentRGBFactors:
    return LatentRGBFactors.from_json(json.loads(path.read_text(encoding="utf-8")))


def _write_factors(path: Path, factors: LatentRGBFactors) -> None:
    path.write_text(json.dumps(factors.to_json()), encoding="utf-8")


# The factors as backend/derived.py keeps them: `<MoVQ fingerprint>.json`.
PREVIEW_FACTORS = derived.Kind("latent->RGB preview factors", ".json", _read_factors, _write_factors)
