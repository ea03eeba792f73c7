"""A job's progress: Step events with the time left, and Loading events a few times a second; and,
from the step times of finished jobs, what a run with other settings would take (StepTimes: the
page's steps slider shows it before a run, against the docs' step count)."""
from __future__ import annotations

import threading
import time

from backend.events import Loading, Step

# Until a decode has been timed, assume it costs this many denoising steps (DESIGN.md: a 512x512
# MoVQ decode takes about two UNet steps on CPU).
DECODE_STEPS_GUESS = 2.0
LOADING_INTERVAL_S = 0.25


class Progress:
    """Counts the steps of a job's phases, emits Step events and estimates the time left.

    `remaining`: phase (backend/events.py PHASES) -> steps the whole job will run in it.
    """

    def __init__(self, job, remaining: dict[str, int], batch_count: int):
        self.job = job
        self.remaining = dict(remaining)
        self.batch_count = batch_count
        self.spent = {phase: [0.0, 0] for phase in remaining}   # phase -> [seconds, steps]
        self.started = time.monotonic()
        self.last = self.started
        self._last_load = ("", 0.0)                             # (component, time) of the last Loading event
        # phase -> (phase, factor): until a step of it is timed, it costs factor x a step of the other
        self.guesses = {"decode": ("denoise", DECODE_STEPS_GUESS)}

    def mark(self) -> None:
        """A phase run starts: its first step is timed from here."""
        self.last = time.monotonic()

    def record(self, phase: str) -> None:
        """One step of `phase` ended now (timed from the last step or mark)."""
        now = time.monotonic()
        self.spent[phase][0] += now - self.last
        self.spent[phase][1] += 1
        self.remaining[phase] = max(0, self.remaining[phase] - 1)
        self.last = now

    def tick(self, phase: str, step: int, total: int, batch: int, preview=None) -> None:
        """One step of `phase` ended now: recorded and reported."""
        self.record(phase)
        self.emit(phase, step, total, batch, preview)

    def emit(self, phase: str, step: int, total: int, batch: int, preview=None) -> None:
        self.job.emit(Step(phase=phase, step=step, total=total, batch=batch, batch_count=self.batch_count,
                           preview=preview, eta_s=self.eta(), elapsed_s=time.monotonic() - self.started))

    def loading(self, event: Loading) -> None:
        """Forward a load report; a checkpoint reports every tensor (the real UNet has 724), and a
        few updates a second are enough."""
        now = time.monotonic()
        if event.done < event.total and event.component == self._last_load[0] and \
                now - self._last_load[1] < LOADING_INTERVAL_S:
            return
        self._last_load = (event.component, now)
        self.job.emit(event)
        self.mark()

    def per_step(self, phase: str) -> float | None:
        seconds, steps = self.spent.get(phase, (0.0, 0))
        if steps:
            return seconds / steps
        other, factor = self.guesses.get(phase, (None, 0.0))
        if other in self.spent and self.spent[other][1]:
            return factor * self.per_step(other)
        return None

    def step_seconds(self) -> dict[str, float]:
        """Seconds per step of each phase that ran (a decode is one step), for StepTimes."""
        return {phase: seconds / steps for phase, (seconds, steps) in self.spent.items() if steps}

    def eta(self) -> float | None:
        total = 0.0
        for phase, steps in self.remaining.items():
            if steps <= 0:
                continue
            cost = self.per_step(phase)
            if cost is None:
                return None
            total += steps * cost
        return total


def decoder_work(request) -> float:
    """What a UNet step and a MoVQ decode of `request` scale with: pixels per run, doubled by guidance (the
    UNet runs on [unconditional; conditional])."""
    guided = 2 if request.guidance_scale > 1.0 else 1
    return float(request.width * request.height * request.batch_size * guided)


class StepTimes:
    """The step times of each model's last finished job, to estimate another run before it starts.

    Every sampler costs one UNet evaluation per step, so a run is: text-stage steps x their time, plus
    denoising steps x the time of one (scaled by decoder_work from the measured run's settings), plus one
    decode per run (scaled by pixels). Model loading is not included. Safe to use from any thread.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._by_model: dict[str, tuple[float, float, dict]] = {}   # model -> (work, pixels, seconds per step)

    def record(self, request, step_seconds: dict) -> None:
        if "denoise" not in step_seconds:  # e.g. image-to-image at strength 0: nothing to scale from
            return
        pixels = float(request.width * request.height * request.batch_size)
        with self._lock:
            self._by_model[request.model] = (decoder_work(request), pixels, dict(step_seconds))

    def measured(self, model: str) -> bool:
        with self._lock:
            return model in self._by_model

    def estimate(self, request, text_steps: int, denoise_steps: int | None = None) -> float | None:
        """Seconds `request` would take: `text_steps` text-stage steps for the whole job, then each run's
        denoising steps (`denoise_steps` instead of the request's own: the docs' count, to compare) and
        decode, and its images' hi-res passes; None before a job of its model has finished."""
        with self._lock:
            record = self._by_model.get(request.model)
        if record is None:
            return None
        work, pixels, seconds = record
        steps = request.denoise_steps() if denoise_steps is None else denoise_steps
        text = sum(seconds.get(phase, 0.0) for phase in ("prior", "encode")) * text_steps
        denoise = seconds["denoise"] * steps * decoder_work(request) / work
        decode = seconds.get("decode", 0.0) * request.width * request.height * request.batch_size / pixels
        hires_steps = request.hires_pass_steps()
        if hires_steps is not None:  # then each image's hi-res pass: its steps and decode at the pass's size
            width, height = request.decoded_size()
            guided = 2 if request.guidance_scale > 1.0 else 1
            one_pass = (seconds["denoise"] * hires_steps * width * height * guided / work
                        + seconds.get("decode", 0.0) * width * height / pixels)
            decode += request.batch_size * one_pass
        return text + request.batch_count * (denoise + decode)
