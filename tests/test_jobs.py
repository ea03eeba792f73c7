"""JobRunner: order, positions, stop, failures, the single engine thread; the requests' checks.

The engine here is a stand-in that "steps" with sleeps (the real pipelines are covered in
tests/test_tasks.py and the browser tests); what is tested is the runner's queueing logic.
"""
import threading
import time

import pytest
from PIL import Image

from backend.events import Cancelled, Failed, Loading, Queued, Result, Step
from backend.jobs import JobCancelled, JobRunner, OwnerLimit
from backend.requests import (ControlNetRequest, Image2ImageRequest, InpaintRequest, InterpolateRequest,
                              Text2ImageRequest)

OWNER = "0" * 32


class SteppingEngine:
    """Emits `steps` Step events `delay` s apart, checking for stop after each, like the callback,
    and ends a stopped job as the task executor does."""

    def __init__(self, steps=5, delay=0.01):
        self.steps, self.delay = steps, delay
        self.threads = set()
        self.order = []
        self.started = threading.Event()

    def __call__(self, job):
        self.threads.add(threading.get_ident())
        self.order.append(job.request.prompt)
        self.started.set()
        if job.request.prompt == "fail":
            raise RuntimeError("out of memory")
        if job.request.prompt == "bad":
            raise ValueError("width 999 is not allowed")
        job.emit(Loading("unet", 10, 20))
        try:
            for i in range(self.steps):
                time.sleep(self.delay)
                job.emit(Step("denoise", i + 1, self.steps))
                job.check_cancelled()
        except JobCancelled:
            job.emit(Cancelled(latency_s=job.stop_latency()))
            return
        job.emit(Result(images=[], seeds=[1]))


def request(prompt="a cat", **kw):
    return Text2ImageRequest(prompt=prompt, width=64, height=64, **kw)


@pytest.fixture
def runner():
    engine = SteppingEngine()
    runner = JobRunner(engine).start()
    runner.engine = engine
    yield runner
    runner.shutdown()


def test_events_in_order_and_one_terminal(runner):
    job = runner.submit(request(), OWNER)
    events = list(job.events(timeout=10, coalesce=False))
    assert isinstance(events[0], Queued)
    assert isinstance(events[-1], Result)
    steps = [e for e in events if isinstance(e, Step)]
    assert [s.step for s in steps] == [1, 2, 3, 4, 5]
    assert any(isinstance(e, Loading) for e in events)
    assert job.done and isinstance(job.terminal, Result)


def test_jobs_run_in_submission_order_on_one_thread(runner):
    runner.engine.delay = 0.02
    jobs = [runner.submit(request(f"job {i}"), OWNER) for i in range(4)]
    for job in jobs:
        assert isinstance(job.wait(timeout=10), Result)
    assert runner.engine.order == [f"job {i}" for i in range(4)]
    assert len(runner.engine.threads) == 1
    assert runner.engine.threads != {threading.get_ident()}


def test_waiting_jobs_see_their_position_go_down(runner):
    runner.engine.delay = 0.03
    first = runner.submit(request("first"), OWNER)
    runner.engine.started.wait(5)
    second = runner.submit(request("second"), OWNER)
    third = runner.submit(request("third"), OWNER)
    positions = [e.position for e in third.events(timeout=10) if isinstance(e, Queued)]
    # the latest status first (2 ahead: first running, second waiting), then 1, then 0
    assert positions == [2, 1, 0]
    assert isinstance(first.wait(10), Result) and isinstance(second.wait(10), Result)


def test_stop_ends_a_running_job_within_one_step(runner):
    runner.engine.steps, runner.engine.delay = 200, 0.02
    job = runner.submit(request(), OWNER)
    for event in job.events(timeout=10):
        if isinstance(event, Step) and event.step == 3:
            job.cancel()
            break
    end = job.wait(timeout=10)
    assert isinstance(end, Cancelled)
    assert end.latency_s is not None and end.latency_s < 0.5  # one step is 0.02 s
    # the engine moved on to the next job
    runner.engine.steps = 3
    assert isinstance(runner.submit(request("next"), OWNER).wait(10), Result)


def test_stop_of_a_waiting_job_removes_it_from_the_queue(runner):
    runner.engine.steps, runner.engine.delay = 20, 0.02
    first = runner.submit(request("first"), OWNER)
    second = runner.submit(request("second"), OWNER)
    third = runner.submit(request("third"), OWNER)
    second.cancel()
    assert isinstance(second.wait(5), Cancelled)
    assert isinstance(first.wait(10), Result) and isinstance(third.wait(10), Result)
    assert "second" not in runner.engine.order


def test_failures_are_reported_and_the_engine_survives(runner):
    assert runner.submit(request("fail"), OWNER).wait(10) == Failed("RuntimeError: out of memory")
    assert runner.submit(request("bad"), OWNER).wait(10) == Failed("width 999 is not allowed")
    assert isinstance(runner.submit(request(), OWNER).wait(10), Result)


def test_engine_that_forgets_the_result_still_ends_the_job():
    runner = JobRunner(lambda job: None).start()
    try:
        assert runner.submit(request(), OWNER).wait(5) == Failed("the job ended without a result")
    finally:
        runner.shutdown()


def test_call_runs_on_the_engine_thread_between_jobs(runner):
    runner.submit(request(), OWNER).wait(10)
    engine_thread = next(iter(runner.engine.threads))
    assert runner.call(threading.get_ident) == engine_thread
    with pytest.raises(KeyError):
        runner.call(lambda: {}["missing"])


def test_a_late_reader_gets_the_latest_status_and_then_the_rest(runner):
    runner.engine.steps, runner.engine.delay = 30, 0.02
    job = runner.submit(request(), OWNER)
    for event in job.events(timeout=10):
        if isinstance(event, Step) and event.step >= 5:
            break
    late = job.events(timeout=10)
    first = next(late)
    assert isinstance(first, Step) and first.step >= 5
    rest = list(late)
    assert isinstance(rest[-1], Result)
    # after the end, a reader gets the terminal event at once
    assert list(job.events(timeout=1))[-1] == job.terminal


def test_a_slow_reader_gets_only_fresh_steps(runner):
    runner.engine.steps, runner.engine.delay = 20, 0.001
    job = runner.submit(request(), OWNER)
    reader = job.events(timeout=10)
    next(reader)  # Queued
    time.sleep(0.3)  # everything happened meanwhile
    rest = list(reader)
    steps = [e for e in rest if isinstance(e, Step)]
    assert len(steps) <= 1 and isinstance(rest[-1], Result)


def test_owner_jobs_and_cancel_owner(runner):
    runner.engine.steps, runner.engine.delay = 20, 0.02
    a1 = runner.submit(request("a1"), owner="alice")
    b1 = runner.submit(request("b1"), owner="bob")
    a2 = runner.submit(request("a2"), owner="alice")
    assert [j.id for j in runner.jobs_of("alice")] == [a1.id, a2.id]
    assert runner.cancel_owner("alice") == 2
    assert isinstance(a1.wait(10), Cancelled) and isinstance(a2.wait(10), Cancelled)
    assert isinstance(b1.wait(10), Result)


def test_one_owner_may_have_a_few_jobs_and_is_told_so():
    engine = SteppingEngine(steps=50, delay=0.02)
    runner = JobRunner(engine, max_per_owner=3).start()
    try:
        jobs = [runner.submit(request(f"a{i}"), "alice") for i in range(3)]
        with pytest.raises(OwnerLimit, match=r"already have 3 jobs running or waiting, as many as one user may "
                                             r"\(3\).*Wait for one to finish, or press Stop"):
            runner.submit(request("a3"), "alice")
        other = runner.submit(request("b0"), "bob")  # the limit is per owner
        jobs[1].cancel()
        assert isinstance(jobs[1].wait(5), Cancelled)
        again = runner.submit(request("a3"), "alice")  # room again once one has ended
        assert runner.cancel_owner("alice") == 3
        for job in (jobs[0], jobs[2], again):
            assert isinstance(job.wait(10), Cancelled)
        assert isinstance(other.wait(10), Result)
    finally:
        runner.shutdown()


def test_sixty_requests_of_one_client_delay_another_by_the_running_job_only():
    """The issue's probe: one client sends 60 requests, another one; round-robin over owners starts the
    other's job right after the first client's running job, and positions say so."""
    engine = SteppingEngine(steps=10, delay=0.02)
    runner = JobRunner(engine, max_waiting=256, max_per_owner=64).start()
    try:
        greedy = [runner.submit(request(f"a{i}"), "alice") for i in range(60)]
        engine.started.wait(5)
        polite = runner.submit(request("b"), "bob")
        assert next(e for e in polite.events(timeout=5) if isinstance(e, Queued)).position == 1
        assert isinstance(polite.wait(timeout=30), Result)
        started = engine.order.index("b")
        assert started == 1, f"bob's job started after {started} of alice's"
        # alice's jobs keep their own order
        assert [name for name in engine.order if name.startswith("a")] == [f"a{i}" for i in range(len(engine.order) - 1)]
        runner.cancel_owner("alice")
        for job in greedy:
            job.wait(timeout=30)
    finally:
        runner.shutdown()


def test_round_robin_order_and_true_positions():
    engine = SteppingEngine(steps=3, delay=0.02)
    runner = JobRunner(engine, max_per_owner=10).start()
    try:
        gate = runner.submit(request("gate"), "carol")
        engine.started.wait(5)
        a = [runner.submit(request(f"a{i}"), "alice") for i in range(3)]
        b = [runner.submit(request(f"b{i}"), "bob") for i in range(2)]
        c = runner.submit(request("c0"), "carol")  # carol's job is running: her next one waits its turn
        expected = ["a0", "b0", "c0", "a1", "b1", "a2"]
        assert [j.request.prompt for j in runner.jobs_of("alice")] == ["a0", "a1", "a2"]
        by_name = {j.request.prompt: j for j in [*a, *b, c]}
        positions = {name: job.events(timeout=5).__next__().position for name, job in by_name.items()}
        assert sorted(positions, key=positions.get) == expected
        assert sorted(positions.values()) == list(range(1, 7))  # 1: the running gate job is ahead of all
        for job in [gate, *a, *b, c]:
            assert isinstance(job.wait(timeout=10), Result)
        assert engine.order == ["gate", *expected]
    finally:
        runner.shutdown()


def test_an_asyncio_reader_gets_the_same_events_without_a_thread(runner):
    import asyncio

    async def read(job):
        return [event async for event in job.aevents(coalesce=False)]

    runner.engine.delay = 0.02
    job = runner.submit(request(), OWNER)
    threads = set(threading.enumerate())
    events = asyncio.run(read(job))
    assert isinstance(events[0], Queued) and isinstance(events[-1], Result)
    assert [e.step for e in events if isinstance(e, Step)] == [1, 2, 3, 4, 5]
    assert set(threading.enumerate()) - threads == set()  # no thread was started to wait
    assert job.subscriber_count() == 0  # the reader left when the job ended


def test_bad_requests_name_the_field():
    cases = [
        (request(num_inference_steps=0), "num_inference_steps must be between 1 and 200"),
        (Text2ImageRequest(width=100, height=64), "width must be a multiple of 64"),
        (request(guidance_scale=float("nan")), "guidance_scale"),
        (request(seed=2**40), "seed must be between -1 and 4294967295"),
        (request(seed=1.5), "seed must be an integer"),
        (request(preview="sometimes"), "preview must be one of"),
        (Image2ImageRequest(width=64, height=64), "image is required"),
        (InpaintRequest(width=64, height=64, image=Image.new("RGB", (8, 8))), "mask is required"),
        (InterpolateRequest(width=64, height=64, inputs=["a"], weights=[1]), "2 to 6"),
        (InterpolateRequest(width=64, height=64, inputs=["a", "b"], weights=[0, 0]), "all be zero"),
        (InterpolateRequest(width=64, height=64, inputs=["a", " "], weights=[1, 1]), "inputs[1] is an empty"),
        (ControlNetRequest(width=64, height=64), "hint is required"),
        (ControlNetRequest(width=64, height=64, hint=Image.new("RGB", (8, 8)), mode="img2img"),
         "image is required"),
        (ControlNetRequest(width=64, height=64, hint=Image.new("RGB", (8, 8)), mode="sideways"),
         "mode must be one of ['text2img', 'img2img']"),
        (request(scheduler="euler_a"), "scheduler must be one of .*; got 'euler_a'"),
        (InterpolateRequest(width=64, height=64, inputs=["a", "b"], weights=[0.5, 2]),
         "weights[1] must be between 0.0 and 1.0; got 2.0"),
        (InpaintRequest(width=64, height=64, image=Image.new("RGB", (8, 8)), mask=Image.new("L", (8, 8)),
                        mask_grow=65), "mask_grow must be between 0 and 64"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            bad.validate()


def test_samplers_are_named_as_people_know_them_in_any_case():
    """The sampler menu's names (backend.schedulers.SAMPLERS and the repository default); a request keeps the
    name as written there, whatever case it came in ("default", the app's earlier name, too)."""
    import re

    from backend.requests import REPOSITORY_DEFAULT, SAMPLER_NAMES, SCHEDULERS, scheduler_key

    assert SAMPLER_NAMES == ("Repository default", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE Karras", "UniPC",
                             "Euler", "Euler a", "DDIM", "DDPM")
    for given, name in [("dpm++ 2m karras", "DPM++ 2M Karras"), ("EULER A", "Euler a"), (" UniPC ", "UniPC"),
                        ("ddpm", "DDPM"), ("default", REPOSITORY_DEFAULT), ("", REPOSITORY_DEFAULT),
                        ("repository DEFAULT", REPOSITORY_DEFAULT)]:
        req = request(scheduler=given)
        req.validate()
        assert req.scheduler == name and req.settings()["scheduler"] == name
        assert SCHEDULERS[scheduler_key(name)] == (None if name == REPOSITORY_DEFAULT else name)
    assert scheduler_key("DDPM") == "ddpm"  # kandinsky-2-1's own ddpm_scheduler folder is found by it
    for bad in ("heun", "euler_a", "DPM++ 2M Karras SDE", 7):
        with pytest.raises(ValueError, match=re.escape(
                "scheduler must be one of ['Repository default', 'DPM++ 2M', 'DPM++ 2M Karras', 'DPM++ 2M SDE Karras', "
                "'UniPC', 'Euler', 'Euler a', 'DDIM', 'DDPM'] (any case); got ") if bad != 7 else "scheduler must be text"):
            request(scheduler=bad).validate()


def test_every_sampler_takes_every_step_count_a_request_may_ask_for():
    """The request's bounds (1 to APP_MAX_STEPS) are every sampler's: each sets up each count on each family's
    published decoder configs (the multistep solvers take lower orders for their first and, below 15 steps,
    last steps, so one step runs; tests/test_schedulers.py test_sampler_steps_minimum). Nothing is refused
    beyond what the request refuses (0 steps), so no sampler has a minimum of its own to name."""
    import json

    from backend.limits import APP_MAX_STEPS
    from backend.schedulers import SAMPLERS, SCHEDULERS, scheduler_from_config

    for name in ("kandinsky-2-2-decoder", "kandinsky-2-1", "kandinsky-3"):
        with open(f"/work/shared/reference-configs/{name}/scheduler.json") as file:
            published = json.load(file)
        # as the app builds them: from the loaded scheduler's config (the repo's, defaults filled in), and the raw file
        for config in (published, SCHEDULERS[published["_class_name"]].from_config(published).config):
            for sampler in SAMPLERS:
                scheduler = scheduler_from_config(sampler, config)
                for steps in range(1, APP_MAX_STEPS + 1):
                    scheduler.set_timesteps(steps)
                    assert len(scheduler.timesteps) == steps, (name, sampler, steps)
    with pytest.raises(ValueError, match=f"num_inference_steps must be between 1 and {APP_MAX_STEPS}; got 0"):
        request(num_inference_steps=0, scheduler="DPM++ 2M Karras").validate()


def test_request_settings_are_json_ready():
    image = Image.new("RGB", (8, 8))
    req = InterpolateRequest(inputs=["a cat", image], weights=[0.3, 0.9], seed=5)
    req.validate()
    settings = req.settings()
    assert settings["task"] == "interpolate" and settings["seed"] == 5
    assert settings["inputs"] == ["a cat", None]
    assert settings["normalized_weights"] == [0.25, 0.75]
    assert list(req.image_fields()) == ["inputs[1]"]
    req = Text2ImageRequest(seed=-7)
    req.validate()
    assert req.seed == -1


def test_owner_ids_are_32_hex_digits():
    from backend.fields import check_owner, is_owner, new_owner

    assert is_owner(new_owner()) and check_owner("0123456789abcdef" * 2)
    for bad in ("alice", "AB" * 16, "a" * 31, "a" * 33, "a" * 32 + "\n", "../" + "a" * 29, None, 7):
        assert not is_owner(bad)
        with pytest.raises(ValueError, match="owner must be 32 hexadecimal digits"):
            check_owner(bad)
