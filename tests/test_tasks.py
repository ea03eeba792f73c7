"""Requests run end to end on the real Engine (tiny random-weight demo models, 64x64):
every task, previews before the result, stop within one step with a partial result, seeds,
PNG settings, and the preview overhead."""
import time

import numpy as np
import pytest
from PIL import Image

from backend.events import Cancelled, Loading, Result, Step
from backend.metadata import read_settings
from backend.requests import (ControlNetRequest, Image2ImageRequest, InpaintRequest, InterpolateRequest,
                              Text2ImageRequest)

SAMPLES = "assets/samples"
MODEL = "kandinsky-2-2-demo"
TESTER, STOPPER = "7e" * 16, "5f" * 16


def small(model, **kw):
    base = dict(model=model, prompt="a red cat", width=64, height=64, num_inference_steps=6,
                prior_num_inference_steps=3)
    base.update(kw)
    return base


def run(engine, request, owner=TESTER):
    job = engine.submit(request, owner)
    events = list(job.events(timeout=120, coalesce=False))
    return events, events[-1]


def test_text_to_image_streams_previews_then_saves_a_png_with_its_settings(engine):
    model, store = MODEL, engine.store
    events, end = run(engine, Text2ImageRequest(**small(model, seed=11, negative_prior_prompt="blurry")))
    assert isinstance(end, Result), end
    steps = [e for e in events if isinstance(e, Step)]
    decoder = [e for e in steps if e.phase == "denoise"]
    assert [e.step for e in decoder] == [1, 2, 3, 4, 5, 6]
    assert all(e.preview is not None and e.preview.size[0] > 0 for e in decoder)
    assert [e.phase for e in steps].index("denoise") > [e.phase for e in steps].index("prior")
    assert steps[-1].phase == "decode"
    assert events.index(decoder[0]) < events.index(end)
    assert decoder[-1].eta_s is not None
    (image,) = end.images
    assert image.image.size == (64, 64) and end.seeds == [11]
    settings = read_settings(image.path)
    assert settings["seed"] == 11 and settings["task"] == "text2img" and settings["prompt"] == "a red cat"
    assert settings["negative_prior_prompt"] == "blurry" and settings["partial"] is False
    assert np.array_equal(np.asarray(Image.open(image.path).convert("RGB")), np.asarray(image.image))
    assert store.list(TESTER)[0] == image.path


def test_same_seed_same_image_and_batches_use_consecutive_seeds(engine):
    model = MODEL
    _, first = run(engine, Text2ImageRequest(**small(model, seed=5)))
    _, runs = run(engine, Text2ImageRequest(**small(model, seed=4, batch_count=2)))
    assert runs.seeds == [4, 5]
    # run 2 (seed 5) is the single seed-5 image: runs are independent of each other
    assert np.array_equal(np.asarray(runs.images[1].image), np.asarray(first.images[0].image))
    _, batch = run(engine, Text2ImageRequest(**small(model, seed=4, batch_size=2)))
    assert [(i.settings["seed"], i.settings["batch_position"]) for i in batch.images] == [(4, 0), (4, 1)]
    assert not np.array_equal(np.asarray(batch.images[0].image), np.asarray(batch.images[1].image))
    _, random_seed = run(engine, Text2ImageRequest(**small(model, seed=-1)))
    assert 0 <= random_seed.seeds[0] < 2**32 and random_seed.images[0].settings["seed"] == random_seed.seeds[0]


def test_stop_ends_within_one_step_and_keeps_the_last_preview_as_partial(engine):
    model, store = MODEL, engine.store
    job = engine.submit(Text2ImageRequest(**small(model, num_inference_steps=200, seed=3)), STOPPER)
    step_times = []
    for event in job.events(timeout=120):
        if isinstance(event, Step) and event.phase == "denoise":
            step_times.append(time.monotonic())
            if event.step >= 4:
                job.cancel()
                break
    end = job.wait(timeout=60)
    assert isinstance(end, Cancelled)
    step = float(np.median(np.diff(step_times)))
    # "within one step": the job ended before the next step could complete, plus scheduling slack
    assert end.latency_s < step + 0.5, (end.latency_s, step)
    (partial,) = end.partials
    assert partial.partial and partial.image.size == (64, 64)
    settings = read_settings(partial.path)
    assert settings["partial"] is True and 4 <= settings["stopped_at_step"] < 200
    assert partial.path.name.endswith("-partial.png") and partial.path in store.list(STOPPER)


def test_image_to_image_inpaint_controlnet_and_interpolate(engine):
    model, store = MODEL, engine.store
    landscape = Image.open(f"{SAMPLES}/landscape.png").convert("RGB")
    depth = Image.open(f"{SAMPLES}/depth.png")
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))

    _, end = run(engine, Image2ImageRequest(**small(model, width=128), image=landscape, strength=0.5))
    assert isinstance(end, Result) and end.images[0].image.size == (128, 64)
    settings = end.images[0].settings
    assert settings["strength"] == 0.5 and settings["input_images"]["image"].startswith("inputs/")
    stored = Image.open(store.input_path(TESTER, settings["input_images"]["image"]))
    assert stored.size == landscape.size

    _, end = run(engine, InpaintRequest(**small(model), image=landscape, mask=mask, mask_blur=2))
    assert isinstance(end, Result)
    out = np.asarray(end.images[0].image, np.float32)
    original = np.asarray(landscape.resize((64, 64), Image.BICUBIC), np.float32)
    # with a blurred edge the result is pasted over the original: far from the mask it is the original
    assert np.abs(out[:8, :8] - original[:8, :8]).max() < 1.0
    assert np.abs(out[24:40, 24:40] - original[24:40, 24:40]).mean() > 5.0

    _, end = run(engine, InpaintRequest(**small(model, batch_size=2, negative_prompt="blurry"), image=landscape,
                                        mask=mask))
    assert isinstance(end, Result), end
    assert [i.settings["batch_position"] for i in end.images] == [0, 1]

    for mode in ("text2img", "img2img"):
        _, end = run(engine, ControlNetRequest(**small(model), hint=depth, mode=mode, image=landscape))
        assert isinstance(end, Result), end
        assert end.images[0].settings["mode"] == mode

    events, end = run(engine, InterpolateRequest(**small(model), inputs=["a cat", landscape], weights=[0.3, 0.9],
                                                 walk_steps=3))
    assert isinstance(end, Result), end
    assert len(end.images) == 4  # the mix, then a walk of 3
    assert end.images[0].settings["normalized_weights"] == [0.25, 0.75]
    assert [i.settings.get("walk_t") for i in end.images[1:]] == [0.0, 0.5, 1.0]


def test_controlnet_from_a_photo_estimates_its_depth_and_keeps_it_with_the_inputs(engine):
    """The hint from a photo: the depth estimator's image drives the ControlNet (the same image as giving that
    depth as the map) and is stored next to the photo; image-to-image without a hint takes the start image's."""
    photo = Image.open(f"{SAMPLES}/landscape.png").convert("RGB")
    depth = engine.estimate_depth(MODEL, photo)
    assert depth.mode == "L" and depth.size == photo.size
    events, end = run(engine, ControlNetRequest(**small(MODEL, seed=3), hint=photo, hint_source="photo"))
    assert isinstance(end, Result), end
    assert any(isinstance(e, Loading) and e.component.startswith("depth estimator") for e in events)
    settings = end.images[0].settings
    assert settings["hint_source"] == "photo"
    stored = Image.open(engine.store.input_path(TESTER, settings["input_images"]["estimated_depth"]))
    assert np.array_equal(np.asarray(stored), np.asarray(depth))
    _, as_map = run(engine, ControlNetRequest(**small(MODEL, seed=3), hint=depth))
    assert np.array_equal(np.asarray(as_map.images[0].image), np.asarray(end.images[0].image))

    _, end = run(engine, ControlNetRequest(**small(MODEL), hint_source="photo", mode="img2img", image=photo))
    assert isinstance(end, Result), end
    assert set(end.images[0].settings["input_images"]) == {"image", "estimated_depth"}


def test_a_photo_too_small_for_the_depth_estimator_is_refused_naming_the_field(engine):
    with pytest.raises(ValueError, match="hint.* too small to estimate depth"):
        engine.estimate_depth(MODEL, Image.new("RGB", (10, 40)))
    _, end = run(engine, ControlNetRequest(**small(MODEL), hint=Image.new("RGB", (10, 40)), hint_source="photo"))
    assert "hint" in end.message and "too small" in end.message
    with pytest.raises(ValueError, match="hint_source must be one of"):
        engine.submit(ControlNetRequest(**small(MODEL), hint=Image.new("RGB", (64, 64)), hint_source="map"), TESTER)


def test_bad_input_is_refused_at_submit_naming_the_field(engine):
    with pytest.raises(ValueError, match="scheduler must be one of"):
        engine.submit(Text2ImageRequest(**small(MODEL, scheduler="heun")), TESTER)
    with pytest.raises(ValueError, match="model must be one of"):
        engine.submit(Text2ImageRequest(**small("kandinsky-9")), TESTER)
    with pytest.raises(ValueError, match="owner must be 32 hexadecimal digits"):
        engine.submit(Text2ImageRequest(**small(MODEL)), "tester")
    assert engine.jobs_of(TESTER) == [] and isinstance(run(engine, Text2ImageRequest(**small(MODEL)))[1], Result)


@pytest.mark.parametrize("sampler", ["DPM++ 2M Karras", "Euler a"])
def test_a_sampler_job_equals_the_library_with_that_sampler_swapped_in(engine, sampler):
    """The request names the sampler (any case); the job's image is what the library gives with the decoder's
    scheduler swapped as diffusers' docs do, from the loaded scheduler's config (`Class.from_config(
    pipe.scheduler.config, **options)`: the repo's settings with DDPM's defaults filled in, timestep_spacing
    "leading" among them), and the PNG says which."""
    from backend.pipelines import KandinskyV22Pipeline, KandinskyV22PriorPipeline
    from backend.schedulers import SAMPLERS

    repos = engine.models[MODEL].repos
    _, end = run(engine, Text2ImageRequest(**small(MODEL, seed=8, scheduler=sampler.lower())))
    assert isinstance(end, Result), end
    (image,) = end.images
    assert read_settings(image.path)["scheduler"] == sampler
    generator = np.random.default_rng(8)
    prior = KandinskyV22PriorPipeline.from_pretrained(repos["prior"])
    embeds, negative = prior("a red cat", num_inference_steps=3, generator=generator, guidance_scale=1.0)
    cls, options = SAMPLERS[sampler]
    decoder = KandinskyV22Pipeline.from_pretrained(repos["decoder"])
    decoder.scheduler = cls.from_config(decoder.scheduler.config, **options)
    (expected,) = decoder(embeds, negative, height=64, width=64, num_inference_steps=6, guidance_scale=4.0,
                          generator=generator)[0]
    assert np.array_equal(np.asarray(image.image), np.asarray(expected))


@pytest.mark.parametrize("sampler", ["DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE Karras", "UniPC", "Euler", "Euler a",
                                     "DDIM", "DDPM", "Repository default"])
def test_every_sampler_runs_every_family_and_image_task(engine, sampler):
    """No sampler needs more than the request's minimum of one step, and none is refused by a task: 2.2
    inpainting (the kept region noised at each step), 2.1 image-to-image (its own noising) and Kandinsky 3
    image-to-image (Karras timesteps repeat 998 there) all run, down to one step."""
    landscape = Image.open(f"{SAMPLES}/landscape.png").convert("RGB")
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    for request in (InpaintRequest(**small(MODEL, num_inference_steps=3, scheduler=sampler), image=landscape,
                                   mask=mask),
                    Image2ImageRequest(**small("kandinsky-2-1-demo", num_inference_steps=4, scheduler=sampler),
                                       image=landscape, strength=0.5),
                    Image2ImageRequest(**small("kandinsky-3-demo", num_inference_steps=4, scheduler=sampler),
                                       image=landscape, strength=0.8),
                    Text2ImageRequest(**small("kandinsky-3-demo", num_inference_steps=1, scheduler=sampler))):
        events, end = run(engine, request)
        assert isinstance(end, Result), (request.model, request.task, end)
        assert end.images[0].settings["scheduler"] == sampler
        assert np.asarray(end.images[0].image).std() > 0


def test_preview_overhead_is_small(engine):
    """Previews at every step cost <= 10% of the run (measured, not assumed)."""
    model = MODEL
    _, end = run(engine, Text2ImageRequest(**small(model, num_inference_steps=20, seed=1)))
    assert isinstance(end, Result)
    assert end.preview_s / end.elapsed_s <= 0.10, (end.preview_s, end.elapsed_s)


def test_loading_is_reported_once_per_component_at_most_a_few_times(engine, tmp_path):
    model = MODEL
    engine.unload()
    events, end = run(engine, Text2ImageRequest(**small(model)))
    loading = [e for e in events if isinstance(e, Loading)]
    assert any("prior" in e.component for e in loading) and any("decoder" in e.component for e in loading)
    assert len(loading) < 40


# ------------------------------------------------------------------ the prior's image encoder, on demand


def loaded(events) -> set:
    """The components a job loaded (its Loading events)."""
    return {e.component.split(" / ")[-1] for e in events if isinstance(e, Loading)}


def test_text_jobs_load_the_prior_image_encoder_once_per_checkpoint_and_interpolating_an_image_still_does(tmp_path):
    """The zero-image embedding is computed by the image encoder for the first text-only job of a prior
    checkpoint and stored beside the preview factors; later jobs and later processes read it and never
    load the encoder, and their images are the ones the library's full prior gives. A damaged or missing
    file is computed again. Interpolating an image loads the encoder."""
    from backend.engine import Engine, EngineConfig
    from backend.pipelines import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    config = EngineConfig(families=("2.2",), demo=True, cache_dir=str(tmp_path / "cache"),
                          outputs_dir=str(tmp_path / "outputs"))
    request = Text2ImageRequest(**small(MODEL, seed=7))

    def job(engine, req=request):
        events, end = run(engine, req)
        assert isinstance(end, Result), end
        return loaded(events), np.asarray(end.images[0].image)

    def prior_units(engine) -> dict:
        return {u["part"]: set(u["components"]) for u in engine.status()["units"] if u["role"] == "prior"}

    engine = Engine(config)
    try:
        repos = engine.models[MODEL].repos
        components, first = job(engine)
        assert {"prior", "text_encoder", "image_encoder"} <= components
        (stored,) = (tmp_path / "cache" / "preview-factors").glob("*.zero_image_embeds.npy")
        assert prior_units(engine) == {"": {"prior", "text_encoder"}}      # the encoder was freed after
        components, second = job(engine)
        assert "image_encoder" not in components and np.array_equal(second, first)
    finally:
        engine.shutdown()

    # the library's pipelines with the full prior (its encoder computes the zero-image embedding) agree
    generator = np.random.default_rng(7)
    prior = KandinskyV22PriorPipeline.from_pretrained(repos["prior"])
    embeds, negative = prior("a red cat", num_inference_steps=3, generator=generator, guidance_scale=1.0)
    assert np.load(stored).tobytes() == prior.get_zero_embed().tobytes()
    (expected,) = KandinskyV22Pipeline.from_pretrained(repos["decoder"])(
        embeds, negative, height=64, width=64, num_inference_steps=6, guidance_scale=4.0, generator=generator)[0]
    assert np.array_equal(first, np.asarray(expected))
    saved = stored.read_bytes()

    engine = Engine(config)   # a restart reads the file
    try:
        components, third = job(engine)
        assert "prior" in components and "image_encoder" not in components and np.array_equal(third, first)
        mix = dict(small(MODEL, seed=7), weights=[0.5, 0.5])
        components, _ = job(engine, InterpolateRequest(**mix, inputs=["a cat", "a dog"]))
        assert "image_encoder" not in components
        landscape = Image.open(f"{SAMPLES}/landscape.png").convert("RGB")
        components, _ = job(engine, InterpolateRequest(**mix, inputs=["a cat", landscape]))
        assert "image_encoder" in components
        assert prior_units(engine) == {"": {"prior", "text_encoder"}, "image encoder": {"image_encoder"}}
    finally:
        engine.shutdown()

    for damage in (lambda: stored.write_bytes(b"\x93NUMPY truncated"), stored.unlink):
        damage()
        engine = Engine(config)
        try:
            components, again = job(engine)
            assert "image_encoder" in components and np.array_equal(again, first)
            assert stored.read_bytes() == saved
            assert prior_units(engine) == {"": {"prior", "text_encoder"}}
        finally:
            engine.shutdown()


def test_a_full_disk_keeps_every_image_and_the_job_ends_with_its_result(engine, monkeypatch):
    """The outputs disk refuses the input image and the first run's image (ENOSPC after 100 bytes): the job
    still ends with its Result, the refused image is in it with the reason and the folder, the next run's
    image is saved (without the input reference), a note says what was lost, and no temporary file is left."""
    import errno
    import os

    from backend import metadata
    from kandinsky_ui import render
    from kandinsky_ui.gallery import Gallery

    owner, store, writes = "d15c" * 8, engine.store, []

    def write(file, data):
        writes.append(len(data))
        if len(writes) <= 2:  # the input image, then the image of seed 21
            file.write(data[:100])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        file.write(data)
    monkeypatch.setattr(metadata, "_write", write)
    landscape = Image.open(f"{SAMPLES}/landscape.png").convert("RGB")
    events, end = run(engine, Image2ImageRequest(**small(MODEL, seed=21, batch_count=2, num_inference_steps=2),
                                                 image=landscape, strength=0.5), owner)
    assert isinstance(end, Result), end
    lost, saved = end.images
    folder = store.root / owner
    assert lost.path is None and lost.image.size == (64, 64)
    assert lost.save_error == f"disk full at {folder} (No space left on device)"
    assert saved.path is not None and read_settings(saved.path)["seed"] == 22
    assert "image" not in read_settings(saved.path)["input_images"]
    assert any("input image 'image' could not be stored: disk full at" in note for note in end.notes), end.notes
    assert any(note.startswith(f"the image of seed 21 could not be saved: disk full at {folder}")
               for note in end.notes), end.notes
    assert "could not be saved: disk full" in render.event_html(end)
    assert [p for p in store.root.rglob("*") if p.name.endswith(".tmp")] == []
    assert store.list(owner) == [saved.path]

    # the page: the unsaved image leads the gallery, can be selected and sent to another tab
    gallery = Gallery(store, 10)
    gallery.remember(owner, end.images)
    gallery.remember(owner, end.images)  # a second follower of the same job
    items = gallery.items(owner)
    # captions name the batch position (issue 17): runs 1 and 2 of batch_count 2
    assert [caption for _, caption in items] == ["seed 21 · 1/2 · not saved", "seed 22 · 2/2"]
    assert np.array_equal(np.asarray(items[0][0]), np.asarray(lost.image))
    # what a download from the gallery gives: a PNG that carries the image's settings
    import gradio as gr
    shown = gr.Gallery(format="png").postprocess(items[:1]).root[0].image.path
    assert read_settings(shown)["seed"] == 21 and read_settings(shown)["task"] == "img2img"
    selected, line = gallery.select(owner, 0)
    assert gallery.is_unsaved(selected) and "disk full" in line
    assert np.array_equal(np.asarray(gallery.selected_image(owner, selected)), np.asarray(lost.image))
    assert gallery.select(owner, 1)[0] == str(saved.path)

    # a read-only disk: every image refused, still a Result
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(metadata, "open", read_only, raising=False)
    _, end = run(engine, Text2ImageRequest(**small(MODEL, seed=5, batch_size=2, num_inference_steps=2)), owner)
    assert isinstance(end, Result), end
    assert [i.path for i in end.images] == [None, None]
    assert any(note.startswith(f"2 images (seed 5 #1, seed 5 #2) could not be saved: read-only file system at "
                               f"{folder}") for note in end.notes), end.notes
    assert store.list(owner) == [saved.path]

    # a stop on that disk: the partial image is kept in the Cancelled event, with the note
    job = engine.submit(Text2ImageRequest(**small(MODEL, seed=6, num_inference_steps=200)), owner)
    for event in job.events(timeout=120):
        if isinstance(event, Step) and event.phase == "denoise" and event.step >= 2:
            job.cancel()
            break
    end = job.wait(timeout=60)
    assert isinstance(end, Cancelled) and end.partials[0].path is None and end.partials[0].partial
    assert any(note.startswith("the image of seed 6 (partial) could not be saved: read-only file system")
               for note in end.notes), end.notes
    assert "read-only file system" in render.event_html(end)
    assert [p for p in store.root.rglob("*") if p.name.endswith(".tmp")] == []
