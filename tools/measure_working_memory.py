"""The working memory of one app job, measured: how much its peak RSS rises above the RSS with the
models loaded, against what backend/working_memory.py estimates for it.

    python tools/measure_working_memory.py 2.2:text2img@1024 2.2:text2img@2048 3:text2img@2048 \
        2.2:img2img@2048 2.2:text2img@1024x2

A case is FAMILY:TASK@SIZE[xBATCH] (TASK text2img or img2img; SIZE the side of a square image; BATCH
the request's batch_size, default 1), on the demo models (tiny random weights, backend/demo.py; built
once under --cache). Each case runs in a fresh process: an Engine with that family's demo model runs
the job once at 64x64 (every unit loads, the preview colours are fitted), then RSS is read
("resident") and the process's peak RSS is reset to it, then the job runs at the case's size, 1 decoder
step, and the peak RSS (VmHWM) is read: working = peak - resident. The demo models' parameters are a few MB, so the
rise is the activations: the MoVQ decode at full resolution (the estimate's figure).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASE = re.compile(r"(?P<family>[\d.]+):(?P<task>text2img|img2img)@(?P<size>\d+)(x(?P<batch>\d+))?")


def peak_rss() -> int:
    """Bytes: the peak resident set size since the last reset (VmHWM of /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024   # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(case: str, cache: str) -> dict:
    """Runs in the child process: one case, as a dict of figures."""
    import psutil
    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from backend.engine import Engine, EngineConfig
    from backend.events import Result
    from backend.requests import Image2ImageRequest, Text2ImageRequest

    match = CASE.fullmatch(case)
    family, task, size, batch = match["family"], match["task"], int(match["size"]), int(match["batch"] or 1)
    outputs = Path(cache) / "outputs"
    # no refusal here: the point is to measure what the estimate would refuse too
    engine = Engine(EngineConfig(families=(family,), demo=True, cache_dir=cache, outputs_dir=str(outputs),
                                 memory_limit=10**15))
    model = next(iter(engine.models))
    photo = Image.open(ROOT / "assets" / "samples" / "landscape.png").convert("RGB")

    def request(side: int, images: int):
        common = dict(model=model, prompt="a red cat", width=side, height=side, num_inference_steps=1,
                      prior_num_inference_steps=2, batch_size=images, seed=1, preview="fast")
        if task == "img2img":
            return Image2ImageRequest(**common, image=photo, strength=1.0)
        return Text2ImageRequest(**common)

    def run(side: int, images: int) -> float:
        started = time.monotonic()
        job = engine.submit(request(side, images), "0" * 32)
        end = list(job.events(timeout=3600))[-1]
        assert isinstance(end, Result), end
        return time.monotonic() - started

    try:
        run(64, 1)
        # the process's peak so far (building the demo models, loading) is not the job's: Linux resets the
        # peak RSS (VmHWM) to the current RSS when "5" is written to clear_refs
        Path("/proc/self/clear_refs").write_text("5")
        resident = psutil.Process().memory_info().rss
        seconds = run(size, batch)
        peak = peak_rss()
        estimate = engine.estimate_memory(request(size, batch))
    finally:
        engine.shutdown()
    return {"case": case, "resident_gb": resident / 1e9, "peak_gb": peak / 1e9,
            "working_gb": (peak - resident) / 1e9, "estimate_gb": estimate.working / 1e9,
            "estimate_call": estimate.largest_call, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="+", help="FAMILY:TASK@SIZE[xBATCH], e.g. 2.2:text2img@2048")
    parser.add_argument("--cache", default="/tmp/kandinsky-working-memory", help="demo models and outputs")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.cases[0], args.cache)))
        return
    for case in args.cases:
        if not CASE.fullmatch(case):
            parser.error(f"a case looks like 2.2:text2img@2048 or 3:img2img@1024x2; got {case!r}")
    print("| case | resident GB | peak GB | working GB (measured) | estimate GB | estimate / measured | job s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for case in args.cases:
        out = subprocess.run([sys.executable, __file__, "--child", "--cache", args.cache, case], check=True,
                             capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {r['case']} | {r['resident_gb']:.2f} | {r['peak_gb']:.2f} | {r['working_gb']:.2f} | "
              f"{r['estimate_gb']:.2f} ({r['estimate_call']}) | {r['estimate_gb'] / r['working_gb']:.2f} | "
              f"{r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
