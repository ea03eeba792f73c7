"""Helpers shared by the test files.

`assert_close` compares our output (numpy array or MindSpore Tensor) with a reference array:
same shape, max abs difference within the tolerance the calling test names. The fixtures below
start the app's Engine in process, or the app itself in a subprocess.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


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


# ------------------------------------------------------------------------------ the decoders with the samplers
#
# tools/fixtures/make_pipelines.py --samplers: diffusers' decoder pipelines of the three families with
# DPM++ 2M (Karras, SDE Karras), UniPC, Euler and Euler a swapped in, their final latents on the tiny fixtures.

SAMPLER_REFERENCE = Path(__file__).parent / "fixtures" / "pipelines" / "reference_samplers.npz"
SAMPLER_TOLERANCE = 1e-5    # of the latents' largest magnitude (|x| reaches 1e5: see the fixture script)


def sampler_cases(family: str) -> list[dict]:
    """The recorded cases of one family ("2.2", "2.1", "3"): task, sampler, steps, seed, strength."""
    with np.load(SAMPLER_REFERENCE) as reference:
        cases = json.loads(str(reference["cases"]))
    return [case for case in cases if case["family"] == family]


def sampler_id(case: dict) -> str:
    return f"{case['task']}-{case['sampler']}"


def swapped_scheduler(case: dict, folder: Path):
    """The case's sampler built from the folder's scheduler config, as the docs swap schedulers; the app's table
    (backend.schedulers.SAMPLERS) must name the class and options diffusers ran."""
    from backend import weights
    from backend.schedulers import SAMPLERS

    cls, options = SAMPLERS[case["sampler"]]
    assert (cls.__name__, options) == (case["class_name"], case["options"])
    return cls.from_config(weights.read_config(folder / "scheduler", "scheduler_config.json"), **options)


def run_sampler_case(pipe, *args, **kwargs) -> np.ndarray:
    """Run a decoder pipeline end to end (to images, checked for shape and range); return its final latents,
    as the step callback saw them."""
    steps = []
    images = pipe(*args, output_type="np", callback=lambda i, total, latents, x0: steps.append(latents), **kwargs)[0]
    assert images.shape[-1] == 3 and np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert steps, "no denoising step ran"
    return steps[-1]


def assert_sampler_latents(actual, case: dict) -> None:
    with np.load(SAMPLER_REFERENCE) as reference:
        expected = reference[f"{case['family']}_{case['task']}_{case['sampler']}"]
    diff, scale = max_abs_diff(actual, expected), float(np.abs(expected).max())
    assert diff <= SAMPLER_TOLERANCE * scale, f"max abs difference {diff:.3g} > {SAMPLER_TOLERANCE:g} x {scale:.4g}"


# ------------------------------------------------------------------------------ the app and its engine
#
# `engine`: an in-process Engine on the tiny demo models (all three families), one per test module.
# `server` / `client`: `python app.py --demo` in a subprocess and a gradio_client on it, one per
# module; a module changes what the server runs by overriding `app_options` (AppServer's keyword
# arguments) and, for a login, `login`.

@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """Where the demo models are built, once per test session."""
    return tmp_path_factory.getbasetemp() / "demo-models"


@pytest.fixture(scope="module")
def engine(demo_root, tmp_path_factory):
    from backend.engine import Engine, EngineConfig

    engine = Engine(EngineConfig(demo=True, cache_dir=str(demo_root),
                                 outputs_dir=str(tmp_path_factory.mktemp("outputs"))))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def app_options() -> dict:
    return {}


@pytest.fixture(scope="module")
def login():
    return None


@pytest.fixture(scope="module")
def server(request, tmp_path_factory, app_options):
    from tests.ui.server import AppServer

    server = AppServer(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]), **app_options)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server, login):
    from gradio_client import Client

    return Client(server.url, auth=login, verbose=False)
