"""One decoder UNet step, ours vs diffusers, on the real kandinsky-2-2-decoder config.

    python3 tools/bench_unet.py [--steps 3] [--size 64] [--profile]
    python3 tools/bench_unet.py --paired 4 [--load 1]     # interleaved, under synthetic load

Builds the real config (1.25 B parameters, 5 GB in float32) with random weights drawn from
numpy generators seeded by each parameter's name, so both sides hold identical weights; runs
batch 2 (classifier-free guidance) at a 64x64 latent (512x512 images); prints our step time,
torch's step time (diffusers in /work/refenv, in a subprocess started after our model is freed,
so only one 5 GB model is in memory at a time), their ratio, and how far the outputs differ.
--profile adds our time per layer kind (exclusive of the layers inside it).

--paired N keeps both models resident (two processes, ~12 GB together: check `free -g`) and
interleaves their steps, N rounds: ours with whole samples per core (split_batch, the engine's
default), ours with every layer split over the cores (the previous host path), torch; the order
rotates each round. Consecutive steps see nearly the same machine load, so the ratios are
paired. --load K adds K busy loops (`while 1: pass`), each in its own session like another
user's job (the kernel's autogroup shares CPU between sessions). It prints wall and CPU time
per step, the hand-offs to the worker thread per step, and voluntary context switches.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT.parent / "shared" / "reference-configs" / "kandinsky-2-2-decoder" / "unet.json"
if not CONFIG.exists():
    CONFIG = Path("/work/shared/reference-configs/kandinsky-2-2-decoder/unet.json")
from reference_env import TORCH_PYTHON as REFERENCE_PYTHON  # noqa: E402
TIMESTEP = 500


def weight(name: str, shape) -> np.ndarray:
    """Deterministic random values per parameter name; 1/sqrt(fan_in) scale keeps activations O(1)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    values = rng.standard_normal(tuple(shape), dtype=np.float32)
    owner = name.split(".")[-2]
    if "norm" in owner and name.endswith("weight"):
        return 1 + np.float32(0.1) * values
    if name.endswith("bias"):
        return np.float32(0.02) * values
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
    return values / np.float32(np.sqrt(fan_in))


def inputs(size: int):
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, size, size), dtype=np.float32)
    image_embeds = rng.standard_normal((2, 1280), dtype=np.float32)
    return sample, image_embeds


def run_ours(steps: int, size: int, profile: bool, out_path: Path) -> list[tuple[float, float]]:
    sys.path.insert(0, str(ROOT))
    from mindspore import Tensor

    from backend.models.unet_2d_condition import UNet2DConditionModel

    config = json.loads(CONFIG.read_text())
    model = UNet2DConditionModel.from_config(config)
    for name, param in model.parameters_and_names():
        param.set_data(Tensor.from_numpy(weight(name, param.shape)))
    model.set_train(False)
    sample, image_embeds = inputs(size)  # numpy in, numpy out on CPU, as the pipelines call it
    times = []
    for _ in range(steps + 1):  # the first call warms up
        start, cpu_start = time.perf_counter(), time.process_time()
        out = model(sample, TIMESTEP, added_cond_kwargs={"image_embeds": image_embeds})
        times.append((time.perf_counter() - start, time.process_time() - cpu_start))
    np.save(out_path, out)
    if profile:
        profile_ours(model, sample, image_embeds)
    return times[1:]


def profile_ours(model, sample, image_embeds) -> None:
    """Exclusive time per layer class for one step (wraps construct on the classes, tool only)."""
    import collections

    import backend.models.unet_2d_condition as unet
    import backend.nn as layers
    from backend.nn import entry

    totals, counts, stack = collections.Counter(), collections.Counter(), []
    classes = [layers.Conv2d, layers.GroupNorm, layers.Linear, layers.LayerNorm, unet.Attention, unet.ResnetBlock2D,
               unet.SimpleCrossAttnDownBlock2D, unet.SimpleCrossAttnUpBlock2D, unet.ResnetDownsampleBlock2D,
               unet.ResnetUpsampleBlock2D, unet.UNetMidBlock2DSimpleCrossAttn, unet.UNet2DConditionModel]
    originals = {cls: cls.construct for cls in classes}

    def timed(cls):
        original = originals[cls]

        def construct(self, *args, **kwargs):
            start = time.perf_counter()
            stack.append(0.0)
            result = original(self, *args, **kwargs)
            elapsed = time.perf_counter() - start
            inner = stack.pop()
            totals[cls.__name__] += elapsed - inner
            counts[cls.__name__] += 1
            if stack:
                stack[-1] += elapsed
            return result
        return construct

    for cls in classes:
        cls.construct = timed(cls)
    # one timing stack: run the samples one after the other (each layer split over the cores)
    split_batch = entry.split_batch
    entry.split_batch = lambda batch, forward: None
    # Attention calls Linear.channels_first directly: time it as Linear too
    original_cf = layers.Linear.channels_first

    def channels_first(self, x):
        start = time.perf_counter()
        result = original_cf(self, x)
        elapsed = time.perf_counter() - start
        totals["Linear"] += elapsed
        counts["Linear"] += 1
        stack[-1] += elapsed
        return result

    layers.Linear.channels_first = channels_first
    try:
        start = time.perf_counter()
        model(sample, TIMESTEP, added_cond_kwargs={"image_embeds": image_embeds})
        total = time.perf_counter() - start
    finally:
        for cls, original in originals.items():
            cls.construct = original
        layers.Linear.channels_first = original_cf
        entry.split_batch = split_batch
    print(f"profile of one step ({total:.2f} s), exclusive seconds per layer kind:")
    for name, seconds in totals.most_common():
        print(f"  {name:32s} {seconds:7.2f} s  {100 * seconds / total:5.1f} %  calls {counts[name]}")


def run_torch(steps: int, size: int, out_path: Path, threads: int) -> list[tuple[float, float]]:
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(threads)
    config = json.loads(CONFIG.read_text())
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(config)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.from_numpy(weight(name, param.shape)))
    sample, image_embeds = inputs(size)
    sample, image_embeds = torch.from_numpy(sample), torch.from_numpy(image_embeds)
    times = []
    with torch.no_grad():
        for _ in range(steps + 1):
            start, cpu_start = time.perf_counter(), time.process_time()
            out = model(sample, TIMESTEP, encoder_hidden_states=None,
                        added_cond_kwargs={"image_embeds": image_embeds}, return_dict=False)[0]
            times.append((time.perf_counter() - start, time.process_time() - cpu_start))
    np.save(out_path, out.numpy())
    return times[1:]


# ------------------------------------------------------------------------------ paired mode

def serve(side: str, size: int) -> None:
    """A resident model answering "layer" / "batch" / "torch" lines with one timed step as JSON."""
    if side == "torch":
        import torch
        from diffusers import UNet2DConditionModel

        torch.set_grad_enabled(False)
        config = json.loads(CONFIG.read_text())
        with torch.device("meta"):
            model = UNet2DConditionModel.from_config(config)
        model = model.to_empty(device="cpu").eval()
        for name, param in model.named_parameters():
            param.copy_(torch.from_numpy(weight(name, param.shape)))
        arrays = [torch.from_numpy(a) for a in inputs(size)]

        def step(mode):
            model(arrays[0], TIMESTEP, encoder_hidden_states=None,
                  added_cond_kwargs={"image_embeds": arrays[1]}, return_dict=False)
        counter = None
    else:
        sys.path.insert(0, str(ROOT))
        from mindspore import Tensor

        from backend.models.unet_2d_condition import UNet2DConditionModel
        from backend.nn import entry
        from backend.nn.host import host_gemm

        config = json.loads(CONFIG.read_text())
        model = UNet2DConditionModel.from_config(config)
        for name, param in model.parameters_and_names():
            param.set_data(Tensor.from_numpy(weight(name, param.shape)))
        model.set_train(False)
        arrays = inputs(size)
        split_batch = entry.split_batch
        pool = host_gemm().pool
        counter = [0]
        submit = pool.submit

        def counting_submit(*args, **kwargs):
            counter[0] += 1
            return submit(*args, **kwargs)
        pool.submit = counting_submit

        def step(mode):
            entry.split_batch = split_batch if mode == "batch" else (lambda batch, forward: None)
            model(arrays[0], TIMESTEP, added_cond_kwargs={"image_embeds": arrays[1]})

    step("batch")  # warm-up
    print("READY", flush=True)
    for line in sys.stdin:
        mode = line.strip()
        if counter:
            counter[0] = 0
        switches = _context_switches()
        start, cpu_start = time.perf_counter(), time.process_time()
        step(mode)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        print(json.dumps({"wall": wall, "cpu": cpu, "handoffs": counter[0] if counter else None,
                          "voluntary_switches": _context_switches() - switches}), flush=True)


def _context_switches() -> int:
    total = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/status") as f:
                total += sum(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt"))
        except OSError:
            pass
    return total


def paired(rounds: int, size: int, load: int, threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    procs = {}
    for side, python in (("ours", sys.executable), ("torch", REFERENCE_PYTHON)):
        procs[side] = subprocess.Popen([python, __file__, "--serve", side, "--size", str(size)], env=env,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for line in procs[side].stdout:  # one model at a time while building (memory)
            if line.startswith("READY"):
                break
        else:
            raise SystemExit(f"{side} server failed")
    busy = [subprocess.Popen([sys.executable, "-c", "while 1: pass"], start_new_session=True)
            for _ in range(load)]
    modes = ["batch", "layer", "torch"]
    results = {m: [] for m in modes}
    try:
        time.sleep(2 if load else 0)
        print(f"paired: {rounds} rounds, latent {size}, {load} busy loop(s) in their own sessions")
        for r in range(rounds):
            for mode in modes[r % 3:] + modes[:r % 3]:
                proc = procs["torch" if mode == "torch" else "ours"]
                proc.stdin.write(mode + "\n")
                proc.stdin.flush()
                step = json.loads(proc.stdout.readline())
                step["load"] = os.getloadavg()[0]
                results[mode].append(step)
                print(f"  {mode:5s} {step['wall']:6.2f} s wall {step['cpu']:6.2f} s CPU  hand-offs "
                      f"{step['handoffs'] if step['handoffs'] is not None else '-':>4}  voluntary switches "
                      f"{step['voluntary_switches']:5d}  load {step['load']:.1f}", flush=True)
    finally:
        for p in busy:
            p.kill()
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
    med = {m: (float(np.median([s["wall"] for s in v])), float(np.median([s["cpu"] for s in v])))
           for m, v in results.items()}
    for m in ("batch", "layer"):
        print(f"ours ({'whole samples per core' if m == 'batch' else 'every layer split'}) / torch, medians: "
              f"wall {med[m][0] / med['torch'][0]:.2f}, CPU {med[m][1] / med['torch'][1]:.2f}  "
              f"(ours {med[m][0]:.2f} s wall {med[m][1]:.2f} s CPU, torch {med['torch'][0]:.2f} s wall "
              f"{med['torch'][1]:.2f} s CPU)")


def report(label: str, times: list[tuple[float, float]]) -> None:
    wall = [t[0] for t in times]
    cpu = [t[1] for t in times]
    print(f"{label}: {min(wall):.2f} s/step best, {np.median(wall):.2f} median "
          f"(all {[round(t, 2) for t in wall]}); CPU time {min(cpu):.2f} s/step best")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side (after one warm-up)")
    parser.add_argument("--size", type=int, default=64, help="latent height and width (64 = 512x512 images)")
    parser.add_argument("--profile", action="store_true", help="also print our time per layer kind")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count())
    parser.add_argument("--side", choices=["both", "ours", "torch"], default="both")
    parser.add_argument("--paired", type=int, default=0, metavar="N",
                        help="interleave ours (two host modes) and torch for N rounds, both resident")
    parser.add_argument("--load", type=int, default=0, help="with --paired: busy loops to add")
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--serve", choices=["ours", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve:
        serve(args.serve, args.size)
        return 0
    if args.paired:
        paired(args.paired, args.size, args.load, args.torch_threads)
        return 0

    if args.side == "torch":  # the subprocess
        times = run_torch(args.steps, args.size, args.out, args.torch_threads)
        print(json.dumps(times))
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench_unet_"))
    ours_out, torch_out = work / "ours.npy", work / "torch.npy"
    print(f"kandinsky-2-2-decoder UNet, batch 2, latent {args.size}x{args.size}, "
          f"{args.steps} timed steps per side, {os.cpu_count()} CPU cores")
    ours = run_ours(args.steps, args.size, args.profile, ours_out)
    report("ours", ours)
    if args.side == "ours":
        return 0
    gc.collect()
    result = subprocess.run([REFERENCE_PYTHON, __file__, "--side", "torch", "--steps", str(args.steps),
                             "--size", str(args.size), "--out", str(torch_out),
                             "--torch-threads", str(args.torch_threads)],
                            check=True, capture_output=True, text=True)
    theirs = [tuple(t) for t in json.loads(result.stdout.strip().splitlines()[-1])]
    report(f"torch ({args.torch_threads} threads)", theirs)
    wall = [min(t[0] for t in side) for side in (ours, theirs)]
    median = [float(np.median([t[0] for t in side])) for side in (ours, theirs)]
    cpu = [min(t[1] for t in side) for side in (ours, theirs)]
    print(f"ratio ours/torch: {wall[0] / wall[1]:.2f} (best wall), {median[0] / median[1]:.2f} (median wall), "
          f"{cpu[0] / cpu[1]:.2f} (best CPU time)")
    a, b = np.load(ours_out), np.load(torch_out)
    print(f"outputs: max abs diff {np.abs(a - b).max():.2e}, max |torch| {np.abs(b).max():.2f}, "
          f"rms diff {np.sqrt(np.mean((a - b) ** 2)):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
