"""The Engine on a Ray cluster (backend/cluster.py, issue 18): a local Ray instance started here with two
worker actors on the demo models, against the in-process Engine (the `engine` fixture) on the same
models: the same images for the same requests and seeds, previews and galleries per owner, jobs on
both workers, Stop across the boundary, a worker killed mid-job. Also the cluster's bad input: an
address nobody answers at, a cluster without a usable device."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from backend.cluster import ClusterEngine
from backend.engine import EngineConfig
from backend.events import Cancelled, Failed, Result, Step
from backend.jobs import OwnerLimit
from backend.metadata import read_settings
from backend.ray_setup import ClusterError, connect, plan_workers, runtime_env
from backend.requests import Image2ImageRequest, InpaintRequest, Text2ImageRequest
from kandinsky_ui.render import status_markdown

MODEL = "kandinsky-2-2-demo"
OWNERS = ["a1" * 16, "b2" * 16, "c3" * 16]
STOPPER, VICTIM = "d4" * 16, "e5" * 16


def small(**kw):
    base = dict(model=MODEL, prompt="a red cat", width=64, height=64, num_inference_steps=6,
                prior_num_inference_steps=3)
    return {**base, **kw}


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def last_preview(job, timeout=180):
    """(terminal event, the last step preview) of `job`; a reader that comes late still gets the latest
    status first: the decode step, with the last preview."""
    preview, events = None, list(job.events(timeout=timeout, coalesce=False))
    for event in events:
        if isinstance(event, Step) and event.preview is not None:
            preview = event.preview
    return events[-1], preview


def first_event(job, timeout=10):
    events = job.events(timeout=timeout)
    try:
        return next(events)
    finally:
        events.close()


def denoising_worker(cluster, job, skip=(), timeout=180):
    """Wait for a denoising step of `job` on a worker not in `skip` (a killed one may still send one);
    returns that worker."""
    events = job.events(timeout=timeout)
    try:
        for event in events:
            assert not job.done, f"the job ended: {event}"
            if isinstance(event, Step) and event.phase == "denoise":
                running = [w for w in cluster.workers if w.running and w.running.job is job and w not in skip]
                if running:
                    return running[0]
    finally:
        events.close()


@pytest.fixture(scope="module")
def cluster(engine, demo_root, tmp_path_factory):
    """Two CPU workers on one local Ray instance. Depends on `engine`, which builds the demo models the
    workers then find in the same cache (two workers building them at once would race)."""
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=runtime_env(), logging_level="WARNING")
    try:
        cluster = ClusterEngine(EngineConfig(demo=True, cache_dir=str(demo_root),
                                             outputs_dir=str(tmp_path_factory.mktemp("cluster-outputs"))),
                                cpu_workers_per_node=2)
    except BaseException:
        ray.shutdown()
        raise
    yield cluster
    cluster.shutdown()
    ray.shutdown()


def test_six_jobs_of_three_owners_equal_the_in_process_images_and_spread_over_both_workers(cluster, engine):
    requests = [Text2ImageRequest(**small(seed=10 + i, prompt=f"a red cat {i}")) for i in range(5)]
    start = Image.open(sorted(Path("assets/samples").glob("*.png"))[0]).convert("RGB").resize((64, 64))
    requests.append(Image2ImageRequest(**small(seed=20, image=start, strength=0.6)))
    jobs = [cluster.submit(request, OWNERS[i % 3]) for i, request in enumerate(requests)]
    results = [last_preview(job) for job in jobs]
    expected = [last_preview(engine.submit(request, OWNERS[i % 3])) for i, request in enumerate(requests)]

    for (end, preview), (reference, reference_preview), job in zip(results, expected, jobs):
        assert isinstance(end, Result), end
        assert isinstance(reference, Result), reference
        (image,), (in_process,) = end.images, reference.images
        assert np.array_equal(pixels(image.image), pixels(in_process.image)), f"job {job.id}: another image"
        # the file the front end saved: the same pixels, and the settings the in-process engine writes
        assert np.array_equal(pixels(Image.open(image.path)), pixels(in_process.image))
        saved, reference_settings = read_settings(image.path), read_settings(in_process.path)
        assert {k: v for k, v in saved.items() if k != "created"} == \
            {k: v for k, v in reference_settings.items() if k != "created"}

    # previews: each job streamed its own. The in-process previews are the nearest match (not equal: each
    # engine fits its preview colours itself, and a fit on another thread count differs in the last bits)
    for index, (_, preview) in enumerate(results):
        distances = [np.abs(pixels(preview).astype(int) - pixels(reference_preview)).mean()
                     for _, reference_preview in expected]
        assert int(np.argmin(distances)) == index and distances[index] < 3, distances

    # galleries: each owner sees exactly its own two images, in its own folder of the front end's outputs
    for index, owner in enumerate(OWNERS):
        mine = {r[0].images[0].path for r in results[index::3]}
        assert set(cluster.store.list(owner)) == mine
    # the image-to-image input is stored with the owner's images, where the PNG's reference points
    reference = read_settings(results[5][0].images[0].path)["input_images"]["image"]
    assert cluster.store.input_path(OWNERS[2], reference).is_file()

    workers = {timing["worker"] for timing in cluster.timings if timing["job"] in {job.id for job in jobs}}
    assert workers == {"worker-1", "worker-2"}


def test_a_model_a_worker_cannot_load_fails_its_job_naming_the_file(cluster):
    weights = Path(cluster.models[MODEL].repos["inpaint"]) / "unet" / "diffusion_pytorch_model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 2])  # the workers' own copy: this machine's cache folder
    try:
        image = Image.new("RGB", (64, 64), "gray")
        end = cluster.submit(InpaintRequest(**small(seed=1, image=image, mask=image)), OWNERS[0]).wait(timeout=120)
    finally:
        weights.write_bytes(intact)
    assert isinstance(end, Failed), end
    assert str(weights) in end.message and "truncated" in end.message, end.message


def test_status_lists_each_worker_with_its_node_device_and_models(cluster):
    status = cluster.status()
    assert [w["name"] for w in status["workers"]] == ["worker-1", "worker-2"]
    for worker in status["workers"]:
        assert worker["device"] == "CPU" and worker["dtype"] == cluster.dtype and worker["node"]
        assert worker["state"] in ("idle", "restarting") or worker["state"].startswith("running")
    page = status_markdown(status)
    assert "worker-1" in page and "worker-2" in page and "CPU" in page
    loaded = [unit["source"] for worker in status["workers"] for unit in worker["units"]]
    assert any("kandinsky-2-2-demo" in source for source in loaded), loaded


def test_depth_and_memory_estimates_come_from_a_worker_as_in_process(cluster, engine):
    photo = Image.open("assets/samples/landscape.png").convert("RGB").resize((128, 96))
    depth, reference = cluster.estimate_depth(MODEL, photo, "hint"), engine.estimate_depth(MODEL, photo, "hint")
    assert depth.size == reference.size
    assert np.abs(np.asarray(depth, np.int16) - np.asarray(reference, np.int16)).max() <= 1
    with pytest.raises(ValueError, match="hint"):  # the worker's own error, naming the field
        cluster.estimate_depth(MODEL, Image.new("RGB", (4, 4)), "hint")
    request = Text2ImageRequest(**small(width=512, height=512, batch_size=2))
    assert cluster.estimate_memory(request).as_dict() == engine.estimate_memory(request).as_dict()


def test_stop_across_the_boundary_keeps_the_partial_image_in_the_owners_gallery(cluster):
    job = cluster.submit(Text2ImageRequest(**small(seed=3, num_inference_steps=200, batch_count=4)), STOPPER)
    denoising_worker(cluster, job)
    assert cluster.cancel(STOPPER) == 1
    end = job.wait(timeout=10)  # as in process: the job ends after the step in progress
    assert isinstance(end, Cancelled), end
    assert end.latency_s is not None and end.latency_s < 10
    (partial,) = end.partials
    assert partial.partial and partial.path in cluster.store.list(STOPPER)
    assert read_settings(partial.path)["stopped_at_step"] < 200
    assert cluster.jobs_of(STOPPER) == []


def test_a_waiting_job_stopped_before_a_worker_took_it_never_runs(cluster):
    long = [cluster.submit(Text2ImageRequest(**small(seed=s, num_inference_steps=200, batch_count=4)), OWNERS[s])
            for s in (0, 1)]
    waiting = cluster.submit(Text2ImageRequest(**small(seed=7)), STOPPER)
    assert first_event(waiting).position == 2  # both workers busy: two jobs ahead
    waiting.cancel()
    assert isinstance(waiting.wait(timeout=10), Cancelled)
    for job in long:
        job.cancel()
        assert isinstance(job.wait(timeout=30), Cancelled)
    assert waiting.started_at is None


def test_one_owner_may_have_as_many_jobs_on_the_cluster_as_in_process(cluster):
    jobs = [cluster.submit(Text2ImageRequest(**small(seed=s, num_inference_steps=200, batch_count=4)), STOPPER)
            for s in range(cluster.config.max_per_owner)]
    with pytest.raises(OwnerLimit, match="as many as one user may"):
        cluster.submit(Text2ImageRequest(**small(seed=9)), STOPPER)
    assert cluster.jobs_of(STOPPER) == jobs  # the two running (one per worker), then the two waiting, in order
    assert cluster.cancel(STOPPER) == len(jobs)
    for job in jobs:
        assert isinstance(job.wait(timeout=30), Cancelled)


def test_a_worker_killed_mid_job_hands_the_job_to_the_other_one_with_the_same_image(cluster, engine):
    request = Text2ImageRequest(**small(seed=-1, num_inference_steps=200))
    job = cluster.submit(request, VICTIM)
    victim = denoising_worker(cluster, job)
    ray.kill(victim.handle, no_restart=False)  # Ray restarts it (max_restarts)

    end = job.wait(timeout=180)
    assert isinstance(end, Result), end
    assert any("stopped during this job" in note and victim.name in note for note in end.notes), end.notes
    (timing,) = [t for t in cluster.timings if t["job"] == job.id]
    assert timing["worker"] != victim.name
    # the seed was drawn before the first try: the retry made the image that seed makes in process
    (image,) = end.images
    assert image.path in cluster.store.list(VICTIM)
    seed = read_settings(image.path)["seed"]
    reference = engine.submit(Text2ImageRequest(**small(seed=seed, num_inference_steps=200)), VICTIM).wait(120)
    assert np.array_equal(pixels(image.image), pixels(reference.images[0].image))

    assert cluster.wait_for_workers(timeout=300)
    assert victim.state == "ready"


def test_a_job_whose_workers_both_die_fails_with_a_message_naming_them(cluster):
    assert cluster.wait_for_workers(timeout=300)
    job = cluster.submit(Text2ImageRequest(**small(seed=5, num_inference_steps=200, batch_count=4)), VICTIM)
    killed = []
    for _ in range(2):  # the first worker, then the one it was handed to
        worker = denoising_worker(cluster, job, skip=killed)
        killed.append(worker)
        ray.kill(worker.handle, no_restart=False)
    end = job.wait(timeout=120)
    assert isinstance(end, Failed), end
    assert all(worker.name in end.message for worker in killed) and "process ended" in end.message
    assert cluster.wait_for_workers(timeout=300)  # and the cluster takes jobs again
    again = cluster.submit(Text2ImageRequest(**small(seed=5)), VICTIM).wait(timeout=180)
    assert isinstance(again, Result), again


# ------------------------------------------------------------------------------ bad input

def test_an_address_nobody_answers_at_fails_at_once_with_how_to_start_a_cluster(tmp_path):
    with pytest.raises(ClusterError, match="HOST:PORT"):
        connect("nowhere")
    app = subprocess.run([sys.executable, "app.py", "--demo", "--ray", "127.0.0.1:1", "--outputs-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert app.returncode == 1
    message = app.stderr.strip().splitlines()[-1]
    assert message.startswith("--ray 127.0.0.1:1: no Ray cluster answers there (Connection refused)")
    assert "ray start --head" in message and "--ray local" in message


def node(cpus=0, gpus=0, npus=0, alive=True, address="10.0.0.5"):
    return {"NodeID": address, "NodeManagerAddress": address, "Alive": alive,
            "Resources": {"CPU": cpus, "GPU": gpus, "NPU": npus, "memory": 8e9}}


def test_one_worker_per_gpu_per_npu_or_per_cpu_node():
    plans = plan_workers([node(cpus=8, gpus=2, address="gpu"), node(cpus=4, npus=1, address="npu"),
                          node(cpus=16, address="cpu"), node(cpus=64, alive=False, address="gone")])
    assert [(p.name, p.node, p.device) for p in plans] == [
        ("worker-1", "gpu", "gpu"), ("worker-2", "gpu", "gpu"), ("worker-3", "npu", "ascend"),
        ("worker-4", "cpu", "cpu")]
    assert plans[0].num_gpus == 1 and plans[2].resources == {"NPU": 1} and plans[3].num_cpus == 16
    split = plan_workers([node(cpus=16)], cpu_workers_per_node=4)
    assert [(p.num_cpus, p.memory_share) for p in split] == [(4, 4)] * 4
    assert [p.device for p in plan_workers([node(cpus=8, gpus=2)], device="cpu")] == ["cpu"]


def test_a_cluster_without_a_usable_device_says_so():
    with pytest.raises(ClusterError, match="no device the models can use with --device gpu") as error:
        plan_workers([node(cpus=8, address="10.0.0.7")], device="gpu")
    assert "10.0.0.7: 8 CPU, 0 GPU, 0 NPU" in str(error.value)
    with pytest.raises(ClusterError, match="no device"):
        plan_workers([node(cpus=0)])
