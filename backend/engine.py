"""The Engine: the one thing the page and the HTTP API talk to.

    engine = Engine(EngineConfig(families=("2.2", "3"), demo=True))
    job = engine.submit(Text2ImageRequest(prompt="a red fox", width=64, height=64), owner)
    for event in job.events(): ...             # Queued, Loading, Step, then Result | Failed | Cancelled
    engine.cancel(owner); engine.status(); engine.unload(); engine.set_memory_budget("12GB")

It owns the engine thread (backend/jobs.py), the model manager (backend/manager.py) and the task
executor (backend/tasks.py), and builds them in one go: MindSpore's device is chosen on the engine
thread, the demo models are built there, then the manager and the executor. Requests
(backend/requests.py) and events (backend/events.py) are plain data, so this boundary can be put
on another machine (DESIGN.md, "The Engine boundary and scale-out").
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from backend import demo
from backend.device import resolve_dtype, select_device
from backend.families import DEPTH_STAGE, FAMILIES, ModelSpec
from backend.jobs import Job, JobRunner
from backend.manager import ModelManager
from backend.memory import default_memory_budget, parse_memory
from backend.metadata import OutputStore
from backend.fields import check_image, check_owner
from backend.requests import GenerationRequest
from backend.tasks import TaskExecutor
from backend.working_memory import MemoryEstimate, WorkingMemory

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kandinsky-studio"


@dataclass(frozen=True)
class EngineConfig:
    families: tuple = tuple(FAMILIES)        # the families offered, in order (the first is the default)
    demo: bool = False                       # tiny random-weight models built locally (backend/demo.py)
    device: str = "auto"                     # auto | cpu | gpu | ascend
    dtype: str = "float32"                   # auto | float32 | float16 | bfloat16 (backend/device.py resolve_dtype)
    memory_budget: int | None = None         # bytes for loaded models (None: 70% of RAM)
    models_dir: str | None = None            # download cache; a folder there named like a repo is used as is
    offline: bool = False                    # never download
    outputs_dir: str = "outputs"             # where images are saved, one folder per owner
    cache_dir: str = str(DEFAULT_CACHE)      # demo models (without models_dir) and preview colours
    max_waiting: int = 256                   # jobs in line before submit refuses more
    max_per_owner: int = 4                   # running + waiting jobs of one owner (browser or API client)
    # bytes a job's peak (app + weights of the unit that decodes + its working memory) must fit in; None: the
    # machine's RAM. A request beyond it is refused by submit (backend/working_memory.py)
    memory_limit: int | None = None


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.store = OutputStore(config.outputs_dir)
        self._runner = JobRunner(self._execute, config.max_waiting, config.max_per_owner).start()
        try:
            # MindSpore's context belongs to the thread that runs it
            self.device = self._runner.call(select_device, config.device)
            self.dtype, self.dtype_note = resolve_dtype(config.dtype, self.device)
            root = Path(config.models_dir or config.cache_dir)
            self.models: dict[str, ModelSpec] = self._runner.call(self._catalogue, root)
            self._manager = ModelManager(dtype=self.dtype, memory_budget=config.memory_budget,
                                         cache_dir=config.models_dir, offline=config.offline, device=self.device,
                                         factors_dir=root / "preview-factors")
            self._executor = TaskExecutor(self.models, self._manager, self.store)
            self._working_memory = WorkingMemory(self.dtype, config.memory_limit)
        except BaseException:
            self._runner.shutdown()
            raise

    def _catalogue(self, root: Path) -> dict[str, ModelSpec]:
        """The models offered, in the configured order: the demo ones (built here, on the engine
        thread), or the published repos (a folder named like one under models_dir is used instead)."""
        if self.config.demo:
            specs = [demo.ensure_demo_models(root, name) for name in self.config.families]
        else:
            specs = [FAMILIES[name].published_model(self.config.models_dir) for name in self.config.families]
        return {spec.key: spec for spec in specs}

    def _execute(self, job: Job) -> None:
        self._executor(job)

    # ------------------------------------------------------------------ jobs
    def model(self, key: str) -> ModelSpec:
        if key not in self.models:
            raise ValueError(f"model must be one of {sorted(self.models)}; got {key!r}")
        return self.models[key]

    def submit(self, request: GenerationRequest, owner: str) -> Job:
        """Check a request and queue it; returns its job at once. ValueError names the field that is
        out of range, the model that cannot do the task, or width/height/batch_size when the job would
        not fit in memory (with what would); RuntimeError when the queue is full."""
        check_owner(owner)
        request.validate()
        model = self.model(request.model)
        model.check_task(request.task)
        self._working_memory.check(model, request)
        if request.depth_photo() is not None:
            self._depth_stage(model)
        return self._runner.submit(request, owner)

    def estimate_memory(self, request: GenerationRequest) -> MemoryEstimate:
        """The peak memory `request`'s job would need, and the limit submit holds it to (its `fits`,
        `needed`, `working`, `as_dict()`); ValueError names a field out of range."""
        request.validate()
        return self._working_memory.estimate(self.model(request.model), request)

    def estimate_depth(self, model: str, photo, name: str = "hint"):
        """The depth image (white = near) of `photo` by `model`'s depth estimator, on the engine thread
        (after the running job, if any). ValueError names `name` or the `model` field."""
        self._depth_stage(self.model(model))
        check_image(name, photo)
        return self._runner.call(self._executor.estimate_depth, model, photo, name)

    @staticmethod
    def _depth_stage(model: ModelSpec):
        if DEPTH_STAGE not in model.family.stages or "depth_estimator" not in model.repos:
            raise ValueError(f"model: {model.label} has no depth estimator to make a ControlNet hint from a "
                             f"photo; give a depth map (hint_source 'depth map') or use Kandinsky 2.2")
        return model.stage(DEPTH_STAGE)

    def jobs_of(self, owner: str) -> list[Job]:
        """The running and waiting jobs of `owner`, in run order."""
        return self._runner.jobs_of(owner)

    def cancel(self, owner: str) -> int:
        """Stop every running or waiting job of `owner`; returns how many were asked to stop."""
        return self._runner.cancel_owner(owner)

    # ------------------------------------------------------------------ models and memory
    def status(self) -> dict:
        """Loaded models (units, their components and sizes), device, dtype, budget, and the queue."""
        running = self._runner.running
        return {**self._manager.status(), "dtype_note": self.dtype_note, "waiting": self._runner.waiting_count,
                "running": f"{running.request.task} ({running.id})" if running is not None else None}

    @property
    def memory_budget(self) -> int:
        return self._manager.memory_budget

    def unload(self, source: str | None = None, timeout: float = 3.0) -> list[str] | None:
        """Free the models no job uses (or one folder, by source); returns the units freed, or None
        when a running job holds the engine longer than `timeout` s (they are freed when it ends)."""
        future = self._runner.call_soon(self._manager.unload, source)
        try:
            return future.result(timeout)
        except TimeoutError:
            return None

    def set_memory_budget(self, budget: str | int | None, timeout: float = 3.0) -> tuple[int, list[str] | None]:
        """Set the budget ("12GB", "auto", bytes); returns it in bytes, and the units evicted (None:
        applied when the running job ends)."""
        budget = parse_memory(budget) or default_memory_budget()
        future = self._runner.call_soon(self._manager.set_memory_budget, budget)
        try:
            return budget, future.result(timeout)
        except TimeoutError:
            return budget, None

    def shutdown(self) -> None:
        """Stop every job and the engine thread."""
        self._runner.shutdown()
