"""backend/pipelines/depth.py against transformers 4.57.1's `pipeline("depth-estimation")` (fixtures:
tools/fixtures/make_depth_anything.py: the tiny random Depth Anything with the published
preprocessor_config.json, on square, portrait and landscape images whose sides are not multiples of
14, a grey and an RGBA image).

`predicted_depth` must equal transformers' to 1e-4 of its largest value and the 0-255 `depth` image
must be transformers' image: the same grey levels, except where transformers' own value sits within
that tolerance of a level boundary (the uint8 cast truncates), and there one level apart at most. Both
execution paths; the preprocessing is transformers' DPTImageProcessorPil and must give 4.57.1's model
input exactly. Then make_hint as the Kandinsky 2.2 ControlNet docs build the hint, a photo's depth
driving the tiny ControlNet pipeline, the bad inputs, and the offline help.
"""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend import weights
from backend.pipelines import DepthEstimationPipeline, KandinskyV22ControlnetPipeline, make_hint

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "depth_anything_tiny"
TOLERANCE = 1e-4  # relative to the reference depth's largest value
SHAPES = ("square", "portrait", "landscape")


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(TINY / "reference.npz"))


@pytest.fixture(scope="module")
def pipe():
    return DepthEstimationPipeline.from_pretrained(TINY)


def input_image(name: str) -> Image.Image:
    return Image.open(TINY / "inputs" / f"{name}.png")


def check_against_transformers(out: dict, reference: dict, name: str, image: Image.Image) -> None:
    expected = reference[f"{name}_predicted_depth"]
    depth = out["predicted_depth"]
    assert depth.dtype == np.float32 and depth.shape == expected.shape == (image.height, image.width)
    assert np.abs(depth - expected).max() / np.abs(expected).max() <= TOLERANCE
    # the 0-255 image: transformers' own levels before the cast, from its predicted depth
    levels = (expected - expected.min()) / (expected.max() - expected.min()) * 255
    ours, theirs = np.asarray(out["depth"]).astype(int), reference[f"{name}_depth"].astype(int)
    assert out["depth"].mode == "L" and out["depth"].size == image.size
    differ = ours != theirs
    assert np.abs(ours - theirs).max() <= 1
    distance_to_boundary = np.abs(levels - np.round(levels))
    assert (distance_to_boundary[differ] <= 255 * TOLERANCE).all()
    assert differ.mean() < 0.01


@pytest.mark.parametrize("host", [True, False], ids=["cpu-numpy-path", "mindspore-ops-path"])
@pytest.mark.parametrize("name", SHAPES)
def test_matches_transformers_pipeline(pipe, reference, name, host):
    pipe.model.cpu_numpy_path = host
    try:
        image = input_image(name)
        assert image.width % 14 and image.height % 14
        check_against_transformers(pipe(image), reference, name, image)
    finally:
        pipe.model.cpu_numpy_path = True


@pytest.mark.parametrize("name", ["grey", "rgba"])
def test_grey_and_alpha_images_are_converted_as_transformers_does(pipe, reference, name):
    image = input_image(name)
    assert image.mode == {"grey": "L", "rgba": "RGBA"}[name]
    check_against_transformers(pipe(image), reference, name, image)


@pytest.mark.parametrize("name", [*SHAPES, "grey", "rgba"])
def test_preprocessing_is_transformers_own(pipe, reference, name):
    from transformers import DPTImageProcessorPil

    assert isinstance(pipe.image_processor, DPTImageProcessorPil)
    processor = pipe.image_processor
    assert (processor.size.height, processor.size.width, processor.ensure_multiple_of, processor.keep_aspect_ratio,
            processor.resample) == (518, 518, 14, True, 3)
    image = pipe.load_image(input_image(name))
    pixel_values = processor(np.asarray(image), return_tensors="np", input_data_format="channels_last").pixel_values
    assert pixel_values.shape == tuple(reference[f"{name}_pixel_values_shape"])
    assert pixel_values.shape[2:] == pipe.model_input_size(image.height, image.width)
    np.testing.assert_array_equal(pixel_values[:, :, ::7, ::7], reference[f"{name}_pixel_values_sample"])


def test_a_path_and_a_list_are_taken(pipe, reference):
    outs = pipe([str(TINY / "inputs" / "square.png"), input_image("landscape")])
    assert isinstance(outs, list) and len(outs) == 2
    check_against_transformers(outs[0], reference, "square", input_image("square"))
    check_against_transformers(outs[1], reference, "landscape", input_image("landscape"))


def test_exif_orientation_is_applied(pipe, reference, tmp_path):
    """transformers' load_image turns the image upright first: a portrait stored sideways with EXIF
    orientation 6 gives the upright portrait's depth."""
    upright = input_image("portrait").convert("RGB")
    sideways = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 rotates it back by 270
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "sideways.png"
    sideways.save(path, exif=exif)
    check_against_transformers(pipe(str(path)), reference, "portrait", upright)


def test_flat_depth_gives_a_black_image_not_nans():
    out = DepthEstimationPipeline.postprocess(np.zeros((1, 28, 42), np.float32), (30, 50))
    assert out["predicted_depth"].shape == (30, 50) and not np.asarray(out["depth"]).any()


# ------------------------------------------------------------------------------------------ make_hint


def test_make_hint_is_the_docs_hint(reference):
    depth = Image.fromarray(reference["landscape_depth"])
    hint = make_hint(depth)
    # diffusers' Kandinsky 2.2 ControlNet docs: np.array(depth)[:, :, None] three times, / 255, (2, 0, 1), batch
    image = np.array(depth)[:, :, None]
    expected = (np.concatenate([image, image, image], axis=2).astype(np.float32) / 255.0).transpose(2, 0, 1)[None]
    assert hint.dtype == np.float32 and hint.shape == (1, 3, depth.height, depth.width)
    np.testing.assert_array_equal(hint, expected)
    np.testing.assert_array_equal(make_hint(reference["landscape_depth"]), expected)
    with pytest.raises(ValueError, match="depth"):
        make_hint(np.zeros((2, 3, 4)))


def test_a_photo_drives_the_controlnet_pipeline(pipe):
    """The docs' flow: photo -> depth-estimation -> make_hint -> ControlNet pipeline."""
    photo = Image.open(FIXTURES / "pipelines" / "image_a.png")
    hint = make_hint(pipe(photo)["depth"])
    assert hint.shape == (1, 3, 64, 64) and 0 <= hint.min() < hint.max() <= 1
    controlnet = KandinskyV22ControlnetPipeline.from_pretrained(
        FIXTURES / "pipelines" / "kandinsky-2-2-controlnet-tiny")
    dim = controlnet.unet.config.encoder_hid_dim
    embeds = np.random.default_rng(0).standard_normal((1, dim)).astype(np.float32)
    common = dict(image_embeds=embeds, negative_image_embeds=-embeds, height=64, width=64, num_inference_steps=2,
                  output_type="np")
    out = controlnet(hint=hint, generator=np.random.default_rng(1), **common)[0]
    flat = controlnet(hint=np.zeros_like(hint), generator=np.random.default_rng(1), **common)[0]
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    assert np.abs(out - flat).max() > 1e-3  # the estimated depth reaches the image


# ------------------------------------------------------------------------------------------ bad input


def test_too_small_is_refused_naming_the_field_and_the_minimum(pipe):
    with pytest.raises(ValueError, match=r"`image` is 13x40 pixels, too small .* at least 14x14"):
        pipe(Image.new("RGB", (13, 40)))
    with pytest.raises(ValueError, match=r"`image\[1\]` is 40x5"):
        pipe([Image.new("RGB", (40, 40)), Image.new("RGB", (40, 5))])


def test_too_elongated_is_refused_before_the_processor_fails(pipe):
    with pytest.raises(ValueError, match=r"`image` is 2000x14 pixels: resized for the model it would be 518x0"):
        pipe(Image.new("RGB", (2000, 14)))
    assert pipe.model_input_size(14, 1000) == (14, 518)  # still one patch: accepted
    assert pipe(Image.new("RGB", (1000, 14), "white"))["predicted_depth"].shape == (14, 1000)


def test_enormous_image_is_refused_from_its_header(pipe, tmp_path):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path = tmp_path / "claims-9000x9000.png"  # a few bytes whose header claims 81M pixels
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 9000, 9000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    with pytest.raises(ValueError, match=r"`image` is 9000x9000 pixels; at most 67,108,864 .* before decoding"):
        pipe(str(path))
    with pytest.raises(ValueError, match="`image` must be a PIL image or the path"):
        pipe(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="`image` cannot be read"):
        pipe(str(tmp_path / "missing.png"))


def test_missing_repo_offline_gets_the_offline_help(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(weights.WeightsError, match="huggingface-cli download") as error:
        DepthEstimationPipeline.from_pretrained("depth-anything/Depth-Anything-V2-Small-hf", cache_dir=tmp_path)
    assert "depth-anything/Depth-Anything-V2-Small-hf" in str(error.value)
    assert "not in the local Hugging Face cache" in str(error.value)


def test_repo_from_the_hf_cache_offline(tmp_path, monkeypatch, reference):
    repo = tmp_path / "models--depth-anything--Depth-Anything-V2-Small-hf"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(TINY, snapshot, ignore=shutil.ignore_patterns("inputs", "reference.npz"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    progress = []
    pipe = DepthEstimationPipeline.from_pretrained(
        "depth-anything/Depth-Anything-V2-Small-hf", cache_dir=tmp_path,
        on_progress=lambda name, done, total: progress.append((name, done, total)))
    assert progress[-1][0] == "depth_estimator" and progress[-1][1] == progress[-1][2] > 0
    check_against_transformers(pipe(input_image("square")), reference, "square", input_image("square"))


def test_download_fetches_the_top_level_model_files_only():
    from fnmatch import fnmatch

    repo_files = ["config.json", "preprocessor_config.json", "model.safetensors", "README.md", ".gitattributes",
                  "pytorch_model.bin", "onnx/model.onnx", "model.fp16.safetensors"]
    allow, ignore = weights.download_patterns(None, [""])
    fetched = {f for f in repo_files if any(fnmatch(f, p) for p in allow) and not any(fnmatch(f, p) for p in ignore)}
    assert fetched == {"config.json", "preprocessor_config.json", "model.safetensors"}


def test_missing_processor_config_names_the_file(tmp_path):
    shutil.copytree(TINY, tmp_path / "repo", ignore=shutil.ignore_patterns("inputs", "reference.npz"))
    os.remove(tmp_path / "repo" / "preprocessor_config.json")
    with pytest.raises(weights.WeightsError, match="preprocessor_config.json"):
        DepthEstimationPipeline.from_pretrained(tmp_path / "repo")
