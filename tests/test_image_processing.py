"""Parity of backend/image_processing.py with transformers 4.57.1 `CLIPImageProcessor`.

Fixtures (tools/fixtures/make_prior_clip.py), with the Kandinsky 2.2 prior's
preprocessor_config.json: test images in PIL modes RGB (landscape downscale, portrait upscale,
11x17), RGBA, L, P, I;16, CMYK and numpy arrays (HWC / CHW uint8, HWC float); for each, the
resized + center-cropped pixels transformers made (exact integers, kept as PNG), and the full
normalised float32 output for a batch of two.
"""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.image_processing import CLIPImageProcessor

FOLDER = Path(__file__).parent / "fixtures" / "image_processor"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def io():
    return np.load(FOLDER / "io.npz")


@pytest.fixture(scope="module")
def processor():
    return CLIPImageProcessor.from_pretrained(FOLDER)


def config() -> dict:
    return json.loads((FOLDER / "preprocessor_config.json").read_text())


def load_input(io, name: str):
    png = FOLDER / "inputs" / f"{name}.png"
    if png.exists():
        image = Image.open(png)
        image.load()
        return image
    if f"{name}_array" in io:
        return io[f"{name}_array"]
    size = tuple(int(v) for v in io[f"{name}_size"])
    return Image.frombytes(str(io[f"{name}_mode"]), size, io[f"{name}_bytes"].tobytes())


def expected_pixels(name: str) -> np.ndarray:
    return np.array(Image.open(FOLDER / "expected" / f"{name}.png")).transpose(2, 0, 1)  # (3, 224, 224)


def test_input_modes_are_covered(io):
    names = [str(n) for n in io["names"]]
    modes = {load_input(io, n).mode for n in names if not f"{n}_array" in io}
    assert modes == {"RGB", "RGBA", "L", "P", "I;16", "CMYK"}
    assert any(io[f"{n}_array"].dtype.kind == "f" for n in names if f"{n}_array" in io)


@pytest.mark.parametrize("name", ["rgb_landscape", "rgb_portrait", "rgb_small", "rgba", "l_grey", "p_palette",
                                  "i16", "cmyk", "np_hwc_uint8", "np_chw_uint8", "np_hwc_float"])
def test_resize_and_crop_match_transformers_exactly(io, name):
    raw = CLIPImageProcessor.from_config({**config(), "do_rescale": False, "do_normalize": False})
    ours = raw.preprocess(load_input(io, name))
    assert ours.shape == (1, 3, 224, 224) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours[0], expected_pixels(name).astype(np.float32))


@pytest.mark.parametrize("name", ["rgb_landscape", "p_palette", "np_chw_uint8"])
def test_full_output_matches_normalised_reference_pixels(processor, io, name):
    ours = processor(load_input(io, name)).pixel_values
    mean = np.array(config()["image_mean"], np.float32)[:, None, None]
    std = np.array(config()["image_std"], np.float32)[:, None, None]
    ref = (expected_pixels(name).astype(np.float64) / 255).astype(np.float32)
    assert np.abs(ours[0] - (ref - mean) / std).max() <= TOLERANCE


def test_transparency_is_dropped_not_composited(processor, io):
    # transformers 4.57.1 (the reference) converts with Image.convert("RGB"); transformers 5 would
    # composite onto white, also for an RGB image with a "transparency" colour key.
    pixels = np.zeros((64, 96, 3), np.uint8)
    pixels[:, :48], pixels[:, 48:] = (10, 200, 30), (90, 20, 160)
    keyed = Image.fromarray(pixels)
    keyed.info["transparency"] = (10, 200, 30)  # an RGB PNG's tRNS colour key: the left half
    np.testing.assert_array_equal(processor.preprocess(keyed), processor.preprocess(pixels))
    rgba = load_input(io, "rgba")
    np.testing.assert_array_equal(processor.preprocess(rgba), processor.preprocess(rgba.convert("RGB")))


def test_batch_output_matches_transformers(processor, io):
    images = [load_input(io, str(n)) for n in io["batch_names"]]
    ours = processor.preprocess(images)
    ref = io["batch_pixel_values"]
    assert ours.shape == ref.shape == (2, 3, 224, 224) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= TOLERANCE, np.abs(ours - ref).max()


def test_four_dimensional_array_is_a_batch(processor, io):
    array = io["np_hwc_uint8_array"]
    batch = processor.preprocess(np.stack([array, array]))
    single = processor.preprocess(array)
    assert batch.shape == (2, 3, 224, 224)
    np.testing.assert_array_equal(batch[1], single[0])


def test_grey_and_rgba_arrays_follow_the_pil_conversion(processor, io):
    grey = np.array(load_input(io, "l_grey"))
    np.testing.assert_array_equal(processor.preprocess(grey), processor.preprocess(load_input(io, "l_grey")))
    rgba = np.array(load_input(io, "rgba"))
    np.testing.assert_array_equal(processor.preprocess(rgba), processor.preprocess(load_input(io, "rgba")))


def test_bad_inputs_are_refused(processor):
    with pytest.raises(ValueError, match="0-255"):
        processor.preprocess(np.full((20, 20, 3), 0.5))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        processor.preprocess(np.full((20, 20, 3), 300.0))
    with pytest.raises(ValueError, match="PIL images or numpy arrays"):
        processor.preprocess(["not an image"])
    with pytest.raises(ValueError, match="resample"):
        CLIPImageProcessor.from_config({"resample": 9})
    with pytest.raises(ValueError, match="image_mean"):
        CLIPImageProcessor.from_config({"image_mean": [0.5, 0.5]})
