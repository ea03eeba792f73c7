"""Measure what the app promises: preview overhead (<= 10% of a run) and stop latency (one step).

    python tools/measure_app.py                      # demo models, CPU
    python tools/measure_app.py --sizes 64 256 --stops 10
    python tools/measure_app.py --real-size [--steps 3]   # real-size 2.2 decoder, 512x512

--real-size: the decoder folder holds the real kandinsky-2-2-decoder UNet (1.25 B parameters) and
MoVQ configs with random weights (the checkpoints tools/bench_suite.py writes into
/tmp/kandinsky-bench, built there if missing), the prior is the demo's tiny prior with its
embedding widened to the real 1280 (the real prior stage is measured by bench_suite.py). It
times, at 512x512 with classifier-free guidance (batch 2 per UNet step): Generate -> first
preview, the run with previews "fast" / "off" / "decode" (preview overhead), and Stop ->
Cancelled. Needs ~7 GB of memory.

Runs the app's Engine (backend/engine.py) on the demo models (backend/demo.py), so the numbers
include everything the app does per step: the step callback, the preview (linear map of x0 and
its upscale), the Step event. It also times the preview alone at the latent sizes of the real
models (512x512 -> 64x64 latents, 768x768 -> 96x96), to compare with a real UNet step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend import demo, previews  # noqa: E402
from backend.engine import Engine, EngineConfig  # noqa: E402
from backend.events import Cancelled, Result, Step  # noqa: E402
from backend.requests import Text2ImageRequest  # noqa: E402
from reference_env import TORCH_PYTHON  # noqa: E402

OWNER = "3ea5" * 8

# diffusers, real kandinsky-2-2-decoder UNet, 512x512 with guidance, this CPU, quiet (docs/PERFORMANCE.md)
REAL_UNET_STEP_512_S = 5.2
BENCH_DIR = Path("/tmp/kandinsky-bench")
CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "reference-configs"
if not CONFIGS.exists():
    CONFIGS = Path("/work/shared/reference-configs")
REAL_EMBED_DIM = 1280  # CLIP-bigG projection = the decoder UNet's encoder_hid_dim


def real_size_models(work: Path, bench_dir: Path) -> Path:
    """A models folder (--models-dir) with a 2.2 decoder that is real-size (random weights) and a
    tiny prior (1280-d), under the names of the published repos."""
    import dataclasses
    import json
    import subprocess

    if not all((bench_dir / name / "config.json").exists() for name in ("unet", "movq")):
        subprocess.run([TORCH_PYTHON, str(Path(__file__).parent / "bench_suite.py"), "--prepare",
                        "unet,movq", "--work", str(bench_dir)], check=True)
    base = work / "kandinsky-2-2-realsize"
    decoder, prior = base / "decoder", base / "prior"
    if not (base / "complete.json").exists():
        # tiny prior: the demo's, with the embedding the real decoder expects
        folders = demo.DEMO_FOLDERS["2.2"]
        # the prior reads the text encoder's token states (hidden_size) and embeddings at the same width
        widths = {"prior": ("embedding_dim",), "text_encoder": ("projection_dim", "hidden_size"),
                  "image_encoder": ("projection_dim",)}
        wide = {name: (lib, cls, dict(config, **{key: REAL_EMBED_DIM for key in widths.get(name, ())}), weights)
                for name, (lib, cls, config, weights) in folders["prior"].components.items()}
        demo.DEMO_FOLDERS["2.2"] = dict(folders, prior=dataclasses.replace(folders["prior"], components=wide))
        try:
            demo.build_folder(prior, "prior", 1, "2.2")
        finally:
            demo.DEMO_FOLDERS["2.2"] = folders
        index = {"_class_name": "KandinskyV22Pipeline", "_diffusers_version": "0.35.2",
                 "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
                 "movq": ["diffusers", "VQModel"]}
        (decoder / "scheduler").mkdir(parents=True, exist_ok=True)
        (decoder / "model_index.json").write_text(json.dumps(index, indent=2))
        (decoder / "scheduler" / "scheduler_config.json").write_text(
            (CONFIGS / "kandinsky-2-2-decoder" / "scheduler.json").read_text())
        for name in ("unet", "movq"):  # links to the benchmark's checkpoints (5 GB: not copied)
            (decoder / name).mkdir(exist_ok=True)
            for file in (bench_dir / name).iterdir():
                link = decoder / name / file.name
                if not link.exists():
                    link.symlink_to(file)
        (base / "complete.json").write_text("{}")
    models = work / "models-dir"
    models.mkdir(exist_ok=True)
    for folder, name in ((prior, "kandinsky-2-2-prior"), (decoder, "kandinsky-2-2-decoder")):
        if not (models / name).exists():
            (models / name).symlink_to(folder, target_is_directory=True)
    return models


def measure_real_size(work: Path, steps: int, stops: int, bench_dir: Path) -> None:
    import os

    models = real_size_models(work / "models", bench_dir)
    engine = Engine(EngineConfig(families=("2.2",), device="cpu", models_dir=str(models), offline=True,
                                 outputs_dir=str(work / "outputs")))
    model = next(iter(engine.models))

    def request(**kw):
        return Text2ImageRequest(model=model, prompt="a red cat", width=512, height=512,
                                 prior_num_inference_steps=2, seed=1, **kw)

    def load():
        return " ".join(f"{x:.1f}" for x in os.getloadavg())

    started = time.monotonic()
    end = engine.submit(request(num_inference_steps=2), OWNER).wait(timeout=3600)
    assert isinstance(end, Result), end
    print("## Real-size 2.2 decoder (UNet 1.25 B + MoVQ, random weights; tiny 1280-d prior), 512x512, "
          "guidance 4 (UNet batch 2)")
    print(f"- first run (loads the models, fits the preview factors, 2 steps): {time.monotonic() - started:.1f} s")

    print("\n| preview | run s | preview s | share | Generate -> first preview s | load average |")
    print("|---|---|---|---|---|---|")
    for mode in ("fast", "off", "decode"):
        cpu = time.process_time()
        job = engine.submit(request(num_inference_steps=steps, preview=mode), OWNER)
        first = None
        for event in job.events(timeout=3600):
            if isinstance(event, Step) and event.phase == "denoise" and event.preview is not None and first is None:
                first = time.monotonic() - job.submitted_at
        end = job.wait(timeout=3600)
        assert isinstance(end, Result), end
        first_text = f"{first:.2f}" if first is not None else "-"
        print(f"| {mode} | {end.elapsed_s:.2f} (CPU {time.process_time() - cpu:.2f}) | {end.preview_s:.3f} | "
              f"{100 * end.preview_s / end.elapsed_s:.2f}% | {first_text} | {load()} |", flush=True)

    latencies, step_times = [], []
    for attempt in range(stops):
        job = engine.submit(request(num_inference_steps=50, preview="fast"), OWNER)
        times = []
        for event in job.events(timeout=3600):
            if isinstance(event, Step) and event.phase == "denoise":
                times.append(time.monotonic())
                if event.step >= 1 + attempt % 2:
                    job.cancel()
                    break
        end = job.wait(timeout=3600)
        assert isinstance(end, Cancelled) and end.partials, end
        latencies.append(end.latency_s)
        if len(times) > 1:
            step_times.append(float(np.median(np.diff(times))))
        print(f"- stop {attempt + 1}: cancel() -> Cancelled {1000 * end.latency_s:.0f} ms (load average {load()})",
              flush=True)
    print(f"- stop latency: median {1000 * statistics.median(latencies):.0f} ms, max {1000 * max(latencies):.0f} ms "
          f"over {stops} stops" + (f"; one UNet step {statistics.median(step_times):.1f} s" if step_times else ""))
    engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--stops", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "gpu", "ascend"])
    parser.add_argument("--work", default=None, help="folder for demo models and outputs (default: a temp dir)")
    parser.add_argument("--real-size", action="store_true", help="the real-size 2.2 decoder at 512x512 instead")
    parser.add_argument("--bench-dir", type=Path, default=BENCH_DIR, help="bench_suite.py's checkpoint folder")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="ks-measure-"))

    if args.real_size:
        steps = args.steps if args.steps != parser.get_default("steps") else 3
        measure_real_size(work, steps, min(args.stops, 3), args.bench_dir)
        return
    engine = Engine(EngineConfig(families=("2.2",), demo=True, device=args.device, cache_dir=str(work / "models"),
                                 outputs_dir=str(work / "outputs")))
    print("device:", engine.device)
    model = next(iter(engine.models))

    first_preview = {}

    def run(**kw):
        request = Text2ImageRequest(model=model, prompt="a red cat", prior_num_inference_steps=2, seed=1, **kw)
        job = engine.submit(request, OWNER)
        first = None
        for event in job.events(timeout=600):
            if isinstance(event, Step) and event.phase == "denoise" and event.preview is not None and first is None:
                first = time.monotonic() - job.submitted_at
        first_preview["s"] = first
        return job.wait(timeout=600)

    run(width=64, height=64, num_inference_steps=2)  # load, fit the preview factors, warm up
    print(f"## Preview overhead (demo models, {args.steps} decoder steps, a preview at every step)")
    print("| size | preview | run s | preview s | share | Generate -> first preview s |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        run(width=size, height=size, num_inference_steps=2)  # warm up this shape
        for mode in ("fast", "off", "decode"):
            end = run(width=size, height=size, num_inference_steps=args.steps, preview=mode)
            assert isinstance(end, Result), end
            first = "-" if first_preview["s"] is None else f"{first_preview['s']:.3f}"
            print(f"| {size}x{size} | {mode} | {end.elapsed_s:.2f} | {end.preview_s:.3f} | "
                  f"{100 * end.preview_s / end.elapsed_s:.1f}% | {first} |")

    factors_file = next((work / "models" / "preview-factors").glob("*.json"))   # fitted by the runs above
    factors = previews.LatentRGBFactors.from_json(json.loads(factors_file.read_text()))
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
        job = engine.submit(Text2ImageRequest(model=model, prompt="a red cat", width=size, height=size,
                                              num_inference_steps=200, prior_num_inference_steps=2, seed=attempt),
                            OWNER)
        times = []
        for event in job.events(timeout=600):
            if isinstance(event, Step) and event.phase == "denoise":
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
    engine.shutdown()


if __name__ == "__main__":
    main()
