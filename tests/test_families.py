"""Kandinsky 2.1 and 3 in the app's Engine (tiny random-weight demo models): what each family
offers, the job a request becomes equals calling the library pipelines directly, truncated prompts
are reported, and Kandinsky 3's text encoder is its own loading unit that the budget evicts
before the UNet loads."""
import logging

import mindspore as ms
import numpy as np
import pytest
from PIL import Image

from backend import pipelines
from backend.engine import Engine, EngineConfig
from backend.events import Result, Step
from backend.families import CATALOGUE, FAMILIES, ModelSpec
from backend.manager import ModelManager
from backend.metadata import read_settings
from backend.requests import (ControlNetRequest, Image2ImageRequest, InpaintRequest, InterpolateRequest,
                              Text2ImageRequest)

SAMPLES = "assets/samples"
LONG_PROMPT = "a red cat " + "in the snowy forest " * 40
OWNER = "fa" * 16


@pytest.fixture(scope="module")
def catalogue(engine):
    return engine.models


def pipeline(manager, spec, stage, scheduler="default"):
    with manager.use(spec.stage(stage)) as unit:
        return unit.pipeline(scheduler)


def small(model, **kw):
    base = dict(model=model, prompt="a red cat", width=64, height=64, num_inference_steps=4,
                prior_num_inference_steps=3, seed=3)
    base.update(kw)
    return base


def run(engine, request):
    job = engine.submit(request, OWNER)
    events = list(job.events(timeout=120, coalesce=False))
    return events, events[-1]


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_each_family_offers_its_tasks_and_says_why_not_the_others(catalogue):
    assert [s.family.name for s in catalogue.values()] == list(FAMILIES) == ["2.2", "2.1", "3"]
    assert CATALOGUE["kandinsky-2-1"].repos == {"prior": "kandinsky-community/kandinsky-2-1-prior",
                                                "decoder": "kandinsky-community/kandinsky-2-1",
                                                "inpaint": "kandinsky-community/kandinsky-2-1-inpaint"}
    assert CATALOGUE["kandinsky-3"].repos == {"decoder": "kandinsky-community/kandinsky-3"}
    # ControlNet's hint from a photo: the depth estimator is a 2.2 stage of its own, loaded on demand
    assert CATALOGUE["kandinsky-2-2"].repos["depth_estimator"] == "depth-anything/Depth-Anything-V2-Small-hf"
    assert CATALOGUE["kandinsky-2-2"].stage("depth").stage.pipeline == "DepthEstimationPipeline"
    assert "depth_estimator" in catalogue["kandinsky-2-2-demo"].repos
    for key, spec in catalogue.items():
        assert spec.tasks == CATALOGUE[key.replace("-demo", "")].tasks
    v21, v3 = catalogue["kandinsky-2-1-demo"], catalogue["kandinsky-3-demo"]
    assert v21.tasks == ("text2img", "img2img", "inpaint", "interpolate")
    assert v3.tasks == ("text2img", "img2img")
    assert "Kandinsky 2.2 only" in v21.unsupported_reason("controlnet")
    assert "no published Kandinsky 3 inpainting checkpoint" in v3.unsupported_reason("inpaint")
    assert "no image-embedding prior" in v3.unsupported_reason("interpolate")
    assert v3.unsupported_reason("text2img") == ""


@pytest.mark.parametrize("request_class,extra", [
    (ControlNetRequest, {"hint": Image.new("L", (64, 64), 128)}),
    (InpaintRequest, {"image": Image.new("RGB", (64, 64)), "mask": Image.new("L", (64, 64), 255)}),
    (InterpolateRequest, {"inputs": ["a", "b"], "weights": [0.5, 0.5]}),
])
def test_a_task_the_model_cannot_do_is_refused_naming_the_model_field(engine, request_class, extra):
    models = ["kandinsky-3-demo"] + (["kandinsky-2-1-demo"] if request_class is ControlNetRequest else [])
    for model in models:
        request = request_class(**small(model), **extra)
        with pytest.raises(ValueError, match=r"^model: Kandinsky (3|2\.1) demo .* cannot do"):
            engine.model(request.model).check_task(request.task)
        with pytest.raises(ValueError, match=r"^model: Kandinsky (3|2\.1) demo .* cannot do"):
            engine.submit(request, OWNER)   # the one place: the Engine checks before it queues
    assert engine.jobs_of(OWNER) == []


def test_2_1_text_to_image_equals_the_library_pipelines_and_reports_both_truncations(engine, catalogue):
    spec = catalogue["kandinsky-2-1-demo"]
    events, end = run(engine, Text2ImageRequest(**small(spec.key, prompt=LONG_PROMPT, negative_prompt="blurry")))
    assert isinstance(end, Result), end
    assert any(n.startswith("CLIP reads 77 tokens") for n in end.notes)
    assert any(n.startswith("The decoder's MultilingualCLIP reads 77 tokens") for n in end.notes)
    phases = [e.phase for e in events if isinstance(e, Step)]
    assert phases.index("prior") < phases.index("denoise") < phases.index("decode")

    # the same run through the diffusers-named pipelines
    generator = np.random.default_rng(3)
    prior = pipelines.KandinskyPriorPipeline.from_pretrained(spec.repos["prior"])
    decoder = pipelines.KandinskyPipeline.from_pretrained(spec.repos["decoder"])
    embeds, negative = prior(LONG_PROMPT, num_inference_steps=3, generator=generator, guidance_scale=1.0)
    negative = prior("blurry", num_inference_steps=3, generator=generator, guidance_scale=1.0)[0]
    (expected,) = decoder([LONG_PROMPT], embeds, negative, negative_prompt=["blurry"], height=64, width=64,
                          num_inference_steps=4, guidance_scale=4.0, generator=generator)[0]
    assert np.array_equal(pixels(end.images[0].image), pixels(expected))
    settings = read_settings(end.images[0].path)
    # the demo's role folders, by name only: no server path in the PNG (issue 16)
    assert settings["model"] == spec.key and settings["repos"] == spec.public_repos() == {
        role: role for role in spec.repos}


def test_2_1_image_to_image_inpaint_and_interpolate_run(engine):
    model = "kandinsky-2-1-demo"
    image = Image.open(f"{SAMPLES}/landscape.png")
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (0, 0, image.size[0] // 2, image.size[1]))
    for request in (Image2ImageRequest(**small(model, scheduler="ddpm"), image=image, strength=0.5),
                    InpaintRequest(**small(model, width=128), image=image, mask=mask),
                    InterpolateRequest(**small(model), inputs=["a cat", image], weights=[0.3, 0.7], walk_steps=2)):
        events, end = run(engine, request)
        assert isinstance(end, Result), (request.task, end)
        assert any(isinstance(e, Step) and e.preview is not None for e in events)
        assert end.images[0].image.size == (request.width, request.height)
    assert len(end.images) == 3  # interpolation + a walk of 2


def test_3_text_to_image_equals_the_whole_pipeline_though_encoder_and_unet_load_apart(engine, catalogue):
    spec = catalogue["kandinsky-3-demo"]
    events, end = run(engine, Text2ImageRequest(**small(spec.key, prompt=LONG_PROMPT, negative_prompt="blurry",
                                                        batch_size=2, width=128, guidance_scale=3.0)))
    assert isinstance(end, Result), end
    assert any(n.startswith("T5 reads 128 tokens; this part of the prompt was dropped:") for n in end.notes)
    steps = [e for e in events if isinstance(e, Step)]
    assert steps[0].phase == "encode" and [e.step for e in steps if e.phase == "denoise"] == [1, 2, 3, 4]
    parts = {u["part"] for u in engine.status()["units"] if u["source"] == spec.repos["decoder"]}
    assert parts == {"text encoder", "unet and movq"}

    pipe = pipelines.Kandinsky3Pipeline.from_pretrained(spec.repos["decoder"])
    expected = pipe(LONG_PROMPT, negative_prompt="blurry", num_images_per_prompt=2, height=64, width=128,
                    num_inference_steps=4, guidance_scale=3.0, generator=np.random.default_rng(3))[0]
    assert [i.image.size for i in end.images] == [(128, 64)] * 2
    for got, want in zip(end.images, expected):
        assert np.array_equal(pixels(got.image), pixels(want))


def test_3_image_to_image_and_consecutive_seeds(engine):
    image = Image.open(f"{SAMPLES}/portrait.png")
    _, end = run(engine, Image2ImageRequest(**small("kandinsky-3-demo", batch_count=2), image=image, strength=0.6))
    assert isinstance(end, Result), end
    assert end.seeds == [3, 4] and [i.image.size for i in end.images] == [(64, 64)] * 2
    _, single = run(engine, Image2ImageRequest(**small("kandinsky-3-demo", seed=4), image=image, strength=0.6))
    assert np.array_equal(pixels(single.images[0].image), pixels(end.images[1].image))


def test_3_budget_below_encoder_plus_unet_evicts_the_encoder_before_the_unet_loads(catalogue, demo_root, tmp_path,
                                                                                   caplog):
    spec = catalogue["kandinsky-3-demo"]
    probe = ModelManager()
    pipeline(probe, spec, "text_encoder")
    pipeline(probe, spec, "text2img")
    sizes = {u["part"]: u["bytes"] for u in probe.status()["units"]}
    assert sizes["text encoder"] > 0 and sizes["unet and movq"] > 0

    budget = max(sizes.values()) + min(sizes.values()) // 2     # either unit fits, not both
    engine = Engine(EngineConfig(families=("3",), demo=True, memory_budget=budget, cache_dir=str(demo_root),
                                 outputs_dir=str(tmp_path / "outputs")))
    encoder, unet = spec.repos["decoder"] + "#text encoder", spec.repos["decoder"] + "#unet and movq"
    try:
        for _ in range(2):  # the second job reloads the encoder and evicts the UNet, and back
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="backend.manager"):
                _, end = run(engine, Text2ImageRequest(**small(spec.key)))
            assert isinstance(end, Result), end
            # in this order: the encoder went before the UNet loaded, so both were never in memory
            log = [(r.msg.split()[0], r.args[0]) for r in caplog.records if r.msg.startswith(("evicted", "loaded"))]
            assert log[-2:] == [("evicted", encoder), ("loaded", unet)], log
            assert [u["part"] for u in engine.status()["units"]] == ["unet and movq"]
            assert engine.status()["used"] <= budget
    finally:
        engine.shutdown()


@pytest.mark.parametrize("prompt", ["x" * 10_000, "🦊 in the snow 🌨️" * 30, "قطة حمراء في الثلج", "tab\tnew\nline\x00\x07",
                                    ""])
@pytest.mark.parametrize("model", ["kandinsky-2-1-demo", "kandinsky-3-demo"])
def test_odd_prompts_work_and_long_ones_are_reported(engine, model, prompt):
    _, end = run(engine, Text2ImageRequest(**small(model, prompt=prompt, negative_prompt=prompt[:50],
                                                   num_inference_steps=2)))
    assert isinstance(end, Result), end
    assert end.images[0].settings["prompt"] == prompt
    if len(prompt) > 1000:
        assert any("this part of the prompt was dropped" in n and len(n) < 500 for n in end.notes), end.notes


def test_2_1_ddpm_means_the_repos_own_ddpm_scheduler_folder(catalogue):
    manager, spec = ModelManager(), catalogue["kandinsky-2-1-demo"]
    ddpm = pipeline(manager, spec, "text2img", scheduler="ddpm").scheduler
    assert type(ddpm).__name__ == "DDPMScheduler"
    assert ddpm.config["variance_type"] == "learned_range" and ddpm.config["thresholding"] is True
    default = pipeline(manager, spec, "text2img").scheduler
    assert type(default).__name__ == "DDIMScheduler"
    # the inpainting repo ships no alternative: DDPM is built from its DDIM config, as for 2.2
    inpaint = pipeline(manager, spec, "inpaint", scheduler="ddpm").scheduler
    assert type(inpaint).__name__ == "DDPMScheduler" and inpaint.config["beta_end"] == 0.012
    assert inpaint.config.get("variance_type", "fixed_small") == "fixed_small"


def test_3_text_encoder_keeps_its_checkpoints_half_precision_in_a_float32_app(catalogue, tmp_path):
    """The published T5 shards are fp16 with float32 `wo` matrices: kept as stored, the encoder
    takes half the memory and its states match a float32 load of the same file (T5 computes in
    float32 either way)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from backend.models.t5 import T5EncoderModel
    from backend.weights import load_model

    folder = tmp_path / "kandinsky-3-half"
    shutil.copytree(catalogue["kandinsky-3-demo"].repos["decoder"], folder)
    path = folder / "text_encoder" / "model.safetensors"
    tensors = {k: (v if ".wo." in k else v.astype(np.float16)) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path))
    spec = ModelSpec("k3-half", "K3 half", FAMILIES["3"], {"decoder": str(folder)})
    manager = ModelManager()
    encoder = pipeline(manager, spec, "text_encoder")
    dtypes = {name: str(p.dtype) for name, p in encoder.text_encoder.parameters_and_names()}
    assert {d for n, d in dtypes.items() if ".wo." in n} == {"Float32"}
    assert {d for n, d in dtypes.items() if ".wo." not in n} == {"Float16"}
    (unit,) = manager.status()["units"]
    assert unit["bytes"] == sum(v.nbytes for v in tensors.values())   # what the file holds, not float32
    assert pipeline(manager, spec, "text2img").unet.conv_in.weight.dtype == ms.float32

    full = load_model(T5EncoderModel, folder / "text_encoder", dtype="float32")
    embeds, _, mask, _ = encoder.encode_prompt(["a red cat in the snow"], False, 1, None)
    encoder.text_encoder = full
    expected, _, _, _ = encoder.encode_prompt(["a red cat in the snow"], False, 1, None)
    assert np.abs(embeds - expected).max() <= 2e-3 * max(1.0, np.abs(expected).max())


def test_2_1_decoder_and_inpaint_folders_share_their_multilingual_clip_and_movq(catalogue):
    manager, spec = ModelManager(), catalogue["kandinsky-2-1-demo"]
    decoder = pipeline(manager, spec, "text2img")
    inpaint = pipeline(manager, spec, "inpaint")
    assert inpaint.text_encoder is decoder.text_encoder and inpaint.movq is decoder.movq
    assert {tuple(u["shared"]) for u in manager.status()["units"]} == {("movq", "text_encoder")}


def test_the_depth_estimator_offline_gets_the_offline_help_and_a_models_dir_folder_is_used(tmp_path, catalogue):
    """The published 2.2 model: a missing estimator repo offline is explained as the other models are; a folder
    named like the repo under --models-dir (a transformers model repo: config.json at its top) is used."""
    engine = Engine(EngineConfig(families=("2.2",), offline=True, models_dir=str(tmp_path / "models"),
                                 cache_dir=str(tmp_path / "cache"), outputs_dir=str(tmp_path / "outputs")))
    try:
        with pytest.raises(RuntimeError, match="not in the local Hugging Face cache") as error:
            engine.estimate_depth("kandinsky-2-2", Image.new("RGB", (64, 64)))
        assert "depth-anything/Depth-Anything-V2-Small-hf" in str(error.value)
    finally:
        engine.shutdown()
    local = tmp_path / "models" / "Depth-Anything-V2-Small-hf"
    local.parent.mkdir()
    local.symlink_to(catalogue["kandinsky-2-2-demo"].repos["depth_estimator"], target_is_directory=True)
    assert FAMILIES["2.2"].published_model(tmp_path / "models").repos["depth_estimator"] == str(local)
