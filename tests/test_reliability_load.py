"""Many users at once on `python app.py --demo`: 8 gradio_client clients submit 3 jobs each while
3 more start long jobs and stop them at random moments.

Each client has its own owner id, image size (so its own preview shape: the previews keep the
aspect ratio), step count (so its own "step k/N" lines) and seeds. All 24 jobs must finish with
their own seed; every progress line, preview and gallery a client receives must be its own; the
queue positions must be reported; the stopped jobs must end and leave the engine free; and the
server's memory after the run must be within 10% of before. The figures are printed (-s).
"""
from __future__ import annotations

import hashlib
import random
import re
import threading
import time

import psutil
from gradio_client import Client
from PIL import Image

from backend.metadata import read_settings

CLIENTS = 8
JOBS_PER_CLIENT = 3
STOPPERS = 3
# one aspect ratio per client: its previews (long side fixed, aspect kept) can only be its own
SIZES = [(64, 64), (128, 64), (64, 128), (192, 64), (64, 192), (192, 128), (128, 192), (256, 64)]
STEP_RE = re.compile(r"Denoising: step (\d+)/(\d+)")
QUEUE_RE = re.compile(r"Waiting in line: (\d+) jobs? ahead")


def owner_id(name: str) -> str:
    return hashlib.md5(name.encode()).hexdigest()


def rss(server) -> int:
    return psutil.Process(server.process.pid).memory_info().rss


def idle(client, timeout=30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "running: none · waiting: 0" in client.predict(api_name="/models_status"):
            return True
        time.sleep(0.1)
    return False


def run_client(url: str, index: int, record: dict) -> None:
    client = Client(url, verbose=False)
    owner = owner_id(f"client-{index}")
    width, height = SIZES[index]
    steps = 3 + index
    for j in range(JOBS_PER_CLIENT):
        seed = 1000 * index + j
        job = client.submit(owner=owner, prompt=f"client {index} job {j}", seed=seed, width=width, height=height,
                            num_inference_steps=steps, prior_num_inference_steps=2, preview="fast",
                            api_name="/text2img")
        job.result(timeout=300)
        record["jobs"].append((index, j, seed, job.outputs()))


def run_stopper(url: str, index: int, delay: float, record: dict) -> None:
    client = Client(url, verbose=False)
    owner = owner_id(f"stopper-{index}")
    job = client.submit(owner=owner, prompt=f"stopper {index}", seed=7, width=128, height=128,
                        num_inference_steps=200, prior_num_inference_steps=2, api_name="/text2img")
    time.sleep(delay)
    answer = client.predict(owner=owner, api_name="/stop")
    job.result(timeout=300)
    stopped = job.outputs()[-1]
    # the same client goes on: its next job must run to the end
    after = client.predict(owner=owner, prompt=f"stopper {index} again", seed=8, width=64, height=64,
                           num_inference_steps=3, prior_num_inference_steps=2, api_name="/text2img")
    record["stops"].append((index, delay, answer, stopped[1], after[1]))


def test_eight_clients_three_jobs_each_with_random_stops(server):
    url = server.url
    warm = Client(url, verbose=False)
    # warm-up: load the models and fit the preview colours, one job per size, before measuring memory
    for width, height in SIZES:
        warm.predict(owner=owner_id("warm"), prompt="warm-up", width=width, height=height, num_inference_steps=3,
                     prior_num_inference_steps=2, api_name="/text2img")
    assert idle(warm)
    rss_before = rss(server)
    record: dict = {"jobs": [], "stops": []}
    rng = random.Random(7)
    threads = [threading.Thread(target=run_client, args=(url, i, record)) for i in range(CLIENTS)]
    threads += [threading.Thread(target=run_stopper, args=(url, i, rng.uniform(0.0, 3.0), record))
                for i in range(STOPPERS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    elapsed = time.monotonic() - started
    assert not any(thread.is_alive() for thread in threads), "a client never got its answer"

    # every job finished, with its own seed, progress lines, previews and gallery
    assert len(record["jobs"]) == CLIENTS * JOBS_PER_CLIENT
    max_position, previews = 0, 0
    for index, j, seed, outputs in record["jobs"]:
        width, height = SIZES[index]
        owner, final_text, _, gallery, seeds = outputs[-1]
        assert owner == owner_id(f"client-{index}") and 'data-state="done"' in final_text and seeds == str(seed)
        for update in outputs:
            for step, total in STEP_RE.findall(update[1]):
                assert int(total) == 3 + index, (index, update[1])
            positions = [int(p) for p in QUEUE_RE.findall(update[1])]
            max_position = max([max_position, *positions])
            if update[2] is not None and STEP_RE.search(update[1]):
                preview = Image.open(update[2]["path"] if isinstance(update[2], dict) else update[2])
                assert abs(preview.width / preview.height - width / height) < 0.05, (index, preview.size)
                previews += 1
        shown = {item["caption"] for item in gallery}
        assert shown == {f"seed {1000 * index + k}" for k in range(j + 1)}, (index, j, shown)
    assert max_position >= 3, f"queue positions were not reported (max {max_position})"

    # on disk: each owner's folder holds exactly its own images, with its own settings
    images = server.owner_images()
    for index in range(CLIENTS):
        files = images[owner_id(f"client-{index}")]
        settings = sorted((read_settings(p) for p in files), key=lambda s: s["seed"])
        assert [(s["seed"], s["prompt"], s["width"], s["height"]) for s in settings] == \
            [(1000 * index + j, f"client {index} job {j}", *SIZES[index]) for j in range(JOBS_PER_CLIENT)]

    # the stopped jobs ended, and their clients' next jobs ran
    assert len(record["stops"]) == STOPPERS
    for index, delay, answer, stopped_text, after_text in record["stops"]:
        assert "Stopping" in answer or "Nothing of yours" in answer, answer
        assert 'data-state="stopped"' in stopped_text or 'data-state="done"' in stopped_text, stopped_text
        assert 'data-state="done"' in after_text, after_text
    assert idle(warm), warm.predict(api_name="/models_status")
    outcomes = ["queued" if "before any preview" in text else re.sub(r".*at step (\d+/\d+).*", r"step \1", text)
                if "stopped" in text else "finished" for _, _, _, text, _ in record["stops"]]

    rss_after = rss(server)
    growth = rss_after / rss_before - 1
    print(f"\nload: {CLIENTS} clients x {JOBS_PER_CLIENT} jobs + {STOPPERS} stopped jobs in {elapsed:.1f} s; "
          f"{previews} previews checked; max queue position {max_position}; stop delays "
          f"{[round(d, 2) for _, d, *_ in record['stops']]} -> {outcomes}; RSS {rss_before / 2**20:.0f} -> "
          f"{rss_after / 2**20:.0f} MB ({100 * growth:+.1f}%)")
    assert growth < 0.10, f"server memory grew by {100 * growth:.1f}%"
