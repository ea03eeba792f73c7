"""What a job tells its readers: plain data (numbers, text, PIL images, paths).

A job's events, in order: Queued(position) whenever its place in line changes -> Loading(component,
bytes done/total) while models load -> Step(phase, i, n, preview, eta) per step -> exactly one of
Result | Failed | Cancelled. backend/jobs.py delivers them; kandinsky_ui/render.py shows them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from PIL import Image

# Step phases, in the order a job runs them: the 2.x image prior | Kandinsky 3's T5 text encoder,
# then the decoder's denoising steps, then the MoVQ decode of each run; a text-to-image job with a
# hi-res pass (hires_scale > 1) then runs, per image, the pass's image-to-image steps ("hires") and
# another "decode", at the pass's size.
PHASES = ("prior", "encode", "denoise", "decode", "hires")


@dataclass
class GeneratedImage:
    image: Image.Image
    settings: dict                 # what went into the PNG's chunks
    path: Optional[Path] = None    # where it was saved; None when it could not be
    partial: bool = False          # a stopped run's last preview, not a finished image
    save_error: Optional[str] = None  # why it was not saved (e.g. "disk full at <folder> (...)"): the image is
                                      # only here, in memory, and the job's notes say so


@dataclass(frozen=True)
class Queued:
    position: int                  # jobs that run before this one (0: it starts next)


@dataclass(frozen=True)
class Loading:
    component: str                 # e.g. "prior / text_encoder" or "decoder / download unet/..."
    done: int                      # bytes (0 and 0: a step of unknown size, e.g. fitting preview colours)
    total: int


@dataclass(frozen=True)
class Step:
    phase: str                     # one of PHASES
    step: int                      # 1-based within the phase
    total: int
    batch: int = 1                 # 1-based run of batch_count
    batch_count: int = 1
    preview: Optional[Image.Image] = None
    eta_s: Optional[float] = None  # seconds left for the whole job, when it can be estimated
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class Result:
    images: list                   # GeneratedImage
    seeds: list                    # the seed of each run
    elapsed_s: float = 0.0
    preview_s: float = 0.0         # time spent making previews (part of elapsed_s)
    notes: tuple = ()              # warnings for the user, e.g. a truncated prompt
    step_seconds: dict = field(default_factory=dict)   # phase -> seconds per step (a decode is one step)


@dataclass(frozen=True)
class Failed:
    message: str


@dataclass(frozen=True)
class Cancelled:
    partials: list = field(default_factory=list)  # GeneratedImage: last preview of each image of the stopped run
    images: list = field(default_factory=list)    # runs of the batch that finished before the stop
    seeds: list = field(default_factory=list)
    latency_s: Optional[float] = None             # from the stop request to the end of the job
    notes: tuple = ()                             # warnings for the user, e.g. an image that could not be saved


Event = Union[Queued, Loading, Step, Result, Failed, Cancelled]
TERMINAL = (Result, Failed, Cancelled)
