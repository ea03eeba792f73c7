"""Kandinsky Studio in a real browser, on the demo models (64x64, a few steps).

Covers: every tab generates an image, a preview appears before the final image, Stop ends a run
early with a partial result, a mask painted with the mouse reaches the backend as painted,
sliders change the interpolation weights sent, PNG info round-trips into the controls, a sampler
and the Fast preset reach the PNG (and the steps note estimates the time they save), two
browser contexts never see each other's images, several sessions at once all finish, and a
screenshot of every tab (tests/ui/screenshots-tmp/).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from backend.metadata import read_settings

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "assets" / "samples"
SCREENSHOTS = ROOT / "tests" / "ui" / "screenshots-tmp"

WATCH_JS = """() => {
  window.__ks = [];
  const log = (kind, value) => window.__ks.push([performance.now(), kind, value]);
  const count = () => document.querySelectorAll('#gallery .gallery-item').length;
  window.__ksCount = count();
  window.__ksPreview = null;
  window.__ksProgress = '';
  new MutationObserver(() => {
    const img = document.querySelector('#preview img');
    const src = img ? img.getAttribute('src') : null;
    if (src && src !== window.__ksPreview) { window.__ksPreview = src; log('preview', src); }
    const n = count();
    if (n !== window.__ksCount) { window.__ksCount = n; log('gallery', n); }
    const text = (document.querySelector('#progress') || {}).innerText || '';
    if (text !== window.__ksProgress) { window.__ksProgress = text; log('progress', text); }
  }).observe(document.body, {subtree: true, childList: true, attributes: true, characterData: true});
}"""


# ------------------------------------------------------------------------------ helpers


def set_slider(page, elem_id: str, value) -> None:
    """Move a slider as a user would (the range input fires input/change)."""
    page.locator(f"#{elem_id} input[type=range]").fill(str(value))


def set_number(page, elem_id: str, value) -> None:
    field = page.locator(f"#{elem_id} input[type=number]")
    field.fill(str(value))
    field.press("Enter")


def small_run(page, steps: int = 5, prior_steps: int = 2, width: int = 64, height: int = 64) -> None:
    set_slider(page, "width", width)
    set_slider(page, "height", height)
    set_slider(page, "steps", steps)
    set_slider(page, "prior-steps", prior_steps)


def open_tab(page, label: str) -> None:
    page.locator("button[role=tab]", has_text=label).first.click()


def gallery_count(page) -> int:
    return page.locator("#gallery .gallery-item").count()


def generate(page, task: str, timeout: float = 120_000) -> list:
    """Click Generate on a tab, wait for the new image; returns the page's event log."""
    before = gallery_count(page)
    page.evaluate(WATCH_JS)
    # the action bar's Generate runs the selected tab's task (its hidden button carries the API event)
    assert page.locator(f"#tab-{task}").is_visible(), f"the {task} tab is not the selected one"
    page.click("#generate")
    page.wait_for_function("""n => document.querySelectorAll('#gallery .gallery-item').length > n
                               || document.querySelector('#progress [data-state=failed]')
                               || document.querySelector('.toast-body')""", arg=before, timeout=timeout)
    failure = page.evaluate("""() => (document.querySelector('#progress [data-state=failed]') || {}).innerText
                                     || (document.querySelector('.toast-body') || {}).innerText""")
    assert not failure, f"generation failed: {failure}"
    page.wait_for_selector("#progress [data-state=done]", timeout=timeout)
    return page.evaluate("window.__ks")


def assert_preview_before_final(log: list) -> None:
    gallery_at = next(t for t, kind, _ in log if kind == "gallery")
    previews = [t for t, kind, _ in log if kind == "preview"]
    assert previews and previews[0] < gallery_at, log
    assert len(previews) >= 2, "a step preview and then the final image"
    # the page showed step progress (fast steps may be coalesced into the decode step's update)
    assert any(kind == "progress" and re.search(r"Denoising: step|Decoding the image", text) for _, kind, text in log)


EDITOR_SHOWS_IMAGE_JS = """side => {
    const zoom = document.querySelector('#inpaint-editor .zoom-number');
    const canvas = document.querySelector('#inpaint-editor canvas');
    if (!zoom || !canvas) return false;
    const shown = side * parseFloat(zoom.innerText) / 100;
    const box = canvas.getBoundingClientRect();
    const room = Math.min(box.width, box.height);
    return shown <= room && shown >= 0.7 * room;
}"""


def upload_to_editor(page, path: Path, side: int) -> None:
    """Upload into the ImageEditor and wait until it shows the image, zoomed to fit.

    The editor first shows a blank canvas, then the image: painting earlier would paint on the blank
    canvas. A file chosen while the editor is still mounting can be dropped, so it is chosen again.
    """
    page.locator("#inpaint-editor", has_text="Upload an image").wait_for()
    for _ in range(3):
        with page.expect_file_chooser() as chooser:  # as a user does: click the upload area, pick the file
            page.locator("#inpaint-editor").get_by_text("Upload an image").click()
        chooser.value.set_files(str(path))
        try:
            page.wait_for_function(EDITOR_SHOWS_IMAGE_JS, arg=side, timeout=10_000)
            return
        except Exception:  # playwright TimeoutError: try the upload again
            continue
    raise AssertionError("the image editor never showed the uploaded image")


def newest_image(app_server) -> tuple[Path, dict]:
    paths = [p for files in app_server.owner_images().values() for p in files]
    newest = max(paths, key=lambda p: p.stat().st_mtime)
    return newest, read_settings(newest)


def screenshot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


# -------------------------------------------------------------------------------- tests


def test_text_to_image_shows_previews_then_the_image(page, app_server):
    small_run(page, steps=8)
    page.fill("#prompt textarea", "a red fox in the snow")
    set_number(page, "seed", 1234)
    log = generate(page, "text2img")
    assert_preview_before_final(log)
    assert "Done: 1 image" in page.locator("#progress").inner_text()
    assert page.locator("#seeds textarea").input_value() == "1234"
    assert page.locator("#gallery .caption-label").first.inner_text() == "seed 1234"
    path, settings = newest_image(app_server)
    assert settings["prompt"] == "a red fox in the snow" and settings["seed"] == 1234
    assert Image.open(path).size == (64, 64)
    screenshot(page, "text2img")
    # select the image and send it to image-to-image
    page.locator("#gallery .thumbnail-item").first.click()
    page.wait_for_function("() => document.querySelector('#selected').innerText.includes('seed 1234')")
    page.click("#send-img2img")
    page.wait_for_selector("#img2img-image img")
    assert page.locator("#tab-img2img").is_visible()


def test_image_to_image(page, app_server):
    small_run(page, steps=8, width=128)
    open_tab(page, "Image to image")
    page.set_input_files("#img2img-image input[type=file]", str(SAMPLES / "landscape.png"))
    set_slider(page, "img2img-strength", 0.5)
    log = generate(page, "img2img")
    assert_preview_before_final(log)
    path, settings = newest_image(app_server)
    assert settings["task"] == "img2img" and settings["strength"] == 0.5
    assert Image.open(path).size == (128, 64)
    screenshot(page, "img2img")


def test_a_painted_mask_reaches_the_backend_as_painted(page, app_server):
    small_run(page, steps=6)
    open_tab(page, "Inpaint")
    upload_to_editor(page, SAMPLES / "landscape.png", 256)
    zoom = float(page.locator("#inpaint-editor .zoom-number").inner_text().strip("%")) / 100
    page.click("#inpaint-editor button[aria-label='Brush']")
    canvas = page.locator("#inpaint-editor canvas").first.bounding_box()
    cx, cy = canvas["x"] + canvas["width"] / 2, canvas["y"] + canvas["height"] / 2  # the image is centred
    # a horizontal stroke through the middle, 100 image pixels long
    half = 50 * zoom
    page.mouse.move(cx - half, cy)
    page.mouse.down()
    for i in range(21):
        page.mouse.move(cx - half + i * half / 10, cy)
    page.mouse.up()
    # the overlay (computed by the backend from the editor's value) shows the painted region in red
    page.wait_for_selector("#mask-overlay img", timeout=30_000)
    log = generate(page, "inpaint")
    assert_preview_before_final(log)
    path, settings = newest_image(app_server)
    assert settings["task"] == "inpaint"
    mask = np.asarray(Image.open(path.parent / settings["input_images"]["mask"]).convert("L")) > 127
    assert mask.shape == (256, 256)
    rows, cols = np.nonzero(mask)
    # painted where the stroke went (centre row, columns 78..178, plus the brush radius) and nowhere else
    assert mask[128, 128] and mask[128, 90] and mask[128, 166]
    assert not mask[128, 20] and not mask[128, 236] and not mask[40, 128] and not mask[216, 128]
    radius = 24  # gr.Brush(default_size=24), in image pixels
    assert abs(cols.min() - (78 - radius)) <= 6 and abs(cols.max() - (178 + radius)) <= 6, (cols.min(), cols.max())
    assert abs(rows.max() - rows.min() - 2 * radius) <= 8, (rows.min(), rows.max())
    assert abs((rows.min() + rows.max()) / 2 - 128) <= 4
    screenshot(page, "inpaint")


def test_interpolation_weights_follow_the_sliders(page, app_server):
    small_run(page, steps=6)
    open_tab(page, "Interpolate")
    set_slider(page, "input-count", 3)
    page.wait_for_selector("#interp-row-3", state="visible")
    page.fill("#text-1 textarea", "a cat")
    page.fill("#text-2 textarea", "a lighthouse")
    page.locator("#kind-3 label", has_text="Image").click()
    page.set_input_files("#image-3 input[type=file]", str(SAMPLES / "portrait.png"))
    set_slider(page, "weight-1", 0.2)
    set_slider(page, "weight-2", 0.6)
    set_slider(page, "weight-3", 0.2)
    page.wait_for_function("() => document.querySelector('#normalized-weights').innerText.includes('0.60')")
    assert re.search(r"1:\s*0\.20.*2:\s*0\.60.*3:\s*0\.20", page.locator("#normalized-weights").inner_text())
    log = generate(page, "interpolate")
    assert_preview_before_final(log)
    _, settings = newest_image(app_server)
    assert settings["task"] == "interpolate"
    assert settings["weights"] == [0.2, 0.6, 0.2]
    assert np.allclose(settings["normalized_weights"], [0.2, 0.6, 0.2])
    assert settings["inputs"] == ["a cat", "a lighthouse", None]
    assert "inputs[2]" in settings["input_images"]
    screenshot(page, "interpolate")


def test_controlnet_depth_from_a_photo_is_shown_before_generating_and_kept_with_the_inputs(page, app_server):
    small_run(page, steps=4)
    open_tab(page, "ControlNet depth")
    assert page.locator("#hint-source input:checked").input_value() == "Estimate depth from this photo"
    page.set_input_files("#depth input[type=file]", str(SAMPLES / "landscape.png"))
    page.wait_for_selector("#hint img")  # the estimated depth, at the output size
    page.wait_for_function("() => document.querySelector('#hint-note').innerText.includes('Estimated depth')")
    shown = page.locator("#hint img").get_attribute("src")
    generate(page, "controlnet")
    path, settings = newest_image(app_server)
    assert settings["hint_source"] == "photo" and {"hint", "estimated_depth"} <= set(settings["input_images"])
    depth = Image.open(path.parent / settings["input_images"]["estimated_depth"])
    assert depth.mode == "L" and depth.size == Image.open(SAMPLES / "landscape.png").size
    assert page.locator("#hint img").get_attribute("src") == shown  # generating left the view as it was

    # the same photo as "my depth map": a warning beside the hint
    page.locator("#hint-source label", has_text="Use my depth map").click()
    page.wait_for_function("() => document.querySelector('#hint-note').innerText.includes('does not look like a "
                           "depth map')")
    # a photo too small for the estimator: the error names the field
    page.locator("#hint-source label", has_text="Estimate depth from this photo").click()
    tiny = app_server.workdir / "tiny.png"
    Image.new("RGB", (10, 64), "red").save(tiny)
    page.set_input_files("#depth input[type=file]", str(tiny))
    page.wait_for_selector(".toast-body")
    assert "`depth` is 10x64 pixels, too small to estimate depth" in page.locator(".toast-body").first.inner_text()


def test_controlnet_depth_text_and_image_modes(page, app_server):
    small_run(page, steps=6)
    open_tab(page, "ControlNet depth")
    page.locator("#hint-source label", has_text="Use my depth map").click()
    page.set_input_files("#depth input[type=file]", str(SAMPLES / "depth.png"))
    page.wait_for_selector("#hint img")  # the hint the model sees, at the output size
    log = generate(page, "controlnet")
    assert_preview_before_final(log)
    _, settings = newest_image(app_server)
    assert settings["task"] == "controlnet" and settings["mode"] == "text2img"
    page.locator("#controlnet-mode label", has_text="Image to image").click()
    page.set_input_files("#controlnet-image input[type=file]", str(SAMPLES / "landscape.png"))
    generate(page, "controlnet")
    _, settings = newest_image(app_server)
    assert settings["mode"] == "img2img" and "image" in settings["input_images"]
    screenshot(page, "controlnet")


def test_stop_ends_the_run_early_and_keeps_a_partial_image(page, app_server):
    small_run(page, steps=200, width=256, height=256)
    page.evaluate(WATCH_JS)
    page.click("#generate")
    page.wait_for_function("() => /Denoising: step ([3-9]|\\d\\d)/.test(document.querySelector('#progress').innerText)")
    page.click("#stop")
    try:
        page.wait_for_selector("#progress [data-state=stopped], #progress [data-state=done], "
                               "#progress [data-state=failed]", timeout=30_000)
    except Exception as error:
        log = page.evaluate("window.__ks")
        raise AssertionError(f"no end state; progress log: {[e[2] for e in log if e[1] == 'progress'][-6:]}") \
            from error
    text = page.locator("#progress").inner_text()
    assert page.locator("#progress [data-state=stopped]").count() == 1, text
    latency = float(re.search(r"Stopped ([\d.]+) s after the click", text).group(1))
    step = int(re.search(r"at step (\d+)/200", text).group(1))
    assert step < 200 and "partial" in text
    assert latency < 2.0, text  # one 256x256 step of the demo UNet is well under a second
    page.wait_for_function("() => document.querySelectorAll('#gallery .gallery-item').length > 0")
    assert "partial" in page.locator("#gallery .caption-label").first.inner_text()
    path, settings = newest_image(app_server)
    assert settings["partial"] is True and settings["stopped_at_step"] == step
    assert path.name.endswith("-partial.png") and Image.open(path).size == (256, 256)


def test_a_reload_during_a_run_reattaches_to_it(page, app_server):
    small_run(page, steps=200, width=256, height=256)
    page.fill("#prompt textarea", "a reattached fox")
    page.click("#generate")
    page.wait_for_function("() => /Denoising: step/.test(document.querySelector('#progress').innerText)")
    page.reload()
    page.wait_for_selector("#stop")
    # the controls come back with the job (before: a blank prompt)
    page.wait_for_function("() => document.querySelector('#prompt textarea').value === 'a reattached fox'")
    assert page.locator("#steps input[type=number]").input_value() == "200"
    # the new page follows the same job: its steps keep coming, and Stop still reaches it
    page.wait_for_function("() => /Denoising: step/.test(document.querySelector('#progress').innerText)")
    page.click("#stop")
    page.wait_for_selector("#progress [data-state=stopped]", timeout=30_000)
    page.wait_for_function("() => document.querySelectorAll('#gallery .gallery-item').length === 1")
    assert "partial" in page.locator("#gallery .caption-label").first.inner_text()


def test_png_info_round_trips_into_the_controls(page, app_server):
    small_run(page, steps=5, prior_steps=3)
    page.fill("#prompt textarea", "a green owl, watercolour")
    page.fill("#negative-prompt input, #negative-prompt textarea", "blurry")
    set_number(page, "seed", 4321)
    set_slider(page, "guidance", 6)
    generate(page, "text2img")
    path, _ = newest_image(app_server)
    # change the controls, then restore them from the PNG
    page.fill("#prompt textarea", "something else")
    set_number(page, "seed", -1)
    set_slider(page, "steps", 17)
    open_tab(page, "PNG info")
    page.set_input_files("#png-file input[type=file]", str(path))
    page.wait_for_function("() => document.querySelector('#png-parameters textarea').value.includes('Seed: 4321')")
    parameters = page.locator("#png-parameters textarea").input_value()
    assert parameters.startswith("a green owl, watercolour\nNegative prompt: blurry\nSteps: 5")
    page.click("#png-apply")
    page.wait_for_function("() => document.querySelector('#prompt textarea').value === 'a green owl, watercolour'")
    assert page.locator("#seed input").input_value() == "4321"
    assert page.locator("#steps input[type=number]").input_value() == "5"
    assert page.locator("#guidance input[type=number]").input_value() == "6"
    assert page.locator("#tab-text2img").is_visible()  # back on the task's tab
    open_tab(page, "PNG info")
    screenshot(page, "pnginfo")


def choose_sampler(page, name: str) -> None:
    """Type into the menu (it filters its options, as a user narrows it down) and pick the option."""
    menu = page.locator("#scheduler input")
    menu.click()
    menu.fill(name)
    page.get_by_role("option", name=name, exact=True).click()
    page.wait_for_function("name => document.querySelector('#scheduler input').value === name", arg=name)


def test_a_sampler_and_the_fast_preset(page, app_server):
    """Pick a sampler from the menu, generate: the PNG says which. The Fast preset sets DPM++ 2M Karras and 20
    steps in one click, and after a run the steps slider's note gives the time against the docs' 50 steps;
    the docs' settings put the repository's sampler back, and PNG info restores the stored one."""
    small_run(page, steps=4)
    assert page.locator("#scheduler input").input_value() == "Repository default (DDPM)"  # the label shown
    choose_sampler(page, "Euler a")
    generate(page, "text2img")
    _, settings = newest_image(app_server)
    assert settings["scheduler"] == "Euler a"

    page.click("#preset-fast")
    page.wait_for_function("() => document.querySelector('#scheduler input').value === 'DPM++ 2M Karras'")
    page.wait_for_function("() => document.querySelector('#steps input[type=number]').value === '20'")
    note = page.locator("#steps")
    page.wait_for_function("() => document.querySelector('#steps').innerText.includes('saves')")
    assert re.search(r"≈ .* with 20 steps; the docs' 50 steps: .* \(saves .*\)", note.inner_text()), note.inner_text()
    generate(page, "text2img")
    path, settings = newest_image(app_server)
    assert settings["scheduler"] == "DPM++ 2M Karras" and settings["num_inference_steps"] == 20
    screenshot(page, "samplers")

    page.click("#preset-docs")
    page.wait_for_function("() => document.querySelector('#scheduler input').value === 'Repository default (DDPM)'")
    open_tab(page, "PNG info")
    page.set_input_files("#png-file input[type=file]", str(path))
    page.wait_for_function("() => document.querySelector('#png-parameters textarea').value"
                           ".includes('Sampler: DPM++ 2M Karras')")
    page.click("#png-apply")
    page.wait_for_function("() => document.querySelector('#scheduler input').value === 'DPM++ 2M Karras'")


def test_two_browser_contexts_never_see_each_others_images(browser, app_server):
    def open_page():
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(app_server.url)
        page.wait_for_selector("#generate")
        return context, page

    context_a, a = open_page()
    context_b, b = open_page()
    try:
        for page in (a, b):
            small_run(page, steps=4)
        a.fill("#prompt textarea", "alpha")
        generate(a, "text2img")
        a_images = a.locator("#gallery img").evaluate_all("els => els.map(e => e.getAttribute('alt'))")
        assert len(a_images) == 1
        assert gallery_count(b) == 0
        b.evaluate(WATCH_JS)
        b.fill("#prompt textarea", "beta")
        generate(b, "text2img")
        assert gallery_count(b) == 1 and gallery_count(a) == 1
        # b never showed a's preview or image, and a reload of a brings back a's image only
        a.reload()
        a.wait_for_function("() => document.querySelectorAll('#gallery .gallery-item').length === 1")
        owners = {a.locator("#owner textarea").input_value(), b.locator("#owner textarea").input_value()}
        assert len(owners) == 2
        by_owner = app_server.owner_images()
        for owner in owners:
            assert len(by_owner[owner]) == 1
        prompts = {read_settings(by_owner[o][0])["prompt"] for o in owners}
        assert prompts == {"alpha", "beta"}
        assert a.locator("#gallery img").first.get_attribute("alt") == a_images[0]
    finally:
        context_a.close()
        context_b.close()


def test_several_sessions_at_once_all_finish_and_see_their_place_in_line(browser, app_server):
    contexts, pages = [], []
    try:
        for _ in range(3):
            context = browser.new_context(viewport={"width": 1200, "height": 900})
            page = context.new_page()
            page.set_default_timeout(120_000)
            page.goto(app_server.url)
            page.wait_for_selector("#generate")
            small_run(page, steps=20)
            page.evaluate(WATCH_JS)
            contexts.append(context), pages.append(page)
        for page in pages:
            page.click("#generate")
        for page in pages:
            page.wait_for_selector("#progress [data-state=done]")
            assert gallery_count(page) == 1
        logs = [page.evaluate("window.__ks") for page in pages]
        assert any("Waiting in line" in text for log in logs for _, kind, text in log if kind == "progress")
    finally:
        for context in contexts:
            context.close()


def test_models_panel_shows_loaded_components_and_unloads(page, app_server):
    open_tab(page, "Models")
    page.click("#models-refresh")
    page.wait_for_function("() => document.querySelector('#models-status').innerText.includes('unet')")
    status = page.locator("#models-status").inner_text()
    assert "Device CPU" in status and "float32" in status and "movq" in status
    screenshot(page, "models")
    # two steps: the first click only asks (before: any click unloaded every user's models at once)
    page.click("#models-unload")
    page.locator("#models-unload-confirm").wait_for(state="visible")
    assert "unet" in page.locator("#models-status").inner_text()
    page.click("#models-unload-cancel")
    page.locator("#models-unload-confirm").wait_for(state="hidden")
    page.click("#models-unload")
    page.click("#models-unload-confirm")
    page.wait_for_function("() => document.querySelector('#models-status').innerText.includes('No model loaded')")


def test_demo_banner_and_api_names(page, app_server):
    assert "Demo mode" in page.locator("#demo-banner").inner_text()
    info = json.loads(page.evaluate("async () => JSON.stringify(await (await fetch('gradio_api/info')).json())"))
    assert {"/text2img", "/img2img", "/inpaint", "/interpolate", "/controlnet", "/stop", "/png_info"} <= \
        set(info["named_endpoints"])
