"""Helpers shared by the test files.

`assert_close` compares our output (numpy array or MindSpore Tensor) with a reference array:
same shape, max abs difference within the tolerance the calling test names. The fixtures below
start the app's Engine in process, or the app itself in a subprocess.
"""
from __future__ import annotations

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
