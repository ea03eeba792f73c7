"""Our MindSpore port vs diffusers/transformers on the REAL component configs (random weights).

    python tools/compare_full_size.py [component ...]        # driver, in the app environment

For each component the driver runs this same file twice: once in the torch environment
(`--side torch`: build the model from ../shared/reference-configs with the library's own random
init, save it with save_pretrained, run it on small fixed inputs, save inputs and outputs), then
in ours (`--side ours`: load the saved folder with backend.weights.load_model, run the same
inputs). It prints the max abs difference per component and, for ours, the load's peak memory
as a multiple of the weights' size. One component at a time keeps memory within 24 GB.

    python tools/compare_full_size.py --previous-engine /path/to/other/checkout [component ...]

also runs the other checkout's engine on the same weights and inputs first and prints the max change
of ours against it (0 where the arithmetic is the same): how a refactor is shown to keep outputs.

Components: unet (kandinsky-2-2-decoder), unet_inpaint, unet_controlnet, movq, prior (clip_std
set to ones: published priors carry real statistics, zeros would make the output trivially 0),
text_encoder (ViT-bigG-14 text tower), image_encoder (ViT-bigG-14 vision tower, 1.8B parameters);
Kandinsky 2.1: unet_2_1 (text_image conditioning), unet_2_1_inpaint (in 9), mclip (MultilingualCLIP:
XLM-RoBERTa-large + LinearTransformation, 560M), prior_2_1, text_encoder_2_1 / image_encoder_2_1
(OpenAI CLIP ViT-L/14 towers, quick_gelu; the text input is padded with "!" = id 0 as the published
2.1 prior tokenizer pads);
Kandinsky 3: unet_3 (Kandinsky3UNet, 3,055,348,228 parameters, 12.2 GB in float32 per side: the two
sides run one after the other, never together; its zero-initialised `context_mlp` layers (the time
conditioning of every norm) get random weights, as the prior's clip_std does, or the comparison would
not see time conditioning at all), movq_3 (the 2.x MoVQ with block_out_channels 256/512/512/1024),
text_encoder_3 (the Flan-UL2 T5 encoder at REDUCED DEPTH: num_layers 2 of 32, everything else as in
text_encoder.json (d_model 4096, d_ff 16384, 16 heads x 256, 32128 tokens), 668M parameters; the full
8.7B-parameter encoder is 34.9 GB in float32 per side, beyond this 24 GB machine. Set
KANDINSKY_T5_LAYERS to change the depth);
ControlNet from a photo: depth_anything_small (depth-anything/Depth-Anything-V2-Small-hf, 24.8M parameters; its
config from tests/fixtures/depth_anything_v2_small/, made by tools/fixtures/make_depth_anything.py: the shared
reference configs do not have it; every parameter redrawn with a scale that keeps activations near 1, since
transformers' init (N(0, 0.02), zero biases) leaves the ReLU head almost all zero; a square 518x518 input,
where the position table is used as it is, and a 364x518 one, where it is resized).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from reference_env import TORCH_PYTHON

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = Path(os.environ.get("KANDINSKY_REFERENCE_CONFIGS", ROOT.parent / "shared" / "reference-configs"))
WORK = Path(os.environ.get("KANDINSKY_COMPARE_DIR", "/tmp/kandinsky-full-size"))

COMPONENTS = {
    # name: (reference-config file, library class, our module, our class)
    "unet": ("kandinsky-2-2-decoder/unet.json", "diffusers.UNet2DConditionModel",
             "backend.models.unet_2d_condition", "UNet2DConditionModel"),
    "unet_inpaint": ("kandinsky-2-2-decoder-inpaint/unet.json", "diffusers.UNet2DConditionModel",
                     "backend.models.unet_2d_condition", "UNet2DConditionModel"),
    "unet_controlnet": ("kandinsky-2-2-controlnet-depth/unet.json", "diffusers.UNet2DConditionModel",
                        "backend.models.unet_2d_condition", "UNet2DConditionModel"),
    "movq": ("kandinsky-2-2-decoder/movq.json", "diffusers.VQModel", "backend.models.vq_model", "VQModel"),
    "prior": ("kandinsky-2-2-prior/prior.json", "diffusers.PriorTransformer",
              "backend.models.prior_transformer", "PriorTransformer"),
    "text_encoder": ("kandinsky-2-2-prior/text_encoder.json", "transformers.CLIPTextModelWithProjection",
                     "backend.models.clip", "CLIPTextModelWithProjection"),
    "image_encoder": ("kandinsky-2-2-prior/image_encoder.json", "transformers.CLIPVisionModelWithProjection",
                      "backend.models.clip", "CLIPVisionModelWithProjection"),
    "unet_2_1": ("kandinsky-2-1/unet.json", "diffusers.UNet2DConditionModel",
                 "backend.models.unet_2d_condition", "UNet2DConditionModel"),
    "unet_2_1_inpaint": ("kandinsky-2-1-inpaint/unet.json", "diffusers.UNet2DConditionModel",
                         "backend.models.unet_2d_condition", "UNet2DConditionModel"),
    "mclip": ("kandinsky-2-1/text_encoder.json", "diffusers.MultilingualCLIP", "backend.models.mclip",
              "MultilingualCLIP"),
    "prior_2_1": ("kandinsky-2-1-prior/prior.json", "diffusers.PriorTransformer",
                  "backend.models.prior_transformer", "PriorTransformer"),
    "text_encoder_2_1": ("kandinsky-2-1-prior/text_encoder.json", "transformers.CLIPTextModelWithProjection",
                         "backend.models.clip", "CLIPTextModelWithProjection"),
    "image_encoder_2_1": ("kandinsky-2-1-prior/image_encoder.json", "transformers.CLIPVisionModelWithProjection",
                          "backend.models.clip", "CLIPVisionModelWithProjection"),
    "unet_3": ("kandinsky-3/unet.json", "diffusers.Kandinsky3UNet", "backend.models.unet_kandinsky3",
               "Kandinsky3UNet"),
    "movq_3": ("kandinsky-3/movq.json", "diffusers.VQModel", "backend.models.vq_model", "VQModel"),
    "text_encoder_3": ("kandinsky-3/text_encoder.json", "transformers.T5EncoderModel", "backend.models.t5",
                       "T5EncoderModel"),
    # an absolute path: not one of the shared reference configs
    "depth_anything_small": (str(ROOT / "tests" / "fixtures" / "depth_anything_v2_small" / "config.json"),
                             "transformers.DepthAnythingForDepthEstimation", "backend.models.depth_anything",
                             "DepthAnythingForDepthEstimation"),
}

# The K3 text encoder is compared at reduced depth (see the module docstring).
T5_LAYERS = int(os.environ.get("KANDINSKY_T5_LAYERS", "2"))
# Shard the torch side's checkpoint so no shard approaches the machine's free memory.
MAX_SHARD_SIZE = "2GB"


def reference_config(name: str) -> dict:
    """The real config of a component, with the one documented change (T5 depth)."""
    config = json.loads((CONFIGS / COMPONENTS[name][0]).read_text())
    if name == "text_encoder_3":
        config["num_layers"] = T5_LAYERS
    return config


def make_inputs(name: str, config: dict) -> dict[str, np.ndarray]:
    """Small fixed inputs (latent 16x16 = 128 px, batch 2 as with guidance)."""
    rng = np.random.default_rng(0)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    if name == "unet_3":
        # square (batch 2, padded text in row 1) and non-square (batch 1, (B,) timestep) cases; 12 text tokens
        mask = np.ones((2, 12), np.int64)
        mask[1, 7:] = 0
        return {"sample": f32(2, 4, 16, 16), "timestep": np.array(537, np.int64),
                "encoder_hidden_states": f32(2, 12, config["encoder_hid_dim"]), "encoder_attention_mask": mask,
                "wide_sample": f32(1, 4, 16, 24), "wide_timestep": np.array([151], np.int64),
                "wide_encoder_hidden_states": f32(1, 12, config["encoder_hid_dim"]),
                "wide_encoder_attention_mask": np.ones((1, 12), np.int64)}
    if name == "depth_anything_small":
        # ImageNet-normalised pixels as DPTImageProcessor makes them: 518x518 (the 37x37 table as it is), 364x518
        return {"pixel_values": f32(1, 3, 518, 518), "wide_pixel_values": f32(1, 3, 364, 518)}
    if name == "movq_3":
        return {"latents": f32(1, 4, 16, 24), "image": rng.uniform(-1, 1, (1, 3, 128, 96)).astype(np.float32)}
    if name == "text_encoder_3":
        # 128 tokens as the pipeline tokenizes (every relative-position bucket is used); row 1 padded (id 0)
        ids = np.zeros((2, 128), np.int64)
        ids[0] = rng.integers(2, config["vocab_size"], 128)
        ids[0, -1] = 1  # </s>
        ids[1, :9] = [363, 3, 9, 1712, 13, 3, 9, 4049, 1]
        return {"input_ids": ids, "attention_mask": (np.arange(128)[None] < [[128], [9]]).astype(np.int64)}
    if name.startswith("unet_2_1"):
        # 2.1: image and pooled text embeddings (cross_attention_dim), MCLIP token states (encoder_hid_dim)
        return {"sample": f32(2, config["in_channels"], 16, 16), "timestep": np.array(537, np.int64),
                "image_embeds": f32(2, config["cross_attention_dim"]),
                "text_embeds": f32(2, config["cross_attention_dim"]),
                "encoder_hidden_states": f32(2, 77, config["encoder_hid_dim"])}
    if name.startswith("unet"):
        inputs = {"sample": f32(2, config["in_channels"] if name != "unet_controlnet" else 4, 16, 16),
                  "timestep": np.array(537, np.int64), "image_embeds": f32(2, config["encoder_hid_dim"])}
        if name == "unet_controlnet":
            inputs["hint"] = rng.uniform(0, 1, (2, 3, 128, 128)).astype(np.float32)
        return inputs
    if name == "movq":
        return {"latents": f32(1, 4, 16, 16), "image": rng.uniform(-1, 1, (1, 3, 128, 128)).astype(np.float32)}
    if name == "mclip":
        # XLM-R ids (<s> ... </s>, then <pad> = 1) as the tokenizer pads to 77, with the attention mask
        ids = np.full((2, 77), config["pad_token_id"], np.int64)
        ids[0, :7] = [0, 10, 2367, 7515, 47, 70, 2]
        ids[1, :4] = [0, 66923, 136, 2]
        return {"input_ids": ids, "attention_mask": (ids != config["pad_token_id"]).astype(np.int64)}
    if name.startswith("prior"):
        d = config["embedding_dim"]
        mask = np.zeros((2, 77), bool)
        mask[:, :9] = True
        return {"hidden_states": f32(2, d), "timestep": np.array(731, np.int64), "proj_embedding": f32(2, d),
                "encoder_hidden_states": f32(2, 77, d), "attention_mask": mask}
    if name.startswith("text_encoder"):
        # 2.1's published tokenizer pads with "!" (id 0); 2.2's with the end-of-text token
        pad = 0 if name == "text_encoder_2_1" else config.get("pad_token_id", 1)
        ids = np.full((2, 77), pad, np.int64)
        ids[0, :6] = [49406, 320, 1929, 530, 518, 49407]
        ids[1, :4] = [49406, 2368, 3469, 49407]
        return {"input_ids": ids}
    if name.startswith("image_encoder"):
        return {"pixel_values": f32(1, 3, 224, 224)}
    raise KeyError(name)


# ----------------------------------------------------------------------------- torch side


def run_torch(name: str, folder: Path) -> None:
    import importlib
    import resource

    import torch

    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    _, cls_path, _, _ = COMPONENTS[name]
    config = reference_config(name)
    library, cls_name = cls_path.split(".")
    cls = getattr(importlib.import_module(library), cls_name) if name != "mclip" else None
    start = time.time()
    if name == "depth_anything_small":
        from transformers import DepthAnythingConfig
        model = cls(DepthAnythingConfig.from_dict(config)).eval()
        generator = torch.Generator().manual_seed(1)
        transposed = {f"{prefix}.weight" for prefix, module in model.named_modules()
                      if isinstance(module, torch.nn.ConvTranspose2d)}
        for key, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in key and key.endswith("weight"):
                param.data.copy_(1.0 + 0.1 * noise)
            elif key.endswith("lambda1"):  # DINOv2's trained layer scales are small
                param.data.copy_(0.1 + 0.02 * noise)
            elif key.endswith("weight") and param.ndim >= 2:  # fan-in scaled: (out, in, kh, kw) or (in, out, k, k)
                fan_in = param.shape[0] if key in transposed else param[0].numel()
                param.data.copy_(noise / fan_in ** 0.5)
            else:  # biases, class and mask tokens, position table
                param.data.copy_(0.1 * noise)
    elif name == "mclip":
        from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP
        model = MultilingualCLIP(MCLIPConfig(**{k: v for k, v in config.items() if not k.startswith("_")})).eval()
    elif library == "transformers":
        config_cls = getattr(importlib.import_module("transformers"),
                             "T5Config" if cls_name == "T5EncoderModel" else
                             cls_name.replace("ModelWithProjection", "Config"))
        model = cls(config_cls(**{k: v for k, v in config.items() if not k.startswith("_")})).eval()
    else:
        model = cls.from_config(config).eval()
    if name.startswith("prior"):
        model.clip_std.data.fill_(1.0)
    if name == "unet_3":
        generator = torch.Generator().manual_seed(1)
        for key, param in model.named_parameters():
            if ".context_mlp." in key:  # zero-initialised by diffusers: random, small
                std = 0.5 / param.shape[-1] ** 0.5 if param.ndim == 2 else 0.1
                param.data.normal_(0.0, std, generator=generator)
    built = time.time() - start
    model.save_pretrained(str(folder), safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    inputs = make_inputs(name, config)
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    start = time.time()
    if name == "unet_3":
        outputs = {prefix + "sample": model(t[prefix + "sample"], t[prefix + "timestep"],
                                            encoder_hidden_states=t[prefix + "encoder_hidden_states"],
                                            encoder_attention_mask=t[prefix + "encoder_attention_mask"]).sample
                   for prefix in ("", "wide_")}
    elif name == "movq_3":
        outputs = {"decoded": model.decode(t["latents"], force_not_quantize=True).sample,
                   "decoded_quantized": model.decode(t["latents"]).sample,
                   "encoded": model.encode(t["image"]).latents}
    elif name == "text_encoder_3":
        outputs = {"last_hidden_state": model(input_ids=t["input_ids"],
                                              attention_mask=t["attention_mask"]).last_hidden_state}
    elif name.startswith("unet_2_1"):
        added = {"image_embeds": t["image_embeds"], "text_embeds": t["text_embeds"]}
        outputs = {"sample": model(t["sample"], t["timestep"], encoder_hidden_states=t["encoder_hidden_states"],
                                   added_cond_kwargs=added).sample}
    elif name.startswith("unet"):
        added = {"image_embeds": t["image_embeds"]}
        if "hint" in t:
            added["hint"] = t["hint"]
        outputs = {"sample": model(t["sample"], t["timestep"], encoder_hidden_states=None,
                                   added_cond_kwargs=added).sample}
    elif name == "mclip":
        text_embeds, last_hidden_state = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
        outputs = {"text_embeds": text_embeds, "last_hidden_state": last_hidden_state}
    elif name == "movq":
        outputs = {"decoded": model.decode(t["latents"], force_not_quantize=True).sample,
                   "encoded": model.encode(t["image"]).latents}
    elif name.startswith("prior"):
        out = model(t["hidden_states"], timestep=t["timestep"], proj_embedding=t["proj_embedding"],
                    encoder_hidden_states=t["encoder_hidden_states"], attention_mask=t["attention_mask"])
        outputs = {"predicted_image_embedding": out.predicted_image_embedding,
                   "post_processed": model.post_process_latents(out.predicted_image_embedding)}
    elif name.startswith("text_encoder"):
        out = model(t["input_ids"])
        outputs = {"text_embeds": out.text_embeds, "last_hidden_state": out.last_hidden_state}
    elif name == "depth_anything_small":
        outputs = {"predicted_depth": model(t["pixel_values"]).predicted_depth,
                   "wide_predicted_depth": model(t["wide_pixel_values"]).predicted_depth}
    else:
        outputs = {"image_embeds": model(t["pixel_values"]).image_embeds}
    ran = time.time() - start
    params = sum(p.numel() for p in model.parameters())
    np.savez(folder / "io.npz", **{f"in_{k}": v for k, v in inputs.items()},
             **{f"out_{k}": v.float().numpy() for k, v in outputs.items()})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    (folder / "torch.json").write_text(json.dumps({"parameters": params, "build_s": built, "run_s": ran,
                                                   "peak_rss_gb": peak / 1e9}))


# ------------------------------------------------------------------------------- our side


def run_ours(name: str, folder: Path) -> dict:
    import importlib
    import resource

    import psutil

    sys.path.insert(0, str(ROOT))
    from backend.weights import find_weight_files, load_model

    _, _, module, cls_name = COMPONENTS[name]
    cls = getattr(importlib.import_module(module), cls_name)
    io = dict(np.load(folder / "io.npz"))
    weight_bytes = sum(f.stat().st_size for f in find_weight_files(folder))
    rss_before = psutil.Process().memory_info().rss
    start = time.time()
    model = load_model(cls, folder)
    load_s = time.time() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = {k[3:]: v for k, v in io.items() if k.startswith("in_")}  # the models take numpy arrays
    start = time.time()
    if name == "unet_3":
        outputs = {prefix + "sample": model(t[prefix + "sample"], io[f"in_{prefix}timestep"],
                                            encoder_hidden_states=t[prefix + "encoder_hidden_states"],
                                            encoder_attention_mask=io[f"in_{prefix}encoder_attention_mask"])
                   for prefix in ("", "wide_")}
    elif name == "movq_3":
        outputs = {"decoded": model.decode(t["latents"], force_not_quantize=True)["sample"],
                   "decoded_quantized": model.decode(t["latents"])["sample"],
                   "encoded": model.encode(t["image"])["latents"]}
    elif name == "text_encoder_3":
        outputs = {"last_hidden_state": model(io["in_input_ids"], io["in_attention_mask"]).last_hidden_state}
    elif name.startswith("unet_2_1"):
        added = {"image_embeds": t["image_embeds"], "text_embeds": t["text_embeds"]}
        outputs = {"sample": model(t["sample"], int(io["in_timestep"]),
                                   encoder_hidden_states=t["encoder_hidden_states"], added_cond_kwargs=added)}
    elif name.startswith("unet"):
        added = {"image_embeds": t["image_embeds"]}
        if "hint" in t:
            added["hint"] = t["hint"]
        outputs = {"sample": model(t["sample"], int(io["in_timestep"]), encoder_hidden_states=None,
                                   added_cond_kwargs=added)}
    elif name == "mclip":
        out = model(io["in_input_ids"], io["in_attention_mask"])
        outputs = {"text_embeds": out.text_embeds, "last_hidden_state": out.last_hidden_state}
    elif name == "movq":
        outputs = {"decoded": model.decode(t["latents"], force_not_quantize=True)["sample"],
                   "encoded": model.encode(t["image"])["latents"]}
    elif name.startswith("prior"):
        pred = model(t["hidden_states"], timestep=int(io["in_timestep"]), proj_embedding=t["proj_embedding"],
                     encoder_hidden_states=t["encoder_hidden_states"], attention_mask=t["attention_mask"])
        outputs = {"predicted_image_embedding": pred, "post_processed": model.post_process_latents(pred)}
    elif name.startswith("text_encoder"):
        out = model(io["in_input_ids"].astype(np.int32))
        outputs = {"text_embeds": out.text_embeds, "last_hidden_state": out.last_hidden_state}
    elif name == "depth_anything_small":
        outputs = {"predicted_depth": model(t["pixel_values"]), "wide_predicted_depth": model(t["wide_pixel_values"])}
    else:
        outputs = {"image_embeds": model(t["pixel_values"]).image_embeds}
    run_s = time.time() - start
    outputs = {key: value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value)
               for key, value in outputs.items()}
    diffs = {}
    for key, ours in outputs.items():
        ref = io[f"out_{key}"]
        diffs[key] = {"max_abs": float(np.abs(ours - ref).max()), "ref_max_abs": float(np.abs(ref).max())}
    # Engine against engine: KANDINSKY_COMPARE_SAVE=new keeps our outputs as ours_new.npz next to the
    # weights (run it in two checkouts with --keep); KANDINSKY_COMPARE_AGAINST=old reports the max
    # change against ours_old.npz.
    if os.environ.get("KANDINSKY_COMPARE_SAVE"):
        np.savez(folder / f"ours_{os.environ['KANDINSKY_COMPARE_SAVE']}.npz", **outputs)
    against = os.environ.get("KANDINSKY_COMPARE_AGAINST")
    if against:
        previous = np.load(folder / f"ours_{against}.npz")
        for key, ours in outputs.items():
            diffs[key]["max_abs_vs_" + against] = float(np.abs(ours - previous[key]).max())
    n_params = sum(int(np.prod(p.shape)) for _, p in model.parameters_and_names())
    run_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"component": name, "parameters": n_params, "weights_gb": weight_bytes / 1e9, "load_s": load_s,
            "run_s": run_s, "load_peak_over_weights": (peak - rss_before) / weight_bytes,
            "peak_rss_gb": run_peak / 1e9, "rss_before_load_gb": rss_before / 1e9, "diffs": diffs}


# --------------------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("components", nargs="*", default=list(COMPONENTS))
    parser.add_argument("--side", choices=["torch", "ours"])
    parser.add_argument("--keep", action="store_true", help="keep the saved random-weight checkpoints")
    parser.add_argument("--previous-engine", type=Path, metavar="CHECKOUT",
                        help="another checkout of this project (one that has this option): its engine runs "
                             "the same weights and inputs first, and the max change against it is printed")
    args = parser.parse_args()
    for name in args.components:
        if name not in COMPONENTS:
            parser.error(f"unknown component {name!r}; choose from {list(COMPONENTS)}")
    if args.side == "torch":
        for name in args.components:
            run_torch(name, WORK / name)
        return
    if args.side == "ours":
        for name in args.components:
            print("RESULT " + json.dumps(run_ours(name, WORK / name)), flush=True)
        return

    rows = []
    for name in args.components:
        folder = WORK / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        subprocess.run([TORCH_PYTHON, __file__, "--side", "torch", name], check=True)
        torch_info = json.loads((folder / "torch.json").read_text())
        env = dict(os.environ, KANDINSKY_COMPARE_DIR=str(WORK))
        if args.previous_engine:
            subprocess.run([sys.executable, str(args.previous_engine / "tools" / "compare_full_size.py"), "--side",
                            "ours", name], check=True, capture_output=True, text=True,
                           env=dict(env, KANDINSKY_COMPARE_SAVE="previous"))
            env["KANDINSKY_COMPARE_AGAINST"] = "previous"
        out = subprocess.run([sys.executable, __file__, "--side", "ours", name], check=True, capture_output=True,
                             text=True, env=env)
        result = json.loads(next(line[7:] for line in out.stdout.splitlines() if line.startswith("RESULT ")))
        result["torch_parameters"] = torch_info["parameters"]
        result["torch_peak_rss_gb"] = torch_info.get("peak_rss_gb")
        result["torch_run_s"] = torch_info["run_s"]
        rows.append(result)
        for key, d in result["diffs"].items():
            engines = "".join(f"  {k[8:]}: {v:.2e}" for k, v in d.items() if k.startswith("max_abs_vs_"))
            print(f"{name:16s} {key:26s} max|diff| {d['max_abs']:.2e}  (max|ref| {d['ref_max_abs']:.2e}){engines}  "
                  f"params ours {result['parameters']:,} / ref {result['torch_parameters']:,}  "
                  f"load peak {result['load_peak_over_weights']:.2f}x weights", flush=True)
        print(f"{name:16s} peak RSS ours {result['peak_rss_gb']:.2f} GB (torch {result['torch_peak_rss_gb']:.2f} GB), "
              f"run {result['run_s']:.1f} s (torch {result['torch_run_s']:.1f} s)", flush=True)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    (WORK / "summary.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
