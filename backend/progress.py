"""A job's progress: Step events with the time left, and Loading events a few times a second."""
from __future__ import annotations

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
        if phase == "decode" and self.spent["denoise"][1]:
            return DECODE_STEPS_GUESS * self.per_step("denoise")
        return None

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
