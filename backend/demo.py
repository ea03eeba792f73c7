"""Tiny random-weight Kandinsky 2.2, 2.1 and 3 models, built locally: `python app.py --demo` and the tests.

Each folder has the published diffusers layout (model_index.json, one subfolder per component
with config.json and safetensors weights, a CLIP tokenizer, scheduler and image processor
configs; SentencePiece-style XLM-R and T5 tokenizers for 2.1 and 3) and loads through the real
`from_pretrained` of backend/pipelines, so the demo runs
the same code as the real models, only with architectures a few hundred times smaller and
weights that are seeded noise. Its images are colourful noise: the point is to exercise the app
end to end without a download, not to make pictures.

Building cells is MindSpore work: call `ensure_demo_models` on the engine thread.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from backend.demo_tokenizers import write_tokenizer, write_unigram_tokenizer
from backend.families import FAMILIES, ModelSpec

DEMO_VERSION = 3          # bump when a config below changes: old folders are rebuilt
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


@dataclass(frozen=True)
class DemoFolder:
    """One demo folder, laid out as the published repo of its role."""

    pipeline: str                         # model_index.json's _class_name
    components: dict                      # name -> (library, class, config, weights file name)
    schedulers: dict                      # subfolder -> scheduler config ("scheduler" is the default)
    tokenizer: Callable | None = None     # writes the tokenizer folder, returns its vocabulary size
    tokenizer_class: tuple = ()           # the tokenizer's model_index.json entry
    image_processor: bool = False         # the prior's CLIP image processor


CLIP_TOKENIZER = ("transformers", "CLIPTokenizer")


def _prior_folder(pipeline: str, text_config: dict, image_config: dict, pad_token: str = "<|endoftext|>"):
    """The 2.x prior folder. 2.2's CLIP tokenizer pads with the end-of-text token, 2.1's with "!"."""
    return DemoFolder(pipeline, {
        "prior": ("diffusers", "PriorTransformer", PRIOR_CONFIG, "diffusion_pytorch_model"),
        "text_encoder": ("transformers", "CLIPTextModelWithProjection", text_config, "model"),
        "image_encoder": ("transformers", "CLIPVisionModelWithProjection", image_config, "model"),
    }, {"scheduler": PRIOR_SCHEDULER}, lambda folder: write_tokenizer(folder, pad_token), CLIP_TOKENIZER,
        image_processor=True)


def _decoder_folder(pipeline: str, unet_config: dict, schedulers: dict, text_encoder: tuple | None = None,
                    tokenizer: Callable | None = None, tokenizer_class: tuple = (),
                    unet_class: str = "UNet2DConditionModel") -> DemoFolder:
    """UNet + MoVQ (+ the text encoder and tokenizer 2.1 and 3 keep in the decoder folder)."""
    components = {"text_encoder": text_encoder} if text_encoder else {}
    components["unet"] = ("diffusers", unet_class, unet_config, "diffusion_pytorch_model")
    components["movq"] = ("diffusers", "VQModel", MOVQ_CONFIG, "diffusion_pytorch_model")
    return DemoFolder(pipeline, components, schedulers, tokenizer, tokenizer_class)


DECODER_SCHEDULERS = {"scheduler": DECODER_SCHEDULER}
FOLDERS = {
    "prior": _prior_folder("KandinskyV22PriorPipeline", TEXT_ENCODER_CONFIG, IMAGE_ENCODER_CONFIG),
    "decoder": _decoder_folder("KandinskyV22Pipeline", _unet_config(4, "image"), DECODER_SCHEDULERS),
    "inpaint": _decoder_folder("KandinskyV22InpaintPipeline", _unet_config(9, "image"), DECODER_SCHEDULERS),
    "controlnet": _decoder_folder("KandinskyV22ControlnetPipeline", _unet_config(8, "image_hint"),
                                  DECODER_SCHEDULERS),
}

# --- Kandinsky 2.1: CLIP ViT-L-style prior (quick_gelu, "!" padding), MCLIP + text_image UNet decoders
MCLIP_HIDDEN = 24
MCLIP_CONFIG = {
    "architectures": ["MultilingualCLIP"], "model_type": "M-CLIP", "hidden_size": MCLIP_HIDDEN,
    "transformerDimensions": MCLIP_HIDDEN, "numDims": EMBED_DIM, "intermediate_size": 37, "num_hidden_layers": 2,
    "num_attention_heads": 4, "hidden_act": "gelu", "layer_norm_eps": 1e-5, "max_position_embeddings": 80,
    "type_vocab_size": 1, "position_embedding_type": "absolute", "bos_token_id": 0, "pad_token_id": 1,
    "eos_token_id": 2, "vocab_size": None,  # set from the vocabulary
}
TEXT_ENCODER_2_1_CONFIG = dict(TEXT_ENCODER_CONFIG, hidden_act="quick_gelu")
IMAGE_ENCODER_2_1_CONFIG = dict(IMAGE_ENCODER_CONFIG, hidden_act="quick_gelu")


def _unet_2_1_config(in_channels: int) -> dict:
    config = _unet_config(in_channels, "text_image")
    config.update(encoder_hid_dim=MCLIP_HIDDEN, encoder_hid_dim_type="text_image_proj")
    return config


# The published 2.1 decoder scheduler (kandinsky-2-1/scheduler/scheduler_config.json) and the
# alternative DDPM one of its ddpm_scheduler folder.
DECODER_2_1_SCHEDULER = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
    "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False,
    "steps_offset": 1, "prediction_type": "epsilon", "thresholding": False,
}
DDPM_2_1_SCHEDULER = {
    "_class_name": "DDPMScheduler", "beta_end": 0.012, "beta_schedule": "linear", "beta_start": 0.00085,
    "clip_sample": True, "clip_sample_range": 2.0, "dynamic_thresholding_ratio": 0.995,
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": None, "thresholding": True,
    "trained_betas": None, "variance_type": "learned_range",
}
MCLIP = ("kandinsky", "MultilingualCLIP", MCLIP_CONFIG, "model")
XLM_ROBERTA = dict(tokenizer=lambda folder: write_unigram_tokenizer(folder, "xlm-roberta"),
                   tokenizer_class=("transformers", "XLMRobertaTokenizerFast"))
FOLDERS_2_1 = {
    "prior": _prior_folder("KandinskyPriorPipeline", TEXT_ENCODER_2_1_CONFIG, IMAGE_ENCODER_2_1_CONFIG, "!"),
    "decoder": _decoder_folder("KandinskyPipeline", _unet_2_1_config(4), {"scheduler": DECODER_2_1_SCHEDULER,
                                                                         "ddpm_scheduler": DDPM_2_1_SCHEDULER},
                               MCLIP, **XLM_ROBERTA),
    "inpaint": _decoder_folder("KandinskyInpaintPipeline", _unet_2_1_config(9), {"scheduler": DECODER_2_1_SCHEDULER},
                               MCLIP, **XLM_ROBERTA),
}

# --- Kandinsky 3: a T5 encoder (gated-silu, as Flan-UL2), a Kandinsky3UNet and a MoVQ in one folder
T5_CONFIG = {
    "architectures": ["T5EncoderModel"], "model_type": "t5", "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2,
    "num_heads": 4, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "dropout_rate": 0.0, "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-silu", "dense_act_fn": "silu",
    "is_gated_act": True, "pad_token_id": 0, "eos_token_id": 1, "vocab_size": None,  # set from the vocabulary
}
UNET_3_CONFIG = {
    "_class_name": "Kandinsky3UNet", "in_channels": 4, "time_embedding_dim": 32, "groups": 8,
    "attention_head_dim": 8, "layers_per_block": 2, "block_out_channels": [16, 32, 32, 32],
    "cross_attention_dim": 32, "encoder_hid_dim": 32,
}
# The published Kandinsky 3 scheduler (kandinsky-3/scheduler/scheduler_config.json).
DECODER_3_SCHEDULER = {
    "_class_name": "DDPMScheduler", "beta_end": 0.012, "beta_schedule": "squaredcos_cap_v2", "beta_start": 0.00085,
    "clip_sample": True, "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "steps_offset": 1,
    "thresholding": False, "timestep_spacing": "leading", "trained_betas": None, "variance_type": "fixed_small",
}
T5 = ("transformers", "T5EncoderModel", T5_CONFIG, "model")
FOLDERS_3 = {"decoder": _decoder_folder("Kandinsky3Pipeline", UNET_3_CONFIG, {"scheduler": DECODER_3_SCHEDULER}, T5,
                                        lambda folder: write_unigram_tokenizer(folder, "t5"),
                                        ("transformers", "T5TokenizerFast"), unet_class="Kandinsky3UNet")}

# Family (backend/families.py) -> its demo folders, role -> DemoFolder
DEMO_FOLDERS = {"2.2": FOLDERS, "2.1": FOLDERS_2_1, "3": FOLDERS_3}

# --- the depth estimator of 2.2's ControlNet: a transformers model repo (config.json, preprocessor_config.json
# and model.safetensors at its top), Depth Anything with the tiny config of tools/fixtures/make_depth_anything.py
# (DINOv2 32 wide, 4 layers; DPT neck 8-32 channels) and the preprocessing of every Depth Anything repo.
DEPTH_ANYTHING_CONFIG = {
    "model_type": "depth_anything", "depth_estimation_type": "relative", "max_depth": 1, "patch_size": 14,
    "backbone_config": {
        "model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
        "mlp_ratio": 2, "image_size": 56, "patch_size": 14, "num_channels": 3, "layer_norm_eps": 1e-6,
        "layerscale_value": 1.0, "qkv_bias": True, "hidden_act": "gelu", "use_swiglu_ffn": False,
        "apply_layernorm": True, "reshape_hidden_states": False,
        "out_features": ["stage1", "stage2", "stage3", "stage4"], "out_indices": [1, 2, 3, 4],
        "stage_names": ["stem", "stage1", "stage2", "stage3", "stage4"]},
    "neck_hidden_sizes": [8, 16, 24, 32], "reassemble_factors": [4, 2, 1, 0.5], "reassemble_hidden_size": 32,
    "fusion_hidden_size": 16, "head_hidden_size": 8, "head_in_index": -1,
}
DEPTH_PREPROCESSOR_CONFIG = {
    "image_processor_type": "DPTImageProcessor", "do_resize": True, "size": {"height": 518, "width": 518},
    "keep_aspect_ratio": True, "ensure_multiple_of": 14, "resample": 3, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225], "do_pad": False,
}


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

    from backend.pipelines.loading import MODEL_CLASSES

    module, attr = MODEL_CLASSES[class_name]
    model_class = getattr(importlib.import_module(module), attr)
    model = model_class.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    save_file(random_weights(model, seed), str(folder / f"{weights_name}.safetensors"))


def build_folder(folder: Path, role: str, seed: int = 0, family: str = "2.2") -> Path:
    spec = DEMO_FOLDERS[family][role]
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": spec.pipeline, "_diffusers_version": "0.35.2"}
    vocab_size = None
    if spec.tokenizer is not None:
        vocab_size = spec.tokenizer(folder / "tokenizer")
        index["tokenizer"] = list(spec.tokenizer_class)
    for name, config in spec.schedulers.items():
        _write_json(folder / name / "scheduler_config.json", config)
    index["scheduler"] = ["diffusers", spec.schedulers["scheduler"]["_class_name"]]
    if spec.image_processor:
        index["image_processor"] = ["transformers", "CLIPImageProcessor"]
        _write_json(folder / "image_processor" / "preprocessor_config.json", IMAGE_PROCESSOR_CONFIG)
    for offset, (name, (library, class_name, config, weights_name)) in enumerate(spec.components.items()):
        config = dict(config)
        if config.get("vocab_size", 0) is None:
            config["vocab_size"] = vocab_size
        # every decoder folder of a family ships the same MoVQ, as the published repos do, and 2.1's
        # decoder and inpainting folders the same MultilingualCLIP (so the manager's sharing of
        # identical components is exercised; it compares content, so it shares only what is equal)
        shared = name == "movq" or (name == "text_encoder" and role != "prior")
        component_seed = 1000 + offset if shared else seed * 10 + offset
        _write_component(folder / name, class_name, config, weights_name, component_seed)
        index[name] = [library, class_name]
    _write_json(folder / "model_index.json", index)
    return folder


def build_depth_estimator(folder: Path, seed: int = 0) -> Path:
    """A tiny random Depth Anything in the published repo's layout, from our own model class."""
    from safetensors.numpy import save_file

    from backend.models.depth_anything import DepthAnythingForDepthEstimation

    model = DepthAnythingForDepthEstimation.from_config(DEPTH_ANYTHING_CONFIG)
    _write_json(folder / "config.json", DEPTH_ANYTHING_CONFIG)
    _write_json(folder / "preprocessor_config.json", DEPTH_PREPROCESSOR_CONFIG)
    save_file(random_weights(model, seed), str(folder / "model.safetensors"))
    return folder


# family -> role -> the builder of a model repo without model_index.json
MODEL_REPOS = {"2.2": {"depth_estimator": build_depth_estimator}}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def demo_key(family: str) -> str:
    return f"{FAMILIES[family].key}-demo"


def _roles(family: str) -> list[str]:
    return [*DEMO_FOLDERS[family], *MODEL_REPOS.get(family, {})]


def _build_role(folder: Path, family: str, role: str) -> None:
    seed = _roles(family).index(role) + 1      # the same seed whether built with the family or alone
    if role in MODEL_REPOS.get(family, {}):
        MODEL_REPOS[family][role](folder, seed)
    else:
        build_folder(folder, role, seed, family)


def role_files(family: str, role: str) -> list[str]:
    """The files (relative to the role's folder) a demo role needs to load."""
    if role in MODEL_REPOS.get(family, {}):
        return ["config.json", "preprocessor_config.json", "model.safetensors"]
    spec = DEMO_FOLDERS[family][role]
    files = ["model_index.json", *(f"{name}/scheduler_config.json" for name in spec.schedulers)]
    if spec.tokenizer is not None:
        files += ["tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json"]
    if spec.image_processor:
        files.append("image_processor/preprocessor_config.json")
    for name, (_, _, _, weights_name) in spec.components.items():
        files += [f"{name}/config.json", f"{name}/{weights_name}.safetensors"]
    return files


def missing_roles(base: Path, family: str) -> list[str]:
    """The roles whose folder under `base` lacks a file it needs (or has it empty)."""
    def present(path: Path) -> bool:
        return path.is_file() and path.stat().st_size > 0
    return [role for role in _roles(family) if not all(present(base / role / name) for name in role_files(family, role))]


def ensure_demo_models(root: str | os.PathLike, family: str = "2.2") -> ModelSpec:
    """Build one family's demo folders under `root` (once; reused while DEMO_VERSION is unchanged).

    A built family whose role folder has gone or lost a file it needs (model_index.json, a
    config, weights) gets that role rebuilt, with the seed it was first built with.
    Engine thread only: the models are built as MindSpore cells to learn their parameter names.
    """
    base = Path(root) / f"{demo_key(family)}-v{DEMO_VERSION}"
    done = base / "complete.json"
    if not done.is_file():
        tmp = base.with_name(base.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for role in _roles(family):
            _build_role(tmp / role, family, role)
        _write_json(tmp / "complete.json", {"version": DEMO_VERSION})
        shutil.rmtree(base, ignore_errors=True)
        tmp.rename(base)
    for role in missing_roles(base, family):
        tmp = base / f"{role}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        _build_role(tmp, family, role)
        shutil.rmtree(base / role, ignore_errors=True)
        tmp.rename(base / role)
    return demo_spec(base, family)


def ensure_demo_catalogue(root: str | os.PathLike) -> dict[str, ModelSpec]:
    """Every family's demo model (2.2 first: the default), by key."""
    specs = [ensure_demo_models(root, family) for family in DEMO_FOLDERS]
    return {spec.key: spec for spec in specs}


def demo_spec(base: Path, family: str = "2.2") -> ModelSpec:
    return ModelSpec(key=demo_key(family), label=f"{FAMILIES[family].label} demo (tiny random weights)",
                     family=FAMILIES[family],
                     repos={role: str(base / role) for role in (*DEMO_FOLDERS[family], *MODEL_REPOS.get(family, {}))},
                     demo=True)
