"""Memory needed per model family and dtype: parameter bytes per folder, and measured peaks.

    python tools/measure_memory.py                    # the table (app environment, no weights needed)
    python tools/measure_memory.py --torch-check      # also count with diffusers/transformers (meta device)
    python tools/measure_memory.py --run unet_2_2@512:float32 [CASE ...]   # measured peak RSS

Parameter counts come from the REAL component configs (../shared/reference-configs) and our
model classes, built under MindSpore's `no_init_parameters()` so that no parameter data is
allocated (the whole table costs ~0.4 GB of RSS, the process itself). `--torch-check` counts the same
components with diffusers 0.35.2 / transformers 4.57.1 on the "meta" device in the reference
environment and fails on any difference. Bytes = parameters x 4 (float32) or x 2
(float16 / bfloat16: the engine stores every floating parameter at the chosen dtype, including
T5's `wo` that transformers keeps in float32, and widens weights to float32 one layer at a time).

`--run COMPONENT@SIZE:DTYPE` (DTYPE float32, float16, bfloat16 or checkpoint = as the published fp16
files store each tensor, which a float32 app keeps for T5) measures, in a fresh process per case, the peak resident memory of
one component call at an image size: the model is built from the real config and filled through
backend.weights.load_state_dict with constant weights at DTYPE (the real load path without
files), then called once on what a text-to-image run at SIZE feeds it (batch 2 = guidance).
Components: unet_2_2 (2.2 decoder UNet), unet_3 (Kandinsky3UNet, 64 text tokens), movq_2_2 /
movq_3 (decode one latent), t5 (the K3 text encoder at KANDINSKY_T5_LAYERS layers, default 2, on
2 x 128 tokens; SIZE is ignored), prior_unit_2_2 (the 2.2 prior + CLIP text encoder, what a
text-only job loads: one guided prior step on 2 x 77 tokens; SIZE is ignored), prior_folder_2_2
(the whole 2.2 prior folder, its ViT-bigG image encoder too, which also embeds the zero image).
It prints the process baseline (after imports), the RSS with
the weights resident, and the peak: peak - resident = the call's working memory.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from reference_env import TORCH_PYTHON

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = Path(os.environ.get("KANDINSKY_REFERENCE_CONFIGS", ROOT.parent / "shared" / "reference-configs"))

# component kind -> (our module, our class, reference library class)
CLASSES = {
    "prior": ("backend.models.prior_transformer", "PriorTransformer", "diffusers.PriorTransformer"),
    "clip_text": ("backend.models.clip", "CLIPTextModelWithProjection", "transformers.CLIPTextModelWithProjection"),
    "clip_vision": ("backend.models.clip", "CLIPVisionModelWithProjection",
                    "transformers.CLIPVisionModelWithProjection"),
    "mclip": ("backend.models.mclip", "MultilingualCLIP", "diffusers.MultilingualCLIP"),
    "unet": ("backend.models.unet_2d_condition", "UNet2DConditionModel", "diffusers.UNet2DConditionModel"),
    "unet_3": ("backend.models.unet_kandinsky3", "Kandinsky3UNet", "diffusers.Kandinsky3UNet"),
    "movq": ("backend.models.vq_model", "VQModel", "diffusers.VQModel"),
    "t5": ("backend.models.t5", "T5EncoderModel", "transformers.T5EncoderModel"),
}

# family -> folder role -> (Hub repo, [(component, kind, reference config)])
# 2.1's inpainting folder ships the same MCLIP and MoVQ configs as kandinsky-2-1 (the reference
# configs hold only its unet.json), so those two are read from kandinsky-2-1.
FAMILIES = {
    "2.1": {
        "prior": ("kandinsky-community/kandinsky-2-1-prior", [
            ("prior", "prior", "kandinsky-2-1-prior/prior.json"),
            ("text_encoder", "clip_text", "kandinsky-2-1-prior/text_encoder.json"),
            ("image_encoder", "clip_vision", "kandinsky-2-1-prior/image_encoder.json")]),
        "decoder": ("kandinsky-community/kandinsky-2-1", [
            ("text_encoder", "mclip", "kandinsky-2-1/text_encoder.json"),
            ("unet", "unet", "kandinsky-2-1/unet.json"),
            ("movq", "movq", "kandinsky-2-1/movq.json")]),
        "inpaint": ("kandinsky-community/kandinsky-2-1-inpaint", [
            ("text_encoder", "mclip", "kandinsky-2-1/text_encoder.json"),
            ("unet", "unet", "kandinsky-2-1-inpaint/unet.json"),
            ("movq", "movq", "kandinsky-2-1/movq.json")]),
    },
    "2.2": {
        "prior": ("kandinsky-community/kandinsky-2-2-prior", [
            ("prior", "prior", "kandinsky-2-2-prior/prior.json"),
            ("text_encoder", "clip_text", "kandinsky-2-2-prior/text_encoder.json"),
            ("image_encoder", "clip_vision", "kandinsky-2-2-prior/image_encoder.json")]),
        "decoder": ("kandinsky-community/kandinsky-2-2-decoder", [
            ("unet", "unet", "kandinsky-2-2-decoder/unet.json"),
            ("movq", "movq", "kandinsky-2-2-decoder/movq.json")]),
        "inpaint": ("kandinsky-community/kandinsky-2-2-decoder-inpaint", [
            ("unet", "unet", "kandinsky-2-2-decoder-inpaint/unet.json"),
            ("movq", "movq", "kandinsky-2-2-decoder-inpaint/movq.json")]),
        "controlnet": ("kandinsky-community/kandinsky-2-2-controlnet-depth", [
            ("unet", "unet", "kandinsky-2-2-controlnet-depth/unet.json"),
            ("movq", "movq", "kandinsky-2-2-controlnet-depth/movq.json")]),
    },
    "3": {
        # one folder, loaded by the model manager as two units (backend/manager.py STAGES)
        "decoder": ("kandinsky-community/kandinsky-3", [
            ("text_encoder", "t5", "kandinsky-3/text_encoder.json"),
            ("unet", "unet_3", "kandinsky-3/unet.json"),
            ("movq", "movq", "kandinsky-3/movq.json")]),
    },
}

# The units a text-to-image run loads one after the other (the model manager frees the earlier
# one when the budget cannot hold both): 2.x prior unit (the prior folder less its image encoder,
# backend/families.py Stage.on_demand) then decoder folder; 3: T5, then UNet + MoVQ.
PRIOR_UNIT = [("prior", "prior"), ("prior", "text_encoder")]
PHASES = {
    "2.1": [("prior unit", PRIOR_UNIT), ("decoder folder", [("decoder", None)])],
    "2.2": [("prior unit", PRIOR_UNIT), ("decoder folder", [("decoder", None)])],
    "3": [("T5 text encoder", [("decoder", "text_encoder")]), ("UNet + MoVQ", [("decoder", "unet"),
                                                                             ("decoder", "movq")])],
}
GB = 1e9

# --run COMPONENT -> the models it builds: (reference config, kind); a call uses the first
RUN_CASES = {
    "unet_2_2": [("kandinsky-2-2-decoder/unet.json", "unet")],
    "unet_3": [("kandinsky-3/unet.json", "unet_3")],
    "movq_2_2": [("kandinsky-2-2-decoder/movq.json", "movq")],
    "movq_3": [("kandinsky-3/movq.json", "movq")],
    "t5": [("kandinsky-3/text_encoder.json", "t5")],
    # the 2.2 prior unit of a text-only job, and the whole prior folder (its image encoder too)
    "prior_unit_2_2": [("kandinsky-2-2-prior/prior.json", "prior"),
                       ("kandinsky-2-2-prior/text_encoder.json", "clip_text")],
    "prior_folder_2_2": [("kandinsky-2-2-prior/prior.json", "prior"),
                         ("kandinsky-2-2-prior/text_encoder.json", "clip_text"),
                         ("kandinsky-2-2-prior/image_encoder.json", "clip_vision")],
}


def read_config(path: str) -> dict:
    return json.loads((CONFIGS / path).read_text())


# ------------------------------------------------------------------------------ counting


# transformers' T5 `_keep_in_fp32_modules`: the published fp16 shards store these in float32.
KEEP_FP32 = {"t5": ".wo."}


def count_ours(kind: str, config: dict) -> tuple[int, int]:
    """(parameters, of which kept in float32 by the published half-precision files) of our class
    built from `config`, with no parameter data allocated."""
    import importlib

    import numpy as np
    from mindspore.nn.utils import no_init_parameters

    module, cls_name, _ = CLASSES[kind]
    cls = getattr(importlib.import_module(module), cls_name)
    with no_init_parameters():  # parameters keep their initializer: shapes only, no memory
        model = cls.from_config(config)
    params = dict(model.parameters_and_names())
    if not all(p.has_init for p in params.values()):
        raise RuntimeError(f"{cls_name}: some parameters were allocated while counting")
    kept = KEEP_FP32.get(kind)
    return (sum(int(np.prod(p.shape)) for p in params.values()),
            sum(int(np.prod(p.shape)) for k, p in params.items() if kept and kept in k))


def count_torch(kind: str, config: dict) -> tuple[int, int]:
    """Parameters of the reference class on the meta device (reference environment only)."""
    import importlib

    import torch

    library, cls_name = CLASSES[kind][2].split(".")
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        if kind == "mclip":
            from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP
            model = MultilingualCLIP(MCLIPConfig(**kwargs))
        elif library == "transformers":
            transformers = importlib.import_module("transformers")
            config_cls = getattr(transformers, "T5Config" if kind == "t5" else
                                 cls_name.replace("ModelWithProjection", "Config"))
            model = getattr(transformers, cls_name)(config_cls(**kwargs))
        else:
            model = getattr(importlib.import_module(library), cls_name).from_config(kwargs)
    kept = KEEP_FP32.get(kind)
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for k, p in model.named_parameters() if kept and kept in k))


def all_components():
    for family, folders in FAMILIES.items():
        for role, (repo, components) in folders.items():
            for name, kind, config in components:
                yield family, role, repo, name, kind, config


def count_all(side: str) -> dict:
    counter = count_ours if side == "ours" else count_torch
    cache: dict = {}
    counts = {}
    for family, role, _, name, kind, config in all_components():
        if (kind, config) not in cache:
            cache[(kind, config)] = counter(kind, read_config(config))
        counts[f"{family}/{role}/{name}"], kept = cache[(kind, config)]
        if kept:
            counts[f"{family}/{role}/{name}/float32 in the fp16 files"] = kept
    return counts


# --------------------------------------------------------------------------------- table


def fmt(n_bytes: float) -> str:
    return f"{n_bytes / GB:.2f}"


def print_table(counts: dict) -> None:
    print("Parameter bytes per folder (GB = 10^9 bytes), from the real configs\n")
    print("| family | folder (Hub repo) | component | parameters | float32 GB | float16/bfloat16 GB |")
    print("|---|---|---|---:|---:|---:|")
    folder_totals = {}
    for family, folders in FAMILIES.items():
        for role, (repo, components) in folders.items():
            total = 0
            for name, _, _ in components:
                n = counts[f"{family}/{role}/{name}"]
                total += n
                print(f"| {family} | {role} ({repo}) | {name} | {n:,} | {fmt(4 * n)} | {fmt(2 * n)} |")
            folder_totals[(family, role)] = total
            print(f"| {family} | **{role} total** | | **{total:,}** | **{fmt(4 * total)}** | **{fmt(2 * total)}** |")
    kept = counts["3/decoder/text_encoder/float32 in the fp16 files"]
    t5 = counts["3/decoder/text_encoder"]
    t5_stored = 2 * t5 + 2 * kept
    print(f"\nK3 text encoder as the published fp16 shards store it (its {kept:,} `wo` parameters in float32): "
          f"{fmt(t5_stored)} GB. A float32 app keeps it so (backend/families.py: keeps_checkpoint_precision); "
          "a float16/bfloat16 app converts `wo` too.")
    print("\nThe 2.x prior unit: a text-only job (every task but interpolating an image) loads the prior folder "
          "less its image encoder, whose zero-image embedding is computed once per checkpoint and cached "
          "(backend/manager.py); the encoder (on demand) loads alone for the first job of a checkpoint, "
          "freed before the prior unit loads, and with the prior unit for interpolation with an image\n")
    print("| family | dtype | prior folder GB (before) | prior unit GB (now) | image encoder GB (on demand) |")
    print("|---|---|---:|---:|---:|")
    for family in ("2.1", "2.2"):
        unit = sum(counts[f"{family}/{role}/{name}"] for role, name in PRIOR_UNIT)
        encoder = counts[f"{family}/prior/image_encoder"]
        for dtype, itemsize in (("float32", 4), ("float16 / bfloat16", 2)):
            print(f"| {family} | {dtype} | {fmt(folder_totals[(family, 'prior')] * itemsize)} | "
                  f"{fmt(unit * itemsize)} | {fmt(encoder * itemsize)} |")
    print("\nText-to-image: parameters resident per phase; the peak is the largest phase when the budget "
          "frees the earlier unit, the sum when it keeps both\n")
    print("| family | dtype | phases (GB) | largest phase GB | all phases GB |")
    print("|---|---|---|---:|---:|")
    for family, phases in PHASES.items():
        for dtype, itemsize in (("float32", 4), ("float16 / bfloat16", 2)):
            sizes = []
            for label, parts in phases:
                n = sum(folder_totals[(family, role)] if name is None else counts[f"{family}/{role}/{name}"]
                        for role, name in parts)
                kinds = {kind for role, name in parts for component, kind, _ in FAMILIES[family][role][1]
                         if component == name}
                if itemsize == 4 and kinds == {"t5"}:
                    sizes.append((label + " (as stored)", t5_stored))  # the float32 app's T5 (see above)
                    continue
                sizes.append((label, n * itemsize))
            text = " then ".join(f"{label} {fmt(size)}" for label, size in sizes)
            print(f"| {family} | {dtype} | {text} | {fmt(max(s for _, s in sizes))} | "
                  f"{fmt(sum(s for _, s in sizes))} |")


# ----------------------------------------------------------------------- measured peaks


def run_case(case: str) -> dict:
    """One component call at one size and dtype, in this (fresh) process; see the module docstring."""
    import importlib

    import numpy as np
    import psutil

    sys.path.insert(0, str(ROOT))
    import mindspore as ms

    from backend.weights import load_state_dict

    component, rest = case.split("@")
    size, dtype = rest.split(":")
    size = int(size)
    baseline = psutil.Process().memory_info().rss
    models, params = [], {}
    for config_path, kind in RUN_CASES[component]:
        config = read_config(config_path)
        if kind == "t5":
            config["num_layers"] = int(os.environ.get("KANDINSKY_T5_LAYERS", "2"))
        module, cls_name, _ = CLASSES[kind]
        model = getattr(importlib.import_module(module), cls_name).from_config(config)
        models.append((model, config))
        params[kind] = dict(model.parameters_and_names())
    n_params = sum(int(np.prod(p.shape)) for named in params.values() for p in named.values())

    def constant_tensors(kind):  # small fan-in-scaled constants: finite activations, real shapes and dtypes
        for key, p in params[kind].items():
            shape = tuple(p.shape)
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            value = 1.0 if key.endswith(("norm.weight", "ln.weight", "layer_norm.weight")) else 0.5 / fan_in ** 0.5
            # "checkpoint": as the published fp16 files store them (half, but T5's `wo` in float32)
            half = dtype == "checkpoint" and not (KEEP_FP32.get(kind) and KEEP_FP32[kind] in key)
            yield key, np.full(shape, value, np.float16 if half else np.float32)

    start = time.time()
    for (model, _), (_, kind) in zip(models, RUN_CASES[component]):
        load_state_dict(model, constant_tensors(kind), dtype=dtype)
        model.set_train(False)
    load_s = time.time() - start
    loaded = psutil.Process().memory_info().rss
    rng = np.random.default_rng(0)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731  (numpy, as the pipelines pass)
    latent = size // 8
    (model, config), *others = models
    cpu0 = time.process_time()
    start = time.time()
    if component == "unet_2_2":
        out = model(f32(2, 4, latent, latent), 500, encoder_hidden_states=None,
                    added_cond_kwargs={"image_embeds": f32(2, config["encoder_hid_dim"])})
    elif component == "unet_3":
        out = model(f32(2, 4, latent, latent), 500, encoder_hidden_states=f32(2, 64, config["encoder_hid_dim"]),
                    encoder_attention_mask=np.ones((2, 64), np.int64))
    elif component.startswith("movq"):
        out = model.decode(f32(1, 4, latent, latent), force_not_quantize=True)["sample"]
    elif component.startswith("prior"):
        # one guided step of a text job: CLIP reads prompt + negative (2 x 77 tokens), the prior runs once
        (text_encoder, _), *image_encoder = others
        text = text_encoder(np.ones((2, 77), np.int64))
        out = model(f32(2, config["embedding_dim"]), 500, proj_embedding=text.text_embeds,
                    encoder_hidden_states=text.last_hidden_state, attention_mask=np.ones((2, 77), bool))
        for encoder, encoder_config in image_encoder:  # and the zero-image embedding, as get_zero_embed runs it
            side = encoder_config["image_size"]
            encoder(np.zeros((1, 3, side, side), np.float32))
    else:
        out = model(np.ones((2, 128), np.int64), np.ones((2, 128), np.int64)).last_hidden_state
    wall = time.time() - start
    cpu = time.process_time() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = out.asnumpy() if hasattr(out, "asnumpy") else np.asarray(out)  # numpy on the host path
    finite = bool(np.isfinite(out.astype(np.float32)).all())
    param_bytes = sum(int(np.prod(p.shape)) * (4 if p.dtype == ms.float32 else 2)
                      for named in params.values() for p in named.values())
    return {"case": case, "parameters": n_params, "param_gb": param_bytes / GB,
            "baseline_rss_gb": baseline / GB, "loaded_rss_gb": loaded / GB, "peak_rss_gb": peak / GB,
            "working_gb": (peak - loaded) / GB, "load_s": load_s, "call_wall_s": wall, "call_cpu_s": cpu,
            "output_finite": finite, "loadavg": os.getloadavg()}


# --------------------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch-check", action="store_true", help="compare the counts with diffusers/transformers")
    parser.add_argument("--run", nargs="+", metavar="COMPONENT@SIZE:DTYPE", help="measure peak RSS of these calls")
    parser.add_argument("--side", choices=["ours", "torch", "case"], help=argparse.SUPPRESS)
    parser.add_argument("case", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "torch":
        print("COUNTS " + json.dumps(count_all("torch")))
        return
    if args.side == "case":
        print("RESULT " + json.dumps(run_case(args.case)), flush=True)
        return
    if args.run:
        for case in args.run:
            out = subprocess.run([sys.executable, __file__, "--side", "case", case], capture_output=True, text=True)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{case}: failed (exit {out.returncode})\n{out.stderr[-2000:]}", flush=True)
                continue
            r = json.loads(line[7:])
            print(f"{case:22s} params {fmt(r['param_gb'] * GB)} GB  baseline {r['baseline_rss_gb']:.2f}  "
                  f"loaded {r['loaded_rss_gb']:.2f}  peak {r['peak_rss_gb']:.2f} GB  "
                  f"(working {r['working_gb']:.2f} GB)  call {r['call_wall_s']:.1f} s wall / "
                  f"{r['call_cpu_s']:.1f} s CPU  load avg {r['loadavg'][0]:.2f}  finite {r['output_finite']}",
                  flush=True)
        return

    sys.path.insert(0, str(ROOT))
    counts = count_all("ours")
    if args.torch_check:
        out = subprocess.run([TORCH_PYTHON, __file__, "--side", "torch"], check=True, capture_output=True, text=True)
        reference = json.loads(next(x[7:] for x in out.stdout.splitlines() if x.startswith("COUNTS ")))
        wrong = {k: (counts[k], reference[k]) for k in counts if counts[k] != reference[k]}
        if wrong:
            raise SystemExit(f"parameter counts differ from diffusers/transformers: {wrong}")
        print(f"All {len(counts)} component counts equal diffusers 0.35.2 / transformers 4.57.1 (meta device).\n")
    print_table(counts)


if __name__ == "__main__":
    main()
