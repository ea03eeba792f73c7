"""ModelManager on the demo folders (real loading): lazy load, the unit handle, sharing, schedulers,
memory budget, least-recently-used eviction, unload, status."""
import logging
from pathlib import Path

import pytest

from backend import demo, pipelines
from backend.events import Loading
from backend.families import ModelSpec
from backend.manager import ModelManager
from backend.memory import component_bytes, format_bytes, parse_memory


@pytest.fixture(scope="module")
def spec(demo_root):
    return demo.ensure_demo_models(demo_root)


def pipeline(manager, spec, stage, scheduler="default", on_progress=None):
    """A pipeline of `stage`, loading its unit if needed."""
    with manager.use(spec.stage(stage), on_progress) as unit:
        return unit.pipeline(scheduler)


def roles(manager) -> set:
    return {unit["role"] for unit in manager.status()["units"]}


def test_parse_memory():
    assert parse_memory("12GB") == 12 * 10**9
    assert parse_memory("1.5 GiB") == int(1.5 * 2**30)
    assert parse_memory("800mb") == 800 * 10**6
    assert parse_memory("auto") is None and parse_memory(None) is None
    assert parse_memory(1234) == 1234
    for bad in ("lots", "-1GB", "0"):
        with pytest.raises(ValueError, match="memory budget"):
            parse_memory(bad)
    assert format_bytes(1_500_000) == "1.5 MB"


def test_nothing_loads_until_used_then_status_lists_components(spec):
    manager = ModelManager(memory_budget=10**9)
    assert manager.status()["units"] == [] and manager.status()["used"] == 0
    reports = []
    pipe = pipeline(manager, spec, "text2img", on_progress=reports.append)
    assert type(pipe).__name__ == "KandinskyV22Pipeline"
    assert all(isinstance(r, Loading) for r in reports)
    assert {r.component.split(" / ")[1] for r in reports} == {"unet", "movq"}
    assert reports[-1].done == reports[-1].total
    status = manager.status()
    (unit,) = status["units"]
    assert unit["role"] == "decoder" and set(unit["components"]) == {"unet", "movq"}
    assert unit["bytes"] == sum(unit["components"].values()) == status["used"]
    assert status["device"] == "CPU" and status["dtype"] == "float32"
    # the header-only estimate equals what loading took
    decoder = spec.stage("text2img").source
    assert sum(component_bytes(f"{decoder}/{name}", 4) for name in ("unet", "movq")) == unit["bytes"]


def test_pipelines_of_one_unit_share_components_and_swap_schedulers(spec):
    manager = ModelManager()
    with manager.use(spec.stage("text2img")) as unit:
        text2img = unit.pipeline()
        assert unit.pipeline().unet is text2img.unet
    img2img = pipeline(manager, spec, "img2img", scheduler="ddim")
    assert type(img2img).__name__ == "KandinskyV22Img2ImgPipeline"   # the stage's class, the unit's components
    assert img2img.unet is text2img.unet and img2img.movq is text2img.movq
    assert type(text2img.scheduler).__name__ == "DDPMScheduler"
    assert type(img2img.scheduler).__name__ == "DDIMScheduler"
    assert img2img.scheduler.config["beta_end"] == text2img.scheduler.config["beta_end"]
    assert len(manager.status()["units"]) == 1
    with pytest.raises(ValueError, match="scheduler must be one of"):
        pipeline(manager, spec, "text2img", scheduler="heun")
    with pytest.raises(ValueError, match="has no upscale stage"):
        spec.stage("upscale")


def test_least_recently_used_unit_is_evicted_to_fit_the_budget(spec, caplog):
    probe = ModelManager()
    pipeline(probe, spec, "text2img")
    pipeline(probe, spec, "controlnet")
    both = probe.status()["used"]                # the two decoders share their MoVQ: counted once
    pipeline(probe, spec, "prior")
    sizes = {u["role"]: u["bytes"] for u in probe.status()["units"]}
    # room for the decoder and the controlnet folder, not for the prior as well
    manager = ModelManager(memory_budget=both + sizes["prior"] // 2)
    pipeline(manager, spec, "prior")
    pipeline(manager, spec, "text2img")         # the decoder is used after the prior: the prior is older
    with caplog.at_level(logging.INFO, logger="backend.manager"):
        pipeline(manager, spec, "controlnet")   # needs room: the least recently used unit goes
    assert roles(manager) == {"decoder", "controlnet"}
    assert evictions(caplog) == [spec.repos["prior"]]
    assert manager.status()["used"] <= manager.memory_budget
    caplog.clear()
    pipeline(manager, spec, "text2img")         # now the controlnet folder is the older one
    with caplog.at_level(logging.INFO, logger="backend.manager"):
        pipeline(manager, spec, "prior")
    assert roles(manager) == {"decoder", "prior"}
    assert evictions(caplog) == [spec.repos["controlnet"]]


def evictions(caplog) -> list[str]:
    return [r.args[0] for r in caplog.records if r.name == "backend.manager" and r.msg.startswith("evicted")]


def test_a_unit_in_use_is_never_evicted_and_unload_frees_the_rest(spec):
    manager = ModelManager(memory_budget=1)  # nothing fits: each unit loads alone
    with manager.use(spec.stage("text2img")):
        pipeline(manager, spec, "prior")
        assert roles(manager) == {"decoder", "prior"}     # the decoder is pinned by the running job
        assert manager.status()["over_budget"]
        with pytest.raises(RuntimeError, match="in use"):
            manager.unload(spec.repos["decoder"])
        assert manager.unload() == [spec.repos["prior"]]
    assert manager.unload() == [spec.repos["decoder"]]
    assert manager.status()["units"] == []


def test_lowering_the_budget_evicts(spec):
    manager = ModelManager(memory_budget=10**9)
    pipeline(manager, spec, "prior")
    pipeline(manager, spec, "inpaint")
    evicted = manager.set_memory_budget(manager.status()["used"] - 1)
    assert evicted == [spec.repos["prior"]]
    with pytest.raises(ValueError):
        manager.set_memory_budget(0)


def test_preview_factors_are_fitted_once_per_movq_checkpoint(spec, tmp_path):
    manager = ModelManager(factors_dir=tmp_path)
    fits = []
    with manager.use(spec.stage("text2img")) as unit:
        first = unit.preview_factors(on_fit=lambda: fits.append("decoder"))
    # the demo folders share one MoVQ checkpoint, like the published repos: one fit, one file
    with manager.use(spec.stage("inpaint")) as unit:
        assert unit.preview_factors(on_fit=lambda: fits.append("inpaint")) is first
    assert fits == ["decoder"] and len(list(tmp_path.glob("*.json"))) == 1
    # a new manager (a restart) reads the file instead of fitting again
    with ModelManager(factors_dir=tmp_path).use(spec.stage("controlnet")) as unit:
        again = unit.preview_factors(on_fit=lambda: fits.append("controlnet"))
    assert fits == ["decoder"] and (again.weight == first.weight).all()


def test_identical_components_of_different_folders_are_loaded_once(spec):
    """The published decoder, inpainting and ControlNet repos ship the same MoVQ (as the demo
    folders do): it is loaded once, shared, and counted once."""
    manager = ModelManager()
    decoder = pipeline(manager, spec, "text2img")
    inpaint = pipeline(manager, spec, "inpaint")
    assert inpaint.movq is decoder.movq and inpaint.unet is not decoder.unet
    status = manager.status()
    units = {u["role"]: u for u in status["units"]}
    assert units["decoder"]["shared"] == units["inpaint"]["shared"] == ["movq"]
    movq = units["decoder"]["components"]["movq"]
    assert status["used"] == units["decoder"]["bytes"] + units["inpaint"]["bytes"] - movq
    # the shared MoVQ outlives the folder it came with
    assert manager.unload(spec.repos["decoder"]) == [spec.repos["decoder"]]
    assert pipeline(manager, spec, "inpaint").movq is decoder.movq
    assert manager.status()["used"] == units["inpaint"]["bytes"]
    again = pipeline(manager, spec, "text2img")
    assert again.movq is decoder.movq and again.unet is not decoder.unet


def test_components_differing_in_content_or_config_are_not_shared(spec, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    other = tmp_path / "decoder-copy"
    shutil.copytree(spec.repos["decoder"], other)
    config = other / "movq" / "config.json"
    config.write_text(config.read_text().replace('"scaling_factor": 0.18215', '"scaling_factor": 0.2'))
    same_size = tmp_path / "decoder-other-weights"     # same config and sizes, other values
    shutil.copytree(spec.repos["decoder"], same_size)
    weights_file = next((same_size / "movq").glob("*.safetensors"))
    tensors = load_file(str(weights_file))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, str(weights_file))
    copy = ModelSpec("copy", "copy", spec.family, {**spec.repos, "inpaint": str(other), "controlnet": str(same_size)})
    manager = ModelManager()
    decoder = pipeline(manager, spec, "text2img")
    assert decoder.movq is not pipeline(manager, copy, "inpaint").movq
    assert decoder.movq is not pipeline(manager, copy, "controlnet").movq


def test_a_folder_is_resolved_once_and_loaded_without_building_a_pipeline(spec, monkeypatch):
    """Components load one by one from the folder (backend/pipelines/loading.py); the repo is
    resolved on first use only."""
    from backend import pipelines, weights

    resolved = []
    resolve = weights.resolve_pretrained
    monkeypatch.setattr(weights, "resolve_pretrained", lambda source, **kw: resolved.append(source) or resolve(source, **kw))
    monkeypatch.setattr(pipelines.KandinskyV22Pipeline, "from_pretrained", None)
    manager = ModelManager()
    pipeline(manager, spec, "text2img")
    manager.unload()
    pipeline(manager, spec, "img2img")
    assert resolved == [spec.repos["decoder"]]


def test_the_prior_loads_without_its_image_encoder_unless_a_job_needs_it(spec, tmp_path, caplog):
    """The prior unit is the folder minus its image encoder, in memory and in the budget; the
    encoder's zero-image embedding is computed once (the encoder loaded for that moment and freed
    before the rest of the prior loads) and read back by a restarted manager; a job that encodes
    images holds the encoder as a unit of its own."""
    prior = spec.stage("prior")
    full = pipelines.KandinskyV22PriorPipeline.from_pretrained(spec.repos["prior"])
    manager = ModelManager(factors_dir=tmp_path)
    reports = []
    with caplog.at_level(logging.INFO, logger="backend.manager"):
        with manager.use(prior, reports.append) as unit:
            pipe = unit.pipeline()
    assert pipe.image_encoder is None and pipe.zero_image_embeds.tobytes() == full.get_zero_embed().tobytes()
    assert any(r.component == "prior image encoder / image_encoder" for r in reports)
    encoder = f"{spec.repos['prior']}#image encoder"
    log = [(r.msg.split()[0], r.args[0]) for r in caplog.records if r.msg.startswith(("loaded", "released"))]
    assert log == [("loaded", encoder), ("released", encoder), ("loaded", spec.repos["prior"])]
    (unit,) = manager.status()["units"]
    assert set(unit["components"]) == {"prior", "text_encoder"}
    assert unit["bytes"] == manager.status()["used"] == sum(
        component_bytes(f"{spec.repos['prior']}/{name}", 4) for name in ("prior", "text_encoder"))

    restarted = ModelManager(factors_dir=tmp_path)
    reports.clear()
    again = pipeline(restarted, spec, "prior", on_progress=reports.append)
    assert "image_encoder" not in {r.component.split(" / ")[1] for r in reports}
    assert again.zero_image_embeds.tobytes() == pipe.zero_image_embeds.tobytes()

    with restarted.use(prior, needs=("image_encoder",)) as unit:
        assert unit.pipeline().image_encoder is not None
        units = {u["part"]: u for u in restarted.status()["units"]}
        assert set(units) == {"", "image encoder"} and units["image encoder"]["in_use"]
        with pytest.raises(RuntimeError, match="in use"):
            restarted.unload(spec.repos["prior"])
    assert sorted(restarted.unload(spec.repos["prior"])) == [spec.repos["prior"], encoder]
    with pytest.raises(ValueError, match="'unet' is not an on-demand component of prior"):
        with restarted.use(prior, needs=("unet",)):
            pass


def test_the_depth_estimator_repo_loads_without_model_index_and_counts_in_the_budget(spec, caplog):
    """A transformers model repo (config.json, preprocessor_config.json, model.safetensors at its top, as
    depth-anything/Depth-Anything-V2-Small-hf): one unit, its bytes in the status, evicted like any other."""
    folder = spec.repos["depth_estimator"]
    assert not (Path(folder) / "model_index.json").exists()
    manager = ModelManager(memory_budget=10**9)
    reports = []
    pipe = pipeline(manager, spec, "depth", on_progress=reports.append)
    assert type(pipe).__name__ == "DepthEstimationPipeline"
    assert reports and reports[-1].component == "depth_estimator / model" and reports[-1].done == reports[-1].total
    (unit,) = manager.status()["units"]
    assert unit["role"] == "depth_estimator" and list(unit["components"]) == ["model"]
    assert unit["bytes"] == component_bytes(folder, 4) == manager.status()["used"] > 0
    depth = pipe(Path("assets/samples/landscape.png"))["depth"]
    assert depth.mode == "L"
    # a budget that holds one unit: the decoder evicts the estimator
    manager.set_memory_budget(unit["bytes"] + 1)
    with caplog.at_level(logging.INFO, logger="backend.manager"):
        pipeline(manager, spec, "text2img")
    assert roles(manager) == {"decoder"} and f"evicted {folder}" in caplog.text
