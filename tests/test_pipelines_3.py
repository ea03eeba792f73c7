"""Kandinsky 3 pipelines against diffusers 0.35.2 on tiny diffusers-saved checkpoints.

Fixtures and reference outputs: tools/fixtures/make_pipelines_3.py (torch environment). Same
weights (tiny T5 encoder, Kandinsky3UNet, MoVQ; the published DDPM scheduler config), same numpy
noise stream on both sides; every output must match to 1e-4.
"""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.pipelines.kandinsky3 import Kandinsky3Img2ImgPipeline, Kandinsky3Pipeline
from tests.conftest import (assert_close, assert_sampler_latents, run_sampler_case, sampler_cases, sampler_id,
                            swapped_scheduler)

FIXTURES = Path(__file__).parent / "fixtures" / "pipelines_3"
REPO = FIXTURES / "kandinsky-3-tiny"
TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURES / "reference.npz"))


@pytest.fixture(scope="module")
def pipe():
    return Kandinsky3Pipeline.from_pretrained(REPO)


@pytest.fixture(scope="module")
def img2img(pipe):
    return Kandinsky3Img2ImgPipeline(**pipe.components)


def gen(seed):
    return np.random.default_rng(seed)


def test_tokenizer_matches_reference(pipe, ref):
    tokens = pipe.tokenizer(["a red cat on the mat", "blue sky xyz"], padding="max_length", max_length=128,
                            truncation=True, return_tensors="np")
    assert (tokens["input_ids"] == ref["token_ids"]).all()
    assert (tokens["attention_mask"] == ref["token_mask"]).all()


def test_text2img(pipe, ref):
    steps = []
    out = pipe("a red cat on the mat", num_inference_steps=3, guidance_scale=3.0, height=64, width=64,
               generator=gen(0), output_type="np", callback=lambda i, n, lat, x0: steps.append((i, n, x0.shape)))[0]
    assert_close(out, ref["text2img"], TOL)
    assert steps == [(0, 3, (1, 4, 8, 8)), (1, 3, (1, 4, 8, 8)), (2, 3, (1, 4, 8, 8))]


def test_text2img_negative_prompts_non_square(pipe, ref):
    out = pipe(["a red cat", "the blue sky"], negative_prompt=["dog", "photo of a mat"], num_inference_steps=2,
               guidance_scale=4.0, height=64, width=128, generator=gen(1), output_type="np")[0]
    assert_close(out, ref["text2img_neg_64x128"], TOL)


def test_text2img_without_guidance_two_images(pipe, ref):
    out = pipe("a dog", num_inference_steps=2, guidance_scale=1.0, height=64, width=64, num_images_per_prompt=2,
               generator=gen(2), output_type="np")[0]
    assert_close(out, ref["text2img_noguid_2"], TOL)


def test_text2img_from_prompt_embeds(pipe, ref):
    out = pipe(prompt_embeds=ref["given_embeds"], attention_mask=ref["given_mask"], num_inference_steps=2,
               guidance_scale=3.0, height=64, width=64, generator=gen(3), output_type="np")[0]
    assert_close(out, ref["text2img_embeds"], TOL)


def test_img2img(img2img, ref):
    out = img2img("a red cat", image=Image.open(FIXTURES / "image_a.png"), strength=0.6, num_inference_steps=5,
                  guidance_scale=3.0, generator=gen(10), output_type="np")[0]
    assert_close(out, ref["img2img"], TOL)


def test_img2img_non_square_negative(img2img, ref):
    out = img2img("the dog on a mat", image=Image.open(FIXTURES / "image_b.png"), negative_prompt="sky",
                  strength=0.5, num_inference_steps=4, guidance_scale=3.0, generator=gen(11), output_type="np")[0]
    assert_close(out, ref["img2img_128x64_neg"], TOL)


@pytest.fixture(scope="module")
def ref_two():
    """Final latents of both pipelines with num_images_per_prompt=2 (make_pipelines_3.py)."""
    return dict(np.load(FIXTURES / "reference_two_per_prompt.npz"))


def test_text2img_two_images_per_prompt(pipe, ref_two):
    out = pipe("a red cat on the mat", num_inference_steps=3, guidance_scale=3.0, height=64, width=64,
               num_images_per_prompt=2, generator=gen(20), output_type="latent")[0]
    assert out.shape == (2, 4, 8, 8)
    assert_close(out, ref_two["text2img"], TOL)


def test_img2img_two_images_per_prompt(img2img, ref_two):
    out = img2img("a red cat", image=Image.open(FIXTURES / "image_a.png"), strength=0.6, num_inference_steps=4,
                  guidance_scale=3.0, num_images_per_prompt=2, generator=gen(21), output_type="latent")[0]
    assert out.shape == (2, 4, 8, 8)
    assert_close(out, ref_two["img2img"], TOL)


@pytest.mark.parametrize("case", sampler_cases("3"), ids=sampler_id)
def test_samplers_match_diffusers(case):
    """Text-to-image and image-to-image with DPM++ 2M, DPM++ 2M Karras and Euler swapped in as the docs swap
    schedulers, against diffusers' Kandinsky 3 pipelines with the same scheduler (tools/fixtures/
    make_pipelines.py --samplers). DPM++ 2M: diffusers as it is. DPM++ 2M Karras: diffusers 0.35.2 fails on
    Kandinsky 3's config (IndexError at the last step: the Karras timesteps repeat 998, so its counter starts one
    step late; tests/test_schedulers.py), so the reference sets the begin index as its Stable Diffusion
    pipelines do (0, or the start of the image-to-image tail), which ours always does. Euler: the reference adds
    the scale_model_input call diffusers' Kandinsky loop lacks. Final latents, relative to their size (|x|
    reaches 1e5 with Karras' sigma_max of 20291 and a random UNet; see tests/conftest.py)."""
    cls = Kandinsky3Img2ImgPipeline if case["task"] == "img2img" else Kandinsky3Pipeline
    pipe = cls.from_pretrained(REPO, scheduler=swapped_scheduler(case, REPO))
    args = dict(num_inference_steps=case["steps"], guidance_scale=3.0, generator=gen(case["seed"]))
    if case["task"] == "img2img":
        args.update(image=Image.open(FIXTURES.parent / "pipelines" / "image_a.png"), strength=case["strength"])
    else:
        args.update(height=64, width=64)
    assert_sampler_latents(run_sampler_case(pipe, "a red cat on the mat", **args), case)


SPIECE = Path(__file__).parent / "fixtures" / "t5_spiece"  # tools/fixtures/make_pipelines_3.py --spiece


def test_t5_tokenizer_from_spiece_model_alone():
    """The published kandinsky-3 tokenizer/ folder has spiece.model but no tokenizer.json: with the
    `sentencepiece` package our tokenizer gives the ids of transformers 4.57's slow T5Tokenizer
    (diffusers' class); without it, the error names the file and the package."""
    from backend.pipelines import loading
    from backend.weights import WeightsError

    folder = SPIECE / "tokenizer"
    assert not (folder / "tokenizer.json").exists()
    reference = json.loads((SPIECE / "reference.json").read_text())
    if loading.sentencepiece_available():
        tokenizer = loading.load_t5_tokenizer(folder)
        tokens = tokenizer(reference["prompts"], padding="max_length", max_length=128, truncation=True)
        assert tokens["input_ids"] == reference["input_ids"]
        assert tokens["attention_mask"] == reference["attention_mask"]
    else:
        with pytest.raises(WeightsError, match=r"spiece\.model.*`sentencepiece` package"):
            loading.load_t5_tokenizer(folder)


def test_t5_tokenizer_without_sentencepiece_names_the_file(monkeypatch, tmp_path):
    from backend.pipelines import loading
    from backend.weights import WeightsError

    monkeypatch.setattr(loading, "sentencepiece_available", lambda: False)
    with pytest.raises(WeightsError, match=r"t5_spiece/tokenizer/spiece\.model is a SentencePiece model"):
        loading.load_t5_tokenizer(SPIECE / "tokenizer")
    with pytest.raises(WeightsError, match="neither tokenizer.json nor spiece.model"):
        loading.load_t5_tokenizer(tmp_path)
    # a folder with tokenizer.json never needs sentencepiece
    assert loading.load_t5_tokenizer(REPO / "tokenizer")(["a cat"])["input_ids"][0][-1] == 1


def test_truncated_text_is_this_calls(pipe, ref):
    pipe("a red cat " * 60, num_inference_steps=1, height=64, width=64, output_type="latent")
    assert pipe.truncated_text and pipe.truncated_text[0].strip().startswith("red cat")
    pipe(prompt_embeds=ref["given_embeds"], attention_mask=ref["given_mask"], num_inference_steps=1, height=64,
         width=64, output_type="latent")
    assert pipe.truncated_text == []


def test_text_encoder_can_be_released_before_the_unet(pipe):
    calls = []
    pipe.on_text_encoded = lambda p: calls.append(p.text_encoder is not None)
    try:
        pipe("a cat", num_inference_steps=1, height=64, width=64, generator=gen(0), output_type="latent")
    finally:
        pipe.on_text_encoded = None
    assert calls == [True]


def test_bad_arguments(pipe, img2img, ref):
    with pytest.raises(ValueError, match="prompt_embeds"):
        pipe("a cat", prompt_embeds=ref["given_embeds"], attention_mask=ref["given_mask"])
    with pytest.raises(ValueError, match="attention_mask"):
        pipe(prompt_embeds=ref["given_embeds"])
    with pytest.raises(ValueError, match="negative_prompt"):
        pipe(["a", "b"], negative_prompt=["c"], num_inference_steps=1, height=64, width=64)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe("a cat", num_inference_steps=0)
    with pytest.raises(ValueError, match="strength"):
        img2img("a cat", image=Image.open(FIXTURES / "image_a.png"), strength=1.5)
    with pytest.raises(ValueError, match="multiple of 64"):
        img2img("a cat", image=Image.new("RGB", (96, 64)), num_inference_steps=1)
