"""Latent -> RGB previews: the least-squares fit, the map, the cache, and the fit from a real MoVQ."""
import json

import numpy as np
import pytest
from PIL import Image

from backend import demo, previews
from backend.derived import DerivedValueCache
from backend.previews import PREVIEW_FACTORS, LatentRGBFactors, fit_factors, latents_to_rgb, preview_image


def test_fit_recovers_a_known_linear_map():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(4, 3)).astype(np.float32) * 0.2
    bias = np.array([0.5, 0.4, 0.3], np.float32)
    latents = rng.normal(size=(3, 4, 6, 5)).astype(np.float32)
    # pixels: each 8x8 block is the map of its latent pixel (plus noise that averages out per block)
    rgb = np.einsum("nchw,ck->nhwk", latents, weight) + bias
    pixels = rgb.repeat(8, axis=1).repeat(8, axis=2) + rng.normal(scale=0.01, size=(3, 48, 40, 3))
    factors = fit_factors(latents, pixels)
    np.testing.assert_allclose(factors.weight, weight, atol=2e-3)
    np.testing.assert_allclose(factors.bias, bias, atol=2e-3)
    assert factors.residual < 0.01


def test_area_downsample_averages_each_cell():
    pixels = np.arange(2 * 4 * 6 * 3, dtype=np.float64).reshape(2, 4, 6, 3)
    small = previews.area_downsample(pixels, (2, 3))
    assert small.shape == (2, 2, 3, 3)
    np.testing.assert_allclose(small[0, 0, 0], pixels[0, :2, :2].mean(axis=(0, 1)))
    with pytest.raises(ValueError, match="not a multiple"):
        previews.area_downsample(pixels, (3, 3))


def test_map_clips_to_valid_colours_and_preview_keeps_the_aspect_ratio():
    factors = LatentRGBFactors(np.eye(4, 3, dtype=np.float32) * 10, np.zeros(3, np.float32), 0.0)
    x0 = np.zeros((2, 4, 8, 16), np.float32)
    x0[:, 0] = 1.0   # red far beyond 1 -> 255
    x0[:, 1] = -1.0  # green below 0 -> 0
    rgb = latents_to_rgb(x0, factors)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 8, 16, 3)
    assert (rgb[..., 0] == 255).all() and (rgb[..., 1] == 0).all()
    image = preview_image(x0, factors, side=128)
    assert image.size == (2 * 128, 64)  # the batch side by side, long side 128 each


def test_cache_fits_once_and_reuses_the_file(tmp_path):
    calls = []
    factors = LatentRGBFactors(np.ones((4, 3), np.float32), np.zeros(3, np.float32), 0.1)

    def fit():
        calls.append(1)
        return factors

    cache = DerivedValueCache(tmp_path)
    assert cache.get(PREVIEW_FACTORS, "abc", fit) is factors
    assert cache.get(PREVIEW_FACTORS, "abc", fit) is factors
    assert len(calls) == 1 and json.loads((tmp_path / "abc.json").read_text())["residual"] == 0.1
    again = DerivedValueCache(tmp_path).get(PREVIEW_FACTORS, "abc", fit)  # a new process reads the file
    assert len(calls) == 1 and np.array_equal(again.weight, factors.weight)
    (tmp_path / "bad.json").write_text("{broken")
    DerivedValueCache(tmp_path).get(PREVIEW_FACTORS, "bad", fit)  # an unreadable file is refitted, not fatal
    assert len(calls) == 2
    (tmp_path / "list.json").write_text("[1, 2]")   # valid JSON, not factors
    DerivedValueCache(tmp_path).get(PREVIEW_FACTORS, "list", fit)
    assert len(calls) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["abc.json", "bad.json", "list.json"]


def test_the_checkpoint_fingerprint_follows_the_content(tmp_path):
    """The one fingerprint (backend/fingerprints.py) keys the preview factors and the manager's sharing."""
    from backend.fingerprints import file_digest, fingerprint

    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        (folder / "config.json").write_text('{"latent_channels": 4}')
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 100)
    assert fingerprint(a) == fingerprint(b)  # same checkpoint in two repos
    (b / "diffusion_pytorch_model.safetensors").write_bytes(b"y" * 100)
    assert fingerprint(a) != fingerprint(b)
    (b / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 100)
    (b / "config.json").write_text('{"latent_channels": 8}')
    assert fingerprint(a) != fingerprint(b)
    # a Hugging Face cache blob is named by its SHA-256: taken from the name, not read
    blob = tmp_path / ("ab" * 32)
    blob.write_bytes(b"not what the name says")
    (tmp_path / "link.safetensors").symlink_to(blob)
    assert file_digest(tmp_path / "link.safetensors") == "ab" * 32


def test_fit_from_a_real_movq_beats_a_flat_colour(tmp_path_factory):
    """The demo MoVQ (random weights) through the real pipeline: the fit explains part of the colour."""
    from backend.pipelines import KandinskyV22Pipeline

    spec = demo.ensure_demo_models(tmp_path_factory.getbasetemp() / "demo-models")
    pipe = KandinskyV22Pipeline.from_pretrained(spec.repos["decoder"])
    factors = previews.fit_factors_from_pipeline(pipe, size=64)
    assert factors.weight.shape == (4, 3) and np.isfinite(factors.weight).all()
    samples = np.stack([np.asarray(i, np.float32) / 255 for i in previews.sample_pixels(64)])
    flat = float(np.sqrt(np.mean((previews.area_downsample(samples, (8, 8)) -
                                  samples.mean(axis=(0, 1, 2))) ** 2)))
    assert factors.residual < flat
    # a preview of an encoded sample looks like the sample more than like its mirror image
    image = Image.open(previews.SAMPLES_DIR / "blocks.png").convert("RGB").resize((64, 64))
    latents = pipe.encode_images([image], 64, 64)
    shown = np.asarray(preview_image(latents, factors, side=8), np.float32)
    target = np.asarray(image.resize((8, 8), Image.BOX), np.float32)
    assert np.abs(shown - target).mean() < np.abs(shown - target[:, ::-1]).mean()
