"""Parity of the numpy schedulers with diffusers 0.35.2, and their argument checks.

The fixtures come from tools/fixtures/make_schedulers.py: every case ran a whole sampling loop
in diffusers with a fake model (0.9 * sample + 0.3 * r_k, r_k from a seeded numpy Generator)
and numpy-drawn scheduler noise; here the same loop runs on our schedulers, fed with our own
samples, and every step must stay within 1e-5 of diffusers.
"""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest

from backend.random import randn
from backend.schedulers import (
    SCHEDULERS,
    DDIMScheduler,
    DDPMScheduler,
    SchedulerOutput,
    UnCLIPScheduler,
    scheduler_from_config,
)
from tests.conftest import assert_close

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "schedulers")
CONFIGS = "/work/shared/reference-configs"
CASE_FILES = sorted(glob.glob(os.path.join(FIXTURES, "*.npz")))
TOLERANCE = 1e-5


def published(name):
    with open(os.path.join(CONFIGS, name)) as f:
        return json.load(f)


def fake_model_output(rng, sample, variance):
    """The same fake model as tools/fixtures/make_schedulers.py."""
    r = rng.standard_normal(sample.shape, dtype=np.float32)
    output = np.float32(0.9) * sample + np.float32(0.3) * r
    if variance == "range":
        output = np.concatenate([output, rng.uniform(-1, 1, sample.shape).astype(np.float32)], axis=1)
    elif variance == "positive":
        output = np.concatenate([output, rng.uniform(0.001, 0.05, sample.shape).astype(np.float32)], axis=1)
    return output


def replay(fixture):
    """Run the fixture's sampling loop on our scheduler; return it, the timesteps and the outputs."""
    class_name = str(fixture["class_name"])
    config = json.loads(str(fixture["config"]))
    settings = json.loads(str(fixture["settings"]))
    scheduler = scheduler_from_config(class_name, config)
    if "timesteps" in settings:
        scheduler.set_timesteps(timesteps=settings["timesteps"])
    else:
        scheduler.set_timesteps(settings["steps"])
    timesteps = scheduler.timesteps

    model_rng = np.random.default_rng(settings["seed"])
    noise_generator = np.random.default_rng(settings["seed"] + 1)
    sample = model_rng.standard_normal(tuple(settings["shape"]), dtype=np.float32)
    prev_samples, pred_originals = [], []
    for i, t in enumerate(timesteps):
        model_output = fake_model_output(model_rng, sample, settings.get("variance"))
        kwargs = {"generator": noise_generator}
        if class_name == "DDIMScheduler":
            kwargs["eta"] = settings.get("eta", 0.0)
            kwargs["use_clipped_model_output"] = settings.get("use_clipped_model_output", False)
        if class_name == "UnCLIPScheduler" and settings.get("pass_prev_timestep", True):
            kwargs["prev_timestep"] = None if i == len(timesteps) - 1 else timesteps[i + 1]
        output = scheduler.step(model_output, t, sample, **kwargs)
        assert isinstance(output, SchedulerOutput)
        assert output.prev_sample.dtype == np.float32 and output.pred_original_sample.dtype == np.float32
        assert output.prev_sample.shape == sample.shape == output.pred_original_sample.shape
        sample = output.prev_sample
        prev_samples.append(sample)
        pred_originals.append(output.pred_original_sample)
    return scheduler, timesteps, np.stack(prev_samples), np.stack(pred_originals)


@pytest.mark.parametrize("path", CASE_FILES, ids=lambda p: os.path.basename(p)[:-4])
def test_matches_diffusers(path):
    fixture = np.load(path)
    scheduler, timesteps, prev_samples, pred_originals = replay(fixture)

    assert timesteps.dtype == np.int64
    np.testing.assert_array_equal(timesteps, fixture["timesteps"])
    if bool(fixture["exact_alphas"]):
        np.testing.assert_array_equal(scheduler.alphas_cumprod, fixture["alphas_cumprod"])
    else:
        np.testing.assert_allclose(scheduler.alphas_cumprod, fixture["alphas_cumprod"], rtol=0, atol=1e-6)

    assert_close(prev_samples, fixture["prev_samples"], TOLERANCE)
    assert_close(pred_originals, fixture["pred_original_samples"], TOLERANCE)

    noisy = scheduler.add_noise(
        fixture["add_noise_original"], fixture["add_noise_noise"], fixture["add_noise_timesteps"]
    )
    assert noisy.dtype == np.float32
    assert_close(noisy, fixture["add_noise_result"], 1e-6)


def test_fixtures_cover_the_published_configs():
    names = {os.path.basename(p)[:-4] for p in CASE_FILES}
    for expected in [
        "k22_decoder_ddpm_25", "k22_decoder_ddpm_1", "k22_inpaint_ddpm_25", "k22_decoder_ddim_25",
        "k22_decoder_ddim_1", "k22_prior_unclip_25", "k21_ddim_25", "k21_ddim_1", "k21_ddpm_learned_range_25",
        "k3_ddpm_25", "k3_ddpm_1",
    ]:
        assert expected in names


def test_registry_and_from_config():
    assert SCHEDULERS == {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler,
                          "UnCLIPScheduler": UnCLIPScheduler}
    decoder = published("kandinsky-2-2-decoder/scheduler.json")
    ddpm = scheduler_from_config(decoder["_class_name"], decoder)
    assert isinstance(ddpm, DDPMScheduler)
    assert ddpm.config["clip_sample"] is True and ddpm.config["steps_offset"] == 1
    assert ddpm.config["variance_type"] == "fixed_small"  # default filled in
    # Keys DDPM does not use are kept, as diffusers keeps them, so a swap to DDIM and back loses nothing.
    assert ddpm.config["set_alpha_to_one"] is False and "_class_name" not in ddpm.config
    assert ddpm.init_noise_sigma == 1.0 and ddpm.order == 1

    # DDIM from a DDPM config (as the Kandinsky docs swap schedulers): DDIM keys used, the rest carried along
    ddim = DDIMScheduler.from_config(decoder)
    assert ddim.config["set_alpha_to_one"] is False and "variance_type" not in ddim.config
    from_ddpm = DDIMScheduler.from_config(ddpm.config).config
    assert from_ddpm["set_alpha_to_one"] is False and from_ddpm["variance_type"] == "fixed_small"
    assert DDIMScheduler.from_config(decoder, timestep_spacing="trailing").config["timestep_spacing"] == "trailing"

    prior = scheduler_from_config("UnCLIPScheduler", published("kandinsky-2-2-prior/scheduler.json"))
    assert prior.config["clip_sample_range"] == 10.0 and prior.config["prediction_type"] == "sample"

    with pytest.raises(ValueError, match="class_name"):
        scheduler_from_config("EulerDiscreteScheduler", decoder)


def test_scale_model_input_is_identity():
    sample = np.ones((1, 4, 2, 3), np.float32)
    for cls in SCHEDULERS.values():
        assert cls().scale_model_input(sample, 10) is sample


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler, UnCLIPScheduler])
def test_bad_num_inference_steps(cls):
    scheduler = cls()
    for bad in (0, -3, 1001, 2.5, True):
        with pytest.raises(ValueError, match="num_inference_steps"):
            scheduler.set_timesteps(bad)


def test_unclip_needs_two_steps():
    # diffusers' karlo step ratio divides by num_inference_steps - 1
    with pytest.raises(ValueError, match="num_inference_steps must be between 2"):
        UnCLIPScheduler().set_timesteps(1)


def test_leading_offset_past_the_end():
    # "leading" with steps_offset=1 and all 1000 steps would index timestep 1000 (IndexError in diffusers)
    scheduler = DDPMScheduler.from_config(published("kandinsky-2-2-decoder/scheduler.json"))
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(1000)
    scheduler.set_timesteps(500)
    assert scheduler.timesteps[0] == 999


def test_bad_config_values():
    for cls, key, value in [
        (DDPMScheduler, "variance_type", "fixed_large_log"),
        (DDPMScheduler, "prediction_type", "flow"),
        (DDPMScheduler, "timestep_spacing", "karras"),
        (DDPMScheduler, "beta_schedule", "cubic"),
        (DDIMScheduler, "beta_schedule", "sigmoid"),
        (DDIMScheduler, "num_train_timesteps", 0),
        (UnCLIPScheduler, "beta_schedule", "linear"),
        (UnCLIPScheduler, "prediction_type", "v_prediction"),
        (UnCLIPScheduler, "variance_type", "fixed_small"),
        (UnCLIPScheduler, "clip_sample_range", None),
        (DDPMScheduler, "clip_sample_range", -1.0),
    ]:
        with pytest.raises(ValueError, match=key):
            cls.from_config({key: value})
    with pytest.raises(ValueError, match="sample_max_value"):
        DDIMScheduler(thresholding=True, sample_max_value=0.5)
    with pytest.raises(ValueError, match="dynamic_thresholding_ratio"):
        DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=1.5)
    with pytest.raises(ValueError, match="trained_betas"):
        DDPMScheduler(trained_betas=[0.1, 0.2])


def test_bad_step_arguments():
    sample = np.zeros((1, 4, 2, 2), np.float32)
    ddim = DDIMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim.step(sample, 10, sample)
    ddim.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep"):
        ddim.step(sample, 1000, sample)
    with pytest.raises(ValueError, match="model_output shape"):
        ddim.step(np.zeros((1, 8, 2, 2), np.float32), 901, sample)

    ddpm = DDPMScheduler()
    ddpm.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 5 is not one"):
        ddpm.step(sample, 5, sample, generator=np.random.default_rng(0))
    with pytest.raises(ValueError, match="prev_timestep"):
        ddpm.step(sample, 900, sample, generator=np.random.default_rng(0), prev_timestep=850)
    learned = DDPMScheduler(variance_type="learned_range")
    learned.set_timesteps(10)
    with pytest.raises(ValueError, match="predicted variance"):
        learned.step(sample, 900, sample, generator=np.random.default_rng(0))
    with pytest.raises(ValueError, match="generator"):
        ddpm.step(sample, 900, sample, generator=123)

    prior = UnCLIPScheduler()
    with pytest.raises(ValueError, match="prev_timestep"):
        prior.step(np.zeros((1, 8), np.float32), 500, np.zeros((1, 8), np.float32), prev_timestep=600)


def test_noise_is_drawn_only_when_diffusers_draws_it():
    sample = np.ones((2, 4, 3, 2), np.float32)
    ddpm = DDPMScheduler()
    ddpm.set_timesteps(4)
    generator = np.random.default_rng(7)
    state = generator.bit_generator.state
    ddpm.step(sample, int(ddpm.timesteps[-1]), sample, generator=generator)  # t = 0: no noise
    assert generator.bit_generator.state == state
    ddpm.step(sample, int(ddpm.timesteps[0]), sample, generator=generator)  # one draw of the sample's shape
    expected = np.random.default_rng(7)
    randn(sample.shape, expected)
    assert generator.bit_generator.state == expected.bit_generator.state

    ddim = DDIMScheduler()
    ddim.set_timesteps(4)
    ddim.step(sample, int(ddim.timesteps[0]), sample, generator=generator)  # eta = 0: deterministic
    assert generator.bit_generator.state == expected.bit_generator.state


def test_ddim_prev_timestep_and_variance_noise():
    sample = np.random.default_rng(0).standard_normal((1, 4, 3, 3), dtype=np.float32)
    ddim = DDIMScheduler.from_config(published("kandinsky-2-1/scheduler.json"))
    ddim.set_timesteps(25)
    a = ddim.step(sample, 961, sample, prev_timestep=921, eta=1.0, variance_noise=np.zeros_like(sample))
    b = ddim.step(sample, 961, sample)  # eta = 0
    assert not np.allclose(a.prev_sample, b.prev_sample)  # eta changes the direction term
    with pytest.raises(ValueError, match="either generator or variance_noise"):
        ddim.step(sample, 961, sample, eta=1.0, variance_noise=sample, generator=np.random.default_rng(0))


def test_add_noise():
    scheduler = DDPMScheduler.from_config(published("kandinsky-2-2-decoder/scheduler.json"))
    rng = np.random.default_rng(3)
    original = rng.standard_normal((2, 4, 3, 5), dtype=np.float32)
    noise = rng.standard_normal((2, 4, 3, 5), dtype=np.float32)
    noisy = scheduler.add_noise(original, noise, np.array([999, 0]))
    a = scheduler.alphas_cumprod
    np.testing.assert_allclose(noisy[0], np.sqrt(a[999]) * original[0] + np.sqrt(1 - a[999]) * noise[0], atol=1e-6)
    np.testing.assert_allclose(noisy[1], np.sqrt(a[0]) * original[1] + np.sqrt(1 - a[0]) * noise[1], atol=1e-6)
    # one timestep for the whole batch, as an int
    single = scheduler.add_noise(original, noise, 999)
    np.testing.assert_array_equal(single[0], noisy[0])
    with pytest.raises(ValueError, match="timesteps"):
        scheduler.add_noise(original, noise, np.array([1000, 0]))
    # one sample noised with each noise of a batch, as diffusers broadcasts (2.2 inpainting)
    broadcast = scheduler.add_noise(original[:1], noise, np.array([10]))
    np.testing.assert_array_equal(broadcast, scheduler.add_noise(original[[0, 0]], noise, np.array([10, 10])))
    with pytest.raises(ValueError, match="noise shape"):
        scheduler.add_noise(original, noise[:, :3], np.array([10, 10]))


def test_output_indexes_like_a_tuple():
    ddpm = DDPMScheduler()
    ddpm.set_timesteps(2)
    sample = np.zeros((1, 2, 2, 2), np.float32)
    output = ddpm.step(sample, int(ddpm.timesteps[-1]), sample)
    assert output[0] is output.prev_sample and output[1] is output.pred_original_sample
    prev, x0 = ddpm.step(sample, int(ddpm.timesteps[-1]), sample, return_dict=False)
    assert prev.shape == x0.shape == sample.shape
