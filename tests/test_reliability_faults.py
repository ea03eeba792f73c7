"""Damaged model files under `--models-dir`, the app running (`python app.py --offline --models-dir`):
each fault fails the job that needs that folder with a message naming the file (and the tensor),
the other models keep serving, the folder works again once repaired (no restart), and models
loaded while other jobs run or wait do not change anyone's images.

The folders are the demo models (backend/demo.py) copied under the names of the published repos,
so the app takes the real-model path.
"""
from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image
from safetensors.numpy import load_file, save_file

from tests.ui.server import ROOT

REPOS = {"prior": "kandinsky-2-2-prior", "decoder": "kandinsky-2-2-decoder",
         "inpaint": "kandinsky-2-2-decoder-inpaint", "controlnet": "kandinsky-2-2-controlnet-depth"}
OWNER = "fa" * 16
TINY = dict(width=64, height=64, num_inference_steps=3, prior_num_inference_steps=2, preview="off", seed=3)
LANDSCAPE = ROOT / "assets" / "samples" / "landscape.png"
DEPTH = ROOT / "assets" / "samples" / "depth.png"
UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from backend import demo

    built = demo.ensure_demo_models(tmp_path_factory.mktemp("built"))
    models = tmp_path_factory.mktemp("models")
    for role, name in REPOS.items():
        shutil.copytree(built.repos[role], models / name)
    return models


@pytest.fixture(scope="module")
def app_options(models):
    return {"extra_args": ["--offline", "--models-dir", str(models)], "demo": False}


def text2img(client, **kw):
    return client.predict(owner=OWNER, prompt="still serving", **{**TINY, **kw}, api_name="/text2img")


def inpaint(client, **kw):
    mask = {"background": handle_file(str(LANDSCAPE)), "layers": [], "composite": None}
    return client.predict(owner=OWNER, prompt="x", editor=mask, mask_invert=True, **{**TINY, **kw},
                          api_name="/inpaint")


def controlnet(client, **kw):
    return client.predict(owner=OWNER, prompt="x", depth=handle_file(str(DEPTH)), hint_source="Use my depth map",
                          **{**TINY, **kw}, api_name="/controlnet")


def done(result) -> bool:
    return 'data-state="done"' in result[1]


def rewrite(path: Path, change) -> None:
    """Load a safetensors file, let `change(tensors)` edit the dict, save it back."""
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def first_matrix(tensors: dict) -> str:
    return next(key for key, value in sorted(tensors.items()) if value.ndim >= 2)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage_header(path: Path) -> None:
    path.write_bytes(b"\xff" * 8 + path.read_bytes()[8:])


def _broken_json(path: Path) -> None:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    path.write_bytes(data[:8] + b"{" + b"x" * (length - 1) + data[8 + length:])


def _wrong_shape(path: Path) -> None:
    def change(tensors):
        key = first_matrix(tensors)
        tensors[key] = np.zeros(tensors[key].shape[:-1] + (tensors[key].shape[-1] + 1,), tensors[key].dtype)
    rewrite(path, change)


def _nan(path: Path) -> None:
    def change(tensors):
        key = first_matrix(tensors)
        tensors[key] = tensors[key].copy()
        tensors[key].flat[0] = np.nan
    rewrite(path, change)


def _extra_key(path: Path) -> None:
    rewrite(path, lambda tensors: tensors.update({"not_a_layer.weight": np.zeros((2, 2), np.float32)}))


def _missing_key(path: Path) -> None:
    rewrite(path, lambda tensors: tensors.pop(first_matrix(tensors)))


# (name, role, file inside the folder, how to damage it, what the message must say besides the file)
FAULTS = [
    ("truncated weights", "inpaint", UNET, _truncate, "truncated"),
    ("empty weights file", "inpaint", UNET, lambda p: p.write_bytes(b""), "truncated or empty"),
    ("random header length", "inpaint", UNET, _garbage_header, "not a safetensors file"),
    ("corrupt JSON header", "inpaint", UNET, _broken_json, "corrupt header"),
    ("missing weights file", "inpaint", UNET, lambda p: p.unlink(), "no *.safetensors weights"),
    ("missing config.json", "inpaint", "movq/config.json", lambda p: p.unlink(), "missing config file"),
    ("corrupt model_index.json", "inpaint", "model_index.json", lambda p: p.write_text("{"), "not valid JSON"),
    ("wrong-shape tensor", "controlnet", UNET, _wrong_shape, "has shape"),
    ("NaN in a tensor", "controlnet", UNET, _nan, "NaN or infinite"),
    ("tensor the model lacks", "controlnet", UNET, _extra_key, "not_a_layer.weight"),
    ("tensor missing", "controlnet", UNET, _missing_key, "missing from the checkpoint"),
    ("missing hint-encoder config", "controlnet", "unet/config.json", lambda p: p.unlink(), "missing config file"),
]


@pytest.mark.parametrize("name,role,relative,damage,says", FAULTS, ids=[f[0] for f in FAULTS])
def test_a_damaged_model_names_its_file_and_the_others_keep_serving(name, role, relative, damage, says,
                                                                   models, client, tmp_path):
    """Each fault is a separate case; `says` must appear in the message with the file's path."""
    # A failed load keeps nothing, so each case reads its folder again (the repaired folder is
    # loaded only by the last test).
    path = models / REPOS[role] / relative
    backup = tmp_path / "backup"
    shutil.copy2(path, backup)
    damage(path)
    try:
        with pytest.raises(Exception) as caught:
            (inpaint if role == "inpaint" else controlnet)(client)
        message = str(caught.value)
        named = str(path) if "no *.safetensors" not in says else str(path.parent)
        assert named in message and says in message, message
        print(f"\nfault {name!r}: {message}")
        assert done(text2img(client)), "text to image must keep working"
    finally:
        shutil.copy2(backup, path)


def test_repaired_folders_load_without_a_restart(client):
    assert done(inpaint(client)) and done(controlnet(client)) and done(text2img(client))


def images_of(result) -> Image.Image:
    return Image.open(result[2]["path"] if isinstance(result[2], dict) else result[2]).convert("RGB")


def test_loads_while_other_jobs_run_change_no_image(server, client):
    """Reference images first, one at a time; then the same jobs at once from several clients,
    with an unload and a tiny memory budget in between so folders are evicted and loaded again
    while jobs run and wait. Every image must equal its reference exactly."""
    long = dict(TINY, width=128, height=128, num_inference_steps=25, seed=11)
    references = {"text2img": np.asarray(images_of(text2img(client, **long))),
                  "inpaint": np.asarray(images_of(inpaint(client, seed=12))),
                  "controlnet": np.asarray(images_of(controlnet(client, seed=13)))}
    client.predict(api_name="/unload")
    results: dict = {}

    def run(name, call, **kw):
        results[name] = call(Client(server.url, verbose=False), **kw)

    first = threading.Thread(target=run, args=("text2img", text2img), kwargs=long)
    first.start()
    time.sleep(0.5)  # the text-to-image job is loading or running
    others = [threading.Thread(target=run, args=("inpaint", inpaint), kwargs={"seed": 12}),
              threading.Thread(target=run, args=("controlnet", controlnet), kwargs={"seed": 13})]
    for thread in others:
        thread.start()
    budget = client.predict(text="1MB", api_name="/set_memory_budget")   # evicts whatever is idle
    unloaded = client.predict(api_name="/unload")
    for thread in [first, *others]:
        thread.join(300)
    client.predict(text="auto", api_name="/set_memory_budget")
    assert "1.0 MB" in budget and "Device" in unloaded
    for name, reference in references.items():
        assert done(results[name]), results[name][1]
        assert np.array_equal(np.asarray(images_of(results[name])), reference), f"{name} changed"
    status = json.dumps(client.predict(api_name="/models_status"))
    assert "running: none" in status
