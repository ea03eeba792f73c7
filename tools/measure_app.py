"""Measure what the app promises: preview overhead (<= 10% of a run) and stop latency (one step).

    python tools/measure_app.py                      # demo models, CPU
    python tools/measure_app.py --sizes 64 256 --stops 10

Runs the real JobRunner + TaskExecutor on the demo models (backend/demo.py), so the numbers
include everything the app does per step: the step callback, the preview (linear map of x0 and
its upscale), the Step event. It also times the preview alone at the latent sizes of the real
models (512x512 -> 64x64 latents, 768x768 -> 96x96), to compare with a real UNet step.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend import demo, previews  # noqa: E402
from backend.jobs import Cancelled, JobRunner, Result, Step, Text2ImageRequest  # noqa: E402
from backend.manager import ModelManager  # noqa: E402
from backend.metadata import OutputStore  # noqa: E402
from backend.tasks import TaskExecutor  # noqa: E402

# diffusers, real kandinsky-2-2-decoder UNet, 512x512 with guidance, this CPU (DESIGN.md)
REAL_UNET_STEP_512_S = 11.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--stops", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "gpu", "ascend"])
    parser.add_argument("--work", default=None, help="folder for demo models and outputs (default: a temp dir)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="ks-measure-"))

    holder = {}
    runner = JobRunner(lambda job: holder["run"](job)).start()
    from backend.device import select_device
    print("device:", runner.call(select_device, args.device))
    spec = runner.call(demo.ensure_demo_models, work / "models")
    manager = ModelManager({spec.key: spec}, factors_dir=work / "factors", device=args.device)
    holder["run"] = TaskExecutor(manager, OutputStore(work / "outputs"))

    def run(**kw):
        request = Text2ImageRequest(model=spec.key, prompt="a red cat", prior_num_inference_steps=2, seed=1, **kw)
        return runner.submit(request, "measure").wait(timeout=600)

    run(width=64, height=64, num_inference_steps=2)  # load, fit the preview factors, warm up
    print(f"## Preview overhead (demo models, {args.steps} decoder steps, a preview at every step)")
    print("| size | preview | run s | preview s | share |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        run(width=size, height=size, num_inference_steps=2)  # warm up this shape
        for mode in ("fast", "off", "decode"):
            end = run(width=size, height=size, num_inference_steps=args.steps, preview=mode)
            assert isinstance(end, Result), end
            print(f"| {size}x{size} | {mode} | {end.elapsed_s:.2f} | {end.preview_s:.3f} | "
                  f"{100 * end.preview_s / end.elapsed_s:.1f}% |")

    factors = next(iter(previews.PreviewFactorCache(work / "factors")._memory.values()), None) or \
        manager.preview_factors("text2img", spec.key, manager.pipeline("text2img", spec.key))
    print("\n## Preview alone at the real models' latent sizes (linear map + upscale to 256 px)")
    for side, pixels in ((64, 512), (96, 768), (128, 1024)):
        x0 = np.random.default_rng(0).standard_normal((1, 4, side, side)).astype(np.float32)
        previews.preview_image(x0, factors)
        started = time.perf_counter()
        for _ in range(50):
            previews.preview_image(x0, factors)
        cost = (time.perf_counter() - started) / 50
        line = f"- {pixels}x{pixels} ({side}x{side} latents): {1000 * cost:.2f} ms per preview"
        if pixels == 512:
            line += f" = {100 * cost / REAL_UNET_STEP_512_S:.3f}% of a real UNet step ({REAL_UNET_STEP_512_S:.0f} s)"
        print(line)

    size = max(args.sizes)
    print(f"\n## Stop latency (demo models, {size}x{size}, Stop after step 3..)")
    latencies, step_times = [], []
    for attempt in range(args.stops):
        job = runner.submit(Text2ImageRequest(model=spec.key, prompt="a red cat", width=size, height=size,
                                              num_inference_steps=500, prior_num_inference_steps=2, seed=attempt),
                            "measure")
        times = []
        for event in job.events(timeout=600):
            if isinstance(event, Step) and event.phase == "decoder":
                times.append(time.monotonic())
                if event.step >= 3 + attempt:
                    job.cancel()
                    break
        end = job.wait(timeout=600)
        assert isinstance(end, Cancelled) and end.partials, end
        latencies.append(end.latency_s)
        step_times.append(statistics.median(np.diff(times)))
    print(f"- cancel() -> Cancelled event: median {1000 * statistics.median(latencies):.0f} ms, "
          f"max {1000 * max(latencies):.0f} ms over {args.stops} stops")
    print(f"- one decoder step (with its preview): median {1000 * statistics.median(step_times):.0f} ms")
    print("- every stop kept the last preview as a partial image")
    runner.shutdown()


if __name__ == "__main__":
    main()
