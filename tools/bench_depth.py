"""Depth estimation of a 768x768 photo: our DepthEstimationPipeline against transformers' depth-estimation
pipeline, Depth-Anything-V2-Small's real config with random weights, on this CPU.

    python tools/bench_depth.py [--runs 5] [--rounds 2]

The torch side (the reference environment, tools/reference_env.py) first saves the random-weight
checkpoint with save_pretrained, with the config and preprocessor_config.json of
tests/fixtures/depth_anything_v2_small/, in $KANDINSKY_BENCH_DIR (default /tmp/kandinsky-bench-depth);
both sides load those same files. Each side runs in a fresh process: load the pipeline
(DepthEstimationPipeline.from_pretrained / transformers.pipeline("depth-estimation") with
DPTImageProcessor, as 4.57.1 picks without torchvision), the first call, then `--runs` calls on the same
photo (assets/samples/landscape.png resized to 768x768, bicubic). Reported per side: wall and process CPU
time (user + system, all threads) of the load, the first call and the median call, and the process's peak
RSS (the interpreter and its libraries included; the RSS once they are imported, before loading the model, is
shown too). `--rounds 2` runs
the pair twice with the order swapped and keeps each side's best median (the machine is shared).
Ratios are ours / transformers: below 1.0 = we are faster or smaller.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from reference_env import TORCH_PYTHON

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "tests" / "fixtures" / "depth_anything_v2_small"
WORK = Path(os.environ.get("KANDINSKY_BENCH_DIR", "/tmp/kandinsky-bench-depth"))
PHOTO = ROOT / "assets" / "samples" / "landscape.png"
SIZE = 768


def photo():
    from PIL import Image

    return Image.open(PHOTO).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Clock:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def make_checkpoint() -> None:
    """Torch side: the real Small config, every parameter random (as tools/compare_full_size.py does)."""
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation

    if (WORK / "model.safetensors").is_file():
        return
    WORK.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = json.loads((SMALL / "config.json").read_text())
    model = DepthAnythingForDepthEstimation(DepthAnythingConfig.from_dict(config)).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if key.endswith("weight") and param.ndim >= 2:
                param.copy_(noise / param[0].numel() ** 0.5)
            elif key.endswith("lambda1"):
                param.copy_(0.1 + 0.02 * noise)
            elif "norm" in key and key.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)
    model.save_pretrained(WORK, safe_serialization=True)
    (WORK / "preprocessor_config.json").write_text((SMALL / "preprocessor_config.json").read_text())


def run_side(side: str, runs: int) -> dict:
    image = photo()
    if side == "torch":
        import torch
        from transformers import DPTImageProcessor, pipeline

        torch.set_grad_enabled(False)
        before = rss()  # the libraries imported: what the model adds comes after
        with Clock() as load:
            pipe = pipeline("depth-estimation", model=str(WORK), image_processor=DPTImageProcessor.from_pretrained(WORK),
                            device="cpu")
        threads = torch.get_num_threads()
    else:
        sys.path.insert(0, str(ROOT))
        from backend.nn.host import host_gemm
        from backend.pipelines import DepthEstimationPipeline

        before = rss()
        with Clock() as load:
            pipe = DepthEstimationPipeline.from_pretrained(WORK)
        threads = host_gemm().threads
    with Clock() as first:
        out = pipe(image)
    calls = []
    for _ in range(runs):
        with Clock() as call:
            out = pipe(image)
        calls.append((call.wall, call.cpu))
    assert out["depth"].size == image.size
    median = sorted(calls)[len(calls) // 2]
    return {"side": side, "threads": threads, "load_wall": load.wall, "load_cpu": load.cpu, "first_wall": first.wall,
            "first_cpu": first.cpu, "median_wall": median[0], "median_cpu": median[1],
            "walls": [c[0] for c in calls], "rss_before_load": before,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=["torch", "ours"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.side:
        if args.side == "torch":
            make_checkpoint()
        print("RESULT " + json.dumps(run_side(args.side, args.runs)), flush=True)
        return

    best: dict[str, dict] = {}
    for round_ in range(args.rounds):
        order = ["torch", "ours"] if round_ % 2 == 0 else ["ours", "torch"]
        if not (WORK / "model.safetensors").is_file():
            order = ["torch", "ours"]
        for side in order:
            python = TORCH_PYTHON if side == "torch" else sys.executable
            out = subprocess.run([python, __file__, "--side", side, "--runs", str(args.runs)], check=True,
                                 capture_output=True, text=True)
            result = json.loads(next(line[7:] for line in out.stdout.splitlines() if line.startswith("RESULT ")))
            print(f"  {side:5s} median {result['median_wall']:.3f} s wall {result['median_cpu']:.3f} s CPU, first "
                  f"{result['first_wall']:.2f} s, load {result['load_wall']:.2f} s, peak RSS "
                  f"{result['peak_rss'] / 1e9:.2f} GB (before load {result['rss_before_load'] / 1e9:.2f} GB), "
                  f"{result['threads']} threads (load average {result['load_average']})", flush=True)
            if side not in best or result["median_wall"] < best[side]["median_wall"]:
                best[side] = result
    ours, torch = best["ours"], best["torch"]
    print(f"\n768x768 photo, Depth-Anything-V2-Small (random weights), best of {args.rounds} rounds of "
          f"{args.runs} calls (medians)")
    print(f"{'measurement':24s} {'ours':>9s} {'transformers':>13s} {'ratio':>6s}")
    for label, key, unit, scale in [("call, wall", "median_wall", "s", 1), ("call, CPU", "median_cpu", "s", 1),
                                    ("first call, wall", "first_wall", "s", 1), ("load, wall", "load_wall", "s", 1),
                                    ("load, CPU", "load_cpu", "s", 1), ("peak RSS", "peak_rss", "GB", 1e9),
                                    ("RSS, libraries imported", "rss_before_load", "GB", 1e9)]:
        a, b = ours[key] / scale, torch[key] / scale
        print(f"{label:24s} {a:8.3f}{unit:>2s} {b:11.3f}{unit:>2s} {a / b:6.2f}")
    (WORK / "summary.json").write_text(json.dumps({"ours": ours, "torch": torch}, indent=1))


if __name__ == "__main__":
    main()
