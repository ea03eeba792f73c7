"""PNG settings chunks: written, read back, A1111 text parsed; the outputs folder per owner."""
import json
import time

import numpy as np
import pytest
from PIL import Image

from backend import metadata
from backend.metadata import OutputStore, parameters_text, parse_parameters_text, read_settings


ALICE, BOB, CAROL = "a1" * 16, "b0" * 16, "c4" * 16   # owner ids: 32 hex digits (backend/requests.py)

SETTINGS = {
    "task": "inpaint",
    "model": "kandinsky-2-2",
    "prompt": "a red fox, oil painting",
    "negative_prompt": "blurry, low quality",
    "negative_prior_prompt": "text: watermark",
    "width": 768,
    "height": 512,
    "num_inference_steps": 50,
    "prior_num_inference_steps": 25,
    "guidance_scale": 4.0,
    "prior_guidance_scale": 1.0,
    "scheduler": "ddpm",
    "seed": 1234,
    "batch_size": 2,
    "batch_position": 1,
    "strength": 0.5,
    "mask_blur": 4,
    "mask_grow": 2,
    "mask_invert": True,
    "image": "inputs/0123456789abcdef0123.png",
}


def small_image():
    return Image.fromarray(np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3))


def test_png_round_trip_keeps_every_field(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(metadata.encode_png(small_image(), SETTINGS))
    settings = read_settings(path)
    assert settings.pop("format_version") == metadata.FORMAT_VERSION
    assert settings == SETTINGS
    # the pixels are untouched
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(small_image()))


def test_parameters_text_is_a1111_layout_and_parses_back():
    text = parameters_text(SETTINGS)
    lines = text.split("\n")
    assert lines[0] == "a red fox, oil painting"
    assert lines[1] == "Negative prompt: blurry, low quality"
    assert lines[2].startswith("Steps: 50, Sampler: ddpm, CFG scale: 4.0, Seed: 1234, Size: 768x512")
    # a value with a colon is quoted so the key-value line stays parseable
    assert 'Negative prior prompt: "text: watermark"' in lines[2]
    parsed = parse_parameters_text(text)
    for field in ("prompt", "negative_prompt", "negative_prior_prompt", "width", "height",
                  "num_inference_steps", "prior_num_inference_steps", "guidance_scale",
                  "prior_guidance_scale", "scheduler", "seed", "strength", "mask_blur", "mask_grow",
                  "mask_invert", "task", "model", "batch_size"):
        assert parsed[field] == SETTINGS[field], field


@pytest.mark.parametrize("name", ["DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE Karras", "UniPC", "Euler", "Euler a",
                                  "DDIM", "DDPM", "Repository default"])
def test_the_sampler_is_stored_in_both_chunks_and_read_back(tmp_path, name):
    """`Sampler: <name>` in the A1111 text (as AUTOMATIC1111 writes "DPM++ 2M Karras") and `scheduler` in the JSON
    chunk; either read back is a name a request takes as it is."""
    from backend.requests import Text2ImageRequest

    settings = dict(SETTINGS, scheduler=name)
    text = parameters_text(settings)
    assert f", Sampler: {name}, CFG scale: 4.0," in text.split("\n")[-1]
    path = tmp_path / "x.png"
    path.write_bytes(metadata.encode_png(small_image(), settings))
    parameters, raw_json = metadata.read_texts(path)
    assert parameters == text and json.loads(raw_json)["scheduler"] == name
    for stored in (read_settings(path)["scheduler"], parse_parameters_text(parameters)["scheduler"]):
        assert stored == name
        request = Text2ImageRequest(scheduler=stored)
        request.validate()
        assert request.scheduler == name


def test_text_to_image_text_leaves_out_fields_of_other_tasks():
    settings = dict(SETTINGS, task="text2img", negative_prompt="")
    text = parameters_text(settings)
    assert "Negative prompt" not in text
    assert "Denoising strength" not in text and "Mask blur" not in text


def test_a1111_text_from_another_tool():
    text = ("masterpiece, a castle\non a hill\nNegative prompt: ugly\n"
            "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 42, Size: 512x640, "
            "Model hash: abcdef, Lora hashes: \"a: 1, b: 2\", Version: v1.9")
    parsed = parse_parameters_text(text)
    assert parsed["prompt"] == "masterpiece, a castle\non a hill"
    assert parsed["negative_prompt"] == "ugly"
    assert parsed["num_inference_steps"] == 20 and parsed["seed"] == 42
    assert (parsed["width"], parsed["height"]) == (512, 640)
    assert parsed["guidance_scale"] == 7.0
    assert parsed["extra"] == {"Model hash": "abcdef", "Lora hashes": "a: 1, b: 2", "Version": "v1.9"}


def test_controlnet_mode_in_text():
    settings = {"task": "controlnet", "prompt": "a room", "mode": "img2img", "strength": 0.5, "seed": 1}
    text = parameters_text(settings)
    assert "ControlNet mode: img2img" in text
    parsed = parse_parameters_text(text)
    assert parsed["mode"] == "img2img" and parsed["strength"] == 0.5


def test_interpolation_weights_in_text():
    settings = {"task": "interpolate", "prompt": "", "weights": [0.25, 0.75], "seed": 1}
    parsed = parse_parameters_text(parameters_text(settings))
    assert parsed["weights"] == [0.25, 0.75]


def test_png_without_settings_and_with_only_a1111_text(tmp_path):
    plain = tmp_path / "plain.png"
    small_image().save(plain)
    assert read_settings(plain) == {}
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 30, Seed: 7")
    other = tmp_path / "other.png"
    small_image().save(other, pnginfo=info)
    assert read_settings(other) == {"prompt": "a cat", "negative_prompt": "",
                                    "num_inference_steps": 30, "seed": 7}


def test_corrupt_json_chunk_is_an_error(tmp_path):
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text(metadata.JSON_CHUNK, "{not json")
    path = tmp_path / "bad.png"
    small_image().save(path, pnginfo=info)
    with pytest.raises(ValueError, match="not valid JSON"):
        read_settings(path)


def test_output_store_per_owner_newest_first(tmp_path):
    store = OutputStore(tmp_path / "out")
    first = store.save(small_image(), {"seed": 1, "prompt": "a"}, owner=ALICE)
    time.sleep(0.01)
    second = store.save(small_image(), {"seed": 2, "prompt": "b", "partial": True}, owner=ALICE)
    store.save(small_image(), {"seed": 3}, owner=BOB)
    assert store.list(ALICE) == [second, first]
    assert second.name.endswith("-2-partial.png")
    assert [read_settings(p)["seed"] for p in store.list(BOB)] == [3]
    assert store.owns(ALICE, first) and not store.owns(BOB, first)
    assert not store.owns(ALICE, tmp_path / "out" / ALICE / ".." / BOB / "x.png")
    assert store.list(CAROL) == []


def test_output_store_rejects_owner_names_that_escape_the_folder(tmp_path):
    store = OutputStore(tmp_path)
    for owner in ("", "../x", "a/b", "x" * 65, "alice", "AB" * 16):
        with pytest.raises(ValueError, match="owner"):
            store.save(small_image(), {}, owner=owner)


def test_input_images_stored_once_by_content(tmp_path):
    store = OutputStore(tmp_path)
    ref = store.save_input(small_image(), ALICE)
    assert ref == store.save_input(small_image(), ALICE)
    path = store.input_path(ALICE, ref)
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(small_image()))
    with pytest.raises(ValueError):
        store.input_path(ALICE, "../../etc/passwd")
    assert json.loads(json.dumps({"image": ref}))["image"].startswith("inputs/")


def _leftovers(root):
    """Every temporary file under `root` (hidden ones included)."""
    return [p for p in root.rglob("*") if p.suffix == ".tmp" or p.name.endswith(".tmp")]


def _full_disk(monkeypatch, written=100):
    """A disk that takes `written` bytes of a file, then refuses with ENOSPC (as a full disk does)."""
    import errno
    import os

    def write(file, data):
        file.write(data[:written])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(metadata, "_write", write)


def test_a_full_disk_names_the_problem_and_the_folder_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    store = OutputStore(tmp_path)
    kept = store.save(small_image(), {"seed": 1}, owner=ALICE)
    _full_disk(monkeypatch)
    for _ in range(3):  # each retry too
        with pytest.raises(OSError) as caught:
            store.save(small_image(), {"seed": 2}, owner=ALICE)
        assert isinstance(caught.value, metadata.SaveError) and caught.value.errno == 28
        assert str(caught.value) == f"disk full at {tmp_path / ALICE} (No space left on device)"
        with pytest.raises(metadata.SaveError, match=r"disk full at .*inputs \(No space left on device\)"):
            store.save_input(small_image(), ALICE)
    assert _leftovers(tmp_path) == []
    assert store.list(ALICE) == [kept] and list((tmp_path / ALICE / "inputs").iterdir()) == []


def test_a_read_only_folder_or_a_refused_rename_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno
    import os
    store = OutputStore(tmp_path)
    store.folder(ALICE)

    def read_only(path, *args, **kwargs):  # as root, chmod would not stop a write: the refusal is injected
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    monkeypatch.setattr(metadata, "open", read_only, raising=False)
    with pytest.raises(metadata.SaveError, match=f"read-only file system at {tmp_path / ALICE} "):
        store.save(small_image(), {"seed": 1}, owner=ALICE)
    monkeypatch.undo()

    def no_rename(source, target):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    monkeypatch.setattr(metadata.os, "replace", no_rename)
    with pytest.raises(metadata.SaveError, match="no permission to write at"):
        store.save(small_image(), {"seed": 1}, owner=ALICE)
    monkeypatch.undo()
    assert _leftovers(tmp_path) == [] and store.list(ALICE) == []
    assert store.save(small_image(), {"seed": 1}, owner=ALICE).is_file()
