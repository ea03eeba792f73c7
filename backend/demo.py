"""Tiny random-weight Kandinsky 2.2 models, built locally: `python app.py --demo` and the tests.

Each folder has the published diffusers layout (model_index.json, one subfolder per component
with config.json and safetensors weights, a CLIP tokenizer, scheduler and image processor
configs) and loads through the real `from_pretrained` of backend/pipelines, so the demo runs
the same code as the real models, only with architectures a few hundred times smaller and
weights that are seeded noise. Its images are colourful noise: the point is to exercise the app
end to end without a download, not to make pictures.

Building cells is MindSpore work: call `ensure_demo_models` on the engine thread.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from backend.manager import ModelSpec

DEMO_VERSION = 1          # bump when a config below changes: old folders are rebuilt
DEMO_KEY = "kandinsky-2-2-demo"
EMBED_DIM = 32            # CLIP projection = prior embedding = UNet encoder_hid_dim

PRIOR_CONFIG = {
    "_class_name": "PriorTransformer", "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 1,
    "embedding_dim": EMBED_DIM, "num_embeddings": 77, "additional_embeddings": 4, "dropout": 0.0,
}
TEXT_ENCODER_CONFIG = {
    "architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
    "hidden_size": 32, "intermediate_size": 37, "projection_dim": EMBED_DIM, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "vocab_size": None,  # set from the vocabulary
}
IMAGE_ENCODER_CONFIG = {
    "architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
    "hidden_size": 32, "intermediate_size": 37, "projection_dim": EMBED_DIM, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_channels": 3, "image_size": 64, "patch_size": 16, "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}
IMAGE_PROCESSOR_CONFIG = {
    "crop_size": 64, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 64,
}
PRIOR_SCHEDULER = {
    "_class_name": "UnCLIPScheduler", "clip_sample": True, "clip_sample_range": 10.0,
    "num_train_timesteps": 1000, "prediction_type": "sample", "variance_type": "fixed_small_log",
}


def _unet_config(in_channels: int, addition_embed_type: str) -> dict:
    return {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": addition_embed_type,
        "addition_embed_type_num_heads": 4, "attention_head_dim": 8, "block_out_channels": [32, 64],
        "class_embed_type": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 32,
        "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"], "downsample_padding": 1,
        "encoder_hid_dim": EMBED_DIM, "encoder_hid_dim_type": "image_proj", "flip_sin_to_cos": True,
        "freq_shift": 0, "in_channels": in_channels, "layers_per_block": 1, "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "norm_eps": 1e-5, "norm_num_groups": 8,
        "only_cross_attention": False, "out_channels": 8, "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False, "resnet_time_scale_shift": "scale_shift", "sample_size": 8,
        "time_embedding_type": "positional", "up_block_types": ["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
        "upcast_attention": False, "use_linear_projection": False,
    }


MOVQ_CONFIG = {
    "_class_name": "VQModel", "act_fn": "silu", "block_out_channels": [32, 32, 32, 32],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 8, "norm_type": "spatial",
    "num_vq_embeddings": 16, "out_channels": 3, "sample_size": 32, "scaling_factor": 0.18215,
    "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
    "vq_embed_dim": 4,
}
# The published decoder scheduler (kandinsky-2-2-decoder/scheduler/scheduler_config.json).
DECODER_SCHEDULER = {
    "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
    "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": True, "set_alpha_to_one": False,
    "steps_offset": 1, "prediction_type": "epsilon", "thresholding": False,
}

# Folder -> (pipeline class, {component: (library, class, config, weights file name)})
FOLDERS = {
    "prior": ("KandinskyV22PriorPipeline", {
        "prior": ("diffusers", "PriorTransformer", PRIOR_CONFIG, "diffusion_pytorch_model"),
        "text_encoder": ("transformers", "CLIPTextModelWithProjection", TEXT_ENCODER_CONFIG, "model"),
        "image_encoder": ("transformers", "CLIPVisionModelWithProjection", IMAGE_ENCODER_CONFIG, "model"),
    }),
    "decoder": ("KandinskyV22Pipeline", {
        "unet": ("diffusers", "UNet2DConditionModel", _unet_config(4, "image"), "diffusion_pytorch_model"),
        "movq": ("diffusers", "VQModel", MOVQ_CONFIG, "diffusion_pytorch_model"),
    }),
    "inpaint": ("KandinskyV22InpaintPipeline", {
        "unet": ("diffusers", "UNet2DConditionModel", _unet_config(9, "image"), "diffusion_pytorch_model"),
        "movq": ("diffusers", "VQModel", MOVQ_CONFIG, "diffusion_pytorch_model"),
    }),
    "controlnet": ("KandinskyV22ControlnetPipeline", {
        "unet": ("diffusers", "UNet2DConditionModel", _unet_config(8, "image_hint"), "diffusion_pytorch_model"),
        "movq": ("diffusers", "VQModel", MOVQ_CONFIG, "diffusion_pytorch_model"),
    }),
}

MODEL_CLASSES = {
    "PriorTransformer": "backend.models.prior_transformer",
    "CLIPTextModelWithProjection": "backend.models.clip",
    "CLIPVisionModelWithProjection": "backend.models.clip",
    "UNet2DConditionModel": "backend.models.unet_2d_condition",
    "VQModel": "backend.models.vq_model",
}


# ------------------------------------------------------------------------------ tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte -> printable character table (the alphabet of byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


# A few merges of common English letter pairs, so words are not all single characters.
DEMO_MERGES = ["t h", "th e</w>", "a n", "an d</w>", "i n", "in g</w>", "e r", "o n", "r e", "a t",
               "c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>"]


def write_tokenizer(folder: Path) -> int:
    """A small CLIP BPE tokenizer (all bytes, a few merges); returns the vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    characters = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in characters + [c + "</w>" for c in characters]:
        vocab.setdefault(token, len(vocab))
    merges = list(dict.fromkeys(DEMO_MERGES))
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = dict(special, tokenizer_class="CLIPTokenizer", model_max_length=77, errors="replace")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return len(vocab)


# -------------------------------------------------------------------------------- weights


def random_weights(model, seed: int) -> dict[str, np.ndarray]:
    """Seeded values for every parameter: matrices ~ N(0, 1/fan_in) (activations stay near unit
    scale through the layers), norm scales 1, biases 0.

    PriorTransformer keeps `clip_std` as a parameter that unscales its output; zeros there (the
    diffusers init) would make every embedding zero, so it is 1.
    """
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, param in model.parameters_and_names():
        shape = tuple(int(s) for s in param.shape)
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("clip_std"):
            value = np.ones(shape, np.float32)
        elif name.endswith("clip_mean") or leaf == "bias":
            value = np.zeros(shape, np.float32)
        elif len(shape) <= 1:
            value = np.ones(shape, np.float32)  # norm weights
        else:
            fan_in = int(np.prod(shape[1:]))
            value = rng.standard_normal(shape).astype(np.float32) / np.float32(np.sqrt(fan_in))
        tensors[name] = value
    return tensors


def _write_component(folder: Path, class_name: str, config: dict, weights_name: str, seed: int) -> None:
    import importlib

    from safetensors.numpy import save_file

    model_class = getattr(importlib.import_module(MODEL_CLASSES[class_name]), class_name)
    model = model_class.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    save_file(random_weights(model, seed), str(folder / f"{weights_name}.safetensors"))


def build_folder(folder: Path, role: str, seed: int = 0) -> Path:
    pipeline_class, components = FOLDERS[role]
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": pipeline_class, "_diffusers_version": "0.35.2"}
    vocab_size = None
    if role == "prior":
        vocab_size = write_tokenizer(folder / "tokenizer")
        index["tokenizer"] = ["transformers", "CLIPTokenizer"]
        index["scheduler"] = ["diffusers", "UnCLIPScheduler"]
        index["image_processor"] = ["transformers", "CLIPImageProcessor"]
        _write_json(folder / "scheduler" / "scheduler_config.json", PRIOR_SCHEDULER)
        _write_json(folder / "image_processor" / "preprocessor_config.json", IMAGE_PROCESSOR_CONFIG)
    else:
        index["scheduler"] = ["diffusers", "DDPMScheduler"]
        _write_json(folder / "scheduler" / "scheduler_config.json", DECODER_SCHEDULER)
    for offset, (name, (library, class_name, config, weights_name)) in enumerate(components.items()):
        config = dict(config)
        if config.get("vocab_size", 0) is None:
            config["vocab_size"] = vocab_size
        # the MoVQ is the same checkpoint in every decoder folder, as in the published repos
        component_seed = 1000 if name == "movq" else seed * 10 + offset
        _write_component(folder / name, class_name, config, weights_name, component_seed)
        index[name] = [library, class_name]
    _write_json(folder / "model_index.json", index)
    return folder


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def ensure_demo_models(root: str | os.PathLike) -> ModelSpec:
    """Build the demo folders under `root` (once; reused while DEMO_VERSION is unchanged).

    Engine thread only: the models are built as MindSpore cells to learn their parameter names.
    """
    base = Path(root) / f"kandinsky-2-2-demo-v{DEMO_VERSION}"
    done = base / "complete.json"
    if not done.is_file():
        tmp = base.with_name(base.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for seed, role in enumerate(FOLDERS, start=1):
            build_folder(tmp / role, role, seed)
        _write_json(tmp / "complete.json", {"version": DEMO_VERSION})
        shutil.rmtree(base, ignore_errors=True)
        tmp.rename(base)
    return demo_spec(base)


def demo_spec(base: Path) -> ModelSpec:
    return ModelSpec(key=DEMO_KEY, label="Kandinsky 2.2 demo (tiny random weights)",
                     repos={role: str(base / role) for role in FOLDERS}, demo=True)
