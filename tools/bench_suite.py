"""Kandinsky 2.2 benchmark suite: our engine against diffusers/transformers on torch, same machine.

    python3 tools/bench_suite.py [--cases unet512,unet768,movq512,movq768,prior_stage,unet21_512,k3_512]
                                 [--work /tmp/kandinsky-bench] [--steps 2] [--rounds 1] [--json out.json]

Real published configs (../shared/reference-configs/kandinsky-2-2-*), random weights. Once per
work folder, the reference environment (tools/reference_env.py) builds each component with its library's
own random init and writes it with save_pretrained (safetensors); both sides then LOAD THE SAME
FILES (the 2.1 and Kandinsky 3 UNets are written by a streaming writer instead, with the
deterministic per-name values of tools/bench_unet.py `weight()`: save_pretrained would hold a
second copy of the 12 GB model in memory). Every measurement runs in a fresh process (this file with --run), torch's right after
ours, so only one big model is in memory at a time and peak RSS is per run:

- unet512 / unet768: one kandinsky-2-2-decoder UNet step, batch 2 (classifier-free guidance),
  latent 64x64 / 96x96; warmed up on a 16x16 latent, then `--steps` timed steps (best is kept).
- unet21_512: the same for the Kandinsky 2.1 UNet (text_image conditioning): encoder_hidden_states
  (2, 77, 1024) (the MultilingualCLIP token states; the config's encoder_hid_dim), text_embeds
  and image_embeds (2, 768).
- k3_512 / k3_1024: one Kandinsky 3 UNet step (3.06 B parameters, 12.2 GB in float32), batch 2,
  latent 64x64 / 128x128 (1024x1024 is its native size), T5 states (2, 128, 4096) with an
  attention mask of 8 real tokens per row. Needs ~14 GB free per side: check `free -g` and run it
  alone.
- movq512 / movq768: one MoVQ decode (force_not_quantize) of a 64x64 / 96x96 latent, warmed up
  on 16x16.
- prior_stage: what KandinskyV22PriorPipeline does for one prompt with guidance, one component
  in memory at a time: the CLIP ViT-bigG text encoder on the prompt and on the empty negative
  prompt (two calls, batch 1, 77 tokens), 25 PriorTransformer steps on batch 2 with the UnCLIP
  scheduler, and the image encoder's zero-image embedding (get_zero_embed). Each model is warmed
  with one call first; the reported time is the sum of the three timed parts.
- load: cold load of each component (the file's pages are dropped from the page cache with
  posix_fadvise(DONTNEED) first, so the bytes come from disk on both sides): ours
  backend.weights.load_model, theirs from_pretrained. Both memory-map the file; torch reads
  pages lazily, so part of its reading lands in the first call: "load + 1st call" (the
  warm-up call: 16x16 latent, or the stage's first call of each model) compares like with like.

Each run reports wall time and the process CPU time (user + system, all threads). The machine
is shared, so wall times move with other people's load; CPU time is the steadier comparison.
Ratios are ours / theirs: below 1.0 means we are faster or smaller.

tools/bench_unet.py (layer profile, parity of the step) and tools/bench_movq.py (cProfile of
a decode, parity) stay for digging into a single component; this suite reuses their inputs.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from bench_unet import TIMESTEP, inputs as unet_inputs  # noqa: E402  (no heavy imports there)
from reference_env import TORCH_PYTHON  # noqa: E402

CONFIGS = Path(os.environ.get("KANDINSKY_REFERENCE_CONFIGS", ROOT.parent / "shared" / "reference-configs"))
if not CONFIGS.exists():
    CONFIGS = Path("/work/shared/reference-configs")

# component: (config file, diffusers/transformers class)
COMPONENTS = {
    "unet": ("kandinsky-2-2-decoder/unet.json", "diffusers.UNet2DConditionModel"),
    "movq": ("kandinsky-2-2-decoder/movq.json", "diffusers.VQModel"),
    "prior": ("kandinsky-2-2-prior/prior.json", "diffusers.PriorTransformer"),
    "text_encoder": ("kandinsky-2-2-prior/text_encoder.json", "transformers.CLIPTextModelWithProjection"),
    "image_encoder": ("kandinsky-2-2-prior/image_encoder.json", "transformers.CLIPVisionModelWithProjection"),
    "unet21": ("kandinsky-2-1/unet.json", "diffusers.UNet2DConditionModel"),
    "unet3": ("kandinsky-3/unet.json", "diffusers.Kandinsky3UNet"),
}
STREAMED = {"unet21", "unet3"}  # written by write_streamed (no second in-memory copy)
UNETS = {"unet", "unet21", "unet3"}
# case: (components it loads, latent side or None)
CASES = {
    "unet512": (["unet"], 64),
    "unet768": (["unet"], 96),
    "movq512": (["movq"], 64),
    "movq768": (["movq"], 96),
    "prior_stage": (["text_encoder", "prior", "image_encoder"], None),
    "unet21_512": (["unet21"], 64),
    "k3_512": (["unet3"], 64),
    "k3_1024": (["unet3"], 128),
}
DEFAULT_CASES = ["unet512", "unet768", "movq512", "movq768", "prior_stage", "unet21_512", "k3_512"]
K3_TOKENS, K3_REAL_TOKENS = 128, 8


def unet_step_inputs(name: str, size: int) -> dict:
    """Numpy inputs of one guided (batch 2) step of UNet component `name` at a size x size latent:
    {"sample", ...keyword arguments of the call}."""
    sample, image_embeds = unet_inputs(size)
    if name == "unet":
        return {"sample": sample, "image_embeds": image_embeds}
    rng = np.random.default_rng(3)
    if name == "unet21":
        return {"sample": sample, "encoder_hidden_states": rng.standard_normal((2, 77, 1024), dtype=np.float32),
                "text_embeds": rng.standard_normal((2, 768), dtype=np.float32),
                "image_embeds": rng.standard_normal((2, 768), dtype=np.float32)}
    mask = np.zeros((2, K3_TOKENS), np.int64)
    mask[:, :K3_REAL_TOKENS] = 1
    states = rng.standard_normal((2, K3_TOKENS, 4096), dtype=np.float32) * mask[:, :, None].astype(np.float32)
    return {"sample": sample, "encoder_hidden_states": states, "encoder_attention_mask": mask}


def write_streamed(folder: Path, name: str) -> None:
    """Reference environment: the component's parameter names and shapes from a meta-device model,
    values from bench_unet.weight(name, shape), written to one safetensors file a tensor at a time."""
    import importlib
    import struct

    import torch
    from bench_unet import weight

    config_file, cls_path = COMPONENTS[name]
    config = json.loads((CONFIGS / config_file).read_text())
    library, cls_name = cls_path.split(".")
    cls = getattr(importlib.import_module(library), cls_name)
    with torch.device("meta"):
        model = cls.from_config(config)
    shapes = [(key, tuple(t.shape)) for key, t in model.state_dict().items()]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in shapes:
        size = 4 * int(np.prod(shape, dtype=np.int64))
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / "diffusion_pytorch_model.safetensors.partial"
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, shape in shapes:
            f.write(np.ascontiguousarray(weight(key, shape), dtype="<f4").tobytes())
    partial.rename(folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text((CONFIGS / config_file).read_text())
PRIOR_STEPS = 25
PRIOR_GUIDANCE = 4.0
# "a red cat" / "" as CLIP BPE ids (bos ... eos, then eos as padding like the 2.2 prior tokenizer)
PROMPT_IDS = [49406, 320, 736, 2368, 49407]
EMPTY_IDS = [49406, 49407]


def token_batch(ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    row = np.full((1, 77), 49407, np.int64)
    row[0, :len(ids)] = ids
    mask = np.zeros((1, 77), np.int64)
    mask[0, :len(ids)] = 1
    return row, mask


def drop_page_cache(folder: Path) -> None:
    """Evict the component's files from the page cache so the next read comes from disk."""
    for path in folder.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class Clock:
    """Wall and process CPU seconds of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


# --------------------------------------------------------------------------------- torch side

def prepare(work: Path, names: list[str]) -> None:
    """Reference environment: build each missing component with random init and save it."""
    import importlib

    import torch

    for name in names:
        folder = work / name
        if (folder / "config.json").exists():
            continue
        if name in STREAMED:
            start = time.time()
            write_streamed(folder, name)
            print(f"prepared {name} in {time.time() - start:.0f} s", flush=True)
            continue
        torch.manual_seed(0)
        config_file, cls_path = COMPONENTS[name]
        config = json.loads((CONFIGS / config_file).read_text())
        library, cls_name = cls_path.split(".")
        cls = getattr(importlib.import_module(library), cls_name)
        start = time.time()
        if library == "transformers":
            config_cls = getattr(importlib.import_module("transformers"),
                                 cls_name.replace("ModelWithProjection", "Config"))
            model = cls(config_cls(**{k: v for k, v in config.items() if not k.startswith("_")}))
        else:
            model = cls.from_config(config)
        if name == "prior":  # published priors carry real statistics; zeros would make outputs 0
            model.clip_std.data.fill_(1.0)
        model.save_pretrained(str(folder), safe_serialization=True)
        print(f"prepared {name} in {time.time() - start:.0f} s", flush=True)
        del model
        gc.collect()


def run_torch(case: str, work: Path, steps: int) -> dict:
    import torch

    torch.set_grad_enabled(False)
    result = {"threads": torch.get_num_threads(), "load": {}}
    components, latent = CASES[case]

    def load(name):
        import importlib

        library, cls_name = COMPONENTS[name][1].split(".")
        cls = getattr(importlib.import_module(library), cls_name)
        drop_page_cache(work / name)
        with Clock() as clock:
            model = cls.from_pretrained(str(work / name)).eval()
        result["load"][name] = [clock.wall, clock.cpu]
        return model

    if components[0] in UNETS:
        name = components[0]
        model = load(name)
        for size, label in ((16, "warm"), (latent, "run")):
            kw = {k: torch.from_numpy(v) for k, v in unet_step_inputs(name, size).items()}
            sample = kw.pop("sample")
            if name != "unet3":
                kw = {"encoder_hidden_states": kw.pop("encoder_hidden_states", None), "added_cond_kwargs": kw}
            for _ in range(1 if label == "warm" else steps):
                with Clock() as clock:
                    model(sample, TIMESTEP, **kw, return_dict=False)
                if label == "run":
                    result.setdefault("run", []).append([clock.wall, clock.cpu])
                else:
                    result["first"] = {name: [clock.wall, clock.cpu]}
    elif case.startswith("movq"):
        model = load("movq")
        for size, label in ((16, "warm"), (latent, "run")):
            z = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 4, size, size)).astype(np.float32))
            with Clock() as clock:
                model.decode(z, force_not_quantize=True)
            if label == "run":
                result["run"] = [[clock.wall, clock.cpu]]
            else:
                result["first"] = {"movq": [clock.wall, clock.cpu]}
    else:
        from diffusers import UnCLIPScheduler

        parts = {}
        model = load("text_encoder")
        ids = [torch.from_numpy(token_batch(t)[0]) for t in (PROMPT_IDS, EMPTY_IDS)]
        with Clock() as warm:
            model(ids[0])
        result["first"] = {"text_encoder": [warm.wall, warm.cpu]}
        with Clock() as clock:
            text = model(ids[0])
            uncond = model(ids[1])
        parts["text_encoder"] = [clock.wall, clock.cpu]
        proj = torch.cat([uncond.text_embeds, text.text_embeds])
        hidden = torch.cat([uncond.last_hidden_state, text.last_hidden_state])
        mask = torch.from_numpy(np.concatenate([token_batch(EMPTY_IDS)[1], token_batch(PROMPT_IDS)[1]]).astype(bool))
        del model, text, uncond
        gc.collect()

        model = load("prior")
        scheduler = UnCLIPScheduler.from_config(json.loads((CONFIGS / "kandinsky-2-2-prior/scheduler.json").read_text()))
        scheduler.set_timesteps(PRIOR_STEPS)
        generator = torch.Generator().manual_seed(0)
        latents = torch.from_numpy(np.random.default_rng(2).standard_normal((1, proj.shape[1])).astype(np.float32))
        with Clock() as warm:
            model(torch.cat([latents] * 2), timestep=999, proj_embedding=proj, encoder_hidden_states=hidden,
                  attention_mask=mask)
        result["first"]["prior"] = [warm.wall, warm.cpu]
        with Clock() as clock:
            timesteps = scheduler.timesteps
            for i, t in enumerate(timesteps):
                predicted = model(torch.cat([latents] * 2), timestep=t, proj_embedding=proj,
                                  encoder_hidden_states=hidden, attention_mask=mask).predicted_image_embedding
                uncond_pred, text_pred = predicted.chunk(2)
                predicted = uncond_pred + PRIOR_GUIDANCE * (text_pred - uncond_pred)
                prev = None if i + 1 == len(timesteps) else timesteps[i + 1]
                latents = scheduler.step(predicted, timestep=t, sample=latents, generator=generator,
                                         prev_timestep=prev).prev_sample
            model.post_process_latents(latents)
        parts["prior"] = [clock.wall, clock.cpu]
        del model
        gc.collect()

        model = load("image_encoder")
        zero = torch.zeros((1, 3, 224, 224))
        with Clock() as warm:
            model(zero)
        result["first"]["image_encoder"] = [warm.wall, warm.cpu]
        with Clock() as clock:
            model(zero).image_embeds
        parts["image_encoder"] = [clock.wall, clock.cpu]
        result["parts"] = parts
        result["run"] = [[sum(p[0] for p in parts.values()), sum(p[1] for p in parts.values())]]
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


# ----------------------------------------------------------------------------------- our side

def as_numpy(x) -> np.ndarray:
    """A model output as numpy: the host path returns numpy arrays, the device path Tensors."""
    return x.asnumpy() if hasattr(x, "asnumpy") else np.asarray(x)


def run_ours(case: str, work: Path, steps: int) -> dict:
    sys.path.insert(0, str(ROOT))

    from backend.weights import load_model

    result = {"threads": os.cpu_count(), "load": {}}
    components, latent = CASES[case]

    def load(name):
        if name in ("unet", "unet21"):
            from backend.models.unet_2d_condition import UNet2DConditionModel as cls
        elif name == "unet3":
            from backend.models.unet_kandinsky3 import Kandinsky3UNet as cls
        elif name == "movq":
            from backend.models.vq_model import VQModel as cls
        elif name == "prior":
            from backend.models.prior_transformer import PriorTransformer as cls
        elif name == "text_encoder":
            from backend.models.clip import CLIPTextModelWithProjection as cls
        else:
            from backend.models.clip import CLIPVisionModelWithProjection as cls
        drop_page_cache(work / name)
        with Clock() as clock:
            model = load_model(cls, work / name)
        result["load"][name] = [clock.wall, clock.cpu]
        return model

    if components[0] in UNETS:
        name = components[0]
        model = load(name)
        for size, label in ((16, "warm"), (latent, "run")):
            kw = unet_step_inputs(name, size)  # numpy arrays, as the pipelines pass them
            sample = kw.pop("sample")
            if name != "unet3":
                kw = {"encoder_hidden_states": kw.pop("encoder_hidden_states", None), "added_cond_kwargs": kw}
            for _ in range(1 if label == "warm" else steps):
                with Clock() as clock:
                    as_numpy(model(sample, TIMESTEP, **kw))
                if label == "run":
                    result.setdefault("run", []).append([clock.wall, clock.cpu])
                else:
                    result["first"] = {name: [clock.wall, clock.cpu]}
    elif case.startswith("movq"):
        model = load("movq")
        for size, label in ((16, "warm"), (latent, "run")):
            z = np.random.default_rng(1).standard_normal((1, 4, size, size)).astype(np.float32)
            with Clock() as clock:
                as_numpy(model.decode(z, force_not_quantize=True)["sample"])
            if label == "run":
                result["run"] = [[clock.wall, clock.cpu]]
            else:
                result["first"] = {"movq": [clock.wall, clock.cpu]}
    else:
        from backend.schedulers.unclip import UnCLIPScheduler
        from backend.random import randn

        parts = {}
        model = load("text_encoder")
        ids = [token_batch(t)[0].astype(np.int32) for t in (PROMPT_IDS, EMPTY_IDS)]
        with Clock() as warm:
            as_numpy(model(ids[0]).text_embeds)
        result["first"] = {"text_encoder": [warm.wall, warm.cpu]}
        with Clock() as clock:
            text = model(ids[0])
            uncond = model(ids[1])
            proj = np.concatenate([as_numpy(uncond.text_embeds), as_numpy(text.text_embeds)])
            hidden = np.concatenate([as_numpy(uncond.last_hidden_state), as_numpy(text.last_hidden_state)])
        parts["text_encoder"] = [clock.wall, clock.cpu]
        mask = np.concatenate([token_batch(EMPTY_IDS)[1], token_batch(PROMPT_IDS)[1]]).astype(bool)
        del model, text, uncond
        gc.collect()

        model = load("prior")
        scheduler = UnCLIPScheduler.from_config(json.loads((CONFIGS / "kandinsky-2-2-prior/scheduler.json").read_text()))
        scheduler.set_timesteps(PRIOR_STEPS)
        generator = np.random.default_rng(0)
        latents = np.random.default_rng(2).standard_normal((1, proj.shape[1])).astype(np.float32)
        with Clock() as warm:
            as_numpy(model(np.concatenate([latents] * 2), timestep=999, proj_embedding=proj,
                           encoder_hidden_states=hidden, attention_mask=mask))
        result["first"]["prior"] = [warm.wall, warm.cpu]
        with Clock() as clock:
            timesteps = scheduler.timesteps
            for i, t in enumerate(timesteps):
                predicted = as_numpy(model(np.concatenate([latents] * 2), timestep=int(t), proj_embedding=proj,
                                           encoder_hidden_states=hidden, attention_mask=mask))
                uncond_pred, text_pred = np.split(predicted, 2)
                predicted = uncond_pred + np.float32(PRIOR_GUIDANCE) * (text_pred - uncond_pred)
                prev = None if i + 1 == len(timesteps) else timesteps[i + 1]
                latents = scheduler.step(predicted, timestep=t, sample=latents, generator=generator,
                                         prev_timestep=prev).prev_sample
            as_numpy(model.post_process_latents(latents))
        parts["prior"] = [clock.wall, clock.cpu]
        del model
        gc.collect()
        _ = randn  # the scheduler draws its noise through backend.random

        model = load("image_encoder")
        zero = np.zeros((1, 3, 224, 224), np.float32)
        with Clock() as warm:
            as_numpy(model(zero).image_embeds)
        result["first"]["image_encoder"] = [warm.wall, warm.cpu]
        with Clock() as clock:
            as_numpy(model(zero).image_embeds)
        parts["image_encoder"] = [clock.wall, clock.cpu]
        result["parts"] = parts
        result["run"] = [[sum(p[0] for p in parts.values()), sum(p[1] for p in parts.values())]]
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


# ------------------------------------------------------------------------------------- driver

def subprocess_run(python: str, side: str, case: str, work: Path, steps: int) -> dict:
    out = subprocess.run([python, __file__, "--run", case, "--side", side, "--work", str(work), "--steps", str(steps)],
                         capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{python} --run {case} failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def print_table(results: dict) -> None:
    header = (f"{'measurement':28s} {'ours wall':>10s} {'torch wall':>10s} {'ratio':>6s} "
              f"{'ours CPU':>9s} {'torch CPU':>9s} {'ratio':>6s}")
    print(header)
    print("-" * len(header))

    def row(label, ours, theirs, unit="s"):
        print(f"{label:28s} {ours[0]:9.2f}{unit} {theirs[0]:9.2f}{unit} {ours[0] / theirs[0]:6.2f} "
              f"{ours[1]:8.2f}{unit} {theirs[1]:8.2f}{unit} {ours[1] / theirs[1]:6.2f}")

    loads, firsts = {}, {}
    for case, sides in results.items():
        best = {side: min(sides[side]["run"], key=lambda t: t[1]) for side in sides}
        row(case, best["ours"], best["torch"])
        for part in sides["ours"].get("parts", {}):
            row(f"  {part}", sides["ours"]["parts"][part], sides["torch"]["parts"][part])
        for name in sides["ours"]["load"]:
            loads.setdefault(name, (sides["ours"]["load"][name], sides["torch"]["load"][name]))
            # torch maps safetensors lazily: its reads land in the first call, so compare this too
            firsts.setdefault(name, tuple([a + b for a, b in zip(sides[side]["load"][name], sides[side]["first"][name])]
                                          for side in ("ours", "torch")))
    for name, (ours, theirs) in loads.items():
        row(f"load {name} (cold)", ours, theirs)
    for name, (ours, theirs) in firsts.items():
        row(f"load + 1st call {name}", ours, theirs)
    print()
    print(f"{'peak RSS per run':28s} {'ours GB':>10s} {'torch GB':>10s} {'ratio':>6s}")
    for case, sides in results.items():
        ours, theirs = sides["ours"]["peak_rss"] / 1e9, sides["torch"]["peak_rss"] / 1e9
        print(f"{case:28s} {ours:10.2f} {theirs:10.2f} {ours / theirs:6.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma-separated, from {list(CASES)}")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("KANDINSKY_BENCH_DIR", "/tmp/kandinsky-bench")),
                        help="where the random-weight checkpoints are kept between runs")
    parser.add_argument("--steps", type=int, default=2, help="timed UNet steps per side (the best is reported)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure each case this many times, alternating which side goes first "
                             "(the machine's load changes between runs; the best run is reported)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # a measurement process (either environment)
    parser.add_argument("--side", choices=("ours", "torch"), default="ours", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", help=argparse.SUPPRESS)  # reference environment: write checkpoints
    args = parser.parse_args()

    if args.prepare:
        prepare(args.work, args.prepare.split(","))
        return 0
    if args.run:
        runner = run_torch if args.side == "torch" else run_ours
        print("RESULT " + json.dumps(runner(args.run, args.work, args.steps)), flush=True)
        return 0

    cases = [c for c in args.cases.split(",") if c]
    for case in cases:
        if case not in CASES:
            parser.error(f"unknown case {case!r}; choose from {list(CASES)}")
    needed = sorted({name for case in cases for name in CASES[case][0]})
    args.work.mkdir(parents=True, exist_ok=True)
    subprocess.run([TORCH_PYTHON, __file__, "--prepare", ",".join(needed), "--work", str(args.work)], check=True)

    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, {memory_gb():.0f} GB RAM; load average {load_average()}",
          flush=True)
    results = {}
    sides = [("ours", sys.executable), ("torch", TORCH_PYTHON)]
    for case in cases:
        results[case] = {}
        for round_ in range(args.rounds):
            for side, python in (sides if round_ % 2 == 0 else sides[::-1]):
                result = subprocess_run(python, side, case, args.work, args.steps)
                run = min(result["run"], key=lambda t: t[1])
                print(f"  {case:12s} {side:5s} {run[0]:7.2f} s wall {run[1]:7.2f} s CPU  "
                      f"peak RSS {result['peak_rss'] / 1e9:5.2f} GB  (load average {load_average()})",
                      flush=True)
                kept = results[case].get(side)
                if kept is None:
                    results[case][side] = result
                else:  # keep every timed run; the table reports the best (least disturbed) one
                    kept["run"] += result["run"]
                    kept["peak_rss"] = max(kept["peak_rss"], result["peak_rss"])
    print()
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


if __name__ == "__main__":
    sys.exit(main())
