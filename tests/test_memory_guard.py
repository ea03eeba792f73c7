"""The memory guard (backend/working_memory.py): a request whose job would not fit in memory is refused
by Engine.submit before it runs, naming width/height/batch_size and what would fit; the estimate
against the measured working memory of docs/MEMORY.md."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from backend.events import Cancelled, Result
from backend.families import CATALOGUE, FAMILIES
from backend.requests import Image2ImageRequest, InpaintRequest, InterpolateRequest, Text2ImageRequest
from backend.working_memory import WorkingMemory, physical_memory

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_CONFIGS = ROOT.parent / "shared" / "reference-configs"
MODEL = "kandinsky-2-2-demo"
OWNER = "3c" * 16
LIMIT = 2 * 10**9       # the demo MoVQ needs ~2.9 GB for one 2048x2048 image: this refuses it
WITHIN = 0.25           # the estimate against a measured working memory
GB = 10**9


@pytest.fixture(scope="module")
def limited(demo_root, tmp_path_factory):
    """An Engine on the demo models held to LIMIT bytes."""
    from backend.engine import Engine, EngineConfig

    engine = Engine(EngineConfig(families=("2.2",), demo=True, cache_dir=str(demo_root),
                                 outputs_dir=str(tmp_path_factory.mktemp("outputs")), memory_limit=LIMIT))
    yield engine
    engine.shutdown()


def text(**fields) -> Text2ImageRequest:
    return Text2ImageRequest(**{**dict(model=MODEL, prompt="a red cat", width=64, height=64, num_inference_steps=2,
                                       prior_num_inference_steps=2, seed=3), **fields})


def suggestions(message: str) -> list[tuple[int, int, int]]:
    """(images, width, height) of each "What fits" alternative of a refusal."""
    fits = message.split("What fits:", 1)[1]
    return [(int(n), int(w), int(h)) for n, w, h in re.findall(r"(\d+) images? of (\d+)x(\d+)", fits)]


def accepted_then_stopped(engine, request) -> None:
    """Submit must accept `request`; the job is stopped at once (only the acceptance is under test)."""
    job = engine.submit(request, OWNER)
    engine.cancel(OWNER)
    end = list(job.events(timeout=300))[-1]
    assert isinstance(end, (Cancelled, Result)), end


def test_batch_8_at_2048_is_refused_naming_the_fields_and_what_fits_and_each_suggestion_is_accepted(limited):
    request = text(width=2048, height=2048, batch_size=8)
    estimate = limited.estimate_memory(request)
    assert not estimate.fits and estimate.limit == LIMIT and estimate.images == 8
    with pytest.raises(ValueError) as refused:
        limited.submit(request, OWNER)
    message = str(refused.value)
    assert message.startswith("width/height/batch_size: 8 images of 2048x2048 decoded at once need about ")
    assert f"the memory limit is {LIMIT / GB:.1f} GB" in message
    alternatives = suggestions(message)
    # not even 1 image of 2048x2048 fits under 2 GB: 1 image at a smaller size, and 8 images at a smaller one
    assert [n for n, _, _ in alternatives] == [1, 8], message
    for images, width, height in alternatives:
        assert width == height and width % 64 == 0 and width < 2048
        suggested = text(width=width, height=height, batch_size=images)
        assert limited.estimate_memory(suggested).fits
        # the largest: 64 pixels more per side does not fit
        assert not limited.estimate_memory(text(width=width + 64, height=height + 64, batch_size=images)).fits
        accepted_then_stopped(limited, suggested)


def test_a_batch_that_does_not_fit_at_a_size_where_one_image_does_is_offered_the_largest_batch(limited):
    request = text(width=768, height=512, batch_size=8)
    with pytest.raises(ValueError) as refused:
        limited.submit(request, OWNER)
    (images, width, height), (all_images, small_w, small_h) = suggestions(str(refused.value))
    assert (width, height) == (768, 512) and 1 <= images < 8 and f"(batch_size {images})" in str(refused.value)
    assert limited.estimate_memory(text(width=768, height=512, batch_size=images)).fits
    assert not limited.estimate_memory(text(width=768, height=512, batch_size=images + 1)).fits
    assert all_images == 8 and small_w > small_h and small_w % 64 == 0 == small_h % 64   # the aspect kept
    accepted_then_stopped(limited, text(width=768, height=512, batch_size=images))


def test_one_image_at_a_size_that_fits_is_accepted_and_runs(limited):
    estimate = limited.estimate_memory(text(width=256, height=256))
    assert estimate.fits and estimate.largest_call == "MoVQ decode"
    job = limited.submit(text(width=256, height=256), OWNER)
    end = list(job.events(timeout=300))[-1]
    assert isinstance(end, Result) and end.images[0].image.size == (256, 256)


def test_a_low_memory_limit_refuses_what_the_machine_would_take(demo_root, tmp_path):
    from backend.engine import Engine, EngineConfig

    request = text(width=1024, height=1024)
    engine = Engine(EngineConfig(families=("2.2",), demo=True, cache_dir=str(demo_root),
                                 outputs_dir=str(tmp_path), memory_limit=GB))
    try:
        with pytest.raises(ValueError, match=r"^width/height/batch_size: 1 image of 1024x1024 needs about .*"
                                             r"the memory limit is 1\.0 GB.* What fits: 1 image of \d+x\d+\.$"):
            engine.submit(request, OWNER)
    finally:
        engine.shutdown()
    # the engine without a limit holds jobs to this machine's RAM, where it fits
    assert WorkingMemory("float32").limit == physical_memory()
    assert WorkingMemory("float32").estimate(CATALOGUE["kandinsky-2-2"], text(model="kandinsky-2-2")).limit_name \
        == "this machine's RAM"


def test_what_is_decoded_at_once_is_what_counts():
    """Images decoded together: batch_size. batch_count runs one after another, a walk decodes one frame at a
    time; image-to-image and inpainting decode at width x height like text-to-image."""
    guard, model = WorkingMemory("float32"), CATALOGUE["kandinsky-2-2"]
    one = guard.estimate(model, text(model=model.key, width=1024, height=1024))
    assert guard.estimate(model, text(model=model.key, width=1024, height=1024, batch_count=16)) == one
    four = guard.estimate(model, text(model=model.key, width=1024, height=1024, batch_size=4))
    assert four.movq_decode == pytest.approx(4 * one.movq_decode, rel=1e-6) and four.weights == one.weights
    walk = InterpolateRequest(model=model.key, width=1024, height=1024, inputs=["a cat", "a dog"], weights=[1, 1],
                              walk_steps=8)
    assert guard.estimate(model, walk).working == one.working
    for other in (Image2ImageRequest(model=model.key, width=1024, height=1024),
                  InpaintRequest(model=model.key, width=1024, height=1024)):
        assert guard.estimate(model, other).working == one.working
    # guidance doubles the UNet's batch, not the decode
    unguided = guard.estimate(model, text(model=model.key, width=1024, height=1024, guidance_scale=1.0))
    assert unguided.unet_step * 2 == one.unet_step and unguided.movq_decode == one.movq_decode
    # half precision halves the weights, not the working memory (activations are float32: docs/MEMORY.md)
    half = WorkingMemory("float16").estimate(model, text(model=model.key, width=1024, height=1024))
    assert half.weights * 2 == one.weights and half.working == one.working


# docs/MEMORY.md, "Working memory of one call" (the real models' configs, constant weights) and "A job's
# working memory on the demo models" (tools/measure_working_memory.py): (model, side, measured GB)
MEASURED = [("kandinsky-2-2", 512, 1.13), ("kandinsky-2-2", 768, 2.48), ("kandinsky-3", 1024, 7.87),
            (MODEL, 1024, 0.75), (MODEL, 2048, 2.90)]


@pytest.mark.parametrize("key, side, measured", MEASURED, ids=[f"{k}@{s}" for k, s, _ in MEASURED])
def test_the_estimate_is_within_25_percent_of_the_measured_movq_decodes(key, side, measured, limited):
    model = limited.models[key] if key == MODEL else CATALOGUE[key]
    estimate = WorkingMemory("float16").estimate(model, text(model=model.key, width=side, height=side))
    assert estimate.largest_call == "MoVQ decode"
    assert abs(estimate.working / GB / measured - 1) <= WITHIN, f"{estimate.working / GB:.2f} GB vs {measured} GB"


@pytest.mark.skipif(not REFERENCE_CONFIGS.is_dir(), reason="the published configs are in ../shared/reference-configs")
@pytest.mark.parametrize("family, repo, movq_folder", [("2.2", "kandinsky-2-2-decoder", "kandinsky-2-2-decoder"),
                                                        ("2.1", "kandinsky-2-1", "kandinsky-2-1"),
                                                        ("3", "kandinsky-3", "kandinsky-3")])
def test_the_published_figures_are_the_published_configs(family, repo, movq_folder):
    figures = FAMILIES[family].decoder_figures
    movq = json.loads((REFERENCE_CONFIGS / movq_folder / "movq.json").read_text())
    unet = json.loads((REFERENCE_CONFIGS / repo / "unet.json").read_text())
    assert tuple(movq["block_out_channels"]) == figures.movq_channels
    assert unet["block_out_channels"][0] == figures.unet_channels


def test_the_estimate_against_a_job_measured_in_a_fresh_process(demo_root):
    """One demo job at 768x768 (one decoder step): its peak RSS over the RSS with the models loaded (about 15 s)."""
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "measure_working_memory.py"), "--child",
                          "--cache", str(demo_root), "2.2:text2img@768"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(figures["estimate_gb"] / figures["working_gb"] - 1) <= WITHIN, figures
