"""Building a pipeline's components from a diffusers-layout folder: models, schedulers, tokenizers
and image processors.

A pipeline folder holds `model_index.json` naming each component's library and class, and one
subfolder per component (config + weights, or tokenizer / scheduler / processor files). The model
classes are our ports (MODEL_CLASSES, the one table of them); tokenizers are transformers' own,
read from local files only; backend/weights.py does the strict weight loading.
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Callable

from backend import weights
from backend.schedulers import SCHEDULERS, scheduler_from_config

# model_index.json class name -> (module, class) of our port.
MODEL_CLASSES = {
    "UNet2DConditionModel": ("backend.models.unet_2d_condition", "UNet2DConditionModel"),
    "VQModel": ("backend.models.vq_model", "VQModel"),
    "PriorTransformer": ("backend.models.prior_transformer", "PriorTransformer"),
    "CLIPTextModelWithProjection": ("backend.models.clip", "CLIPTextModelWithProjection"),
    "CLIPVisionModelWithProjection": ("backend.models.clip", "CLIPVisionModelWithProjection"),
    "T5EncoderModel": ("backend.models.t5", "T5EncoderModel"),
    "Kandinsky3UNet": ("backend.models.unet_kandinsky3", "Kandinsky3UNet"),
    "MultilingualCLIP": ("backend.models.mclip", "MultilingualCLIP"),
}

# Load progress: (component name, bytes done, bytes total).
ProgressCallback = Callable[[str, int, int], None]


def load_component(folder: Path, library: str, class_name: str, dtype, variant=None,
                   on_progress: ProgressCallback | None = None, name: str = ""):
    """One component of a pipeline folder, built with our classes."""
    if class_name in MODEL_CLASSES:
        module, attr = MODEL_CLASSES[class_name]
        cls = getattr(importlib.import_module(module), attr)
        report = None
        if on_progress is not None:
            report = lambda done, total: on_progress(name, done, total)  # noqa: E731
        return weights.load_model(cls, folder, dtype=dtype, variant=variant, on_tensor=report)
    if class_name in SCHEDULERS:  # any of our schedulers, e.g. a folder saved with DPM-Solver++ swapped in
        return scheduler_from_config(class_name, weights.read_config(folder, "scheduler_config.json"))
    if class_name in ("CLIPTokenizer", "CLIPTokenizerFast"):
        return load_clip_tokenizer(folder)
    if class_name in ("XLMRobertaTokenizer", "XLMRobertaTokenizerFast"):
        return load_xlm_roberta_tokenizer(folder)
    if class_name in ("T5Tokenizer", "T5TokenizerFast"):
        return load_t5_tokenizer(folder)
    if class_name in ("CLIPImageProcessor", "CLIPFeatureExtractor"):
        from backend.image_processing import CLIPImageProcessor
        return CLIPImageProcessor.from_config(weights.read_config(folder, "preprocessor_config.json"))
    raise weights.WeightsError(f"{folder}: component class {library}.{class_name} is not supported")


def load_subfolder(folder: Path, dtype, variant=None, on_progress: ProgressCallback | None = None, name: str = ""):
    """A component from a subfolder that model_index.json does not list (e.g. kandinsky-2-1's
    `ddpm_scheduler`): the class comes from the folder's own config."""
    if (folder / "scheduler_config.json").is_file():
        config = weights.read_config(folder, "scheduler_config.json")
        return load_component(folder, "diffusers", str(config.get("_class_name")), dtype, variant, on_progress, name)
    if (folder / "config.json").is_file():
        config = weights.read_config(folder)
        class_name = config.get("_class_name") or (config.get("architectures") or [None])[0]
        return load_component(folder, "", str(class_name), dtype, variant, on_progress, name)
    raise weights.WeightsError(f"{folder} has neither scheduler_config.json nor config.json")


# ---------------------------------------------------------------- tokenizers (transformers', local files only)


def load_clip_tokenizer(folder: Path):
    """transformers' CLIPTokenizer (the model classes are ours, the vocabulary is theirs)."""
    try:
        from transformers import CLIPTokenizer
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:
        raise weights.WeightsError(f"cannot load the CLIP tokenizer from {folder}: {error}") from error


def load_xlm_roberta_tokenizer(folder: Path):
    """transformers' XLM-R tokenizer (Kandinsky 2.1's MCLIP) from the folder's tokenizer.json.

    The fast class reads tokenizer.json in transformers 4.x and 5.x alike (5.x has only that one
    class; 4.x's slow one would need sentencepiece and the .model file).
    """
    try:
        from transformers import XLMRobertaTokenizerFast
        return XLMRobertaTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:
        raise weights.WeightsError(f"cannot load the XLM-RoBERTa tokenizer from {folder}: {error}") from error


def sentencepiece_available() -> bool:
    return importlib.util.find_spec("sentencepiece") is not None


def load_t5_tokenizer(folder: Path):
    """transformers' T5 tokenizer (Kandinsky 3): tokenizer.json, or else spiece.model.

    The published kandinsky-community/kandinsky-3 `tokenizer/` folder has spiece.model and the slow
    tokenizer's json files but no tokenizer.json. transformers 5.x builds its (tokenizers-backed)
    T5 tokenizer from spiece.model only with the `sentencepiece` package installed: its
    SentencePieceExtractor requires it, and without it transformers falls back to a tiktoken reader
    that fails with a message about tiktoken. So that case is told here, naming the file.
    """
    folder = Path(folder)
    spiece = folder / "spiece.model"
    if not (folder / "tokenizer.json").is_file():
        if not spiece.is_file():
            raise weights.WeightsError(f"cannot load the T5 tokenizer from {folder}: it has neither "
                                       "tokenizer.json nor spiece.model")
        if not sentencepiece_available():
            raise weights.WeightsError(
                f"cannot load the T5 tokenizer from {folder}: {spiece} is a SentencePiece model and there is no "
                "tokenizer.json; transformers reads spiece.model only with the `sentencepiece` package "
                "installed (pip install sentencepiece, see requirements.txt)")
    try:
        from transformers import T5TokenizerFast
        return T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:
        raise weights.WeightsError(f"cannot load the T5 tokenizer from {folder}: {error}") from error
