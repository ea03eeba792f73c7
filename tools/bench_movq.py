"""Time one MoVQ decode at 512x512 (64x64 latent), ours against diffusers, same random weights.

    python3 tools/bench_movq.py [--config PATH] [--size 64] [--profile]

Writes random weights for the real config (kandinsky-2-2-decoder/movq.json by default) to a
temporary diffusers folder, runs diffusers' VQModel.decode(force_not_quantize=True) in the
reference environment (/work/refenv, a subprocess), then ours on the same weights and latent,
and prints both times (wall and process CPU), the ratios ours/theirs and the largest output
difference.
`--profile` also prints where our time goes (cProfile, top functions by own time).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
from reference_env import TORCH_PYTHON as REFERENCE_PYTHON  # noqa: E402
DEFAULT_CONFIG = Path("/work/shared/reference-configs/kandinsky-2-2-decoder/movq.json")
# Importing mindspore prepends its plugin folder to LD_LIBRARY_PATH; a torch child process
# started with that environment loads another OpenMP runtime and runs on one thread.
CLEAN_ENVIRONMENT = dict(os.environ)

TORCH_SIDE = r"""
import resource, sys, time, numpy as np, torch
from diffusers import VQModel
folder, size = sys.argv[1], int(sys.argv[2])
model = VQModel.from_pretrained(folder).eval()
latents = torch.from_numpy(np.load(folder + "/latents.npy"))
usage = resource.getrusage(resource.RUSAGE_SELF)
with torch.no_grad():
    start = time.perf_counter()
    sample = model.decode(latents, force_not_quantize=True).sample
    seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF)
cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
np.save(folder + "/torch_sample.npy", sample.numpy())
print(f"TORCH_SECONDS {seconds:.3f} {cpu:.3f} {torch.get_num_threads()}")
"""


def random_weights(model, seed: int = 0) -> dict:
    """Scaled random values per parameter so activations stay O(1) through the network."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, param in model.parameters_and_names():
        shape = tuple(param.shape)
        if name == "quantize.embedding.weight":
            value = rng.standard_normal(shape)
        elif ("norm" in name.split(".")[-2] or "norm_layer" in name or "group_norm" in name):
            value = (1.0 if name.endswith("weight") else 0.0) + 0.1 * rng.standard_normal(shape)
        elif name.endswith("bias"):
            value = 0.02 * rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        weights[name] = value.astype(np.float32)
    return weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--size", type=int, default=64, help="latent side (64 -> 512x512 pixels)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from safetensors.numpy import save_file

    from backend.models.vq_model import VQModel
    from backend.weights import load_model

    config = json.loads(args.config.read_text())
    with tempfile.TemporaryDirectory(prefix="movq_bench_") as folder:
        model = VQModel.from_config(config)
        save_file(random_weights(model), os.path.join(folder, "diffusion_pytorch_model.safetensors"))
        del model
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f)
        latent_channels = config.get("vq_embed_dim") or config["latent_channels"]
        latents = np.random.default_rng(1).standard_normal(
            (1, latent_channels, args.size, args.size)).astype(np.float32)
        np.save(os.path.join(folder, "latents.npy"), latents)

        result = subprocess.run([REFERENCE_PYTHON, "-c", TORCH_SIDE, folder, str(args.size)],
                                capture_output=True, text=True, check=False, env=CLEAN_ENVIRONMENT)
        lines = [line for line in result.stdout.splitlines() if line.startswith("TORCH_SECONDS")]
        if result.returncode != 0 or not lines:
            raise SystemExit(f"reference run failed:\n{result.stderr[-3000:]}")
        _, theirs, theirs_cpu, threads = lines[0].split()
        theirs, theirs_cpu = float(theirs), float(theirs_cpu)
        print(f"diffusers decode {args.size * 8}x{args.size * 8}: {theirs:.2f} s "
              f"(process CPU time {theirs_cpu:.1f} s, {threads} torch threads)", flush=True)

        model = load_model(VQModel, folder)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        if args.profile:
            import cProfile
            import pstats
            profiler = cProfile.Profile()
            profiler.enable()
        sample = model.decode(latents, force_not_quantize=True)["sample"]  # numpy in and out on CPU
        ours = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        ours_cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
        if args.profile:
            profiler.disable()
        reference = np.load(os.path.join(folder, "torch_sample.npy"))
        print(f"ours decode {args.size * 8}x{args.size * 8}: {ours:.2f} s (process CPU time {ours_cpu:.1f} s)")
        print(f"ratio ours/theirs: {ours / theirs:.2f} wall, {ours_cpu / theirs_cpu:.2f} CPU time "
              "(the machine is shared: compare runs made back to back)")
        print(f"max abs diff: {np.abs(sample - reference).max():.3g} "
              f"(output std {reference.std():.3g})")
        if args.profile:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
