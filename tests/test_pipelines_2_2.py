"""Kandinsky 2.2 pipelines against diffusers 0.35.2 on tiny diffusers-saved checkpoints.

Fixtures and reference outputs: tools/fixtures/make_pipelines.py (torch environment). Same
weights, same numpy noise stream on both sides; every pipeline must match to 1e-4.
"""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.pipelines import (
    KandinskyV22CombinedPipeline,
    KandinskyV22ControlnetImg2ImgPipeline,
    KandinskyV22ControlnetPipeline,
    KandinskyV22Img2ImgPipeline,
    KandinskyV22InpaintPipeline,
    KandinskyV22Pipeline,
    KandinskyV22PriorEmb2EmbPipeline,
    KandinskyV22PriorPipeline,
)
from backend import weights
from backend.derived import DerivedValueCache, array_kind
from backend.schedulers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UnCLIPScheduler
from tests.conftest import (assert_close, assert_sampler_latents, run_sampler_case, sampler_cases, sampler_id,
                            swapped_scheduler)

FIXTURES = Path(__file__).parent / "fixtures" / "pipelines"
PRIOR = FIXTURES / "kandinsky-2-2-prior-tiny"
DECODER = FIXTURES / "kandinsky-2-2-decoder-tiny"
INPAINT = FIXTURES / "kandinsky-2-2-inpaint-tiny"
CONTROLNET = FIXTURES / "kandinsky-2-2-controlnet-tiny"
TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURES / "reference.npz"))


@pytest.fixture(scope="module")
def ref_two():
    """Final latents of every decoder with num_images_per_prompt=2 (make_pipelines.py)."""
    return dict(np.load(FIXTURES / "reference_two_per_prompt.npz"))


@pytest.fixture(scope="module")
def prior():
    return KandinskyV22PriorPipeline.from_pretrained(PRIOR)


@pytest.fixture(scope="module")
def decoder():
    return KandinskyV22Pipeline.from_pretrained(DECODER)


def image(name):
    return Image.open(FIXTURES / name)


def gen(seed):
    return np.random.default_rng(seed)


def test_prior_text_to_embedding(prior, ref):
    emb, neg = prior("a red cat", num_inference_steps=3, generator=gen(0), guidance_scale=4.0)
    assert_close(emb, ref["prior_image_embeds"], TOL)
    assert_close(neg, ref["prior_negative_image_embeds"], TOL)


def test_prior_negative_prompt_and_images_per_prompt(prior, ref):
    emb, neg = prior(["the dog", "a cat"], negative_prompt=["red", "the"], num_images_per_prompt=2,
                     num_inference_steps=2, generator=gen(1), guidance_scale=3.0)
    assert_close(emb, ref["prior_neg_image_embeds"], TOL)
    assert_close(neg, ref["prior_neg_negative_image_embeds"], TOL)


def test_prior_without_guidance(prior, ref):
    emb, neg = prior("the cat", num_inference_steps=2, generator=gen(2), guidance_scale=1.0)
    assert_close(emb, ref["prior_noguid_image_embeds"], TOL)
    assert_close(neg, ref["prior_noguid_negative_image_embeds"], TOL)


def test_prior_interpolate(prior, ref):
    emb, neg = prior.interpolate(["a cat", image("image_a.png"), "red dog", image("image_b.png")],
                                 [0.3, 0.2, 0.4, 0.1], num_inference_steps=2, generator=gen(3))
    assert_close(emb, ref["interp_image_embeds"], TOL)
    assert_close(neg, ref["interp_negative_image_embeds"], TOL)


def test_prior_emb2emb(prior, ref):
    pipe = KandinskyV22PriorEmb2EmbPipeline(**prior.components)
    emb, neg = pipe("a cat", image=image("image_a.png"), strength=0.5, num_inference_steps=4, generator=gen(4),
                    guidance_scale=4.0)
    assert_close(emb, ref["emb2emb_image_embeds"], TOL)
    assert_close(neg, ref["emb2emb_negative_image_embeds"], TOL)


def test_prior_without_image_encoder_given_the_cached_zero_embedding_is_bit_identical(prior, tmp_path):
    """What the app runs for every text-only job: no image encoder, its zero-image embedding read back
    from backend/derived.py's .npy file instead."""
    zero = prior.get_zero_embed()
    assert zero.shape == (1, prior.embedding_dim) and zero.dtype == np.float32
    kind = array_kind("zero_image_embeds")
    DerivedValueCache(tmp_path).put(kind, "encoder-fingerprint", zero)
    stored = DerivedValueCache(tmp_path).peek(kind, "encoder-fingerprint")   # a new process reads the file
    assert stored.dtype == zero.dtype and stored.shape == zero.shape and stored.tobytes() == zero.tobytes()

    text_only = KandinskyV22PriorPipeline.from_pretrained(PRIOR, image_encoder=None, zero_image_embeds=stored)
    assert text_only.image_encoder is None and text_only.prior is not prior.prior
    assert np.array_equal(text_only.get_zero_embed(3), prior.get_zero_embed(3))
    for kwargs in (dict(guidance_scale=4.0), dict(guidance_scale=1.0, num_images_per_prompt=2),
                   dict(negative_prompt="red", guidance_scale=3.0)):
        want = prior("a red cat", num_inference_steps=2, generator=gen(5), **kwargs)
        got = text_only("a red cat", num_inference_steps=2, generator=gen(5), **kwargs)
        assert all(np.array_equal(a, b) for a, b in zip(got, want)), kwargs
    want = prior.interpolate(["a cat", "red dog"], [0.3, 0.7], num_inference_steps=2, generator=gen(6))
    got = text_only.interpolate(["a cat", "red dog"], [0.3, 0.7], num_inference_steps=2, generator=gen(6))
    assert all(np.array_equal(a, b) for a, b in zip(got, want))


def test_prior_without_image_encoder_names_what_is_missing_before_any_work(prior):
    steps = []
    callback = lambda *args: steps.append(args)  # noqa: E731
    bare = KandinskyV22PriorPipeline(**{**prior.components, "image_encoder": None})
    with pytest.raises(ValueError, match=r"^The zero-image embedding .* needs the image encoder, and this "
                                         r"KandinskyV22PriorPipeline was built without one \(image_encoder=None\).*"
                                         r"`zero_image_embeds`"):
        bare("a cat", num_inference_steps=2, callback=callback)
    assert steps == []
    # with a negative prompt the negative embedding is that prompt's: no zero image needed
    emb, neg = bare("a cat", negative_prompt="a dog", num_inference_steps=2, generator=gen(7))
    assert emb.shape == neg.shape == (1, prior.embedding_dim)

    text_only = KandinskyV22PriorPipeline(**{**prior.components, "image_encoder": None},
                                          zero_image_embeds=prior.get_zero_embed())
    with pytest.raises(ValueError, match=r"`images_and_prompts\[1\]`, an image, needs the image encoder"):
        text_only.interpolate(["a cat", image("image_a.png")], [0.5, 0.5], num_inference_steps=2, callback=callback)
    assert steps == []
    emb2emb = KandinskyV22PriorEmb2EmbPipeline(**text_only.components, zero_image_embeds=text_only.zero_image_embeds)
    with pytest.raises(ValueError, match="^Encoding an image needs the image encoder"):
        emb2emb("a cat", image=image("image_a.png"), num_inference_steps=2, callback=callback)
    assert steps == []
    # embeddings instead of images need no encoder
    emb, _ = emb2emb("a cat", image=np.ones((1, prior.embedding_dim), np.float32), strength=0.5,
                     num_inference_steps=2, generator=gen(8))
    assert emb.shape == (1, prior.embedding_dim)
    with pytest.raises(ValueError, match=rf"`zero_image_embeds` must have shape \(1, {prior.embedding_dim}\)"):
        KandinskyV22PriorPipeline(**prior.components, zero_image_embeds=np.zeros((2, prior.embedding_dim)))
    with pytest.raises(ValueError, match=rf"`zero_image_embeds` must have shape \(batch, {prior.embedding_dim}\)"):
        KandinskyV22PriorPipeline(**prior.components, zero_image_embeds=np.zeros((1, 7)))


def test_text2img(decoder, ref):
    out = decoder(ref["image_embeds"], ref["negative_image_embeds"], height=64, width=64, num_inference_steps=3,
                  guidance_scale=4.0, generator=gen(10), output_type="np")[0]
    assert_close(out, ref["text2img"], TOL)


def test_text2img_non_square_ddim_two_per_prompt(decoder, ref):
    pipe = KandinskyV22Pipeline(unet=decoder.unet, movq=decoder.movq,
                                scheduler=DDIMScheduler.from_config(decoder.scheduler.config))
    out = pipe(ref["image_embeds"], ref["negative_image_embeds"], height=64, width=128, num_inference_steps=3,
               guidance_scale=5.0, num_images_per_prompt=2, generator=gen(11), output_type="np")[0]
    assert out.shape == (2, 64, 128, 3)
    assert_close(out, ref["text2img_ddim_64x128"], TOL)


def test_text2img_pil_output(decoder):
    images = decoder(np.ones((1, 32), np.float32), np.zeros((1, 32), np.float32), height=64, width=64,
                     num_inference_steps=1, generator=gen(0))[0]
    assert isinstance(images[0], Image.Image) and images[0].size == (64, 64) and images[0].mode == "RGB"


def test_img2img(decoder, ref):
    pipe = KandinskyV22Img2ImgPipeline(**decoder.components)
    out = pipe(image_embeds=ref["image_embeds"], image=image("image_a.png"),
               negative_image_embeds=ref["negative_image_embeds"], height=64, width=64, strength=0.6,
               num_inference_steps=5, guidance_scale=4.0, generator=gen(12), output_type="np")[0]
    assert_close(out, ref["img2img"], TOL)


def test_img2img_non_square(decoder, ref):
    pipe = KandinskyV22Img2ImgPipeline(**decoder.components)
    out = pipe(image_embeds=ref["image_embeds"], image=image("image_b.png"),
               negative_image_embeds=ref["negative_image_embeds"], height=64, width=96, strength=0.5,
               num_inference_steps=4, guidance_scale=4.0, generator=gen(13), output_type="np")[0]
    assert out.shape == (1, 64, 96, 3)
    assert_close(out, ref["img2img_64x96"], TOL)


def test_inpaint(ref):
    out = inpaint_pipeline()(image_embeds=ref["image_embeds"], image=image("image_a.png"), mask_image=image("mask.png"),
               negative_image_embeds=ref["negative_image_embeds"], height=64, width=64, num_inference_steps=3,
               guidance_scale=4.0, generator=gen(14), output_type="np")[0]
    assert_close(out, ref["inpaint"], TOL)


def test_controlnet(ref):
    pipe = KandinskyV22ControlnetPipeline.from_pretrained(CONTROLNET)
    out = pipe(image_embeds=ref["image_embeds"], negative_image_embeds=ref["negative_image_embeds"],
               hint=ref["hint"], height=64, width=64, num_inference_steps=3, guidance_scale=4.0, generator=gen(15),
               output_type="np")[0]
    assert_close(out, ref["controlnet"], TOL)
    img2img = KandinskyV22ControlnetImg2ImgPipeline(**pipe.components)
    out = img2img(image_embeds=ref["image_embeds"], image=image("image_a.png"),
                  negative_image_embeds=ref["negative_image_embeds"], hint=ref["hint"], height=64, width=64,
                  strength=0.5, num_inference_steps=4, guidance_scale=4.0, generator=gen(16), output_type="np")[0]
    assert_close(out, ref["controlnet_img2img"], TOL)


def inpaint_pipeline():
    # Run with the decoder's scheduler (clip_sample true), as the fixture script explains: with the
    # published inpaint scheduler a random tiny model saturates and fp32 rounding alone exceeds 1e-4.
    decoder_scheduler = DDPMScheduler.from_config(weights.read_config(DECODER / "scheduler", "scheduler_config.json"))
    return KandinskyV22InpaintPipeline.from_pretrained(INPAINT, scheduler=decoder_scheduler)


@pytest.mark.parametrize("case", ["text2img", "img2img", "inpaint", "controlnet", "controlnet_img2img"])
def test_two_images_per_prompt(decoder, ref, ref_two, case):
    common = dict(image_embeds=ref["image_embeds"], negative_image_embeds=ref["negative_image_embeds"], height=64,
                  width=64, guidance_scale=4.0, num_images_per_prompt=2, output_type="latent")
    if case == "text2img":
        out = decoder(num_inference_steps=3, generator=gen(20), **common)[0]
    elif case == "img2img":
        pipe = KandinskyV22Img2ImgPipeline(**decoder.components)
        out = pipe(image=image("image_a.png"), strength=0.6, num_inference_steps=4, generator=gen(21), **common)[0]
    elif case == "inpaint":
        out = inpaint_pipeline()(image=image("image_a.png"), mask_image=image("mask.png"), num_inference_steps=3,
                                 generator=gen(22), **common)[0]
    elif case == "controlnet":
        pipe = KandinskyV22ControlnetPipeline.from_pretrained(CONTROLNET)
        out = pipe(hint=ref["hint"], num_inference_steps=3, generator=gen(23), **common)[0]
    else:
        pipe = KandinskyV22ControlnetImg2ImgPipeline.from_pretrained(CONTROLNET)
        out = pipe(image=image("image_a.png"), hint=ref["hint"], strength=0.5, num_inference_steps=4,
                   generator=gen(24), **common)[0]
    assert out.shape == (2, 4, 8, 8)
    assert_close(out, ref_two[case], TOL)


SAMPLER_PIPELINES = {"text2img": (KandinskyV22Pipeline, DECODER), "img2img": (KandinskyV22Img2ImgPipeline, DECODER),
                     "inpaint": (KandinskyV22InpaintPipeline, INPAINT),
                     "controlnet_img2img": (KandinskyV22ControlnetImg2ImgPipeline, CONTROLNET)}


@pytest.mark.parametrize("case", sampler_cases("2.2"), ids=sampler_id)
def test_samplers_match_diffusers(ref, case):
    """Text-to-image, image-to-image, inpainting and ControlNet image-to-image with DPM++ 2M, DPM++ 2M Karras,
    DPM++ 2M SDE Karras, UniPC, Euler and Euler a swapped in as the docs swap schedulers
    (`from_pretrained(repo, scheduler=Class.from_config(config, **options))`), against diffusers'
    pipelines with the same scheduler (tools/fixtures/make_pipelines.py --samplers), same weights and noise.

    The DPM-Solver++ cases are diffusers' pipelines as they are. Where diffusers cannot run a sampler, the
    reference is its pipeline plus a few lines: UniPC's step() takes no `generator`, which diffusers'
    Kandinsky loops pass (TypeError), so the reference drops it; diffusers' Kandinsky loops never call
    scale_model_input (grey images with Euler and Euler a), so the reference adds it before the UNet, as its
    Stable Diffusion loops do, and noises inpainting's kept region with the unit noise, not with the latents
    already multiplied by Euler's init_noise_sigma. The final latents are compared, relative to their size:
    the random tiny models drive them to |x| ~ 180, which the tiny MoVQ decodes too steeply for an image
    comparison to measure anything but its own rounding (see the fixture script)."""
    cls, folder = SAMPLER_PIPELINES[case["task"]]
    pipe = cls.from_pretrained(folder, scheduler=swapped_scheduler(case, folder))
    args = dict(image_embeds=ref["image_embeds"], negative_image_embeds=ref["negative_image_embeds"], height=64,
                width=64, num_inference_steps=case["steps"], guidance_scale=4.0,
                generator=gen(case["seed"]))
    if case["task"] != "text2img":
        args["image"] = image("image_a.png")
    if "strength" in case:
        args["strength"] = case["strength"]
    if case["task"] == "inpaint":
        args["mask_image"] = image("mask.png")
    if case["task"] == "controlnet_img2img":
        args["hint"] = ref["hint"]
    assert_sampler_latents(run_sampler_case(pipe, **args), case)


def test_folder_saved_with_a_swapped_scheduler_loads_it(tmp_path):
    """A pipeline folder whose scheduler is DPM-Solver++ (diffusers' save_pretrained after a swap) loads it."""
    import json

    for name in ("unet", "movq"):
        (tmp_path / name).symlink_to(DECODER / name, target_is_directory=True)
    index = json.loads((DECODER / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "DPMSolverMultistepScheduler"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    config = weights.read_config(DECODER / "scheduler", "scheduler_config.json")
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {**config, "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}))
    pipe = KandinskyV22Pipeline.from_pretrained(tmp_path)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler) and pipe.scheduler.config["use_karras_sigmas"]


def test_sampler_cases_cover_the_tasks_and_names():
    cases = {(case["task"], case["sampler"]) for case in sampler_cases("2.2")}
    for task in ("text2img", "img2img", "inpaint"):
        for sampler in ("DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE Karras", "UniPC", "Euler", "Euler a"):
            assert (task, sampler) in cases


def test_combined(prior, decoder, ref):
    pipe = KandinskyV22CombinedPipeline(prior, decoder)
    out = pipe("a red cat", negative_prompt="the dog", num_inference_steps=2, prior_num_inference_steps=2,
               height=64, width=64, generator=gen(17), output_type="np")[0]
    assert_close(out, ref["combined"], TOL)


def test_combined_reports_the_priors_truncation(prior, decoder):
    pipe = KandinskyV22CombinedPipeline(prior, decoder)
    pipe("the dog on the mat " * 30, num_inference_steps=1, prior_num_inference_steps=2, height=64, width=64,
         output_type="latent")
    assert pipe.truncated_text and pipe.truncated_text == prior.truncated_text
    assert decoder.truncated_text == []  # the 2.2 decoder reads no text


def test_combined_from_pretrained_with_explicit_prior():
    pipe = KandinskyV22CombinedPipeline.from_pretrained(DECODER, prior_pretrained_model_name_or_path=PRIOR)
    assert set(pipe.components) >= {"unet", "movq", "scheduler", "prior_prior", "prior_text_encoder"}


def test_combined_from_pretrained_with_a_swapped_scheduler(prior):
    """`scheduler=` is the decoder's (as in diffusers, whose prior's is `prior_scheduler`): the prior keeps its
    UnCLIP scheduler, and the call equals the prior then the DPM-Solver++ decoder."""
    config = weights.read_config(DECODER / "scheduler", "scheduler_config.json")
    pipe = KandinskyV22CombinedPipeline.from_pretrained(
        DECODER, prior_pretrained_model_name_or_path=PRIOR,
        scheduler=DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True))
    assert isinstance(pipe.decoder_pipe.scheduler, DPMSolverMultistepScheduler)
    assert isinstance(pipe.prior_pipe.scheduler, UnCLIPScheduler)
    out = pipe("a red cat", num_inference_steps=4, prior_num_inference_steps=2, height=64, width=64,
               generator=gen(9), output_type="latent")[0]
    generator = gen(9)
    embeds, negative = prior("a red cat", num_inference_steps=2, generator=generator)
    decoder = KandinskyV22Pipeline(unet=pipe.decoder_pipe.unet, movq=pipe.decoder_pipe.movq,
                                   scheduler=DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True))
    want = decoder(embeds, negative, height=64, width=64, num_inference_steps=4, generator=generator,
                   output_type="latent")[0]
    np.testing.assert_array_equal(out, want)


def test_callback_sees_every_step_and_can_stop(decoder):
    seen = []

    class Stop(Exception):
        pass

    def callback(step, total, latents, x0):
        seen.append((step, total, latents.shape, x0.shape))
        if step == 1:
            raise Stop

    with pytest.raises(Stop):
        decoder(np.ones((1, 32), np.float32), np.zeros((1, 32), np.float32), height=64, width=64,
                num_inference_steps=4, generator=gen(0), callback=callback)
    assert seen == [(0, 4, (1, 4, 8, 8), (1, 4, 8, 8)), (1, 4, (1, 4, 8, 8), (1, 4, 8, 8))]


def test_same_seed_same_image_fixed_latents_override(decoder):
    embeds = (np.ones((1, 32), np.float32), np.zeros((1, 32), np.float32))
    a = decoder(*embeds, height=64, width=64, num_inference_steps=2, generator=gen(5), output_type="np")[0]
    b = decoder(*embeds, height=64, width=64, num_inference_steps=2, generator=gen(5), output_type="np")[0]
    # Passing the latents the seed would draw, and the generator after that draw, changes nothing.
    generator = gen(5)
    latents = generator.standard_normal((1, 4, 8, 8), dtype=np.float32)
    c = decoder(*embeds, height=64, width=64, num_inference_steps=2, generator=generator, latents=latents,
                output_type="np")[0]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, c, atol=1e-6)
