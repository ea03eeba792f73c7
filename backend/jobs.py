"""Jobs and the engine thread: requests in, events out, one thread for all MindSpore work.

MindSpore 2.10 deadlocks when two Python threads run ops at once (DESIGN.md, "One thread runs
MindSpore"), and Gradio calls handlers from a thread pool. So the JobRunner owns one engine
thread; every model load, pipeline run, preview fit and unload happens there. Other threads
only submit requests (`submit`), run small functions through it (`call`), cancel, and read
events (backend/events.py).

A stop is a flag: `Job.cancel()` sets it, the running job's step callback calls
`Job.check_cancelled()`, which raises JobCancelled, and the executor (backend/tasks.py) ends the
job as Cancelled. A job stopped while it waits never starts.

Several readers may follow one job (a browser tab that reloaded re-attaches to its running
job); each `Job.events()` call (or `Job.aevents()`, for an asyncio reader that must not hold a
thread while it waits) gets the latest status first, then everything after it.

Fairness: one owner may have `max_per_owner` jobs running or waiting; beyond that `submit` raises
OwnerLimit. Waiting jobs run round-robin across owners (the owner served longest ago first, each
owner's jobs in the order sent), so one client's queue delays another client's job by at most the
job that is running; every waiting job is told its true place in that order.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import heapq
import itertools
import logging
import queue
import threading
import time
import uuid
from typing import Callable, Iterator

from backend.events import TERMINAL, Cancelled, Event, Failed, Loading, Queued, Step

logger = logging.getLogger(__name__)


class JobCancelled(Exception):
    """Raised inside the engine (by the step callback) when a job's stop was requested."""


class OwnerLimit(RuntimeError):
    """Raised by submit when the owner already has as many jobs running or waiting as one owner may."""


# ----------------------------------------------------------------------------------- jobs


class Job:
    """One submitted request. Engine side: `emit`, `check_cancelled`; any side: `cancel`, `events`."""

    _ids = itertools.count(1)

    def __init__(self, request, owner: str, on_cancel: Callable[["Job"], None] | None = None):
        self.id = f"{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        self._on_cancel = on_cancel  # the runner drops a job that has not started yet
        self.request = request                  # a backend.requests dataclass, validated
        self.owner = owner
        self.submitted_at = time.monotonic()
        self.sent = 0                           # its place in the runner's order of submissions
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.cancel_requested_at: float | None = None
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._subscribers: list[Callable[[Event], None]] = []   # each reader's put
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
            for put in self._subscribers:
                put(event)

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise JobCancelled(self.id)

    def stop_latency(self) -> float | None:
        """Seconds from the stop request until now (None: no stop was requested)."""
        if self.cancel_requested_at is None:
            return None
        return time.monotonic() - self.cancel_requested_at

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
        self._subscribe(inbox.put)
        try:
            while True:
                try:
                    first = inbox.get(timeout=timeout)
                except queue.Empty:
                    raise TimeoutError(f"job {self.id}: no event for {timeout} s") from None
                for event in _drain(inbox, first, coalesce):
                    yield event
                    if isinstance(event, TERMINAL):
                        return
        finally:
            self._unsubscribe(inbox.put)

    async def aevents(self, coalesce: bool = True):
        """`events()` for an asyncio reader: waits without holding a thread (Gradio runs a sync
        generator's every step on its 40-thread pool, so 40 waiting readers would starve it)."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()

        def put(event: Event) -> None:  # called on the engine thread (or any other)
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, event)
            except RuntimeError:
                pass  # the reader's event loop has closed

        self._subscribe(put)
        try:
            while True:
                for event in _drain(inbox, await inbox.get(), coalesce):
                    yield event
                    if isinstance(event, TERMINAL):
                        return
        finally:
            self._unsubscribe(put)

    def _subscribe(self, put: Callable[[Event], None]) -> None:
        """Add a reader: it gets the latest status (and the end, if the job has ended) at once."""
        with self._lock:
            if self._status is not None:
                put(self._status)
            if self._terminal is not None:
                put(self._terminal)
            self._subscribers.append(put)

    def _unsubscribe(self, put: Callable[[Event], None]) -> None:
        with self._lock:
            self._subscribers.remove(put)

    def wait(self, timeout: float | None = None) -> Event:
        """Block until the job ends; returns its terminal event."""
        for event in self.events(timeout=timeout):
            if isinstance(event, TERMINAL):
                return event
        raise AssertionError("unreachable")  # events() always ends with a terminal event


def _drain(inbox, first: Event, coalesce: bool) -> list:
    """`first` and every event already waiting in `inbox` (a queue.SimpleQueue or an asyncio.Queue)."""
    batch = [first]
    while not inbox.empty():
        batch.append(inbox.get_nowait())
    return _coalesce(batch) if coalesce else batch


def _coalesce(batch: list) -> list:
    last_step = max((i for i, e in enumerate(batch) if isinstance(e, Step)), default=-1)
    last_loading = max((i for i, e in enumerate(batch) if isinstance(e, Loading)), default=-1)
    return [e for i, e in enumerate(batch)
            if not (isinstance(e, Step) and i != last_step) and not (isinstance(e, Loading) and i != last_loading)]


class JobRunner:
    """Runs jobs one at a time, in order, on its own engine thread.

    `execute(job)` does the work: it emits events, calls `job.check_cancelled()` often (the step
    callback does) and ends the job with a terminal event. If it returns or raises without one,
    the runner emits Failed: the engine survives any job.
    """

    def __init__(self, execute: Callable[[Job], None], max_waiting: int = 256, max_per_owner: int = 4):
        self._execute = execute
        self._max_waiting = max_waiting
        self._max_per_owner = max_per_owner
        self._lock = threading.Condition()
        self._waiting: list[Job] = []                   # in the order they were sent
        self._sent = itertools.count()                  # each waiting job's place in that order
        self._started = 0                               # jobs started so far
        self._last_start: dict[str, int] = {}           # owner -> _started when its last job started
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

    # ---------------------------------------------------------------- submitting
    def submit(self, request, owner: str) -> Job:
        """Queue a (validated) request; returns the job at once."""
        job = Job(request, owner, on_cancel=self._cancel_waiting)
        with self._lock:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            if len(self._waiting) >= self._max_waiting:
                raise RuntimeError(f"the queue is full ({self._max_waiting} jobs waiting); try again later")
            mine = sum(j.owner == owner for j in self._waiting) + (self._running is not None and
                                                                    self._running.owner == owner)
            if mine >= self._max_per_owner:
                raise OwnerLimit(f"you already have {mine} jobs running or waiting, as many as one user may "
                                 f"({self._max_per_owner}); this one was not queued. Wait for one to finish, "
                                 f"or press Stop")
            job.sent = next(self._sent)
            self._waiting.append(job)
            self._announce_positions()
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
            jobs = ([self._running] if self._running is not None else []) + self._run_order()
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

    def _run_order(self) -> list[Job]:
        """The waiting jobs in the order they will start (caller holds the lock)."""
        return fair_order(self._waiting, lambda job: job.owner, lambda job: job.sent, self._last_start,
                          self._started)

    def _announce_positions(self) -> None:
        """Tell every waiting job its true place in line (caller holds the lock)."""
        base = 1 if self._running is not None else 0
        for index, job in enumerate(self._run_order()):
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
                    job = self._run_order()[0]
                    self._waiting.remove(job)
                    self._running = job
                    self._started += 1
                    self._last_start[job.owner] = self._started
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
        if job.cancel_requested:  # stopped between leaving the queue and starting
            job.emit(Cancelled(latency_s=job.stop_latency()))
            return
        try:
            self._execute(job)
        except ValueError as error:  # bad input found late (e.g. an image the model cannot take)
            logger.info("job %s failed: %s", job.id, error)
            job.emit(Failed(str(error)))
        except Exception as error:  # the engine must survive any job
            logger.exception("job %s failed", job.id)
            job.emit(Failed(f"{type(error).__name__}: {error}"))
        else:
            if not job.done:
                job.emit(Failed("the job ended without a result"))


def fair_order(waiting: list, owner_of, sent_of, last_start: dict, started: int, first_of=lambda item: False) -> list:
    """`waiting` in the order they will start: round-robin over owners, the owner whose last job started
    longest ago (`last_start[owner]`, a count of starts up to `started`), or never, first, ties by the time
    sent; each owner's own items in the order sent. Items `first_of` says must go first (backend/cluster.py:
    a job whose worker died had started) lead their owner's and give it the first turn."""
    mine: dict[str, collections.deque] = {}
    for item in sorted(waiting, key=lambda item: (not first_of(item), sent_of(item))):
        mine.setdefault(owner_of(item), collections.deque()).append(item)
    turns = [(-1 if first_of(items[0]) else last_start.get(owner, -1), sent_of(items[0]), owner)
             for owner, items in mine.items()]
    heapq.heapify(turns)
    order, tick = [], started
    while turns:
        _, _, owner = heapq.heappop(turns)
        order.append(mine[owner].popleft())
        tick += 1
        if mine[owner]:
            heapq.heappush(turns, (tick, sent_of(mine[owner][0]), owner))
    return order


def _run_into(future: concurrent.futures.Future, fn, args, kwargs) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn(*args, **kwargs))
    except BaseException as error:  # handed to the caller of call()
        future.set_exception(error)
