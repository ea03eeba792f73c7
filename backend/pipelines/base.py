"""What every pipeline shares: `from_pretrained` from a diffusers-layout folder or Hub repo (the
components are built by loading.py), the step callback contract, and tensor <-> numpy moves."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import mindspore as ms
from mindspore import Tensor

from backend import weights
from backend.pipelines.loading import ProgressCallback, load_component, load_subfolder

# Step callback: (step index, total steps, current latents, predicted clean latents x0).
# Raising from it stops the run; the exception reaches the caller unchanged.
StepCallback = Callable[[int, int, np.ndarray, np.ndarray], None]


class DiffusionPipeline:
    """Base: `from_pretrained`, `components`, dtype handling."""

    # Component names in model_index.json that this pipeline needs.
    component_names: tuple[str, ...] = ()
    # Those of them that may be None (diffusers' `_optional_components`): the pipeline checks,
    # when a call needs one, that it is there.
    optional_components: tuple[str, ...] = ()

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

    # -- tensor moves: MindSpore for the models, numpy float32 for schedulers and outputs
    def to_tensor(self, array: np.ndarray) -> Tensor:
        return Tensor(np.ascontiguousarray(array, dtype=np.float32)).astype(self.dtype) \
            if self.dtype != ms.float32 else Tensor(np.ascontiguousarray(array, dtype=np.float32))

    @staticmethod
    def to_numpy(tensor) -> np.ndarray:
        """A model's output as float32 numpy: the host path already returns numpy arrays."""
        if isinstance(tensor, np.ndarray):
            return tensor if tensor.dtype == np.float32 else tensor.astype(np.float32)
        if tensor.dtype != ms.float32:
            tensor = tensor.astype(ms.float32)
        return tensor.asnumpy()
