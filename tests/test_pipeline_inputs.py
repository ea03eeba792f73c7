"""Bad input gets a ValueError that names the argument; odd image modes are converted."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.pipelines import (
    KandinskyV22ControlnetPipeline,
    KandinskyV22Img2ImgPipeline,
    KandinskyV22InpaintPipeline,
    KandinskyV22Pipeline,
    KandinskyV22PriorPipeline,
)
from backend.pipelines.inputs import to_rgb

FIXTURES = Path(__file__).parent / "fixtures" / "pipelines"
GOOD = np.ones((1, 32), np.float32)
NEG = np.zeros((1, 32), np.float32)


@pytest.fixture(scope="module")
def decoder():
    return KandinskyV22Pipeline.from_pretrained(FIXTURES / "kandinsky-2-2-decoder-tiny")


@pytest.fixture(scope="module")
def img2img(decoder):
    return KandinskyV22Img2ImgPipeline(**decoder.components)


@pytest.fixture(scope="module")
def inpaint():
    return KandinskyV22InpaintPipeline.from_pretrained(FIXTURES / "kandinsky-2-2-inpaint-tiny")


@pytest.fixture(scope="module")
def prior():
    return KandinskyV22PriorPipeline.from_pretrained(FIXTURES / "kandinsky-2-2-prior-tiny")


@pytest.mark.parametrize("field,value", [
    ("height", 0), ("height", -64), ("width", 0), ("width", 100_000), ("height", 64.5), ("width", "64"),
    ("num_inference_steps", 0), ("num_inference_steps", -3), ("num_inference_steps", 5000),
    ("guidance_scale", -1.0), ("guidance_scale", float("nan")), ("guidance_scale", float("inf")),
    ("num_images_per_prompt", 0), ("output_type", "jpeg"),
])
def test_decoder_rejects_bad_numbers(decoder, field, value):
    kwargs = dict(height=64, width=64, num_inference_steps=1)
    kwargs[field] = value
    with pytest.raises(ValueError, match=field):
        decoder(GOOD, NEG, **kwargs)


@pytest.mark.parametrize("embeds,message", [
    (np.full((1, 32), np.nan, np.float32), "NaN"),
    (np.full((1, 32), np.inf, np.float32), "NaN or infinite"),
    (np.ones((1, 31), np.float32), "shape"),
    (np.ones((1, 2, 32), np.float32), "shape"),
    (None, "required"),
])
def test_decoder_rejects_bad_embeddings(decoder, embeds, message):
    with pytest.raises(ValueError, match=f"`image_embeds`.*{message}"):
        decoder(embeds, NEG, height=64, width=64, num_inference_steps=1)
    with pytest.raises(ValueError, match=f"`negative_image_embeds`.*{message}"):
        decoder(GOOD, embeds, height=64, width=64, num_inference_steps=1)


def test_latents_of_wrong_shape(decoder):
    with pytest.raises(ValueError, match="latents"):
        decoder(GOOD, NEG, height=64, width=64, num_inference_steps=1, latents=np.zeros((1, 4, 9, 9)))


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan"), "strong"])
def test_img2img_rejects_strength(img2img, strength):
    with pytest.raises(ValueError, match="strength"):
        img2img(image_embeds=GOOD, image=Image.new("RGB", (64, 64)), negative_image_embeds=NEG, height=64,
                width=64, strength=strength, num_inference_steps=2)


def test_img2img_strength_zero_returns_the_image(img2img):
    out = img2img(image_embeds=GOOD, image=Image.open(FIXTURES / "image_a.png"), negative_image_embeds=NEG,
                  height=64, width=64, strength=0.0, num_inference_steps=3, output_type="np")[0]
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_inpaint_mask_size_mismatch_of_arrays(inpaint):
    image = np.zeros((64, 64, 3), np.float32)
    mask = np.zeros((32, 32), np.float32)
    with pytest.raises(ValueError, match="mask_image"):
        inpaint(image_embeds=GOOD, image=image, mask_image=mask, negative_image_embeds=NEG, height=64, width=64,
                num_inference_steps=1)


def test_inpaint_mask_out_of_range(inpaint):
    with pytest.raises(ValueError, match="mask_image"):
        inpaint(image_embeds=GOOD, image=Image.new("RGB", (64, 64)), mask_image=np.full((64, 64), 2.0),
                negative_image_embeds=NEG, height=64, width=64, num_inference_steps=1)


def test_inpaint_pil_mask_of_other_size_is_resized(inpaint):
    out = inpaint(image_embeds=GOOD, image=Image.new("RGB", (80, 48)), mask_image=Image.new("L", (20, 30), 255),
                  negative_image_embeds=NEG, height=64, width=64, num_inference_steps=1, output_type="np")[0]
    assert out.shape == (1, 64, 64, 3)


def test_controlnet_hint_errors():
    pipe = KandinskyV22ControlnetPipeline.from_pretrained(FIXTURES / "kandinsky-2-2-controlnet-tiny")
    with pytest.raises(ValueError, match="hint"):
        pipe(GOOD, NEG, hint=np.zeros((1, 1, 64, 64)), height=64, width=64, num_inference_steps=1)
    with pytest.raises(ValueError, match="hint"):
        pipe(GOOD, NEG, hint=np.zeros((1, 3, 32, 32)), height=64, width=64, num_inference_steps=1)
    with pytest.raises(ValueError, match="hint"):
        pipe(GOOD, NEG, hint=np.full((1, 3, 64, 64), np.nan), height=64, width=64, num_inference_steps=1)


def test_prior_rejects_bad_arguments(prior):
    with pytest.raises(ValueError, match="prompt"):
        prior(123)
    with pytest.raises(ValueError, match="num_inference_steps"):
        prior("a cat", num_inference_steps=0)
    with pytest.raises(ValueError, match="guidance_scale"):
        prior("a cat", guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="weights"):
        prior.interpolate(["a cat", "a dog"], [1.0])
    with pytest.raises(ValueError, match="images_and_prompts"):
        prior.interpolate(["a cat", 3], [0.5, 0.5], num_inference_steps=1)


def test_prior_reports_truncated_prompt(prior):
    long_prompt = "a " * 200
    prior(long_prompt, num_inference_steps=2, guidance_scale=1.0)
    assert prior.truncated_text, "the dropped part of a long prompt must be reported"


def _modes():
    rgb = Image.open(FIXTURES / "image_a.png").convert("RGB")
    rgba = rgb.copy()
    rgba.putalpha(128)
    sixteen = Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257).astype(np.uint16))  # uint16 -> I;16
    return {"RGBA": rgba, "L": rgb.convert("L"), "P": rgb.convert("P"), "I;16": sixteen,
            "CMYK": rgb.convert("CMYK")}


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "I;16", "CMYK"])
def test_image_modes_are_converted(img2img, mode):
    image = _modes()[mode]
    assert image.mode == mode
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    if mode == "I;16":  # scaled, not clipped: a mid-grey 16-bit pixel stays mid-grey
        grey = np.asarray(_modes()["L"], np.float32)
        assert np.abs(np.asarray(rgb, np.float32)[..., 0] - grey).max() <= 1
    out = img2img(image_embeds=GOOD, image=image, negative_image_embeds=NEG, height=64, width=64, strength=0.5,
                  num_inference_steps=2, output_type="np")[0]
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
