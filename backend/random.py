"""Noise from a numpy generator, so a seed gives the same latents on CPU, GPU and Ascend.

Every random draw of a pipeline or scheduler goes through `randn`, in the same order as
diffusers calls its `randn_tensor`; tools/fixtures/numpy_randn.py makes diffusers draw from
the same stream, which is what makes exact parity with the stochastic samplers possible.
"""
from __future__ import annotations

import numpy as np


def randn(shape, generator: np.random.Generator | None) -> np.ndarray:
    """Standard normal float32 array of `shape` drawn from `generator` (a fresh one if None)."""
    if generator is None:
        generator = np.random.default_rng()
    if not isinstance(generator, np.random.Generator):
        raise ValueError(f"generator must be a numpy.random.Generator; got {type(generator).__name__}")
    return generator.standard_normal(tuple(int(s) for s in shape), dtype=np.float32)
