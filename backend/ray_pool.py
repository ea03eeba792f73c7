"""The front end's handles on the worker actors (backend/ray_worker.py): start them on their devices,
ask them (their status, a call to each), wait while Ray restarts one, stop them. backend/cluster.py
sends them jobs; backend/ray_setup.py plans them.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

from backend.engine import EngineConfig
from backend.ray_setup import ClusterError, WorkerPlan
from backend.ray_worker import EngineWorker

logger = logging.getLogger(__name__)

MAX_RESTARTS = 3                 # Ray restarts a dead worker this many times
WORKER_START_S = 600.0           # a worker's Engine starts (MindSpore, the demo models) within this
STATUS_TIMEOUT_S = 2.0           # the Models tab does not wait longer for a busy worker's status
ACTOR_THREADS = 16               # a threaded actor: cancel and status are served while a job runs


@dataclass
class Worker:
    """The front end's record of one worker actor."""

    plan: WorkerPlan
    handle: object                              # the Ray actor handle
    info: dict = field(default_factory=dict)    # EngineWorker.describe(): node, device, dtype, models, budget
    state: str = "starting"                     # starting | ready | restarting | dead
    running: object = None                      # the job it runs (backend/cluster.py's _Dispatch), if any
    loaded: set = field(default_factory=set)    # folders it held after its last job
    jobs_done: int = 0
    last_status: dict | None = None             # EngineWorker.status(), the last answer

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def label(self) -> str:
        return f"{self.name} ({self.info.get('device', self.plan.device)} on {self.plan.node})"


def start_workers(plans: list[WorkerPlan], config: EngineConfig) -> list[Worker]:
    """One actor per plan, each with an Engine of `config` on its device; returns them ready (described),
    or raises ClusterError naming the worker that could not start (the others are stopped)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor = ray.remote(EngineWorker)

    def start(plan: WorkerPlan) -> Worker:
        return Worker(plan, actor.options(
            num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, resources=plan.resources,
            scheduling_strategy=NodeAffinitySchedulingStrategy(plan.node_id, soft=False),
            max_restarts=MAX_RESTARTS, max_task_retries=0, max_concurrency=ACTOR_THREADS,
        ).remote(dataclasses.replace(config, device=plan.device), plan.name, plan.memory_share))

    # The demo models are built by the first worker alone: two builds into one cache folder would race.
    workers = [start(plans[0])]
    try:
        if config.demo:
            workers[0].info = describe(workers[0], WORKER_START_S)
        workers += [start(plan) for plan in plans[1:]]
        for worker in workers:
            worker.info, worker.state = worker.info or describe(worker, WORKER_START_S), "ready"
    except BaseException:
        stop(workers)
        raise
    return workers


def describe(worker: Worker, timeout: float) -> dict:
    import ray

    try:
        return ray.get(worker.handle.describe.remote(), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise ClusterError(f"{worker.name} on {worker.plan.node} did not start within {timeout:.0f} s "
                           f"(`ray status` shows whether its resources are free)") from None
    except ray.exceptions.RayError as error:
        raise ClusterError(f"{worker.name} on {worker.plan.node} could not start its engine: "
                           f"{cause(error)}") from None


def await_restart(worker: Worker) -> tuple[dict, str]:
    """Block while Ray restarts a dead worker (MAX_RESTARTS); -> (its description, "ready"), or its last
    one and "dead" when Ray gave up or it did not come back within WORKER_START_S."""
    import ray

    deadline = time.monotonic() + WORKER_START_S
    while time.monotonic() < deadline:
        try:
            return ray.get(worker.handle.describe.remote(), timeout=deadline - time.monotonic()), "ready"
        except ray.exceptions.ActorUnavailableError:  # still restarting: Ray has no event to wait on
            time.sleep(1.0)
        except ray.exceptions.RayError as error:  # ActorDiedError: Ray gave up restarting it; or too slow
            logger.error("%s is gone: %s", worker.label, cause(error))
            break
    return worker.info, "dead"


def refresh_statuses(workers: list[Worker]) -> None:
    """Ask each ready worker its Engine's status; those answering within STATUS_TIMEOUT_S update
    `last_status` (a busy worker answers too: its actor is threaded)."""
    import ray

    asked = {w.name: w.handle.status.remote() for w in workers if w.state == "ready"}
    answered, _ = ray.wait(list(asked.values()), num_returns=len(asked), timeout=STATUS_TIMEOUT_S)
    for worker in workers:
        reference = asked.get(worker.name)
        if reference is not None and reference in answered:
            try:
                worker.last_status = ray.get(reference)
            except ray.exceptions.RayError:  # it died meanwhile: the dispatcher finds out
                pass


def call_each(workers: list[Worker], method: str, *args, timeout: float) -> list:
    """`method(*args)` on every ready worker; their answers in order."""
    import ray

    ready = [w for w in workers if w.state == "ready"]
    return ray.get([getattr(w.handle, method).remote(*args) for w in ready], timeout=timeout)


def stop(workers: list[Worker], timeout: float = 10.0) -> None:
    """Shut each worker's Engine down (its scratch folder goes), then end the actors for good."""
    import ray

    alive = [w for w in workers if w.state != "dead"]
    try:
        ray.get([w.handle.shutdown.remote() for w in alive], timeout=timeout)
    except ray.exceptions.RayError as error:  # one is dead or stuck: the kill below ends it anyway
        logger.warning("a worker did not shut down cleanly: %s", cause(error))
    for worker in workers:
        ray.kill(worker.handle, no_restart=True)
        worker.state = "dead"


def cause_exception(error) -> BaseException:
    """The exception a worker raised (a ValueError naming a field), without Ray's wrapping."""
    original = getattr(error, "cause", None)
    return original if isinstance(original, BaseException) else RuntimeError(cause(error))


def cause(error) -> str:
    """What went wrong on a worker, in one line: the worker's own error, else Ray's last line."""
    original = getattr(error, "cause", None)
    if isinstance(original, BaseException) and not hasattr(original, "cause"):
        return str(original) if isinstance(original, ValueError) else f"{type(original).__name__}: {original}"
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__
