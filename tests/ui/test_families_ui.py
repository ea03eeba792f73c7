"""Kandinsky 2.1 and 3 in a real browser (demo models): one run per tab each family offers, and
the tabs it does not offer say why, with their Generate button off."""
from __future__ import annotations

from PIL import Image

from tests.ui.test_studio import (SAMPLES, assert_preview_before_final, generate, newest_image, open_tab,
                                  screenshot, set_slider, small_run, upload_to_editor)

LONG_PROMPT = "a red cat " + "in the snowy forest " * 40


def select_model(page, label: str) -> None:
    page.locator("#model input").click()
    page.locator("ul[role=listbox] li", has_text=label).first.click()
    page.wait_for_function("label => document.querySelector('#model input').value.startsWith(label)", arg=label)


def assert_unavailable(page, task: str, reason: str) -> None:
    note = page.locator(f"#unavailable-{task}")
    note.wait_for(state="visible")
    assert reason in note.inner_text()
    page.wait_for_function("s => document.querySelector(s) && document.querySelector(s).disabled",
                           arg=f"#generate-{task}", timeout=10_000)  # may take a render after the note


def test_kandinsky_2_1_runs_on_its_four_tabs_and_controlnet_says_2_2_only(page, app_server):
    select_model(page, "Kandinsky 2.1 demo")
    small_run(page, steps=5)
    open_tab(page, "ControlNet depth")
    assert_unavailable(page, "controlnet", "ControlNet depth exists for Kandinsky 2.2 only")
    screenshot(page, "kandinsky-2-1-controlnet")

    open_tab(page, "Text to image")
    page.fill("#prompt textarea", LONG_PROMPT)
    assert not page.locator("#unavailable-text2img").is_visible()
    log = generate(page, "text2img")
    assert_preview_before_final(log)
    progress = page.locator("#progress").inner_text()
    assert "CLIP reads 77 tokens" in progress and "MultilingualCLIP reads 77 tokens" in progress
    _, settings = newest_image(app_server)
    assert settings["model"] == "kandinsky-2-1-demo" and settings["task"] == "text2img"
    page.fill("#prompt textarea", "a red cat")

    open_tab(page, "Image to image")
    page.set_input_files("#img2img-image input[type=file]", str(SAMPLES / "landscape.png"))
    generate(page, "img2img")
    _, settings = newest_image(app_server)
    assert (settings["model"], settings["task"]) == ("kandinsky-2-1-demo", "img2img")

    open_tab(page, "Inpaint")
    upload_to_editor(page, SAMPLES / "landscape.png", 256)
    page.get_by_text("Or upload a mask image").click()
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (64, 64, 192, 192))
    mask_path = app_server.outputs.parent / "mask-2-1.png"
    mask.save(mask_path)
    page.set_input_files("#mask-upload input[type=file]", str(mask_path))
    page.wait_for_selector("#mask-overlay img", timeout=30_000)
    generate(page, "inpaint")
    path, settings = newest_image(app_server)
    assert (settings["model"], settings["task"]) == ("kandinsky-2-1-demo", "inpaint")
    assert Image.open(path).size == (64, 64)

    open_tab(page, "Interpolate")
    generate(page, "interpolate")
    _, settings = newest_image(app_server)
    assert (settings["model"], settings["task"]) == ("kandinsky-2-1-demo", "interpolate")
    assert settings["inputs"] == ["a cat", "a lighthouse"]
    screenshot(page, "kandinsky-2-1-interpolate")


def test_kandinsky_3_runs_text_and_image_to_image_and_the_other_tabs_say_why(page, app_server):
    select_model(page, "Kandinsky 3 demo")
    # no prior: its controls are off; the demo keeps its small settings but takes 3's guidance
    for selector in ("#prior-steps input[type=range]", "#prior-guidance input[type=range]",
                     "#negative-prior-prompt textarea"):
        page.wait_for_function("s => document.querySelector(s).disabled", arg=selector, timeout=10_000)
    page.wait_for_function("() => document.querySelector('#guidance input[type=number]').value === '3'",
                           timeout=10_000)
    open_tab(page, "Inpaint")
    assert_unavailable(page, "inpaint", "no published Kandinsky 3 inpainting checkpoint")
    open_tab(page, "Interpolate")
    assert_unavailable(page, "interpolate", "no image-embedding prior")
    open_tab(page, "ControlNet depth")
    assert_unavailable(page, "controlnet", "Kandinsky 2.2 only")

    set_slider(page, "width", 128)
    set_slider(page, "height", 64)
    set_slider(page, "steps", 5)
    open_tab(page, "Text to image")
    page.fill("#prompt textarea", "a lighthouse by the sea")
    page.fill("#negative-prompt textarea", "blurry")
    log = generate(page, "text2img")
    assert_preview_before_final(log)
    path, settings = newest_image(app_server)
    assert (settings["model"], settings["task"]) == ("kandinsky-3-demo", "text2img")
    assert settings["negative_prompt"] == "blurry" and Image.open(path).size == (128, 64)
    screenshot(page, "kandinsky-3-text2img")

    open_tab(page, "Image to image")
    page.set_input_files("#img2img-image input[type=file]", str(SAMPLES / "portrait.png"))
    set_slider(page, "img2img-strength", 0.6)
    generate(page, "img2img")
    path, settings = newest_image(app_server)
    assert (settings["model"], settings["task"], settings["strength"]) == ("kandinsky-3-demo", "img2img", 0.6)
    assert Image.open(path).size == (128, 64)

    # back to 2.2: everything is offered again (the button may be re-enabled a render after the note hides)
    select_model(page, "Kandinsky 2.2 demo")
    page.locator("#unavailable-controlnet").wait_for(state="hidden")
    for selector in ("#generate-controlnet", "#prior-steps input[type=range]"):
        page.wait_for_function("s => document.querySelector(s) && !document.querySelector(s).disabled",
                               arg=selector, timeout=10_000)
