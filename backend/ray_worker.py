"""The worker of a Ray cluster: one per device, owning an Engine (backend/engine.py).

backend/cluster.py makes it a Ray actor (`ray.remote(EngineWorker)`) on each GPU, Ascend NPU or CPU
node of the cluster and sends it one job at a time. The actor is threaded (max_concurrency), so
`cancel` and `status` are served while `run` streams a job's events; every one of its methods only
talks to the Engine's API: the Engine's own thread is the only one running MindSpore ops
(DESIGN.md, "One thread runs MindSpore").

The front end saves the images (its OutputStore, one folder per owner), so the worker's Engine
saves into a scratch folder of its own (removed when the worker shuts down; a killed worker's, by the
next worker that starts on that machine): a job's PNGs are deleted from it as soon as they are
shipped, and the input images its settings reference travel with the job's last event as PNG
bytes, under the same `inputs/<hash>.png` names (backend/shipping.py). The class is plain Python:
Ray is imported only to name the node.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Iterator

from backend.engine import Engine, EngineConfig
from backend.events import TERMINAL, Cancelled, Result
from backend.memory import default_memory_budget
from backend.shipping import Shipped

logger = logging.getLogger(__name__)

EARLY_CANCELS_KEPT = 1024     # cancels that arrived before their job: remembered for this many jobs
SCRATCH_ROOT = "kandinsky-workers"   # under the temporary folder: one scratch folder per worker process


class EngineWorker:
    """An Engine on one device of the cluster, driven by the front end's ClusterEngine."""

    def __init__(self, config: EngineConfig, name: str, memory_share: int = 1):
        """`memory_share`: how many workers share this machine's memory; with the default budget
        (None: 70% of RAM) each takes that share of it."""
        self.name = name
        self._scratch = _scratch_folder(name)
        weakref.finalize(self, shutil.rmtree, self._scratch, ignore_errors=True)
        budget = config.memory_budget
        if budget is None and memory_share > 1:
            budget = default_memory_budget() // memory_share
        self.engine = Engine(dataclasses.replace(config, outputs_dir=self._scratch, memory_budget=budget))
        self._lock = threading.Lock()
        self._jobs: dict[str, object] = {}                  # front end's job id -> the Engine's Job
        self._early_cancels: collections.OrderedDict = collections.OrderedDict()

    def describe(self) -> dict:
        """Who this worker is: its name, node, process, device, dtype and the models it offers."""
        return {"name": self.name, "node": _node_address(), "host": socket.gethostname(), "pid": os.getpid(),
                "device": self.engine.device, "dtype": self.engine.dtype, "dtype_note": self.engine.dtype_note,
                "memory_budget": self.engine.memory_budget, "models": self.engine.models}

    # ------------------------------------------------------------------ jobs
    def run(self, key: str, request, owner: str) -> Iterator[Shipped]:
        """The events of one job, as they happen (a Ray streaming generator). `key` is the front end's
        job id, by which `cancel` reaches it. Bad input raises ValueError naming the field."""
        job = self.engine.submit(request, owner)
        with self._lock:
            self._jobs[key] = job
            cancelled_early = self._early_cancels.pop(key, None) is not None
        if cancelled_early:
            job.cancel()
        try:
            for event in job.events():
                if isinstance(event, TERMINAL):
                    yield self._last(job, event)
                else:
                    yield Shipped(event, time.time())
        finally:
            with self._lock:
                self._jobs.pop(key, None)
            if not job.done:  # the front end stopped reading (it went away): stop the work too
                job.cancel()

    def _last(self, job, event) -> Shipped:
        """The terminal event with the input images its settings reference; the job's PNGs leave the
        scratch folder (the front end saves them again, from the images and their settings)."""
        images = [*event.images, *event.partials] if isinstance(event, Cancelled) else \
            list(event.images) if isinstance(event, Result) else []
        references = {ref for generated in images for ref in generated.settings.get("input_images", {}).values()}
        inputs = {}
        for reference in sorted(references):
            try:
                inputs[reference] = self.engine.store.input_path(job.owner, reference).read_bytes()
            except OSError as error:  # the front end notes the missing reference
                logger.warning("%s: input image %s of job %s not readable: %s", self.name, reference, job.id, error)
        for generated in images:
            if generated.path is not None:
                generated.path.unlink(missing_ok=True)
        loaded = tuple(unit["source"] for unit in self.engine.status()["units"])
        return Shipped(event, time.time(), input_files=inputs, loaded=loaded,
                       engine_s=(job.finished_at or time.monotonic()) - job.submitted_at)

    def cancel(self, key: str) -> bool:
        """Stop the job of front-end id `key` after its current step; True when it is here. A cancel that
        arrives before its job is remembered, and stops the job when it comes."""
        with self._lock:
            job = self._jobs.get(key)
            if job is None:
                self._early_cancels[key] = True
                while len(self._early_cancels) > EARLY_CANCELS_KEPT:
                    self._early_cancels.popitem(last=False)
        if job is None:
            return False
        job.cancel()
        return True

    # ------------------------------------------------------------------ models and memory
    def status(self) -> dict:
        return {**self.engine.status(), "memory_budget": self.engine.memory_budget}

    def unload(self, source: str | None = None, timeout: float = 3.0):
        return self.engine.unload(source, timeout)

    def set_memory_budget(self, budget, timeout: float = 3.0):
        return self.engine.set_memory_budget(budget, timeout)

    def estimate_depth(self, model: str, photo, name: str = "hint"):
        return self.engine.estimate_depth(model, photo, name)

    def estimate_memory(self, request):
        return self.engine.estimate_memory(request)

    def cpu_seconds(self) -> float:
        """CPU time of this worker's process so far, every thread (tools/bench_ray.py)."""
        return time.process_time()

    def shutdown(self) -> None:
        """Stop the Engine and remove the scratch folder (the front end then kills the actor)."""
        self.engine.shutdown()
        shutil.rmtree(self._scratch, ignore_errors=True)


def _scratch_folder(name: str) -> str:
    """A new scratch folder for this worker process, `<tmp>/kandinsky-workers/<name>-<pid>`; those of worker
    processes that are gone (killed: Ray restarted them) are removed first."""
    root = Path(tempfile.gettempdir()) / SCRATCH_ROOT
    root.mkdir(exist_ok=True)
    for folder in root.iterdir():
        pid = folder.name.rpartition("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
    folder = root / f"{name}-{os.getpid()}"
    folder.mkdir(exist_ok=True)
    return str(folder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _node_address() -> str:
    try:
        import ray  # the actor's process has it; the module itself does not need it

        return ray.util.get_node_ip_address()
    except Exception:  # not in a Ray process
        return socket.gethostname()
