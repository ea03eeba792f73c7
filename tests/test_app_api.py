"""The app's API through gradio_client (`python app.py --demo` in a subprocess), and the rules
app.py applies before it serves: no exposure beyond this machine without a login."""
from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time

import pytest
from gradio_client import Client, handle_file
from PIL import Image

from backend.metadata import read_settings
from tests.ui.server import ROOT, AppServer

SAMPLES = ROOT / "assets" / "samples"
SMALL = dict(width=64, height=64, num_inference_steps=5, prior_num_inference_steps=2)
OWNER_A, OWNER_B = "a" * 32, "b" * 32


def final(job):
    """The last update of a streaming job: (owner, progress html, preview, gallery, seeds)."""
    outputs = job.outputs()
    assert outputs, job.status()
    return outputs[-1]


def test_every_task_has_a_stable_api_name_with_named_parameters(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for name in ("/text2img", "/img2img", "/inpaint", "/interpolate", "/controlnet", "/estimate_depth", "/stop",
                 "/png_info", "/models_status", "/unload", "/set_memory_budget"):
        assert name in endpoints, sorted(endpoints)
    names = [p["parameter_name"] for p in endpoints["/text2img"]["parameters"]]
    assert names[:3] == ["owner", "model", "prompt"]
    assert {"width", "height", "num_inference_steps", "prior_num_inference_steps", "guidance_scale",
            "prior_guidance_scale", "seed", "batch_count", "batch_size", "scheduler"} <= set(names)
    assert {"image", "strength"} <= {p["parameter_name"] for p in endpoints["/img2img"]["parameters"]}
    assert {"weight_1", "text_1", "image_1", "kind_1", "input_count", "walk_steps"} <= \
        {p["parameter_name"] for p in endpoints["/interpolate"]["parameters"]}


def test_text_to_image_streams_progress_and_returns_the_owners_gallery(client, server):
    job = client.submit(owner=OWNER_A, prompt="a blue bird", seed=99, **SMALL, api_name="/text2img")
    job.result(timeout=120)
    outputs = job.outputs()
    progress = [o[1] for o in outputs]
    assert any("Denoising: step" in p or "Decoding" in p for p in progress)
    owner, text, preview, gallery, seeds = outputs[-1]
    assert owner == OWNER_A and 'data-state="done"' in text and seeds == "99"
    assert len(gallery) == 1 and gallery[0]["caption"] == "seed 99"
    (path,) = server.owner_images()[OWNER_A]
    assert read_settings(path)["prompt"] == "a blue bird"


def test_image_tasks_through_the_api(client, server, tmp_path):
    landscape = handle_file(str(SAMPLES / "landscape.png"))
    job = client.submit(owner=OWNER_A, prompt="x", image=landscape, strength=0.6, **SMALL, api_name="/img2img")
    job.result(timeout=120)
    assert 'data-state="done"' in final(job)[1]

    mask_path = tmp_path / "mask.png"
    mask_image = Image.new("L", (256, 256))
    mask_image.paste(255, (64, 64, 192, 192))
    mask_image.save(mask_path)
    mask = handle_file(str(mask_path))
    editor = {"background": landscape, "layers": [], "composite": None}
    job = client.submit(owner=OWNER_A, prompt="x", editor=editor, mask_upload=mask, mask_grow=2, **SMALL,
                        api_name="/inpaint")
    job.result(timeout=120)
    assert 'data-state="done"' in final(job)[1]
    settings = read_settings(server.owner_images()[OWNER_A][0])
    sent = Image.open(server.outputs / OWNER_A / settings["input_images"]["mask"])
    assert settings["mask_grow"] == 2 and sent.getbbox() == (64, 64, 192, 192)

    job = client.submit(owner=OWNER_A, input_count=2, kind_1="Text", text_1="a cat", kind_2="Image",
                        image_2=landscape, weight_1=0.3, weight_2=0.9, **SMALL, api_name="/interpolate")
    job.result(timeout=120)
    assert 'data-state="done"' in final(job)[1]
    newest = server.owner_images()[OWNER_A][0]
    settings = read_settings(newest)
    assert settings["weights"] == [0.3, 0.9] and settings["normalized_weights"] == [0.25, 0.75]

    job = client.submit(owner=OWNER_A, prompt="a room", depth=handle_file(str(SAMPLES / "depth.png")),
                        hint_source="Use my depth map", controlnet_mode="Text to image", **SMALL,
                        api_name="/controlnet")
    job.result(timeout=120)
    assert 'data-state="done"' in final(job)[1]
    settings = read_settings(server.owner_images()[OWNER_A][0])
    assert settings["task"] == "controlnet" and settings["hint_source"] == "depth map"


def test_hires_pass_variations_and_outpainting_through_the_api(client, server):
    """Issue 17, items 4-6, as a client reaches them: the page's controls are the API's parameters."""
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    names = {name: {p["parameter_name"] for p in endpoints[name]["parameters"]} for name in ("/text2img", "/inpaint")}
    assert {"hires_scale", "hires_strength", "hires_steps", "variation_seed", "variation_strength"} <= names["/text2img"]
    assert {f"outpaint_{side}" for side in ("left", "right", "top", "bottom")} | {"outpaint_blend"} <= names["/inpaint"]

    job = client.submit(owner=OWNER_A, prompt="hi-res", seed=5, hires_scale=2, hires_strength=0.5, hires_steps=4,
                        **SMALL, api_name="/text2img")
    job.result(timeout=120)
    progress = [update[1] for update in job.outputs()]
    assert 'data-state="done"' in progress[-1]
    assert any("Hi-res" in text or "hires" in text for text in progress), progress[-3:]
    newest = server.owner_images()[OWNER_A][0]
    assert Image.open(newest).size == (128, 128)
    settings = read_settings(newest)
    assert (settings["width"], settings["hires_width"], settings["hires_scale"]) == (64, 128, 2)

    seeds = []
    for strength in (0.0, 1.0):
        result = client.predict(owner=OWNER_A, prompt="vary", seed=5, variation_seed=9, variation_strength=strength,
                                **SMALL, api_name="/text2img")
        assert 'data-state="done"' in result[1]
        seeds.append(read_settings(server.owner_images()[OWNER_A][0]))
    assert seeds[1]["variation_seed"] == 9 and seeds[1]["variation_strength"] == 1.0
    plain = client.predict(owner=OWNER_A, prompt="vary", seed=9, **SMALL, api_name="/text2img")
    assert 'data-state="done"' in plain[1]
    # strength 1 is the variation seed's own image
    images = server.owner_images()[OWNER_A]
    assert Image.open(images[0]).tobytes() == Image.open(images[1]).tobytes()

    landscape = handle_file(str(SAMPLES / "landscape.png"))
    editor = {"background": landscape, "layers": [], "composite": None}
    job = client.submit(owner=OWNER_A, prompt="wider", editor=editor, outpaint_right=64, outpaint_blend=8, **SMALL,
                        api_name="/inpaint")  # no mask painted: the new area is the mask
    job.result(timeout=120)
    assert 'data-state="done"' in final(job)[1]
    newest = server.owner_images()[OWNER_A][0]
    assert Image.open(newest).size == (128, 64)
    assert read_settings(newest)["outpaint_right"] == 64


def test_estimate_depth_returns_the_photos_depth_and_controlnet_takes_a_photo_or_a_map(client, server):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert [p["parameter_name"] for p in endpoints["/estimate_depth"]["parameters"]] == ["image", "model"]
    assert "hint_source" in {p["parameter_name"] for p in endpoints["/controlnet"]["parameters"]}
    photo = handle_file(str(SAMPLES / "landscape.png"))
    path = client.predict(image=photo, api_name="/estimate_depth")
    depth = Image.open(path)
    assert depth.size == Image.open(SAMPLES / "landscape.png").size and len(set(depth.convert("RGB").getpixel(
        (9, 9)))) == 1  # grey

    # a photo (hint_source left out: the page's default, "Estimate depth from this photo"): its depth is
    # estimated and kept with the inputs
    job = client.submit(owner=OWNER_B, prompt="a room", depth=photo, **SMALL, api_name="/controlnet")
    job.result(timeout=120)
    assert 'data-state="done"' in final(job)[1]
    settings = read_settings(server.owner_images()[OWNER_B][0])
    assert settings["hint_source"] == "photo"
    stored = Image.open(server.outputs / OWNER_B / settings["input_images"]["estimated_depth"])
    assert stored.size == depth.size

    # a map: used as it is; a colour photo given as one is done, with a note that it does not look like one
    job = client.submit(owner=OWNER_B, prompt="a room", depth=photo, hint_source="Use my depth map", **SMALL,
                        api_name="/controlnet")
    job.result(timeout=120)
    assert "does not look like a depth map" in final(job)[1]
    settings = read_settings(server.owner_images()[OWNER_B][0])
    assert settings["hint_source"] == "depth map" and "estimated_depth" not in settings["input_images"]


def test_a_photo_too_small_to_estimate_is_refused_naming_the_field(client, tmp_path):
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (10, 64), "red").save(tiny)
    with pytest.raises(Exception, match="`image` is 10x64 pixels, too small to estimate depth"):
        client.predict(image=handle_file(str(tiny)), api_name="/estimate_depth")
    with pytest.raises(Exception, match="hint.* too small to estimate depth"):
        client.predict(owner=OWNER_A, prompt="x", depth=handle_file(str(tiny)), **SMALL,
                       api_name="/controlnet")


def test_bad_settings_come_back_as_errors_naming_the_field(client):
    with pytest.raises(Exception, match="width must be a multiple of 64"):
        client.predict(owner=OWNER_A, prompt="x", width=100, height=64, api_name="/text2img")
    with pytest.raises(Exception, match="image is required"):
        client.predict(owner=OWNER_A, prompt="x", **SMALL, api_name="/img2img")


SAMPLER_MENU = ["Repository default", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE Karras", "UniPC", "Euler",
                "Euler a", "DDIM", "DDPM"]


def page_component(client, elem_id: str) -> dict:
    (component,) = [c for c in client.config["components"] if c.get("props", {}).get("elem_id") == elem_id]
    return component["props"]


def test_the_sampler_menu_and_the_presets(client):
    """One sampler menu with the names people know, the repository default named after what the repo ships;
    the docs' settings and the Fast preset one click each, beside the steps slider and its time note."""
    menu = page_component(client, "scheduler")
    assert menu["label"] == "Sampler" and menu["value"] == "Repository default"
    assert [value for _, value in menu["choices"]] == SAMPLER_MENU
    assert menu["choices"][0][0] == "Repository default (DDPM)"  # the 2.2 decoder repo ships DDPM
    assert page_component(client, "preset-fast")["value"] == "Fast: DPM++ 2M Karras, 20 steps"
    assert page_component(client, "preset-docs")["value"] == "Docs' settings"
    assert "A time estimate appears after a first image" in page_component(client, "steps")["info"]


def test_samplers_through_the_api_are_stored_in_the_png(client, server):
    """The API takes the menu's names, in any case; the PNG's A1111 text and JSON chunk store the name, and PNG
    info reads it back. An unknown name is refused with the list of names, naming the field."""
    for given, stored, api in (("DPM++ 2M Karras", "DPM++ 2M Karras", "/text2img"), ("euler a", "Euler a", "/img2img")):
        extra = {"image": handle_file(str(SAMPLES / "landscape.png")), "strength": 0.6} if api == "/img2img" else {}
        job = client.submit(owner=OWNER_A, prompt="a sampler", scheduler=given, seed=5, **SMALL, **extra, api_name=api)
        job.result(timeout=120)
        assert 'data-state="done"' in final(job)[1]
        newest = server.owner_images()[OWNER_A][0]
        assert read_settings(newest)["scheduler"] == stored
        parameters, settings_json = client.predict(file=handle_file(str(newest)), api_name="/png_info")
        assert f"Steps: 5, Sampler: {stored}, CFG scale" in parameters and f'"scheduler": "{stored}"' in settings_json
    with pytest.raises(Exception, match=re.escape(
            "scheduler must be one of ['Repository default', 'DPM++ 2M', 'DPM++ 2M Karras', 'DPM++ 2M SDE Karras', "
            "'UniPC', 'Euler', 'Euler a', 'DDIM', 'DDPM'] (any case); got 'Heun'")):
        client.predict(owner=OWNER_A, prompt="x", scheduler="Heun", **SMALL, api_name="/text2img")


def test_step_times_estimate_a_run_against_the_docs_steps(engine):
    """The steps slider's note: from the model's last finished job (its seconds per prior step, UNet step and
    decode), a run of N steps, scaled by pixels and guidance, against the docs' 50 (2.2); before any job, the
    share of steps. The presets: Fast = DPM++ 2M Karras at 20 steps; the docs' settings restore the sampler."""
    from backend.progress import StepTimes
    from backend.requests import Text2ImageRequest
    from kandinsky_ui import page_config
    from kandinsky_ui.handlers import Studio
    from kandinsky_ui.page import Page
    from kandinsky_ui.render import steps_eta

    times = StepTimes()
    measured = Text2ImageRequest(model="m", width=768, height=768, num_inference_steps=50)
    times.record(measured, {"prior": 1.5, "denoise": 10.9, "decode": 22.0})
    fast = Text2ImageRequest(model="m", width=768, height=768, num_inference_steps=20)
    assert times.estimate(fast, text_steps=25) == pytest.approx(25 * 1.5 + 20 * 10.9 + 22.0)
    assert times.estimate(fast, text_steps=25, denoise_steps=50) == pytest.approx(25 * 1.5 + 50 * 10.9 + 22.0)
    half = Text2ImageRequest(model="m", width=768, height=384, num_inference_steps=20, guidance_scale=1.0,
                             batch_count=2)
    assert times.estimate(half, text_steps=50) == pytest.approx(50 * 1.5 + 2 * (20 * 10.9 / 4 + 22.0 / 2))
    assert times.estimate(Text2ImageRequest(model="other"), text_steps=25) is None
    assert steps_eta(20, 50, 279.0, 606.0) == ("≈ 4 min 39 s with 20 steps; the docs' 50 steps: 10 min 06 s "
                                               "(saves 5 min 27 s), once the models are loaded.")
    assert steps_eta(20, 50, None, None).startswith("20 steps: 60% fewer UNet evaluations than the docs' 50.")

    config = page_config(engine.models)
    studio = Studio(engine, config)
    page = Page(config, studio.gallery, studio.step_times)
    model = "kandinsky-2-2-demo"
    args = (model, 20, 64, 64, 4.0, 1, 1, 3, "")
    assert "A time estimate appears" in page.steps_info(*args)["info"]
    async def run():
        async for _ in studio.text2img(OWNER_A, model=model, prompt="timed", width=64, height=64,
                                       num_inference_steps=4, prior_num_inference_steps=3):
            pass
    asyncio.run(run())
    assert studio.step_times.measured(model)
    info = page.steps_info(*args)["info"]
    assert info.startswith("≈ ") and "with 20 steps; the docs' 50 steps: " in info and "(saves " in info
    assert page.fast_settings() == (20, "DPM++ 2M Karras")
    steps, sampler = page.docs_settings(model)[2], page.docs_settings(model)[-1]
    assert (steps, sampler) == (config.defaults["num_inference_steps"], "Repository default")  # demo: its 20


def test_stop_through_the_api_keeps_a_partial_image(client, server):
    job = client.submit(owner=OWNER_B, prompt="slow", **dict(SMALL, num_inference_steps=200, width=256,
                                                              height=256), api_name="/text2img")
    while not any("Denoising: step" in o[1] for o in job.outputs()):
        assert not job.done(), job.outputs()[-1:]
        time.sleep(0.1)
    assert "Stopping" in client.predict(owner=OWNER_B, api_name="/stop")
    job.result(timeout=60)
    owner, text, _, gallery, _ = final(job)
    assert 'data-state="stopped"' in text and "partial" in text
    assert gallery[0]["caption"].endswith("partial")
    assert "Nothing of yours is running" in client.predict(owner=OWNER_B, api_name="/stop")


def test_owners_only_ever_get_their_own_images(client, server):
    job = client.submit(owner=OWNER_B, prompt="b's image", **SMALL, api_name="/text2img")
    job.result(timeout=120)
    gallery = final(job)[3]
    assert isinstance(gallery, list), final(job)
    b_names = {item["image"].rsplit("/", 1)[-1] for item in gallery}
    a_names = {p.name for p in server.owner_images()[OWNER_A]}
    assert b_names and not (b_names & a_names)
    # an API client without an owner id gets a fresh one, and an empty gallery of its own
    job = client.submit(prompt="anonymous", **SMALL, api_name="/text2img")
    job.result(timeout=120)
    owner, _, _, gallery, _ = final(job)
    assert owner not in (OWNER_A, OWNER_B) and len(owner) == 32 and len(gallery) == 1


def test_png_info_and_models_panel(client, server):
    path = server.owner_images()[OWNER_A][-1]  # the first image, the blue bird
    parameters, settings_json = client.predict(file=handle_file(str(path)), api_name="/png_info")
    assert parameters.startswith("a blue bird\nSteps: 5") and '"seed": 99' in settings_json
    status = client.predict(api_name="/models_status")
    assert "Device" in status and "unet" in status and "prior" in status
    status = client.predict(text="1MB", api_name="/set_memory_budget")
    assert "Budget set to 1.0 MB" in status and "Evicted" in status
    status = client.predict(api_name="/unload")
    assert "No model loaded yet" in status
    client.predict(text="auto", api_name="/set_memory_budget")


def run_app(*args, timeout=60):
    return subprocess.run([sys.executable, str(ROOT / "app.py"), "--demo", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT / ".."),
                                                          "PYTHONPATH": str(ROOT)})


def test_refuses_to_serve_beyond_this_machine_without_a_login():
    result = run_app("--host", "0.0.0.0")
    assert result.returncode != 0 and "refusing to serve on 0.0.0.0" in result.stderr
    result = run_app("--share")
    assert result.returncode != 0 and "gradio.live" in result.stderr and "--auth" in result.stderr
    result = run_app("--host", "0.0.0.0", "--auth", "nopassword")
    assert result.returncode != 0 and "USER:PASSWORD" in result.stderr


def test_login_is_required_when_given(tmp_path):
    auth_file = tmp_path / "logins.txt"
    auth_file.write_text("# users\nalice:wonderland\n")
    server = AppServer(tmp_path, extra_args=["--host", "0.0.0.0", "--auth-file", str(auth_file)])
    try:
        with pytest.raises(Exception):
            Client(server.url, verbose=False)
        client = Client(server.url, auth=("alice", "wonderland"), verbose=False)
        assert "Device" in client.predict(api_name="/models_status")
    finally:
        server.stop()


BACKEND = ("backend.engine, backend.jobs, backend.tasks, backend.manager, backend.metadata, backend.previews, "
           "backend.demo, backend.pipelines")


def test_front_end_never_imports_mindspore_and_backend_never_imports_gradio():
    check = ("import sys, kandinsky_ui; assert 'mindspore' not in sys.modules, 'kandinsky_ui imported mindspore';"
             f"import {BACKEND}; assert 'mindspore' in sys.modules")
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    check = f"import sys, {BACKEND}; assert 'gradio' not in sys.modules, 'the backend imported gradio'"
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    # the plain-data modules the page shares with the backend load without MindSpore
    check = ("import sys, backend.families, backend.requests, backend.events, backend.limits, backend.memory; "
             "assert 'mindspore' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_page_talks_to_the_engine_only():
    """kandinsky_ui never reaches around the Engine (backend/engine.py) to its parts, and only
    backend/families.py knows which family is which."""
    import re

    for path in (ROOT / "kandinsky_ui").glob("*.py"):
        source = path.read_text()
        assert not re.search(r"backend\.(manager|tasks|jobs|engine|demo|pipelines)\b|check_task\(|\.spec\(", source), path
    for path in [ROOT / "app.py", *(ROOT / "backend").rglob("*.py"), *(ROOT / "kandinsky_ui").glob("*.py")]:
        if path.name != "families.py":
            assert not re.search(r"family\s*(==|!=)|\.name\s*==\s*[\"']\d", path.read_text()), path


def test_without_demo_the_published_repos_are_found_in_models_dir(tmp_path):
    """The real-model path, offline: folders named like the Hub repos under --models-dir are used."""
    from backend import demo

    spec = demo.ensure_demo_models(tmp_path / "built")
    models = tmp_path / "models"
    models.mkdir()
    for role, name in (("prior", "kandinsky-2-2-prior"), ("decoder", "kandinsky-2-2-decoder"),
                       ("inpaint", "kandinsky-2-2-decoder-inpaint"), ("controlnet", "kandinsky-2-2-controlnet-depth")):
        (models / name).symlink_to(spec.repos[role], target_is_directory=True)
    server = AppServer(tmp_path, extra_args=["--offline", "--models-dir", str(models)], demo=False)
    try:
        client = Client(server.url, verbose=False)
        result = client.predict(owner=OWNER_A, prompt="x", **SMALL, api_name="/text2img")
        assert 'data-state="done"' in result[1]
        settings = read_settings(server.owner_images()[OWNER_A][0])
        assert settings["model"] == "kandinsky-2-2"
        # the --models-dir folder was used (the demo's own build names it "decoder"); the PNG names the
        # folder, never the server's path to it (issue 16)
        assert settings["repos"]["decoder"] == "kandinsky-2-2-decoder"
    finally:
        server.stop()


def test_a_waiting_job_nobody_follows_any_more_is_dropped(engine):
    """A tab closed while its job waits in line: Gradio closes the handler, the job leaves the queue.
    (An in-process Engine on the demo models; a long job holds the device.)"""
    from backend.events import Cancelled
    from backend.requests import Text2ImageRequest
    from kandinsky_ui import page_config
    from kandinsky_ui.handlers import Studio

    studio = Studio(engine, page_config(engine.models))
    first = engine.submit(Text2ImageRequest(model="kandinsky-2-2-demo", width=64, height=64, num_inference_steps=200,
                                            prior_num_inference_steps=2), OWNER_A)

    async def follow_then_leave():
        stream = studio.text2img(OWNER_B, prompt="waiting", **SMALL)
        owner, progress, *_ = await anext(stream)
        assert owner == OWNER_B and "1 job ahead" in progress
        (waiting,) = engine.jobs_of(OWNER_B)
        await stream.aclose()  # what Gradio does when the client cancels its request
        return waiting
    waiting = asyncio.run(follow_then_leave())
    assert isinstance(waiting.wait(5), Cancelled) and engine.jobs_of(OWNER_B) == []
    assert engine.cancel(OWNER_A) == 1 and isinstance(first.wait(30), Cancelled)
