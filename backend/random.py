"""Noise from a numpy generator, so a seed gives the same latents on CPU, GPU and Ascend.

Every random draw of a pipeline or scheduler goes through `randn`, in the same order as
diffusers calls its `randn_tensor`; tools/fixtures/numpy_randn.py makes diffusers draw from
the same stream, which is what makes exact parity with the stochastic samplers possible.

Variations (AUTOMATIC1111's "variation seed" / subseed): `VariationGenerator(seed, variation_seed,
strength)` is the seed's generator whose every normal draw is `slerp(strength, draw of seed, draw of
variation_seed)`; any pipeline takes it as its `generator`.
"""
from __future__ import annotations

import copy

import numpy as np

# Above this cosine between two noises slerp's angle is too small to divide by: interpolate linearly
# (AUTOMATIC1111 modules/rng.py `slerp`: `if dot.mean() > 0.9995`).
SLERP_PARALLEL_DOT = 0.9995


def randn(shape, generator: np.random.Generator | None) -> np.ndarray:
    """Standard normal float32 array of `shape` drawn from `generator` (a fresh one if None)."""
    if generator is None:
        generator = np.random.default_rng()
    if not isinstance(generator, np.random.Generator):
        raise ValueError(f"generator must be a numpy.random.Generator; got {type(generator).__name__}")
    return generator.standard_normal(tuple(int(s) for s in shape), dtype=np.float32)


def slerp(t: float, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Spherical interpolation from `low` (t = 0) to `high` (t = 1), image by image (axis 0), each image's
    values as one vector; in float64, returned in `low`'s dtype.

    AUTOMATIC1111's formula (modules/rng.py `slerp`, used by ImageRNG.first for the subseed):
    sin((1 - t) omega) / sin(omega) x low + sin(t omega) / sin(omega) x high, omega the angle between them,
    and linear interpolation when they are nearly parallel. Two differences, on purpose: A1111 normalises
    a (C, H, W) noise along dim 1, so it slerps every (channel, column) vector by its own angle; here the
    angle is the whole image's, which keeps each image's noise on the sphere it was drawn on. And its
    parallel fallback weighs the ends the wrong way round (`low * val + high * (1 - val)`); here it is
    (1 - t) low + t high (both only matter for two almost equal noises, i.e. equal seeds).
    At t = 0 and t = 1 the result is `low` and `high` bit for bit: sin(0) = 0, sin(omega) / sin(omega) = 1.
    """
    low, high = np.asarray(low), np.asarray(high)
    if low.shape != high.shape:
        raise ValueError(f"slerp needs two noises of one shape; got {low.shape} and {high.shape}")
    rows = low.shape[0] if low.ndim >= 2 else 1
    a = low.reshape(rows, -1).astype(np.float64)
    b = high.reshape(rows, -1).astype(np.float64)
    out = np.empty_like(a)
    for k in range(rows):
        norms = np.linalg.norm(a[k]) * np.linalg.norm(b[k])
        dot = float(a[k] @ b[k] / norms) if norms > 0 else 1.0
        if dot > SLERP_PARALLEL_DOT:
            out[k] = (1.0 - t) * a[k] + t * b[k]
            continue
        omega = np.arccos(np.clip(dot, -1.0, 1.0))
        so = np.sin(omega)
        out[k] = np.sin((1.0 - t) * omega) / so * a[k] + np.sin(t * omega) / so * b[k]
    return out.reshape(low.shape).astype(low.dtype)


class VariationGenerator(np.random.Generator):
    """The generator of `seed` (numpy's default_rng(seed) stream), whose every normal draw is slerped
    `strength` of the way towards the same draw of `variation_seed`'s generator.

    Every draw, not only the decoder's initial latents as AUTOMATIC1111 does (its later sampler noise
    comes from the seed alone): here the 2.x prior samples its image embedding with the same generator,
    and the decoders' repository default sampler (DDPM) draws fresh noise at every step. Slerping only
    the first draw would leave strength 1 short of the variation seed's own image; slerping all of them
    makes strength a path from the seed's image (0) to the variation seed's image (1), both ends exact.
    With strength 0 the app does not use this class at all (tasks.py), so nothing changes bit for bit.
    """

    def __init__(self, seed: int, variation_seed: int, strength: float):
        super().__init__(np.random.PCG64(seed))
        self.variation = np.random.default_rng(variation_seed)
        self.strength = float(strength)

    def standard_normal(self, size=None, dtype=np.float64, out=None):
        if out is not None:
            raise ValueError("VariationGenerator.standard_normal does not fill `out`")
        own = np.asarray(super().standard_normal(size, dtype=dtype))
        other = np.asarray(self.variation.standard_normal(size, dtype=dtype))
        mixed = slerp(self.strength, own, other)
        return mixed if size is not None else mixed.item()

    def __deepcopy__(self, memo):
        twin = VariationGenerator.__new__(VariationGenerator)
        np.random.Generator.__init__(twin, copy.deepcopy(self.bit_generator, memo))
        twin.variation = copy.deepcopy(self.variation, memo)
        twin.strength = self.strength
        return twin


def run_generator(seed: int, variation_seed: int = -1, variation_strength: float = 0.0) -> np.random.Generator:
    """A run's generator: default_rng(seed), or with a variation strength > 0 its VariationGenerator."""
    if variation_strength <= 0:
        return np.random.default_rng(seed)
    return VariationGenerator(seed, variation_seed, variation_strength)
