"""The issue-16 probes of Stop, cancel and fairness against `python app.py --demo`, run from a checkout:

    python tools/probe_stop.py            # this checkout's app
    (cd ../other-checkout && python /path/to/tools/probe_stop.py)   # another one, same probes

Prints one line per probe: Stop right after Generate, gradio_client's job.cancel(), a killed client, Stop among
50 requests, 60 requests of one client against one of another. Demo models, 64x64 images.
"""
from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())
from gradio_client import Client  # noqa: E402

from tests.ui.server import AppServer  # noqa: E402  (the checkout's own)

LONG = dict(width=64, height=64, num_inference_steps=200, prior_num_inference_steps=2, preview="fast")


def owner_id(name):
    return hashlib.md5(name.encode()).hexdigest()


def state(job):
    text = job.outputs()[-1][1] if job.outputs() else ""
    return "stopped" if 'data-state="stopped"' in text else "done" if 'data-state="done"' in text else "other"


def images(server, owner):
    return [p.name for p in server.owner_images().get(owner, [])]


def wait(predicate, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def stepping(job):
    return any("Denoising: step" in u[1] for u in job.outputs())


def main():
    server = AppServer(Path(tempfile.mkdtemp()))
    client = Client(server.url, verbose=False)
    try:
        outcomes = []
        for i in range(5):
            owner = owner_id(f"race{i}")
            job = client.submit(owner=owner, prompt="race", seed=i, **LONG, api_name="/text2img")
            while job.communicator.event_id is None:
                time.sleep(0.001)
            answer = client.predict(owner=owner, api_name="/stop")
            job.result(timeout=120)
            outcomes.append(f"{state(job)} ({answer})")
        print("Stop right after Generate x5:", "; ".join(outcomes))

        owner = owner_id("cancel")
        job = client.submit(owner=owner, prompt="cancel", seed=1, **LONG, api_name="/text2img")
        wait(lambda: stepping(job), 60)
        start = time.monotonic()
        job.cancel()
        wait(lambda: images(server, owner), 60)
        print(f"job.cancel(): {images(server, owner)} after {time.monotonic() - start:.2f} s")

        owner = owner_id("killed")
        script = textwrap.dedent(f"""
            import time
            from gradio_client import Client
            job = Client({server.url!r}, verbose=False).submit(owner={owner!r}, prompt="orphan", seed=3,
                                                               api_name="/text2img", **{LONG!r})
            while not any("Denoising: step" in u[1] for u in job.outputs()):
                time.sleep(0.05)
            print("stepping", flush=True)
            time.sleep(600)
        """)
        process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        process.stdout.readline()
        start = time.monotonic()
        process.send_signal(signal.SIGKILL)
        process.wait()
        wait(lambda: images(server, owner), 120)
        print(f"killed client: {images(server, owner)} after {time.monotonic() - start:.1f} s")

        owners = [owner_id(f"crowd{i}") for i in range(13)]
        clients = [client, Client(server.url, verbose=False)]
        jobs = [clients[i % 2].submit(owner=owners[i % 13], prompt="crowd", seed=i, **LONG, api_name="/text2img")
                for i in range(50)]
        wait(lambda: any(stepping(j) for j in jobs), 120)
        time.sleep(3)
        start = time.monotonic()
        answer = client.predict(owner=owners[5], api_name="/stop")
        print(f"Stop among 50 requests: {answer!r} in {(time.monotonic() - start) * 1000:.0f} ms; "
              f"{sum(1 for j in jobs if j.outputs())} of 50 had an update")
        for o in owners:
            client.predict(owner=o, api_name="/stop")
        for j in jobs:
            try:
                j.result(timeout=120)
            except Exception:
                pass

        greedy, polite = owner_id("greedy"), owner_id("polite")
        jobs = [client.submit(owner=greedy, prompt="g", seed=i, **dict(LONG, num_inference_steps=60, preview="off"),
                              api_name="/text2img") for i in range(60)]
        wait(lambda: any(stepping(j) for j in jobs), 120)
        mine = clients[1].submit(owner=polite, prompt="p", seed=1, **dict(LONG, num_inference_steps=5),
                                 api_name="/text2img")
        start = time.monotonic()
        mine.result(timeout=1800)
        first = next((u[1] for u in mine.outputs() if "Waiting in line" in u[1]), "no position")
        first = " ".join(re.sub("<[^>]+>", " ", first).split())
        refused = sum(1 for j in jobs if j.done() and j.exception() is not None)
        print(f"60 + 1: polite's job done after {time.monotonic() - start:.1f} s, first position: {first!r}; "
              f"greedy images before it: {len(images(server, greedy))}; greedy requests refused: {refused}")
        client.predict(owner=greedy, api_name="/stop")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
