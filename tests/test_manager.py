"""ModelManager on the demo folders (real loading): lazy load, sharing, schedulers, memory budget,
least-recently-used eviction, unload, status."""
import pytest

from backend import demo
from backend.manager import (ModelManager, estimate_folder_bytes, format_bytes, parse_memory)


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return demo.ensure_demo_models(tmp_path_factory.getbasetemp() / "demo-models")


def manager_for(spec, **kw):
    return ModelManager({spec.key: spec}, **kw)


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
    manager = manager_for(spec, memory_budget=10**9)
    assert manager.status()["folders"] == [] and manager.status()["used"] == 0
    reports = []
    pipe = manager.pipeline("text2img", spec.key, on_progress=reports.append)
    assert type(pipe).__name__ == "KandinskyV22Pipeline"
    assert {r.component.split(" / ")[1] for r in reports} == {"unet", "movq"}
    assert reports[-1].done == reports[-1].total
    status = manager.status()
    (folder,) = status["folders"]
    assert folder["role"] == "decoder" and set(folder["components"]) == {"unet", "movq"}
    assert folder["bytes"] == sum(folder["components"].values()) == status["used"]
    assert status["device"] == "CPU" and status["dtype"] == "float32"
    # the header-only estimate equals what loading took
    assert estimate_folder_bytes(manager._loaded[spec.repos["decoder"]].folder, 4) == folder["bytes"]


def test_pipelines_of_one_folder_share_components_and_swap_schedulers(spec):
    manager = manager_for(spec)
    text2img = manager.pipeline("text2img", spec.key)
    img2img = manager.pipeline("img2img", spec.key, scheduler="ddim")
    assert img2img.unet is text2img.unet and img2img.movq is text2img.movq
    assert type(text2img.scheduler).__name__ == "DDPMScheduler"
    assert type(img2img.scheduler).__name__ == "DDIMScheduler"
    assert img2img.scheduler.config["beta_end"] == text2img.scheduler.config["beta_end"]
    assert len(manager.status()["folders"]) == 1
    with pytest.raises(ValueError, match="scheduler must be one of"):
        manager.pipeline("text2img", spec.key, scheduler="euler")
    with pytest.raises(ValueError, match="model must be one of"):
        manager.pipeline("text2img", "kandinsky-9")
    with pytest.raises(ValueError, match="kind must be one of"):
        manager.pipeline("upscale", spec.key)


def test_least_recently_used_folder_is_evicted_to_fit_the_budget(spec):
    probe = manager_for(spec)
    probe.pipeline("text2img", spec.key)
    probe.pipeline("controlnet", spec.key)
    both = probe.status()["used"]                # the two decoders share their MoVQ: counted once
    probe.pipeline("prior", spec.key)
    sizes = {f["role"]: f["bytes"] for f in probe.status()["folders"]}
    # room for the decoder and the controlnet folder, not for the prior as well
    manager = manager_for(spec, memory_budget=both + sizes["prior"] // 2)
    manager.pipeline("prior", spec.key)
    manager.pipeline("text2img", spec.key)       # the decoder is used after the prior: the prior is older
    manager.pipeline("controlnet", spec.key)     # needs room: the least recently used folder goes
    assert {f["role"] for f in manager.status()["folders"]} == {"decoder", "controlnet"}
    assert manager.last_evicted == [spec.repos["prior"]]
    assert manager.status()["used"] <= manager.memory_budget
    manager.pipeline("text2img", spec.key)       # now the controlnet folder is the older one
    manager.pipeline("prior", spec.key)
    assert {f["role"] for f in manager.status()["folders"]} == {"decoder", "prior"}
    assert manager.last_evicted == [spec.repos["controlnet"]]


def test_a_folder_in_use_is_never_evicted_and_unload_frees_the_rest(spec):
    manager = manager_for(spec, memory_budget=1)  # nothing fits: each folder loads alone
    with manager.use("text2img", spec.key):
        manager.pipeline("prior", spec.key)
        roles = {f["role"] for f in manager.status()["folders"]}
        assert roles == {"decoder", "prior"}     # the decoder is pinned by the running job
        assert manager.status()["over_budget"]
        with pytest.raises(RuntimeError, match="in use"):
            manager.unload(spec.repos["decoder"])
        assert manager.unload() == [spec.repos["prior"]]
    assert manager.unload() == [spec.repos["decoder"]]
    assert manager.status()["folders"] == []


def test_lowering_the_budget_evicts(spec):
    manager = manager_for(spec, memory_budget=10**9)
    manager.pipeline("prior", spec.key)
    manager.pipeline("inpaint", spec.key)
    evicted = manager.set_memory_budget(manager.status()["used"] - 1)
    assert evicted == [spec.repos["prior"]]
    with pytest.raises(ValueError):
        manager.set_memory_budget(0)


def test_preview_factors_are_fitted_once_per_movq_checkpoint(spec, tmp_path):
    manager = manager_for(spec, factors_dir=tmp_path)
    decoder = manager.pipeline("text2img", spec.key)
    first = manager.preview_factors("text2img", spec.key, decoder)
    inpaint = manager.pipeline("inpaint", spec.key)
    # the demo folders share one MoVQ checkpoint, like the published repos: one fit, one file
    assert manager.preview_factors("inpaint", spec.key, inpaint) is first
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_identical_components_of_different_folders_are_loaded_once(spec):
    """The published decoder, inpainting and ControlNet repos ship the same MoVQ (as the demo
    folders do): it is loaded once, shared, and counted once."""
    manager = manager_for(spec)
    decoder = manager.pipeline("text2img", spec.key)
    inpaint = manager.pipeline("inpaint", spec.key)
    assert inpaint.movq is decoder.movq and inpaint.unet is not decoder.unet
    status = manager.status()
    folders = {f["role"]: f for f in status["folders"]}
    assert folders["decoder"]["shared"] == folders["inpaint"]["shared"] == ["movq"]
    movq = folders["decoder"]["components"]["movq"]
    assert status["used"] == folders["decoder"]["bytes"] + folders["inpaint"]["bytes"] - movq
    # the shared MoVQ outlives the folder it came with
    assert manager.unload(spec.repos["decoder"]) == [spec.repos["decoder"]]
    assert manager.pipeline("inpaint", spec.key).movq is decoder.movq
    assert manager.status()["used"] == folders["inpaint"]["bytes"]
    again = manager.pipeline("text2img", spec.key)
    assert again.movq is decoder.movq and again.unet is not decoder.unet


def test_components_differing_in_content_or_config_are_not_shared(spec, tmp_path):
    import shutil

    from backend.manager import ModelSpec

    other = tmp_path / "decoder-copy"
    shutil.copytree(spec.repos["decoder"], other)
    config = other / "movq" / "config.json"
    config.write_text(config.read_text().replace('"scaling_factor": 0.18215', '"scaling_factor": 0.2'))
    same_size = tmp_path / "decoder-other-weights"     # same config and sizes, other values
    shutil.copytree(spec.repos["decoder"], same_size)
    weights_file = next((same_size / "movq").glob("*.safetensors"))
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(weights_file))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, str(weights_file))
    copy = ModelSpec("copy", "copy", {**spec.repos, "inpaint": str(other), "controlnet": str(same_size)})
    manager = ModelManager({spec.key: spec, "copy": copy})
    decoder = manager.pipeline("text2img", spec.key)
    assert decoder.movq is not manager.pipeline("inpaint", "copy").movq
    assert decoder.movq is not manager.pipeline("controlnet", "copy").movq
