"""Kandinsky 2.1 pipelines against diffusers 0.35.2 on tiny diffusers-saved checkpoints.

Fixtures and reference outputs: tools/fixtures/make_pipelines_2_1.py (torch environment). Same
weights, same numpy noise stream on both sides; every pipeline must match to 1e-4, on the images
and on the final latents.

The DDIM cases run the published DDIM config with clip_sample true, as the fixture script explains:
with clip_sample false a random tiny model grows the latents to |20|, where diffusers' own fp32 MoVQ
decode differs from its fp64 one by 1.7e-4. One case runs the published config unchanged and
compares its latents.
"""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend import weights
from backend.pipelines import (
    KandinskyCombinedPipeline,
    KandinskyImg2ImgCombinedPipeline,
    KandinskyImg2ImgPipeline,
    KandinskyInpaintCombinedPipeline,
    KandinskyInpaintPipeline,
    KandinskyPipeline,
    KandinskyPriorPipeline,
)
from backend.schedulers import SAMPLERS, DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler
from tests.conftest import (assert_close, assert_sampler_latents, run_sampler_case, sampler_cases, sampler_id,
                            swapped_scheduler)

FIXTURES = Path(__file__).parent / "fixtures" / "pipelines_2_1"
IMAGES = Path(__file__).parent / "fixtures" / "pipelines"
PRIOR = FIXTURES / "kandinsky-2-1-prior-tiny"
DECODER = FIXTURES / "kandinsky-2-1-tiny"
INPAINT = FIXTURES / "kandinsky-2-1-inpaint-tiny"
TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURES / "reference.npz"))


@pytest.fixture(scope="module")
def prior():
    return KandinskyPriorPipeline.from_pretrained(PRIOR)


@pytest.fixture(scope="module")
def decoder():
    return KandinskyPipeline.from_pretrained(DECODER)


@pytest.fixture(scope="module")
def decoder_ddpm(decoder):
    return KandinskyPipeline.from_pretrained(DECODER, scheduler="ddpm_scheduler")


def clipped(scheduler) -> DDIMScheduler:
    return DDIMScheduler.from_config({**scheduler.config, "clip_sample": True})


@pytest.fixture(scope="module")
def decoder_clipped(decoder):
    return KandinskyPipeline(**{**decoder.components, "scheduler": clipped(decoder.scheduler)})


@pytest.fixture(scope="module")
def inpaint():
    pipe = KandinskyInpaintPipeline.from_pretrained(INPAINT)
    return KandinskyInpaintPipeline(**{**pipe.components, "scheduler": clipped(pipe.scheduler)})


def image(name, folder=IMAGES):
    return Image.open(folder / name)


def gen(seed):
    return np.random.default_rng(seed)


def run(pipe, ref, key, *args, **kwargs):
    """Call with output_type "np"; compare the images and the last step's latents with diffusers'."""
    steps = []
    out = pipe(*args, output_type="np", callback=lambda i, total, latents, x0: steps.append(latents), **kwargs)[0]
    assert_close(steps[-1], ref[key + "_latents"], TOL)
    assert_close(out, ref[key], TOL)
    return out, steps


# ------------------------------------------------------------------------------------ prior


def test_prior_text_to_embedding(prior, ref):
    emb, neg = prior("a red cat", num_inference_steps=3, generator=gen(0), guidance_scale=4.0)
    assert_close(emb, ref["prior_image_embeds"], TOL)
    assert_close(neg, ref["prior_negative_image_embeds"], TOL)


def test_prior_pads_with_exclamation_mark(prior):
    # the published 2.1 prior tokenizer pads with "!" (id 0), not with the end-of-text token
    assert prior.tokenizer.pad_token == "!" and prior.tokenizer.pad_token_id == 0
    ids = prior.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="np")["input_ids"]
    assert (ids[0, 4:] == 0).all()


def test_prior_negative_prompt_and_images_per_prompt(prior, ref):
    emb, neg = prior(["the dog", "a cat"], negative_prompt=["red", "the"], num_images_per_prompt=2,
                     num_inference_steps=2, generator=gen(1), guidance_scale=3.0)
    assert_close(emb, ref["prior_neg_image_embeds"], TOL)
    assert_close(neg, ref["prior_neg_negative_image_embeds"], TOL)


def test_prior_without_guidance(prior, ref):
    emb, neg = prior("the cat", num_inference_steps=2, generator=gen(2), guidance_scale=1.0)
    assert_close(emb, ref["prior_noguid_image_embeds"], TOL)
    assert_close(neg, ref["prior_noguid_negative_image_embeds"], TOL)


def test_prior_without_image_encoder_given_its_zero_embedding_is_bit_identical(prior):
    """The ViT-L/14 image encoder left out, its zero-image embedding given (as the app does for text-only jobs)."""
    text_only = KandinskyPriorPipeline.from_pretrained(PRIOR, image_encoder=None,
                                                       zero_image_embeds=prior.get_zero_embed())
    assert text_only.image_encoder is None
    want = prior("a red cat", num_inference_steps=2, generator=gen(5), guidance_scale=4.0)
    got = text_only("a red cat", num_inference_steps=2, generator=gen(5), guidance_scale=4.0)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    with pytest.raises(ValueError, match="an image, needs the image encoder"):
        text_only.interpolate(["a cat", image("image_a.png")], [0.5, 0.5], num_inference_steps=2)


def test_prior_interpolate(prior, ref):
    emb, neg = prior.interpolate(["a cat", image("image_a.png"), "red dog", image("image_b.png")],
                                 [0.3, 0.2, 0.4, 0.1], num_inference_steps=2, generator=gen(3))
    assert_close(emb, ref["interp_image_embeds"], TOL)
    assert_close(neg, ref["interp_negative_image_embeds"], TOL)


# ---------------------------------------------------------------------------------- decoders


def test_text2img_published_ddim_latents(decoder, ref):
    assert isinstance(decoder.scheduler, DDIMScheduler)  # the published model_index's scheduler
    assert decoder.scheduler.config["clip_sample"] is False
    steps = []
    decoder("a red cat", image_embeds=ref["image_embeds"][:1], negative_image_embeds=ref["negative_image_embeds"][:1],
            height=64, width=64, num_inference_steps=3, guidance_scale=4.0, generator=gen(10), output_type="latent",
            callback=lambda i, total, latents, x0: steps.append(latents))
    assert np.abs(steps[-1]).max() > 10  # why the image itself is not compared (module docstring)
    assert_close(steps[-1], ref["text2img_published_ddim_latents"], TOL)


def test_text2img(decoder_clipped, ref):
    run(decoder_clipped, ref, "text2img", "a red cat", image_embeds=ref["image_embeds"][:1],
        negative_image_embeds=ref["negative_image_embeds"][:1], height=64, width=64, num_inference_steps=3,
        guidance_scale=4.0, generator=gen(10))


def test_text2img_ddpm_scheduler_non_square_batch(decoder_ddpm, ref):
    assert isinstance(decoder_ddpm.scheduler, DDPMScheduler)
    assert decoder_ddpm.scheduler.config["thresholding"] and \
        decoder_ddpm.scheduler.config["variance_type"] == "learned_range"
    out, steps = run(decoder_ddpm, ref, "text2img_ddpm_64x128", ["a red cat", "the dog on the mat"],
                     image_embeds=ref["image_embeds"], negative_image_embeds=ref["negative_image_embeds"],
                     negative_prompt=["the", "red dog"], height=64, width=128, num_inference_steps=3,
                     guidance_scale=5.0, num_images_per_prompt=2, generator=gen(11))
    assert out.shape == (4, 64, 128, 3) and len(steps) == 3


def test_text2img_without_guidance(decoder_clipped, ref):
    run(decoder_clipped, ref, "text2img_noguid", "ein rote Katze", image_embeds=ref["image_embeds"][:1],
        negative_image_embeds=ref["negative_image_embeds"][:1], height=64, width=64, num_inference_steps=2,
        guidance_scale=1.0, generator=gen(12))


def test_scheduler_as_component(decoder, ref):
    config = weights.read_config(DECODER / "ddpm_scheduler", "scheduler_config.json")
    pipe = KandinskyPipeline(**{**decoder.components, "scheduler": DDPMScheduler.from_config(config)})
    out = pipe(["a red cat", "the dog on the mat"], ref["image_embeds"], ref["negative_image_embeds"],
               negative_prompt=["the", "red dog"], height=64, width=128, num_inference_steps=3, guidance_scale=5.0,
               num_images_per_prompt=2, generator=gen(11), output_type="np")[0]
    assert_close(out, ref["text2img_ddpm_64x128"], TOL)


def test_img2img(decoder_clipped, ref):
    pipe = KandinskyImg2ImgPipeline(**decoder_clipped.components)
    run(pipe, ref, "img2img", "a red cat", image=image("image_a.png"), image_embeds=ref["image_embeds"][:1],
        negative_image_embeds=ref["negative_image_embeds"][:1], height=64, width=64, strength=0.6,
        num_inference_steps=5, guidance_scale=7.0, generator=gen(13))


def test_img2img_ddpm_scheduler(decoder_ddpm, ref):
    pipe = KandinskyImg2ImgPipeline(**decoder_ddpm.components)
    run(pipe, ref, "img2img_ddpm", "the dog", image=image("image_a.png"), image_embeds=ref["image_embeds"][:1],
        negative_image_embeds=ref["negative_image_embeds"][:1], negative_prompt="red", height=64, width=64,
        strength=0.5, num_inference_steps=4, guidance_scale=4.0, generator=gen(14))


def test_img2img_non_square_and_strength_zero(decoder):
    # diffusers 0.35.2 rejects every non-square 2.1 img2img size (module docstring); ours resizes to it
    pipe = KandinskyImg2ImgPipeline(**decoder.components)
    embeds, negative = np.ones((1, 32), np.float32), np.zeros((1, 32), np.float32)
    out = pipe("a cat", image=image("image_b.png"), image_embeds=embeds, negative_image_embeds=negative, height=64,
               width=128, strength=0.5, num_inference_steps=2, generator=gen(0), output_type="np")[0]
    assert out.shape == (1, 64, 128, 3) and np.isfinite(out).all()
    steps = []
    out = pipe("a cat", image=image("image_a.png"), image_embeds=embeds, negative_image_embeds=negative, height=64,
               width=64, strength=0.0, num_inference_steps=3, output_type="np",
               callback=lambda *a: steps.append(a))[0]
    assert not steps  # nothing to denoise: the image comes back through the MoVQ as it went in
    decoded = pipe.decode(pipe.encode_images([image("image_a.png")], 64, 64), "np")
    np.testing.assert_array_equal(out, decoded)


def test_inpaint(inpaint, ref):
    assert inpaint.unet.config.in_channels == 9
    run(inpaint, ref, "inpaint", "a red cat", image=image("image_a.png"), mask_image=image("mask.png"),
        image_embeds=ref["image_embeds"][:1], negative_image_embeds=ref["negative_image_embeds"][:1], height=64,
        width=64, num_inference_steps=3, guidance_scale=4.0, generator=gen(15))


def test_inpaint_non_square(inpaint, ref):
    out, _ = run(inpaint, ref, "inpaint_64x128", "the dog", image=image("image_64x128.png", FIXTURES),
                 mask_image=image("mask_64x128.png", FIXTURES), image_embeds=ref["image_embeds"][:1],
                 negative_image_embeds=ref["negative_image_embeds"][:1], height=64, width=128,
                 num_inference_steps=3, guidance_scale=4.0, generator=gen(16))
    assert out.shape == (1, 64, 128, 3)


@pytest.fixture(scope="module")
def ref_two():
    """Final latents of every decoder with num_images_per_prompt=2 (make_pipelines_2_1.py)."""
    return dict(np.load(FIXTURES / "reference_two_per_prompt.npz"))


@pytest.mark.parametrize("case", ["text2img", "img2img", "inpaint"])
def test_two_images_per_prompt(decoder_clipped, inpaint, ref, ref_two, case):
    common = dict(image_embeds=ref["image_embeds"][:1], negative_image_embeds=ref["negative_image_embeds"][:1],
                  height=64, width=64, guidance_scale=4.0, num_images_per_prompt=2, output_type="latent")
    if case == "text2img":
        out = decoder_clipped("a red cat", num_inference_steps=3, generator=gen(20), **common)[0]
    elif case == "img2img":
        pipe = KandinskyImg2ImgPipeline(**decoder_clipped.components)
        out = pipe("a red cat", image=image("image_a.png"), strength=0.6, num_inference_steps=4, generator=gen(21),
                   **common)[0]
    else:
        out = inpaint("the dog", image=image("image_a.png"), mask_image=image("mask.png"), num_inference_steps=3,
                      generator=gen(22), **common)[0]
    assert out.shape == (2, 4, 8, 8)
    assert_close(out, ref_two[case], TOL)


def test_inpaint_needs_an_inpainting_unet(decoder):
    pipe = KandinskyInpaintPipeline(**decoder.components)
    with pytest.raises(ValueError, match="inpainting UNet"):
        pipe("a cat", image=image("image_a.png"), mask_image=image("mask.png"), image_embeds=np.ones((1, 32)),
             negative_image_embeds=np.zeros((1, 32)), height=64, width=64, num_inference_steps=1)


# ---------------------------------------------------------------------------------- combined


def test_combined(prior, decoder_clipped, ref):
    pipe = KandinskyCombinedPipeline(prior, decoder_clipped)
    run(pipe, ref, "combined", "a red cat", negative_prompt="the dog", num_inference_steps=2,
        prior_num_inference_steps=2, height=64, width=64, generator=gen(17))


def test_combined_img2img(prior, decoder_clipped, ref):
    pipe = KandinskyImg2ImgCombinedPipeline(prior, KandinskyImg2ImgPipeline(**decoder_clipped.components))
    run(pipe, ref, "combined_img2img", "a red cat", image=image("image_a.png"), num_inference_steps=4, strength=0.5,
        prior_num_inference_steps=2, height=64, width=64, generator=gen(18))


def test_combined_inpaint(prior, inpaint, ref):
    pipe = KandinskyInpaintCombinedPipeline(prior, inpaint)
    run(pipe, ref, "combined_inpaint", "the dog", image=image("image_a.png"), mask_image=image("mask.png"),
        num_inference_steps=2, prior_num_inference_steps=2, height=64, width=64, generator=gen(19))


def test_combined_from_pretrained_with_ddpm_scheduler():
    pipe = KandinskyCombinedPipeline.from_pretrained(DECODER, prior_pretrained_model_name_or_path=PRIOR,
                                                     scheduler="ddpm_scheduler")
    assert isinstance(pipe.decoder_pipe.scheduler, DDPMScheduler)
    assert isinstance(pipe.prior_pipe, KandinskyPriorPipeline)
    assert set(pipe.components) >= {"prior_prior", "prior_tokenizer", "text_encoder", "tokenizer", "unet", "movq"}


# ---------------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("case", sampler_cases("2.1"), ids=sampler_id)
def test_dpmpp_2m_karras_matches_diffusers(ref, case):
    """Text-to-image, image-to-image and inpainting with DPM++ 2M Karras swapped in as the docs swap schedulers,
    against diffusers' own pipelines with the same scheduler (tools/fixtures/make_pipelines.py --samplers;
    diffusers runs DPM-Solver++ here as it is). Final latents, relative to their size (|x| reaches 87 with the
    random tiny UNet: tests/conftest.py SAMPLER_TOLERANCE and the fixture script say why not images)."""
    cls = {"text2img": KandinskyPipeline, "img2img": KandinskyImg2ImgPipeline,
           "inpaint": KandinskyInpaintPipeline}[case["task"]]
    folder = INPAINT if case["task"] == "inpaint" else DECODER
    pipe = cls.from_pretrained(folder, scheduler=swapped_scheduler(case, folder))
    args = dict(image_embeds=ref["image_embeds"][:1], negative_image_embeds=ref["negative_image_embeds"][:1],
                height=64, width=64, num_inference_steps=case["steps"], guidance_scale=4.0,
                generator=gen(case["seed"]))
    if case["task"] != "text2img":
        args["image"] = image("image_a.png")
    if case["task"] == "img2img":
        args["strength"] = case["strength"]
    if case["task"] == "inpaint":
        args["mask_image"] = image("mask.png")
    assert_sampler_latents(run_sampler_case(pipe, "a red cat", **args), case)


class RecordingUNet:
    """The UNet, recording the (sample, timestep) of every call."""

    def __init__(self, unet):
        self.unet, self.config, self.calls = unet, unet.config, []

    def __call__(self, sample, timestep, **kwargs):
        self.calls.append((sample.copy(), timestep))
        return self.unet(sample, timestep, **kwargs)


def test_euler_img2img_starts_from_what_ddim_starts_from(decoder):
    """2.1 image-to-image noises the image with the original 2.1 schedule whatever the scheduler (as diffusers).
    Euler steps x = x0 + sigma * eps, so it gets those latents times sqrt(sigma^2 + 1) and its scale_model_input
    divides that out: the UNet's first input is what DDIM's is (diffusers would multiply the clean image latents
    by init_noise_sigma, 25, first)."""
    first_inputs = []
    for scheduler in (decoder.scheduler, EulerDiscreteScheduler.from_config(decoder.scheduler.config)):
        unet = RecordingUNet(decoder.unet)
        pipe = KandinskyImg2ImgPipeline(**{**decoder.components, "unet": unet, "scheduler": scheduler})
        out = pipe("a red cat", image("image_a.png"), np.ones((1, 32), np.float32), np.zeros((1, 32), np.float32),
                   height=64, width=64, strength=0.5, num_inference_steps=6, generator=gen(3), output_type="latent")[0]
        assert np.isfinite(out).all() and len(unet.calls) == 3
        first_inputs.append(unet.calls[0][0])
    np.testing.assert_allclose(first_inputs[1], first_inputs[0], rtol=1e-5, atol=1e-6)
    assert np.abs(first_inputs[0]).max() < 5  # the noisy image latents, not 25 times them


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_runs_every_decoder(decoder, inpaint, name):
    """Each sampler from the repo's DDIM config and from its alternative ddpm_scheduler (learned-range variance:
    only DDPM reads the variance channels; the others get the noise half, though their config still names
    "learned_range"), through text-to-image, image-to-image and inpainting."""
    for folder in ("scheduler", "ddpm_scheduler"):
        config = weights.read_config(DECODER / folder, "scheduler_config.json")
        cls, options = SAMPLERS[name]
        scheduler = cls.from_config(config, **options)
        embeds = dict(image_embeds=np.ones((1, 32), np.float32), negative_image_embeds=np.zeros((1, 32), np.float32),
                      height=64, width=64, num_inference_steps=3, generator=gen(4), output_type="latent")
        outputs = [
            KandinskyPipeline(**{**decoder.components, "scheduler": scheduler})("a cat", **embeds)[0],
            KandinskyImg2ImgPipeline(**{**decoder.components, "scheduler": scheduler})(
                "a cat", image("image_a.png"), strength=0.7, **embeds)[0],
            KandinskyInpaintPipeline(**{**inpaint.components, "scheduler": scheduler})(
                "a cat", image("image_a.png"), image("mask.png"), **embeds)[0],
        ]
        assert all(out.shape == (1, 4, 8, 8) and np.isfinite(out).all() for out in outputs), (name, folder)


# ------------------------------------------------------------------------------ bad input


def test_long_prompts_are_truncated_and_reported(decoder, prior):
    long_prompt = "the dog on the mat " * 30  # well over 77 tokens for both tokenizers
    out = decoder(long_prompt, np.ones((1, 32)), np.zeros((1, 32)), height=64, width=64, num_inference_steps=1,
                  output_type="np")[0]
    assert out.shape == (1, 64, 64, 3)
    assert decoder.truncated_text and decoder.truncated_text[0].strip().startswith("the dog")
    decoder("a red cat", np.ones((1, 32)), np.zeros((1, 32)), height=64, width=64, num_inference_steps=1,
            output_type="np")
    assert decoder.truncated_text == []
    pipe = KandinskyCombinedPipeline(prior, decoder)
    pipe(long_prompt, num_inference_steps=1, prior_num_inference_steps=2, height=64, width=64, output_type="np")
    assert len(pipe.truncated_text) == 2  # CLIP's cut (prior) and the multilingual encoder's cut (decoder)


@pytest.mark.parametrize("field,value", [
    ("height", 0), ("width", 100_000), ("height", 64.5), ("num_inference_steps", 0), ("num_inference_steps", 5000),
    ("guidance_scale", -1.0), ("guidance_scale", float("nan")), ("num_images_per_prompt", 0),
    ("output_type", "jpeg"),
])
def test_decoder_rejects_bad_numbers(decoder, field, value):
    kwargs = dict(height=64, width=64, num_inference_steps=1)
    kwargs[field] = value
    with pytest.raises(ValueError, match=field):
        decoder("a cat", np.ones((1, 32)), np.zeros((1, 32)), **kwargs)


@pytest.mark.parametrize("args,message", [
    ((123, np.ones((1, 32)), np.zeros((1, 32))), "`prompt`"),
    (("a cat", np.ones((1, 31)), np.zeros((1, 32))), "`image_embeds`.*shape"),
    (("a cat", np.ones((1, 32)), np.full((1, 32), np.nan)), "`negative_image_embeds`.*NaN"),
    ((["a", "b"], np.ones((3, 32)), np.zeros((1, 32))), "`image_embeds` has batch 3"),
])
def test_decoder_rejects_bad_inputs(decoder, args, message):
    with pytest.raises(ValueError, match=message):
        decoder(*args, height=64, width=64, num_inference_steps=1)


def test_decoder_rejects_mismatched_negative_prompts(decoder):
    with pytest.raises(ValueError, match="negative_prompt"):
        decoder(["a", "b", "c"], np.ones((1, 32)), np.zeros((1, 32)), negative_prompt=["x", "y"], height=64,
                width=64, num_inference_steps=1)


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan")])
def test_img2img_rejects_strength(decoder, strength):
    pipe = KandinskyImg2ImgPipeline(**decoder.components)
    with pytest.raises(ValueError, match="strength"):
        pipe("a cat", image=Image.new("RGB", (64, 64)), image_embeds=np.ones((1, 32)),
             negative_image_embeds=np.zeros((1, 32)), height=64, width=64, strength=strength, num_inference_steps=2)


def test_scheduler_subfolder_must_exist():
    with pytest.raises(ValueError, match="not a subfolder"):
        KandinskyPipeline.from_pretrained(DECODER, scheduler="no_such_scheduler")
    with pytest.raises(ValueError, match="not a subfolder"):
        KandinskyPipeline.from_pretrained(DECODER, scheduler="../kandinsky-2-1-inpaint-tiny/scheduler")
