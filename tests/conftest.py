"""Helpers shared by the test files.

`assert_close` compares our output (numpy array or MindSpore Tensor) with a reference array:
same shape, max abs difference within the tolerance the calling test names.
"""
from __future__ import annotations

import numpy as np


def as_numpy(value) -> np.ndarray:
    """A numpy array from a numpy array, a MindSpore Tensor or anything np.asarray takes."""
    if hasattr(value, "asnumpy"):
        return value.asnumpy()
    return np.asarray(value)


def max_abs_diff(actual, expected) -> float:
    actual, expected = as_numpy(actual), as_numpy(expected)
    assert actual.shape == expected.shape, f"shape {actual.shape} != reference {expected.shape}"
    return float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max()) if actual.size else 0.0


def assert_close(actual, expected, tolerance: float) -> None:
    diff = max_abs_diff(actual, expected)
    assert diff <= tolerance, f"max abs difference {diff:.3g} > {tolerance:.3g}"
