"""Numpy ports of the diffusers schedulers the Kandinsky pipelines use (one algorithm per file).

The pipelines convert model outputs to numpy for `step`; schedulers never touch MindSpore.
DDPM, DDIM and UnCLIP are what the published repos ship; DPM-Solver++, UniPC, Euler and Euler
ancestral are swapped in with `Class.from_config(repo_scheduler_config, **options)`, as the diffusers
docs swap schedulers. SCHEDULERS names every class by its scheduler.json "_class_name" (a folder
saved with any of them loads); SAMPLERS is the one table of the samplers people know by name
(AUTOMATIC1111's names), each a class and its from_config options: the app's menu, its API
and the PNGs it writes use these names.
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
SCHEDULERS = {cls.__name__: cls for cls in (
    DDPMScheduler, DDIMScheduler, UnCLIPScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler,
    EulerDiscreteScheduler, EulerAncestralDiscreteScheduler)}

# Sampler name -> (class, from_config options), in the order a menu lists them. Every one takes one
# model evaluation per step (order 1) and runs with any number of steps from 1 (the multistep solvers
# use lower orders for their first and, below 15 steps, last steps).
SAMPLERS = {
    "DPM++ 2M": (DPMSolverMultistepScheduler, {}),
    "DPM++ 2M Karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "DPM++ 2M SDE Karras": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++",
                                                          "use_karras_sigmas": True}),
    "UniPC": (UniPCMultistepScheduler, {}),
    "Euler": (EulerDiscreteScheduler, {}),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "DDIM": (DDIMScheduler, {}),
    "DDPM": (DDPMScheduler, {}),
}


def scheduler_from_config(name: str, config: dict):
    """Build a scheduler from a config dict (a published scheduler.json): `name` is a class name
    (the file's "_class_name", a key of SCHEDULERS) or a sampler name (a key of SAMPLERS: its class
    with its options, e.g. "DPM++ 2M Karras" = DPMSolverMultistepScheduler with use_karras_sigmas)."""
    if name in SCHEDULERS:
        return SCHEDULERS[name].from_config(config)
    if name in SAMPLERS:
        cls, options = SAMPLERS[name]
        return cls.from_config(config, **options)
    raise ValueError(f"class_name must be one of {sorted(SCHEDULERS)} or a sampler name {list(SAMPLERS)}; "
                     f"got {name!r}")


__all__ = [
    "DDIMScheduler", "DDPMScheduler", "UnCLIPScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
    "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "SAMPLERS", "SCHEDULERS", "SchedulerOutput",
    "scheduler_from_config",
]
