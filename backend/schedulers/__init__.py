"""Numpy ports of the diffusers schedulers the Kandinsky pipelines use (one algorithm per file).

The pipelines convert model outputs to numpy for `step`; schedulers never touch MindSpore.
DDPM, DDIM and UnCLIP are what the published repos ship (SCHEDULERS, by their scheduler.json
"_class_name"); DPM-Solver++, UniPC, Euler and Euler ancestral are swapped in with
`Class.from_config(repo_scheduler_config, **options)`, as the diffusers docs swap schedulers.
"""
from __future__ import annotations

from backend.schedulers.base import SchedulerOutput
from backend.schedulers.ddim import DDIMScheduler
from backend.schedulers.ddpm import DDPMScheduler
from backend.schedulers.dpmsolver_multistep import DPMSolverMultistepScheduler
from backend.schedulers.euler_ancestral_discrete import EulerAncestralDiscreteScheduler
from backend.schedulers.euler_discrete import EulerDiscreteScheduler
from backend.schedulers.unclip import UnCLIPScheduler
from backend.schedulers.unipc_multistep import UniPCMultistepScheduler

# scheduler.json "_class_name" -> class
SCHEDULERS = {
    "DDPMScheduler": DDPMScheduler,
    "DDIMScheduler": DDIMScheduler,
    "UnCLIPScheduler": UnCLIPScheduler,
}


def scheduler_from_config(class_name: str, config: dict):
    """Build the scheduler `class_name` (e.g. a scheduler.json's "_class_name") from a config dict."""
    if class_name not in SCHEDULERS:
        raise ValueError(f"class_name must be one of {sorted(SCHEDULERS)}; got {class_name!r}")
    return SCHEDULERS[class_name].from_config(config)


__all__ = [
    "DDIMScheduler", "DDPMScheduler", "UnCLIPScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
    "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "SCHEDULERS", "SchedulerOutput",
    "scheduler_from_config",
]
