"""The Engine on a Ray cluster: the same interface as backend/engine.py, the work on worker actors.

    connect("local")                                     # or "auto", "10.0.0.5:6379" (ClusterError if not)
    engine = ClusterEngine(EngineConfig(demo=True), cpu_workers_per_node=2)
    job = engine.submit(Text2ImageRequest(prompt="a red fox"), owner)   # a backend.jobs.Job, as in process
    for event in job.events(): ...

One worker actor per device (backend/ray_worker.py; planned by backend/ray_setup.py, started and
asked by backend/ray_pool.py): a GPU (num_gpus=1), an Ascend NPU (its Ray resource, "NPU"), or a CPU
node (its cores, or a share of them). Each owns an Engine with its models, memory budget and engine
thread, and runs one job at a time, so the line is here, in the front end (the JobRunner's order:
round-robin over owners), and positions count the whole cluster. A job goes to a free worker that
already holds its folders, else to the free worker that has run the fewest jobs; one thread per
running job reads the worker's events (a Ray streaming generator) into the front end's Job, which
every reader of events uses unchanged. The images of a job's last event are saved here, in this
process's OutputStore, under the owner, with the same settings (and input images) as in process
(backend/shipping.py): galleries and PNG info work as they do without Ray.

Stop: the Job's on_cancel drops a waiting job, or forwards the cancel to the worker (a threaded
actor serves it while the job runs): the job ends after its current step, as in process.
Faults: a worker whose process dies mid-job is restarted by Ray (max_restarts); its job runs again
once on another worker (with the seed fixed before the first try: the same images), or fails with a
message naming the workers. Nothing of a job is saved before its last event, so no image is lost.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from backend.engine import EngineConfig
from backend.events import TERMINAL, Cancelled, Failed, Queued
from backend.fields import check_image, check_owner
from backend.jobs import Job, OwnerLimit, fair_order
from backend.limits import MAX_SEED
from backend.memory import parse_memory
from backend.metadata import OutputStore
from backend import ray_pool
from backend.ray_pool import Worker
from backend.ray_setup import ClusterError, connect, plan_workers  # noqa: F401 (connect: app.py's)
from backend.shipping import Shipped, save_last_event

logger = logging.getLogger(__name__)

ATTEMPTS = 2                     # a job whose worker died runs once more
TIMINGS_KEPT = 1000


@dataclass
class _Dispatch:
    """A job of the front end, and what it takes to run it on a worker."""

    job: Job
    request: object                         # job.request with its seed drawn (a retry draws the same noise)
    tried: list = field(default_factory=list)   # the workers that ran it, in order
    notes: list = field(default_factory=list)
    sent: int = 0                           # its place in the order jobs were sent
    dispatched_at: float = 0.0


# ----------------------------------------------------------------------------------- the engine

class ClusterEngine:
    """backend.engine.Engine's interface over the worker actors of the Ray cluster this process is
    connected to (`connect`, or ray.init with `runtime_env()`). The page and the API use it unchanged."""

    def __init__(self, config: EngineConfig, cpu_workers_per_node: int = 1, started_ray: bool = False):
        import ray

        self.config = config
        self._started_ray = started_ray
        self.store = OutputStore(config.outputs_dir)
        self._lock = threading.Condition()
        self._waiting: list[_Dispatch] = []            # in the order sent (_run_order_locked: the order run)
        self._sent = itertools.count()
        self._started = 0                               # jobs started so far
        self._last_start: dict[str, int] = {}           # owner -> _started when its last job started
        self._threads: set[threading.Thread] = set()
        self._stopping = False
        # per job: front_s (dispatched -> its last event delivered) and engine_s (the worker Engine's own time)
        self.timings: collections.deque = collections.deque(maxlen=TIMINGS_KEPT)
        self.event_delays: collections.deque = collections.deque(maxlen=100 * TIMINGS_KEPT)  # seconds

        plans = plan_workers(ray.nodes(), config.device, cpu_workers_per_node)
        # relative folders mean this process's; the workers run in the shipped copy of the code
        models_dir = config.models_dir and str(Path(config.models_dir).resolve())
        cache_dir = str(Path(config.cache_dir).resolve())
        worker_config = dataclasses.replace(config, models_dir=models_dir, cache_dir=cache_dir)
        self.workers = ray_pool.start_workers(plans, worker_config)
        self.models = self.workers[0].info["models"]
        for worker in self.workers[1:]:
            if list(worker.info["models"]) != list(self.models):
                ray_pool.stop(self.workers)
                raise ClusterError(f"{worker.label} offers {list(worker.info['models'])}, {self.workers[0].label} "
                                   f"{list(self.models)}: give every node the same models (--models, --models-dir)")
        first = self.workers[0].info
        self.dtype = first["dtype"]
        kinds = collections.Counter(w.info["device"] for w in self.workers)
        self.device = (f"a Ray cluster of {len(self.workers)} worker{'s' if len(self.workers) > 1 else ''} "
                       f"({', '.join(f'{count} {kind}' for kind, count in kinds.items())})")
        self.dtype_note = "; ".join(dict.fromkeys(w.info["dtype_note"] for w in self.workers))
        logger.info("Ray workers: %s", ", ".join(w.label for w in self.workers))

    # ------------------------------------------------------------------ jobs
    def model(self, key: str):
        if key not in self.models:
            raise ValueError(f"model must be one of {sorted(self.models)}; got {key!r}")
        return self.models[key]

    def submit(self, request, owner: str) -> Job:
        """Check a request (as Engine.submit does) and queue it for the cluster; returns its job at once."""
        check_owner(owner)
        request.validate()
        model = self.model(request.model)
        model.check_task(request.task)
        if request.depth_photo() is not None and "depth_estimator" not in model.repos:
            raise ValueError(f"model: {model.label} has no depth estimator to make a ControlNet hint from a "
                             f"photo; give a depth map (hint_source 'depth map') or use Kandinsky 2.2")
        seed = request.seed if request.seed >= 0 else secrets.randbelow(MAX_SEED - request.batch_count)
        job = Job(request, owner, on_cancel=self._on_cancel)
        with self._lock:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            if len(self._waiting) >= self.config.max_waiting:
                raise RuntimeError(f"the queue is full ({self.config.max_waiting} jobs waiting); try again later")
            mine = len([d for d in self._waiting if d.job.owner == owner]) + \
                len([w for w in self.workers if w.running and w.running.job.owner == owner and not w.running.job.done])
            if mine >= self.config.max_per_owner:
                raise OwnerLimit(f"you already have {mine} jobs running or waiting, as many as one user may "
                                 f"({self.config.max_per_owner}); this one was not queued. Wait for one to finish, "
                                 f"or press Stop")
            self._waiting.append(_Dispatch(job, dataclasses.replace(request, seed=seed), sent=next(self._sent)))
            self._dispatch_locked()
        return job

    def jobs_of(self, owner: str) -> list[Job]:
        """The running and waiting jobs of `owner`, in run order."""
        with self._lock:
            running = sorted((w.running for w in self.workers if w.running), key=lambda d: d.dispatched_at)
            # a job whose last event came is done, though its thread may not have freed the worker yet
            return [d.job for d in [*running, *self._run_order_locked()] if d.job.owner == owner and not d.job.done]

    def cancel(self, owner: str) -> int:
        """Stop every running or waiting job of `owner`; returns how many were asked to stop."""
        jobs = self.jobs_of(owner)
        for job in jobs:
            job.cancel()
        return len(jobs)

    def _on_cancel(self, job: Job) -> None:
        with self._lock:
            waiting = next((d for d in self._waiting if d.job is job), None)
            if waiting is not None:
                self._waiting.remove(waiting)
                self._announce_locked()
            worker = next((w for w in self.workers if w.running and w.running.job is job), None)
        if waiting is not None:
            job.emit(Cancelled(latency_s=0.0))
        elif worker is not None:
            worker.handle.cancel.remote(job.id)  # served while the job runs: the actor is threaded

    # ------------------------------------------------------------------ dispatching
    def _dispatch_locked(self) -> None:
        """Start waiting jobs on free workers, in line order; tell the others their place."""
        if self._waiting and all(w.state == "dead" for w in self.workers):
            failed, self._waiting = self._waiting, []
            for dispatch in failed:
                dispatch.job.emit(Failed("no worker is left: every worker of the Ray cluster stopped and Ray gave up "
                                         "restarting it (see `ray logs`); restart the app or add workers"))
        while self._waiting:
            dispatch = self._run_order_locked()[0]
            worker = self._pick_worker(dispatch)
            if worker is None:
                break
            self._waiting.remove(dispatch)
            self._started += 1
            self._last_start[dispatch.job.owner] = self._started
            worker.running, dispatch.dispatched_at = dispatch, time.monotonic()
            dispatch.tried.append(worker)
            dispatch.job.started_at = dispatch.job.started_at or dispatch.dispatched_at
            thread = threading.Thread(target=self._run, args=(dispatch, worker), daemon=True,
                                      name=f"dispatch-{dispatch.job.id}")
            self._threads.add(thread)
            thread.start()
        self._announce_locked()

    def _pick_worker(self, dispatch: _Dispatch) -> Worker | None:
        """A free worker holding the job's folders, else the free one that ran the fewest jobs. A retry
        avoids the workers that already failed it, unless no other is left."""
        others = [w for w in self.workers if w not in dispatch.tried and w.state != "dead"]
        pool = others if others else [w for w in self.workers if w.state != "dead"]
        free = [w for w in pool if w.state == "ready" and w.running is None]
        if not free:
            return None
        needed = self._folders(dispatch.request)
        return min(free, key=lambda w: (not needed <= w.loaded, w.jobs_done))

    def _folders(self, request) -> set:
        model = self.models[request.model]
        return {model.stage(model.family.text_stage).source, model.stage(request.decoder_stage).source}

    def _run_order_locked(self) -> list[_Dispatch]:
        """The waiting jobs in the order they will start, by the JobRunner's rule (backend/jobs.py
        fair_order); a job whose worker died goes first (it was started before)."""
        return fair_order(self._waiting, lambda d: d.job.owner, lambda d: d.sent, self._last_start, self._started,
                          first_of=lambda d: d.tried)

    def _announce_locked(self) -> None:
        """Tell every waiting job its place: the jobs running on the cluster, then those before it."""
        busy = sum(1 for w in self.workers if w.running is not None)
        for index, dispatch in enumerate(self._run_order_locked()):
            dispatch.job.emit(Queued(busy + index))

    def _run(self, dispatch: _Dispatch, worker: Worker) -> None:
        """One job on one worker (its own thread): the worker's events into the job."""
        import ray

        job, lost = dispatch.job, None
        try:
            if job.cancel_requested:  # stopped between leaving the line and starting
                job.emit(Cancelled(latency_s=job.stop_latency()))
                return
            stream = worker.handle.run.options(num_returns="streaming").remote(job.id, dispatch.request, job.owner)
            for reference in stream:
                self._deliver(dispatch, worker, ray.get(reference))
            if not job.done:
                job.emit(Failed(f"{worker.label} ended the job without a result"))
        except ray.exceptions.RayActorError as error:   # the worker's process died (or is out of reach)
            lost = error
        except ray.exceptions.RayTaskError as error:    # the job raised on the worker: bad input found there
            job.emit(Failed(ray_pool.cause(error)))
        except Exception as error:  # the front end must survive any job
            logger.exception("job %s on %s", job.id, worker.name)
            job.emit(Failed(f"{type(error).__name__}: {error}"))
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())
                if lost is not None:
                    worker.state, worker.loaded = "restarting", set()
                    threading.Thread(target=self._await_restart, args=(worker,), daemon=True).start()
                if worker.running is dispatch:  # no last event came: free the worker here
                    worker.running = None
                    if lost is not None:
                        self._retry_locked(dispatch, worker, lost)
                self._dispatch_locked()

    def _deliver(self, dispatch: _Dispatch, worker: Worker, shipped: Shipped) -> None:
        self.event_delays.append(time.time() - shipped.sent_at)
        event, job = shipped.event, dispatch.job
        if not isinstance(event, TERMINAL):
            job.emit(event)
            return
        event = save_last_event(self.store, event, job.owner, shipped.input_files, dispatch.notes)
        if isinstance(event, Cancelled):
            event = dataclasses.replace(event, latency_s=job.stop_latency())
        self.timings.append({"job": job.id, "worker": worker.name, "engine_s": shipped.engine_s,
                             "front_s": time.monotonic() - dispatch.dispatched_at})
        with self._lock:  # free before the job is seen done; not only once the worker's stream has closed
            worker.loaded, worker.running = set(shipped.loaded), None
            worker.jobs_done += 1
            self._dispatch_locked()
        job.emit(event)

    def _retry_locked(self, dispatch: _Dispatch, worker: Worker, error: Exception) -> None:
        job = dispatch.job
        logger.warning("%s stopped during job %s: %s", worker.label, job.id, ray_pool.cause(error))
        if job.cancel_requested:
            job.emit(Cancelled(latency_s=job.stop_latency(), notes=(f"{worker.label} stopped too, before it "
                                                                     f"could keep the last preview",)))
        elif len(dispatch.tried) < ATTEMPTS:
            dispatch.notes.append(f"{worker.label} stopped during this job (its process ended); the job ran "
                                  f"again from the start with the same seed")
            self._waiting.append(dispatch)  # first in the run order: it has been tried
        else:
            names = ", ".join(w.label for w in dispatch.tried)
            job.emit(Failed(f"the workers running this job stopped ({names}): their process ended (killed, out of "
                            f"memory or crashed); Ray restarts them. Try again; `ray logs` on their node says why"))

    def _await_restart(self, worker: Worker) -> None:
        info, state = ray_pool.await_restart(worker)
        with self._lock:
            worker.info, worker.state = info, state
            self._lock.notify_all()
            self._dispatch_locked()

    def wait_for_workers(self, timeout: float) -> bool:
        """Block until no worker is restarting (each is ready, or dead for good); False after `timeout` s."""
        with self._lock:
            return self._lock.wait_for(lambda: all(w.state in ("ready", "dead") for w in self.workers), timeout)

    # ------------------------------------------------------------------ models and memory
    def status(self) -> dict:
        """Engine.status()'s keys summed over the workers, and "workers": each one's node, device,
        dtype, loaded folders, memory and state (the last known, when a busy worker does not answer)."""
        ray_pool.refresh_statuses(self.workers)
        workers = []
        with self._lock:
            waiting, running = len(self._waiting), [w for w in self.workers if w.running]
        for worker in self.workers:
            status = worker.last_status or {"units": [], "used": 0, "budget": worker.info.get("memory_budget", 0)}
            # whose job a worker runs is not said: the page names only the reader's own jobs
            state = worker.state if worker.state != "ready" else "running a job" if worker.running else "idle"
            workers.append({"name": worker.name, "node": worker.plan.node, "device": worker.info.get("device", "?"),
                            "dtype": worker.info.get("dtype", "?"), "state": state,
                            "units": status["units"], "used": status["used"], "budget": status["budget"],
                            "jobs_done": worker.jobs_done})
        used, budget = sum(w["used"] for w in workers), sum(w["budget"] for w in workers)
        return {"device": self.device, "dtype": self.dtype, "dtype_note": self.dtype_note, "budget": budget,
                "used": used, "over_budget": used > budget, "units": [], "waiting": waiting,
                "running": ", ".join(f"{w.running.job.request.task} ({w.running.job.id}) on {w.name}"
                                     for w in running) or None, "workers": workers}

    @property
    def memory_budget(self) -> int:
        return self.workers[0].info.get("memory_budget", 0)

    def unload(self, source: str | None = None, timeout: float = 3.0) -> list[str] | None:
        """Engine.unload on every worker: the units freed, or None when a running job holds one longer
        than `timeout` s (they are freed when it ends)."""
        answers = ray_pool.call_each(self.workers, "unload", source, timeout, timeout=timeout + 10)
        return None if any(a is None for a in answers) else [unit for a in answers for unit in a]

    def set_memory_budget(self, budget, timeout: float = 3.0):
        """Each worker's budget ("12GB", "auto": 70% of its own machine's RAM)."""
        parse_memory(budget)  # a bad value is refused here, naming it, before any worker sees it
        answers = ray_pool.call_each(self.workers, "set_memory_budget", budget, timeout, timeout=timeout + 10)
        for worker, (applied, _) in zip([w for w in self.workers if w.state == "ready"], answers):
            worker.info["memory_budget"] = applied
        evicted = None if any(e is None for _, e in answers) else [unit for _, e in answers for unit in e]
        return answers[0][0], evicted

    def estimate_memory(self, request):
        """Engine.estimate_memory on a worker (its machine's memory is what the job must fit in; a request
        beyond it is refused by that worker's Engine when the job starts: the job fails naming the field)."""
        request.validate()
        self.model(request.model)
        return self._ask_one("estimate_memory", request)

    def estimate_depth(self, model: str, photo, name: str = "hint"):
        """The depth image of `photo` by `model`'s estimator, on a free worker if there is one."""
        spec = self.model(model)
        check_image(name, photo)
        return self._ask_one("estimate_depth", spec.key, photo, name)

    def _ask_one(self, method: str, *args):
        """`method(*args)` on a free worker if there is one (its Engine runs it between jobs otherwise);
        the worker's own exception (a ValueError naming a field) is raised here as it is."""
        import ray

        with self._lock:
            ready = [w for w in self.workers if w.state == "ready"] or self.workers
            worker = min(ready, key=lambda w: (w.running is not None, w.jobs_done))
        try:
            return ray.get(getattr(worker.handle, method).remote(*args))
        except ray.exceptions.RayTaskError as error:
            raise ray_pool.cause_exception(error) from None
        except ray.exceptions.RayActorError:
            raise RuntimeError(f"{worker.label} stopped while answering; try again") from None

    def shutdown(self) -> None:
        """Stop every job and the workers (and Ray, when this process started it)."""
        with self._lock:
            self._stopping = True
            waiting, self._waiting = self._waiting, []
            running = [w.running.job for w in self.workers if w.running]
            threads = list(self._threads)
        for dispatch in waiting:
            dispatch.job.emit(Cancelled())
        for job in running:
            job.cancel()
        for thread in threads:
            thread.join(10.0)
        ray_pool.stop(self.workers)
        if self._started_ray:
            import ray

            ray.shutdown()
