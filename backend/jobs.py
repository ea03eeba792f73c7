"""Jobs: typed requests in, events out, one engine thread for all MindSpore work.

MindSpore 2.10 deadlocks when two Python threads run ops at once (DESIGN.md, "One thread runs
MindSpore"), and Gradio calls handlers from a thread pool. So the JobRunner owns one engine
thread; every model load, pipeline run, preview fit and unload happens there. Other threads
only submit requests (`submit`), run small functions through it (`call`), cancel, and read
events.

A job's events, in order: Queued(position) whenever its place in line changes ->
Loading(component, bytes done/total) while models load -> Step(phase, i, n, preview, eta) per
denoising step -> exactly one of Result | Failed | Cancelled.

Several readers may follow one job (a browser tab that reloaded re-attaches to its running
job); each `Job.events()` call gets the latest status first, then everything after it.
"""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import math
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Optional, Union

from PIL import Image, ImageFilter, ImageOps

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "kandinsky-2-2"
SIZE_MULTIPLE = 64      # the MoVQ works on multiples of 8 latent pixels of 8 pixels each
MAX_SIDE = 2048
MAX_STEPS = 1000
MAX_BATCH_SIZE = 16
MAX_BATCH_COUNT = 100
MAX_SEED = 2**32 - 1
MIN_PRIOR_STEPS = 2     # the UnCLIP scheduler spaces its timesteps over n - 1 intervals (as in diffusers)
MAX_TEXT_CHARS = 10_000  # CLIP reads 77 tokens; the rest is only stored in the PNG and shown as dropped
MAX_INPUT_PIXELS = 8192 * 8192  # an input image beyond this is refused before it is decoded
PREVIEW_MODES = ("fast", "decode", "off")


# ------------------------------------------------------------------------------- requests


def _check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{name} must be an integer between {low} and {high}; got {value!r}")
    if not low <= int(value) <= high:
        raise ValueError(f"{name} must be between {low} and {high}; got {int(value)}")
    return int(value)


def _check_float(name: str, value, low: float, high: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number between {low} and {high}; got {value!r}") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must be between {low} and {high}; got {value}")
    return value


def _check_text(name: str, value) -> str:
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


def _check_image(name: str, value) -> Image.Image:
    if not isinstance(value, Image.Image):
        raise ValueError(f"{name} is required: an image" + ("" if value is None else
                                                            f" (got {type(value).__name__})"))
    if value.width < 1 or value.height < 1:
        raise ValueError(f"{name} is empty ({value.width}x{value.height} pixels)")
    if value.width * value.height > MAX_INPUT_PIXELS:
        raise ValueError(f"{name} is {value.width}x{value.height} pixels; at most {MAX_INPUT_PIXELS:,} pixels "
                         f"(8192x8192) are allowed")
    return value


@dataclass(kw_only=True)
class GenerationRequest:
    """Settings every task shares. Defaults follow the Kandinsky 2.2 docs."""

    task: ClassVar[str] = ""
    model: str = DEFAULT_MODEL                 # key of a model in the ModelManager's catalogue
    prompt: str = ""
    negative_prompt: str = ""                  # its prior embedding is the decoder's negative
    negative_prior_prompt: str = ""            # the prior's own classifier-free guidance negative
    width: int = 768                           # pixels, a multiple of 64
    height: int = 768
    num_inference_steps: int = 50              # decoder steps
    prior_num_inference_steps: int = 25
    guidance_scale: float = 4.0                # decoder guidance
    prior_guidance_scale: float = 1.0
    scheduler: str = "default"                 # decoder scheduler: default (the repo's) | ddpm | ddim
    seed: int = -1                             # < 0: a random seed, reported back
    batch_count: int = 1                       # runs one after another, seeds seed, seed+1, ...
    batch_size: int = 1                        # images per run
    preview: str = "fast"                      # fast (linear map of x0) | decode (MoVQ) | off
    preview_every: int = 1                     # a preview every n-th step

    def validate(self) -> None:
        """Raise ValueError naming the first field out of range."""
        for name in ("model", "prompt", "negative_prompt", "negative_prior_prompt", "scheduler", "preview"):
            setattr(self, name, _check_text(name, getattr(self, name)))
        for name in ("width", "height"):
            value = _check_int(name, getattr(self, name), SIZE_MULTIPLE, MAX_SIDE)
            if value % SIZE_MULTIPLE:
                raise ValueError(f"{name} must be a multiple of {SIZE_MULTIPLE}; got {value}")
            setattr(self, name, value)
        self.num_inference_steps = _check_int("num_inference_steps", self.num_inference_steps, 1, MAX_STEPS)
        # The prior's UnCLIP scheduler divides by (steps - 1): it needs at least 2 steps.
        self.prior_num_inference_steps = _check_int("prior_num_inference_steps",
                                                    self.prior_num_inference_steps, MIN_PRIOR_STEPS, MAX_STEPS)
        self.guidance_scale = _check_float("guidance_scale", self.guidance_scale, 0.0, 50.0)
        self.prior_guidance_scale = _check_float("prior_guidance_scale", self.prior_guidance_scale, 0.0, 50.0)
        if isinstance(self.seed, (int, float)) and not isinstance(self.seed, bool) and self.seed < 0:
            self.seed = -1  # any negative seed asks for a random one
        self.seed = _check_int("seed", self.seed, -1, MAX_SEED)
        self.batch_count = _check_int("batch_count", self.batch_count, 1, MAX_BATCH_COUNT)
        self.batch_size = _check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        self.scheduler = self.scheduler.lower() or "default"
        if self.preview not in PREVIEW_MODES:
            raise ValueError(f"preview must be one of {list(PREVIEW_MODES)}; got {self.preview!r}")
        self.preview_every = _check_int("preview_every", self.preview_every, 1, MAX_STEPS)

    def image_fields(self) -> dict[str, Image.Image]:
        """The input images of this request (stored next to the outputs, referenced by name)."""
        return {}

    def settings(self) -> dict:
        """JSON-ready fields (input images left out; the caller adds references to them)."""
        out: dict[str, Any] = {"task": self.task}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Image.Image):
                continue
            out[f.name] = value
        return out


@dataclass(kw_only=True)
class Text2ImageRequest(GenerationRequest):
    task: ClassVar[str] = "text2img"


@dataclass(kw_only=True)
class Image2ImageRequest(GenerationRequest):
    task: ClassVar[str] = "img2img"
    image: Optional[Image.Image] = None        # resized to width x height
    strength: float = 0.3                      # how much of the schedule is re-run: 0 keeps the image

    def validate(self) -> None:
        super().validate()
        _check_image("image", self.image)
        self.strength = _check_float("strength", self.strength, 0.0, 1.0)

    def image_fields(self):
        return {"image": self.image}


@dataclass(kw_only=True)
class InpaintRequest(GenerationRequest):
    task: ClassVar[str] = "inpaint"
    image: Optional[Image.Image] = None
    mask: Optional[Image.Image] = None         # white = repaint; resized to the image
    mask_invert: bool = False                  # repaint what is black instead
    mask_grow: int = 0                         # pixels added around the painted region
    mask_blur: int = 0                         # Gaussian blur radius of the mask edge, pixels

    def validate(self) -> None:
        super().validate()
        _check_image("image", self.image)
        _check_image("mask", self.mask)
        self.mask_invert = bool(self.mask_invert)
        self.mask_grow = _check_int("mask_grow", self.mask_grow, 0, 256)
        self.mask_blur = _check_int("mask_blur", self.mask_blur, 0, 256)

    def image_fields(self):
        return {"image": self.image, "mask": self.mask}

    def repaint_mask(self, size: tuple[int, int]) -> Image.Image:
        """The mask the pipeline gets, (width, height): white = repaint, inverted and grown as asked."""
        mask = self.mask.convert("L").resize(size, Image.NEAREST)
        mask = mask.point(lambda v: 255 if v >= 128 else 0)
        if self.mask_invert:
            mask = ImageOps.invert(mask)
        for _ in range(self.mask_grow):  # a 3x3 max filter grows the region by one pixel a pass
            mask = mask.filter(ImageFilter.MaxFilter(3))
        return mask

    def blend_mask(self, size: tuple[int, int]) -> Image.Image:
        """How much of the generated image to keep at each pixel: the repaint mask, blurred.

        The pipeline works with a hard mask (diffusers thresholds it at 0.5), so the blur acts
        where it is visible: when pasting the result over the original, edges fade.
        """
        mask = self.repaint_mask(size)
        if self.mask_blur:
            mask = mask.filter(ImageFilter.GaussianBlur(self.mask_blur))
        return mask


@dataclass(kw_only=True)
class InterpolateRequest(GenerationRequest):
    """Mix 2 to 6 texts and images by weight; the shared `prompt` is not used."""

    task: ClassVar[str] = "interpolate"
    inputs: list = field(default_factory=list)     # each a str or a PIL image
    weights: list = field(default_factory=list)    # one per input, >= 0; normalised to sum 1
    walk_steps: int = 0                            # > 1: also N images walking from input 1 to 2

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.inputs, (list, tuple)) or not 2 <= len(self.inputs) <= 6:
            raise ValueError(f"inputs must be a list of 2 to 6 texts or images; got "
                             f"{len(self.inputs) if isinstance(self.inputs, (list, tuple)) else self.inputs!r}")
        for index, item in enumerate(self.inputs):
            if isinstance(item, str):
                _check_text(f"inputs[{index}]", item)
                if not item.strip():
                    raise ValueError(f"inputs[{index}] is an empty text; give a text or an image")
            else:
                _check_image(f"inputs[{index}]", item)
        if not isinstance(self.weights, (list, tuple)) or len(self.weights) != len(self.inputs):
            raise ValueError(f"weights must be a list with one weight per input ({len(self.inputs)})")
        self.weights = [_check_float(f"weights[{i}]", w, 0.0, 1000.0) for i, w in enumerate(self.weights)]
        if sum(self.weights) <= 0:
            raise ValueError("weights must not all be zero")
        self.walk_steps = _check_int("walk_steps", self.walk_steps, 0, 16)
        if self.walk_steps == 1:
            raise ValueError("walk_steps must be 0 (no walk) or between 2 and 16; got 1")

    def normalized_weights(self) -> list[float]:
        total = float(sum(self.weights))
        return [float(w) / total for w in self.weights]

    def image_fields(self):
        return {f"inputs[{i}]": item for i, item in enumerate(self.inputs) if isinstance(item, Image.Image)}

    def settings(self) -> dict:
        out = super().settings()
        out["inputs"] = [item if isinstance(item, str) else None for item in self.inputs]
        out["normalized_weights"] = self.normalized_weights()
        return out


@dataclass(kw_only=True)
class ControlNetRequest(GenerationRequest):
    """Depth-guided generation: text-to-image, or image-to-image when `mode` is "img2img"."""

    task: ClassVar[str] = "controlnet"
    hint: Optional[Image.Image] = None         # depth map, white = near; resized to width x height
    mode: str = "text2img"                     # text2img | img2img
    image: Optional[Image.Image] = None        # the start image in img2img mode
    strength: float = 0.5

    def validate(self) -> None:
        super().validate()
        _check_image("hint", self.hint)
        if self.mode not in ("text2img", "img2img"):
            raise ValueError(f"mode must be 'text2img' or 'img2img'; got {self.mode!r}")
        if self.mode == "img2img":
            _check_image("image", self.image)
        self.strength = _check_float("strength", self.strength, 0.0, 1.0)

    def image_fields(self):
        out = {"hint": self.hint}
        if self.mode == "img2img":
            out["image"] = self.image
        return out


REQUEST_TYPES = {cls.task: cls for cls in (Text2ImageRequest, Image2ImageRequest, InpaintRequest,
                                           InterpolateRequest, ControlNetRequest)}


# --------------------------------------------------------------------------------- events


@dataclass
class GeneratedImage:
    image: Image.Image
    settings: dict                 # what went into the PNG's chunks
    path: Optional[Path] = None    # where it was saved
    partial: bool = False          # a stopped run's last preview, not a finished image


@dataclass(frozen=True)
class Queued:
    position: int                  # jobs that run before this one (0: it starts next)


@dataclass(frozen=True)
class Loading:
    component: str                 # e.g. "prior: text_encoder" or "download unet/..."
    done: int                      # bytes
    total: int


@dataclass(frozen=True)
class Step:
    phase: str                     # prior | decoder | decode
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


@dataclass(frozen=True)
class Failed:
    message: str


@dataclass(frozen=True)
class Cancelled:
    partials: list = field(default_factory=list)  # GeneratedImage: last preview of each image of the stopped run
    images: list = field(default_factory=list)    # runs of the batch that finished before the stop
    seeds: list = field(default_factory=list)
    latency_s: Optional[float] = None             # from the stop request to the end of the job


Event = Union[Queued, Loading, Step, Result, Failed, Cancelled]
TERMINAL = (Result, Failed, Cancelled)


class JobCancelled(Exception):
    """Raised inside the engine (by the step callback) when a job's stop was requested."""


# ----------------------------------------------------------------------------------- jobs


class Job:
    """One submitted request. Engine side: `emit`, `check_cancelled`; any side: `cancel`, `events`."""

    _ids = itertools.count(1)

    def __init__(self, request: GenerationRequest, owner: str,
                 on_cancel: Callable[["Job"], None] | None = None):
        self.id = f"{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        self._on_cancel = on_cancel  # the runner drops a job that has not started yet
        self.request = request
        self.owner = owner
        self.submitted_at = time.monotonic()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.cancel_requested_at: float | None = None
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._subscribers: list[queue.SimpleQueue] = []
        self._status: Event | None = None      # the latest non-terminal event, for late readers
        self._terminal: Event | None = None

    # ------------------------------------------------------------------ engine side
    def emit(self, event: Event) -> None:
        with self._lock:
            if self._terminal is not None:
                return  # a job ends once
            if isinstance(event, Queued) and event == self._status:
                return  # the place in line did not change
            if isinstance(event, TERMINAL):
                self._terminal = event
                self.finished_at = time.monotonic()
            else:
                self._status = event
            for subscriber in self._subscribers:
                subscriber.put(event)

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise JobCancelled(self.id)

    # ------------------------------------------------------------------ any side
    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._terminal is not None

    @property
    def terminal(self) -> Event | None:
        return self._terminal

    def cancel(self) -> None:
        """Ask the job to stop; a running job ends after its current step."""
        if not self._cancel.is_set():
            self.cancel_requested_at = time.monotonic()
            self._cancel.set()
        if self._on_cancel is not None:
            self._on_cancel(self)

    def subscriber_count(self) -> int:
        with self._lock:
            return len(self._subscribers)

    def events(self, timeout: float | None = None, coalesce: bool = True) -> Iterator[Event]:
        """Events from now on (starting with the latest status) until the terminal one.

        With `coalesce`, when several events wait, only the newest Step and Loading among them
        are yielded: a slow reader gets fresh previews instead of a backlog of stale ones.
        Raises TimeoutError when no event comes within `timeout` seconds.
        """
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            if self._status is not None:
                inbox.put(self._status)
            if self._terminal is not None:
                inbox.put(self._terminal)
            self._subscribers.append(inbox)
        try:
            while True:
                try:
                    batch = [inbox.get(timeout=timeout)]
                except queue.Empty:
                    raise TimeoutError(f"job {self.id}: no event for {timeout} s") from None
                while True:
                    try:
                        batch.append(inbox.get_nowait())
                    except queue.Empty:
                        break
                if coalesce:
                    batch = _coalesce(batch)
                for event in batch:
                    yield event
                    if isinstance(event, TERMINAL):
                        return
        finally:
            with self._lock:
                self._subscribers.remove(inbox)

    def wait(self, timeout: float | None = None) -> Event:
        """Block until the job ends; returns its terminal event."""
        for event in self.events(timeout=timeout):
            if isinstance(event, TERMINAL):
                return event
        raise AssertionError("unreachable")  # events() always ends with a terminal event


def _coalesce(batch: list) -> list:
    last_step = max((i for i, e in enumerate(batch) if isinstance(e, Step)), default=-1)
    last_loading = max((i for i, e in enumerate(batch) if isinstance(e, Loading)), default=-1)
    return [e for i, e in enumerate(batch)
            if not (isinstance(e, Step) and i != last_step) and not (isinstance(e, Loading) and i != last_loading)]


class JobRunner:
    """Runs jobs one at a time, in order, on its own engine thread.

    `execute(job)` does the work: it emits events and calls `job.check_cancelled()` often (the
    step callback does); raising JobCancelled ends the job as cancelled. If `execute` returns or
    raises without a terminal event, the runner emits one.
    """

    def __init__(self, execute: Callable[[Job], None], max_waiting: int = 256):
        self._execute = execute
        self._max_waiting = max_waiting
        self._lock = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._calls: collections.deque = collections.deque()
        self._running: Job | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "JobRunner":
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
                self._thread.start()
        return self

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Cancel everything and stop the engine thread."""
        with self._lock:
            self._stopping = True
            waiting = list(self._waiting)
            self._waiting.clear()
            running = self._running
            self._lock.notify_all()
        for job in waiting:
            job.emit(Cancelled())
        if running is not None:
            running.cancel()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def engine_thread(self) -> threading.Thread | None:
        return self._thread

    # ---------------------------------------------------------------- submitting
    def submit(self, request: GenerationRequest, owner: str = "default") -> Job:
        """Validate and queue a request (ValueError for bad settings); returns the job at once."""
        request.validate()
        job = Job(request, owner, on_cancel=self._cancel_waiting)
        with self._lock:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            if len(self._waiting) >= self._max_waiting:
                raise RuntimeError(f"the queue is full ({self._max_waiting} jobs waiting); try again later")
            ahead = len(self._waiting) + (1 if self._running is not None else 0)
            self._waiting.append(job)
            job.emit(Queued(ahead))
            self._lock.notify_all()
        return job

    def call_soon(self, fn: Callable, *args, **kwargs) -> concurrent.futures.Future:
        """Run `fn` on the engine thread before the next job (after the running one)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if threading.current_thread() is self._thread:  # already on the engine: run now
            _run_into(future, fn, args, kwargs)
            return future
        with self._lock:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            self._calls.append((future, fn, args, kwargs))
            self._lock.notify_all()
        return future

    def call(self, fn: Callable, *args, timeout: float | None = None, **kwargs):
        """Run `fn` on the engine thread and return its result (or raise its exception)."""
        return self.call_soon(fn, *args, **kwargs).result(timeout)

    # ---------------------------------------------------------------- inspecting
    def jobs_of(self, owner: str) -> list[Job]:
        """The running and waiting jobs of `owner`, in run order."""
        with self._lock:
            jobs = ([self._running] if self._running is not None else []) + list(self._waiting)
        return [job for job in jobs if job.owner == owner]

    def cancel_owner(self, owner: str) -> int:
        """Stop every running or waiting job of `owner`; returns how many were asked to stop."""
        jobs = self.jobs_of(owner)
        for job in jobs:
            job.cancel()
        return len(jobs)

    @property
    def waiting_count(self) -> int:
        with self._lock:
            return len(self._waiting)

    @property
    def running(self) -> Job | None:
        return self._running

    # ---------------------------------------------------------------- engine thread
    def _cancel_waiting(self, job: Job) -> None:
        with self._lock:
            try:
                self._waiting.remove(job)
            except ValueError:
                return  # running or finished: the step callback stops it
            self._announce_positions()
        job.emit(Cancelled(latency_s=0.0))

    def _announce_positions(self) -> None:
        """Tell every waiting job its place in line (caller holds the lock)."""
        base = 1 if self._running is not None else 0
        for index, job in enumerate(self._waiting):
            job.emit(Queued(base + index))

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not self._calls:
                    self._lock.wait()
                if self._stopping and not self._calls:
                    return
                if self._calls:
                    future, fn, args, kwargs = self._calls.popleft()
                    job = None
                else:
                    job = self._waiting.popleft()
                    self._running = job
                    self._announce_positions()
            if job is None:
                _run_into(future, fn, args, kwargs)
                continue
            try:
                self._run_job(job)
            finally:
                with self._lock:
                    self._running = None
                    self._announce_positions()

    def _run_job(self, job: Job) -> None:
        job.started_at = time.monotonic()
        try:
            job.check_cancelled()
            self._execute(job)
        except JobCancelled:
            job.emit(Cancelled(latency_s=_latency(job)))
        except ValueError as error:  # bad input found late (e.g. an image the model cannot take)
            logger.info("job %s failed: %s", job.id, error)
            job.emit(Failed(str(error)))
        except Exception as error:  # the engine must survive any job
            logger.exception("job %s failed", job.id)
            job.emit(Failed(f"{type(error).__name__}: {error}"))
        else:
            if not job.done:
                job.emit(Failed("the job ended without a result"))


def _latency(job: Job) -> float | None:
    if job.cancel_requested_at is None:
        return None
    return time.monotonic() - job.cancel_requested_at


def _run_into(future: concurrent.futures.Future, fn, args, kwargs) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn(*args, **kwargs))
    except BaseException as error:  # handed to the caller of call()
        future.set_exception(error)
