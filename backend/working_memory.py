"""Will a request fit in memory? Its working memory, estimated before it runs, against the machine's RAM.

The model manager (backend/manager.py) budgets parameter bytes; what a job adds on top of them grows
with the image: its largest call is the MoVQ decode (docs/MEMORY.md, "Working memory of one call"),
whose last blocks run at full image resolution on every image of a run at once (the pipelines decode
the run's batch in one `movq.decode`). A job's peak is then

    peak = app baseline + weights of the unit that decodes + max(MoVQ decode, UNet step)

and it must fit in `limit` (the machine's RAM, or EngineConfig.memory_limit). The two calls are
estimated from the model's own config, so the same figures hold for the published models and the
tiny demo ones:

    MoVQ decode = MOVQ_BYTES_PER_CHANNEL_PIXEL x (channels at full resolution) x H x W x images
    UNet step   = UNET_BYTES_PER_CHANNEL_PIXEL x (UNet's first width) x H/8 x W/8 x images x 2 (guidance)

"Channels at full resolution" are those of the MoVQ decoder's tensors at the image's size: its last
block takes block_out_channels[1] channels from the upsampler and makes block_out_channels[0], both
alive in its first resnet (2.x: 256 + 128, Kandinsky 3: 512 + 256, the demo: 32 + 32). Images: a
request's `batch_size`, decoded together; `batch_count` runs one after another and an interpolation
walk decodes one frame at a time, so neither adds. Image-to-image and inpainting
also encode at width x height, with the MoVQ encoder's narrower full-resolution blocks
(block_out_channels[0]) and plain group norms: less than the decode.

No MindSpore at import (the page may estimate too); reading a local folder's weight sizes does.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from backend.families import DecoderFigures, ModelSpec
from backend.limits import SIZE_MULTIPLE
from backend.memory import format_bytes
from backend.requests import GenerationRequest

logger = logging.getLogger(__name__)

# Bytes per full-resolution channel per pixel per image of a MoVQ decode: working GB / ((block_out_channels[0]
# + [1]) x H x W x 4 bytes) is 2.80 for 2.2 at 512 px (1.13 GB measured), 2.74 at 768 px (2.48 GB), 2.44 for
# Kandinsky 3 at 1024 px (7.87 GB; docs/MEMORY.md), 2.80 and 2.70 for the demo MoVQ at 1024 and 2048 px
# (0.75 and 2.90 GB; tools/measure_working_memory.py). 2.7 is within 11% of each.
MOVQ_BYTES_PER_CHANNEL_PIXEL = 2.7 * 4
# Bytes per channel of the UNet's first block per latent pixel per sample of one UNet step: the 2.2 UNet
# at 512 and 768 px, 0.64 and 1.42 GB on a guided batch of 2 (51 and 50 x 4 B). The Kandinsky 3 UNet needs
# less (1.12 GB at 1024 px: 22 x 4 B); the MoVQ decode is the larger call either way for the real models.
UNET_BYTES_PER_CHANNEL_PIXEL = 50 * 4
# The app's own resident memory before any weights: Python, MindSpore, Gradio (docs/MEMORY.md: 0.64 to
# 0.69 GB for app.py --demo with its tiny models loaded).
APP_BASELINE = 650_000_000
LATENT_FACTOR = 8            # pixels per latent pixel of the 2.x and 3 MoVQs


@dataclass(frozen=True)
class MemoryEstimate:
    """The peak memory of one request's job, in bytes, and the limit it is held to."""

    width: int
    height: int
    images: int               # decoded at once: the request's batch_size
    movq_decode: int          # working memory of the MoVQ decode of `images` images
    unet_step: int            # working memory of one UNet step (both guidance halves)
    weights: int              # parameters of the unit that decodes, at the app's dtype
    baseline: int             # the app itself
    limit: int                # what the job must fit in
    limit_name: str           # what `limit` is, for people ("this machine's RAM", "the memory limit")

    @property
    def working(self) -> int:
        return max(self.movq_decode, self.unet_step)

    @property
    def largest_call(self) -> str:
        return "MoVQ decode" if self.movq_decode >= self.unet_step else "UNet step"

    @property
    def needed(self) -> int:
        return self.baseline + self.weights + self.working

    @property
    def room(self) -> int:
        """Working memory the limit leaves once the app and the weights are resident."""
        return self.limit - self.baseline - self.weights

    @property
    def fits(self) -> bool:
        return self.needed <= self.limit

    def as_dict(self) -> dict:
        """Plain data for the page and the API (bytes), with the figures derived above."""
        return {"width": self.width, "height": self.height, "images": self.images, "movq_decode": self.movq_decode,
                "unet_step": self.unet_step, "working": self.working, "largest_call": self.largest_call,
                "weights": self.weights, "baseline": self.baseline, "needed": self.needed, "limit": self.limit,
                "limit_name": self.limit_name, "fits": self.fits}


@dataclass(frozen=True)
class DecoderShape:
    """What the estimate reads of one model's decoding unit."""

    movq_channels: int        # the MoVQ decoder's channels at full resolution (block_out_channels[0] + [1])
    unet_channels: int        # the UNet's width at latent resolution (block_out_channels[0])
    weights: int              # parameter bytes of the unit, at the app's dtype


def physical_memory() -> int | None:
    """The machine's RAM in bytes (None: unknown, and then nothing is refused)."""
    try:
        import psutil
        return int(psutil.virtual_memory().total)
    except Exception:  # psutil missing or an unsupported platform: no guard rather than a wrong one
        return None


class WorkingMemory:
    """Estimates requests against a limit; `check` refuses, naming the fields and what would fit."""

    def __init__(self, dtype: str, limit: int | None = None):
        self.itemsize = 2 if dtype in ("float16", "bfloat16") else 4
        self.limit = limit or physical_memory()
        self.limit_name = "the memory limit" if limit else "this machine's RAM"
        self._shapes: dict[tuple, DecoderShape] = {}

    def estimate(self, model: ModelSpec, request: GenerationRequest, width: int | None = None,
                 height: int | None = None, images: int | None = None) -> MemoryEstimate:
        """The estimate of `request` on `model` (or at another size or batch, for the suggestions), at its largest
        decoder call (request.largest_decode: a hi-res pass's or an outpainted canvas's size)."""
        width, height, images = request.largest_decode(width or request.width, height or request.height,
                                                       images or request.batch_size)
        shape = self.shape(model, request.decoder_stage)
        pixels = width * height
        guided = 2 if request.guidance_scale > 1.0 else 1   # diffusers' classifier-free guidance rule
        movq = MOVQ_BYTES_PER_CHANNEL_PIXEL * shape.movq_channels * pixels * images
        unet = UNET_BYTES_PER_CHANNEL_PIXEL * shape.unet_channels * (pixels // LATENT_FACTOR**2) * images * guided
        return MemoryEstimate(width=width, height=height, images=images, movq_decode=int(movq), unet_step=int(unet),
                              weights=shape.weights, baseline=APP_BASELINE, limit=self.limit or 0,
                              limit_name=self.limit_name)

    def check(self, model: ModelSpec, request: GenerationRequest) -> MemoryEstimate:
        """The estimate, or ValueError naming width, height and batch_size, what they need and what fits."""
        estimate = self.estimate(model, request)
        if not self.limit or estimate.fits:
            return estimate
        w, h, n = estimate.width, estimate.height, estimate.images
        what = f"{_images(n)} of {w}x{h} decoded at once need" if n > 1 else f"1 image of {w}x{h} needs"
        message = (f"{request.memory_fields()}: {what} about {_gb(estimate.working)} of working memory "
                   f"({estimate.largest_call}) on top of the {_gb(estimate.weights)} of weights of {model.label} "
                   f"and the app's {_gb(estimate.baseline)}; {estimate.limit_name} is {_gb(estimate.limit)}, which "
                   f"leaves about {_gb(max(0, estimate.room))} for it.")
        fitting = self.what_fits(model, request)
        if fitting:
            message += " What fits: " + ", or ".join(fitting) + "."
            if request.decoded_size() != (request.width, request.height):
                message = message[:-1] + " (width x height, before the hi-res pass or the outpainting)."
        else:
            message += (f" Not even 1 image of {SIZE_MULTIPLE}x{SIZE_MULTIPLE} fits; --dtype float16 or bfloat16 "
                        f"halves the weights.")
        raise ValueError(message)

    def what_fits(self, model: ModelSpec, request: GenerationRequest) -> list[str]:
        """Requests like `request` that fit, for people: the largest batch_size at its size, else 1 image at the
        largest size of its aspect; and its batch_size at the largest size of its aspect."""
        w, h, n = request.width, request.height, request.batch_size
        out = []
        batch = max((b for b in range(1, n) if self.estimate(model, request, images=b).fits), default=0)
        if batch:
            out.append(f"{_images(batch)} of {w}x{h} (batch_size {batch})")
        else:
            size = self.largest_size(model, request, 1)
            if size:
                out.append(f"1 image of {size[0]}x{size[1]}" + (" (batch_size 1)" if n > 1 else ""))
        if n > 1:
            size = self.largest_size(model, request, n)
            if size:
                out.append(f"{_images(n)} of {size[0]}x{size[1]}")
        return out

    def largest_size(self, model: ModelSpec, request: GenerationRequest, images: int) -> tuple[int, int] | None:
        """The largest (width, height) below the request's, multiples of SIZE_MULTIPLE of about its aspect ratio,
        at which `images` images fit; None when not even the smallest does."""
        w, h = request.width, request.height
        long, short = max(w, h), min(w, h)
        for side in range(long - SIZE_MULTIPLE, 0, -SIZE_MULTIPLE):
            other = max(SIZE_MULTIPLE, round(side * short / long / SIZE_MULTIPLE) * SIZE_MULTIPLE)
            size = (side, other) if w >= h else (other, side)
            if self.estimate(model, request, *size, images=images).fits:
                return size
        return None

    # ------------------------------------------------------------------ the model's figures
    def shape(self, model: ModelSpec, stage_name: str) -> DecoderShape:
        """The decoding unit's widths and weight bytes: from its folder when it is on this machine (the demo
        models, a --models-dir folder), else the family's published figures (backend/families.py)."""
        stage = model.stage(stage_name)
        key = (stage.source, stage.stage.part, stage.variant, self.itemsize)
        if key not in self._shapes:
            folder = Path(stage.source)
            shape = None
            if (folder / "movq" / "config.json").is_file():
                try:
                    shape = self._folder_shape(folder, stage)
                except (OSError, ValueError, KeyError, IndexError, RuntimeError) as error:
                    # a damaged folder fails its load with the file named; the estimate need not
                    logger.warning("memory estimate: %s unreadable (%s); using the published figures", folder, error)
            figures = model.family.decoder_figures
            if shape is None and figures is not None:
                shape = self._published_shape(figures)
            if shape is None:
                raise ValueError(f"model: {model.label} has no figures for a memory estimate")
            self._shapes[key] = shape
        return self._shapes[key]

    def _published_shape(self, figures: DecoderFigures) -> DecoderShape:
        return DecoderShape(movq_channels=_full_resolution_channels(figures.movq_channels),
                            unet_channels=figures.unet_channels, weights=figures.parameters * self.itemsize)

    def _folder_shape(self, folder: Path, stage) -> DecoderShape:
        from backend.memory import component_bytes   # reads the safetensors headers (backend/weights.py)

        movq = json.loads((folder / "movq" / "config.json").read_text())
        unet = json.loads((folder / "unet" / "config.json").read_text())
        index = json.loads((folder / "model_index.json").read_text())
        names = stage.stage.components or [name for name, entry in index.items() if isinstance(entry, list)]
        itemsize = None if stage.stage.keeps_checkpoint_precision and self.itemsize == 4 else self.itemsize
        weights = sum(component_bytes(folder / name, itemsize, stage.variant) for name in names
                      if name not in stage.stage.on_demand and (folder / name).is_dir())
        return DecoderShape(movq_channels=_full_resolution_channels(movq["block_out_channels"]),
                            unet_channels=int(unet["block_out_channels"][0]), weights=weights)


def _full_resolution_channels(block_out_channels) -> int:
    """The MoVQ decoder's channels at the output's size: the upsampler that reaches it and the last block's
    input are block_out_channels[1] wide, the last block's output block_out_channels[0]."""
    return int(block_out_channels[0]) + int(block_out_channels[1])


def _images(count: int) -> str:
    return f"{count} image" + ("s" if count != 1 else "")


def _gb(count: int) -> str:
    """Bytes as people read them here: "141 GB", "5.3 GB", "0.65 GB"."""
    gb = count / 1e9
    if gb >= 100:
        return f"{gb:.0f} GB"
    if gb >= 1:
        return f"{gb:.1f} GB"
    return f"{gb:.2f} GB" if gb >= 0.01 else format_bytes(count)
