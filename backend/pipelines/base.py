"""What every pipeline shares: `from_pretrained` from a diffusers-layout folder or Hub repo (the
components are built by loading.py), the step callback contract, classifier-free guidance, the
truncation notes, and model outputs as numpy."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
import mindspore as ms

from backend import weights
from backend.pipelines.loading import ProgressCallback, load_component, load_subfolder

logger = logging.getLogger(__name__)

# Step callback: (step index, total steps, current latents, predicted clean latents x0).
# Raising from it stops the run; the exception reaches the caller unchanged.
StepCallback = Callable[[int, int, np.ndarray, np.ndarray], None]


def do_classifier_free_guidance(guidance_scale: float) -> bool:
    """diffusers' rule: a scale above 1 runs the model on the [unconditional; conditional] batch."""
    return guidance_scale > 1.0


def apply_guidance(noise_pred: np.ndarray, guidance_scale: float, learned_variance: bool) -> np.ndarray:
    """Classifier-free guidance: a (2B, C, ...) prediction for the [unconditional; conditional]
    batch -> (B, C, ...) uncond + g * (cond - uncond).

    `learned_variance`: the channels are [noise; variance] halves (the Kandinsky 2.x UNets predict
    both, out_channels = 2 x latent channels): only the noise is guided, the variance is the
    conditional half's (diffusers' unCLIP-style pipelines).
    """
    variance = None
    if learned_variance:
        noise_pred, variance = np.split(noise_pred, 2, axis=1)
        variance = np.split(variance, 2)[1]
    uncond, cond = np.split(noise_pred, 2)
    guided = uncond + np.float32(guidance_scale) * (cond - uncond)
    return guided if variance is None else np.concatenate([guided, variance], axis=1)


def get_timesteps(scheduler, num_inference_steps: int, strength: float):
    """The tail of the schedule that img2img runs: the last `strength` fraction of the steps.

    A scheduler with a step counter (DPM-Solver++, UniPC, Euler, Euler a) is told where the tail begins,
    as diffusers' Stable Diffusion img2img pipelines do (`set_begin_index(t_start * order)`): its first
    step, and add_noise before it, then use that sigma. Found from the timestep instead (diffusers'
    Kandinsky pipelines), a repeated timestep would pick the wrong one: Kandinsky 3 with Karras sigmas
    repeats 998, and the 2.x Karras schedules of 50 steps or more repeat their last timesteps."""
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init_timestep, 0)
    begin = t_start * scheduler.order
    timesteps = scheduler.timesteps[begin:]
    if len(timesteps) and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return timesteps


class DiffusionPipeline:
    """Base: `from_pretrained`, `components`, dtype handling, truncation notes."""

    # Component names in model_index.json that this pipeline needs.
    component_names: tuple[str, ...] = ()
    # Those of them that may be None (diffusers' `_optional_components`): the pipeline checks,
    # when a call needs one, that it is there.
    optional_components: tuple[str, ...] = ()
    # What stands in for an optional component in the calls that need only one value of it, the same
    # for every call: constructor keyword -> (the component, the class method computing the value from
    # that component alone). The app computes each once per checkpoint and caches it (backend/manager.py).
    derived_values: dict[str, tuple[str, str]] = {}
    # The text each prompt of the last call lost to the text encoder's token limit (the tokenizer
    # cuts it; the app shows it). Set at each call that encodes a prompt (record_truncation);
    # empty when nothing was cut or the call read no prompt.
    truncated_text: list[str] = []

    def __init__(self, dtype=ms.float32, **components):
        missing = [n for n in self.component_names
                   if components.get(n) is None and n not in self.optional_components]
        if missing:
            raise ValueError(f"{type(self).__name__} needs the components {missing}")
        self.dtype = weights.dtype_from_name(dtype)
        for name in self.component_names:
            setattr(self, name, components.get(name))

    @property
    def components(self) -> dict:
        return {name: getattr(self, name) for name in self.component_names}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, dtype="float32",
                        variant: str | None = None, on_progress: ProgressCallback | None = None,
                        local_files_only: bool | None = None, cache_dir=None, revision=None,
                        **overrides):
        """Load from a local diffusers-layout folder or a Hub repo id.

        `dtype`: "float32" | "float16" | "bfloat16" (or a MindSpore dtype), or "checkpoint" (each
        tensor as its file stores it; the pipeline computes in float32); `variant="fp16"` reads
        `*.fp16.safetensors`. Components passed as keyword arguments (e.g. `scheduler=...`) are
        used instead of loading them; a string names another subfolder of the pipeline to load the
        component from (`scheduler="ddpm_scheduler"` for kandinsky-2-1's alternative DDPM scheduler).
        """
        if dtype != weights.CHECKPOINT_PRECISION:  # that one goes to the loader as it is
            dtype = weights.dtype_from_name(dtype)
        download = None
        if on_progress is not None:
            download = lambda filename, done, total: on_progress(f"download {filename}", done, total)  # noqa: E731
        folder = weights.resolve_pretrained(pretrained_model_name_or_path, variant=variant,
                                            subfolders=None, local_files_only=local_files_only,
                                            cache_dir=cache_dir, revision=revision, on_download=download)
        index = weights.read_config(folder, "model_index.json")
        components = {}
        for name in cls.component_names:
            if name in overrides:
                component = overrides.pop(name)
                if isinstance(component, (str, os.PathLike)):
                    subfolder = folder / component
                    if Path(component).is_absolute() or ".." in Path(component).parts or not subfolder.is_dir():
                        raise ValueError(f"`{name}`={str(component)!r} is not a subfolder of {folder}")
                    component = load_subfolder(subfolder, dtype, variant, on_progress, name)
                components[name] = component
                continue
            entry = index.get(name)
            if not isinstance(entry, list) or len(entry) != 2:
                raise weights.WeightsError(f"{folder / 'model_index.json'} has no component {name!r} "
                                           f"needed by {cls.__name__}")
            components[name] = load_component(folder / name, entry[0], entry[1], dtype, variant,
                                              on_progress, name)
        if overrides:
            raise ValueError(f"unknown components for {cls.__name__}: {sorted(overrides)}")
        return cls(dtype=dtype, **components)

    def record_truncation(self, prompts: list[str], max_length: int) -> None:
        """Set (and log) `truncated_text`: what `self.tokenizer` cuts from `prompts` at `max_length` tokens."""
        untruncated = self.tokenizer(prompts, padding="longest", return_tensors="np")["input_ids"]
        self.truncated_text = []
        if untruncated.shape[-1] > max_length:
            removed = self.tokenizer.batch_decode(untruncated[:, max_length - 1:], skip_special_tokens=True)
            self.truncated_text = [text for text in removed if text.strip()]
        if self.truncated_text:
            logger.warning("The text encoder reads %d tokens; this part of the prompt was dropped: %s",
                           max_length, self.truncated_text)

    @staticmethod
    def to_numpy(output) -> np.ndarray:
        """A model's output as float32 numpy. Models take numpy inputs and, on the host path (CPU),
        return numpy; on the device path they return Tensors (backend/nn/entry.py run_model)."""
        if isinstance(output, np.ndarray):
            return output if output.dtype == np.float32 else output.astype(np.float32)
        if output.dtype != ms.float32:
            output = output.astype(ms.float32)
        return output.asnumpy()
