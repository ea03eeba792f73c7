"""Our MindSpore port vs diffusers/transformers on the REAL component configs (random weights).

    python tools/compare_full_size.py [component ...]        # driver, in the app environment

For each component the driver runs this same file twice: once in the torch environment
(`--side torch`: build the model from ../shared/reference-configs with the library's own random
init, save it with save_pretrained, run it on small fixed inputs, save inputs and outputs), then
in ours (`--side ours`: load the saved folder with backend.weights.load_model, run the same
inputs). It prints the max abs difference per component and, for ours, the load's peak memory
as a multiple of the weights' size. One component at a time keeps memory within 24 GB.

Components: unet (kandinsky-2-2-decoder), unet_inpaint, unet_controlnet, movq, prior (clip_std
set to ones: published priors carry real statistics, zeros would make the output trivially 0),
text_encoder (ViT-bigG-14 text tower), image_encoder (ViT-bigG-14 vision tower, 1.8B parameters);
Kandinsky 2.1: unet_2_1 (text_image conditioning), unet_2_1_inpaint (in 9), mclip (MultilingualCLIP:
XLM-RoBERTa-large + LinearTransformation, 560M), prior_2_1, text_encoder_2_1 / image_encoder_2_1
(OpenAI CLIP ViT-L/14 towers, quick_gelu; the text input is padded with "!" = id 0 as the published
2.1 prior tokenizer pads).
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

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = Path(os.environ.get("KANDINSKY_REFERENCE_CONFIGS", ROOT.parent / "shared" / "reference-configs"))
TORCH_PYTHON = os.environ.get("KANDINSKY_TORCH_PYTHON", "/work/refenv/bin/python")
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
}


def make_inputs(name: str, config: dict) -> dict[str, np.ndarray]:
    """Small fixed inputs (latent 16x16 = 128 px, batch 2 as with guidance)."""
    rng = np.random.default_rng(0)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
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

    import torch

    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    config_file, cls_path, _, _ = COMPONENTS[name]
    config = json.loads((CONFIGS / config_file).read_text())
    library, cls_name = cls_path.split(".")
    cls = getattr(importlib.import_module(library), cls_name) if name != "mclip" else None
    start = time.time()
    if name == "mclip":
        from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP
        model = MultilingualCLIP(MCLIPConfig(**{k: v for k, v in config.items() if not k.startswith("_")})).eval()
    elif library == "transformers":
        config_cls = getattr(importlib.import_module("transformers"), cls_name.replace("ModelWithProjection", "Config"))
        model = cls(config_cls(**{k: v for k, v in config.items() if not k.startswith("_")})).eval()
    else:
        model = cls.from_config(config).eval()
    if name.startswith("prior"):
        model.clip_std.data.fill_(1.0)
    built = time.time() - start
    model.save_pretrained(str(folder), safe_serialization=True)
    inputs = make_inputs(name, config)
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    start = time.time()
    if name.startswith("unet_2_1"):
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
    else:
        outputs = {"image_embeds": model(t["pixel_values"]).image_embeds}
    ran = time.time() - start
    params = sum(p.numel() for p in model.parameters())
    np.savez(folder / "io.npz", **{f"in_{k}": v for k, v in inputs.items()},
             **{f"out_{k}": v.float().numpy() for k, v in outputs.items()})
    (folder / "torch.json").write_text(json.dumps({"parameters": params, "build_s": built, "run_s": ran}))


# ------------------------------------------------------------------------------- our side


def run_ours(name: str, folder: Path) -> dict:
    import importlib
    import resource

    import psutil

    sys.path.insert(0, str(ROOT))
    from mindspore import Tensor

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
    t = {k[3:]: Tensor(v) for k, v in io.items() if k.startswith("in_")}
    start = time.time()
    if name.startswith("unet_2_1"):
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
        out = model(Tensor(io["in_input_ids"].astype(np.int32)))
        outputs = {"text_embeds": out.text_embeds, "last_hidden_state": out.last_hidden_state}
    else:
        outputs = {"image_embeds": model(t["pixel_values"]).image_embeds}
    run_s = time.time() - start
    diffs = {}
    for key, value in outputs.items():
        ref = io[f"out_{key}"]
        ours = value.asnumpy()
        diffs[key] = {"max_abs": float(np.abs(ours - ref).max()), "ref_max_abs": float(np.abs(ref).max())}
    n_params = sum(int(np.prod(p.shape)) for _, p in model.parameters_and_names())
    return {"component": name, "parameters": n_params, "weights_gb": weight_bytes / 1e9, "load_s": load_s,
            "run_s": run_s, "load_peak_over_weights": (peak - rss_before) / weight_bytes, "diffs": diffs}


# --------------------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("components", nargs="*", default=list(COMPONENTS))
    parser.add_argument("--side", choices=["torch", "ours"])
    parser.add_argument("--keep", action="store_true", help="keep the saved random-weight checkpoints")
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
        out = subprocess.run([sys.executable, __file__, "--side", "ours", name], check=True, capture_output=True,
                             text=True)
        result = json.loads(next(line[7:] for line in out.stdout.splitlines() if line.startswith("RESULT ")))
        result["torch_parameters"] = torch_info["parameters"]
        rows.append(result)
        for key, d in result["diffs"].items():
            print(f"{name:16s} {key:26s} max|diff| {d['max_abs']:.2e}  (max|ref| {d['ref_max_abs']:.2e})  "
                  f"params ours {result['parameters']:,} / ref {result['torch_parameters']:,}  "
                  f"load peak {result['load_peak_over_weights']:.2f}x weights", flush=True)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    (WORK / "summary.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
