"""The page's parts, one builder each: the task tabs, PNG info, Models, the shared settings and
the outputs column. Each returns its components by name; kandinsky_ui/layout.py wires them.

A task tab's `inputs` are its own controls by the name of the API parameter they fill (and of
the request field, unless kandinsky_ui/controls.py CONTROL_NAMES says otherwise).
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from backend import limits
from backend.families import FAST_SETTINGS
from backend.requests import PREVIEW_MODES
from kandinsky_ui import render
from kandinsky_ui.controls import HINT_LABELS, INPUT_KINDS, MODE_LABELS, row_names
from kandinsky_ui.page import Page, scheduler_choices, unavailable_text

SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "samples"
PREVIEW_LABELS = {"fast": "Fast (linear colour map of the predicted image)", "decode": "Exact (MoVQ decode, slower)",
                  "off": "Off"}
# Interpolation rows 1 and 2 start as these texts.
FIRST_MIX_TEXTS = ("a cat", "a lighthouse")


def _unavailable_note(spec, task: str):
    """Why the model cannot run this tab (hidden when it can)."""
    return gr.Markdown(unavailable_text(spec, task), visible=not spec.supports(task), elem_id=f"unavailable-{task}",
                       elem_classes="ks-unavailable")


TAB_LABELS = {"text2img": "Text to image", "img2img": "Image to image", "inpaint": "Inpaint",
              "interpolate": "Interpolate", "controlnet": "ControlNet depth"}


def tab_label(spec, task: str) -> str:
    """A task tab's label, which says up front when the selected model cannot run it."""
    return TAB_LABELS[task] + ("" if spec.supports(task) else " (off)")


def _generate_button(spec, task: str):
    """The tab's own Generate: its click is the task's API event. Hidden: the action bar's Generate clicks the
    selected tab's (kandinsky_ui/page.js); off when the model cannot run the task."""
    return gr.Button("Generate", variant="primary", elem_id=f"generate-{task}", interactive=spec.supports(task),
                     elem_classes=["ks-task-button"])


# A task's controls added after its API was published: the API lists them after the shared ones, so a
# client passing the older parameters by position still reaches the same ones (layout.py _generation).
LATE_INPUTS = {"text2img": ("hires_scale", "hires_strength", "hires_steps"),
               "inpaint": ("outpaint_left", "outpaint_right", "outpaint_top", "outpaint_bottom", "outpaint_blend")}


OUTPAINT_ASPECTS = ["16:9", "3:2", "4:3", "1:1", "3:4", "2:3", "9:16"]


def text2img_tab(spec):
    with gr.Tab(tab_label(spec, "text2img"), id="text2img", elem_id="tab-text2img") as tab:
        note = _unavailable_note(spec, "text2img")
        gr.Markdown("Generate from the prompt.")
        with gr.Accordion("Hi-res pass (AUTOMATIC1111's hi-res fix)", open=False, elem_id="hires"):
            gr.Markdown("Generate at the size in Settings, upscale (Lanczos), then refine by image to image at "
                        "the larger size: one job, both phases in the progress.")
            with gr.Row():
                hires_scale = gr.Slider(1, limits.MAX_HIRES_SCALE, value=1, step=0.25, label="Upscale by (1 = off)",
                                        elem_id="hires-scale")
                hires_strength = gr.Slider(0, 1, value=0.5, step=0.05, label="Hi-res strength",
                                           elem_id="hires-strength")
                hires_steps = gr.Slider(0, limits.APP_MAX_STEPS, value=0, step=1,
                                        label="Hi-res steps (0 = the decoder steps)", elem_id="hires-steps")
        button = _generate_button(spec, "text2img")
    return SimpleNamespace(tab=tab, note=note, button=button,
                           inputs={"hires_scale": hires_scale, "hires_strength": hires_strength,
                                   "hires_steps": hires_steps}, late=LATE_INPUTS["text2img"])


def img2img_tab(spec):
    with gr.Tab(tab_label(spec, "img2img"), id="img2img", elem_id="tab-img2img") as tab:
        note = _unavailable_note(spec, "img2img")
        image = gr.Image(label="Start image", type="pil", image_mode=None, elem_id="img2img-image",
                         sources=["upload", "clipboard"])
        strength = gr.Slider(0, 1, value=0.3, step=0.05, label="Strength (0 keeps the image, 1 ignores it)",
                             elem_id="img2img-strength")
        gr.Examples([[str(SAMPLES / "landscape.png")], [str(SAMPLES / "portrait.png")]], inputs=[image],
                    label="Sample images")
        button = _generate_button(spec, "img2img")
    return SimpleNamespace(tab=tab, note=note, button=button, inputs={"image": image, "strength": strength})


def inpaint_tab(spec):
    with gr.Tab(tab_label(spec, "inpaint"), id="inpaint", elem_id="tab-inpaint") as tab:
        note = _unavailable_note(spec, "inpaint")
        gr.Markdown("Upload an image, pick the brush and paint over what to repaint "
                    "(white = repaint in an uploaded mask).")
        with gr.Row():
            editor = gr.ImageEditor(label="Image and mask", type="pil", image_mode="RGBA", format="png", layers=False,
                                    transforms=(), sources=("upload", "clipboard"),
                                    brush=gr.Brush(colors=["#ff3030"], color_mode="fixed", default_size=24),
                                    eraser=gr.Eraser(default_size=24), canvas_size=(512, 512),
                                    elem_id="inpaint-editor", scale=3)
            overlay = gr.Image(label="Mask over the image (red = repaint)", interactive=False, elem_id="mask-overlay",
                               scale=2, format="png")
        with gr.Row():
            invert = gr.Checkbox(label="Invert mask", value=False, elem_id="mask-invert")
            grow = gr.Slider(0, limits.MAX_MASK_EDIT, value=0, step=1, label="Grow mask (px)", elem_id="mask-grow")
            blur = gr.Slider(0, limits.MAX_MASK_EDIT, value=0, step=1, label="Blur edge (px)", elem_id="mask-blur")
            clear = gr.Button("Clear mask", elem_id="clear-mask", size="sm")
        with gr.Accordion("Or upload a mask image", open=False):
            upload = gr.Image(label="Mask (white = repaint)", type="pil", image_mode=None, elem_id="mask-upload")
        with gr.Accordion("Outpaint: extend the canvas (no mask needed)", open=False, elem_id="outpaint"):
            gr.Markdown("The image (at the Settings size) gets this many new pixels on each side, filled by the "
                        "inpainting model; the canvas is rounded up to multiples of 64.")
            with gr.Row():
                sides = {side: gr.Slider(0, limits.APP_MAX_SIDE // 2, value=0, step=limits.SIZE_MULTIPLE,
                                         label=f"{side.capitalize()} (px)", elem_id=f"outpaint-{side}")
                         for side in ("left", "right", "top", "bottom")}
                blend = gr.Slider(0, limits.MAX_OUTPAINT_BLEND, value=16, step=1, label="Blend into the image (px)",
                                  elem_id="outpaint-blend")
            aspect = gr.Dropdown(OUTPAINT_ASPECTS, value=None, label="Or extend to an aspect ratio (sets the sides)",
                                 elem_id="outpaint-aspect")
        gr.Examples([[str(SAMPLES / "landscape.png")]], inputs=[editor], label="Sample image")
        button = _generate_button(spec, "inpaint")
    return SimpleNamespace(tab=tab, note=note, button=button, overlay=overlay, clear=clear, editor=editor,
                           inputs={"editor": editor, "mask_upload": upload, "mask_invert": invert, "mask_grow": grow,
                                   "mask_blur": blur, **{f"outpaint_{side}": slider for side, slider in sides.items()},
                                   "outpaint_blend": blend}, late=LATE_INPUTS["inpaint"], outpaint_aspect=aspect)


def interpolate_tab(spec):
    with gr.Tab(tab_label(spec, "interpolate"), id="interpolate", elem_id="tab-interpolate") as tab:
        note = _unavailable_note(spec, "interpolate")
        gr.Markdown(f"Mix {limits.MIN_MIX_INPUTS} to {limits.MAX_MIX_INPUTS} texts and images; the weights are "
                    f"normalised to sum to 1. The prompt above is not used here.")
        count = gr.Slider(limits.MIN_MIX_INPUTS, limits.MAX_MIX_INPUTS, value=2, step=1, label="Inputs",
                          elem_id="input-count")
        rows, inputs = [], {"input_count": count}
        for i in range(1, limits.MAX_MIX_INPUTS + 1):
            kind_name, text_name, image_name, weight_name = row_names(i)
            with gr.Row(visible=i <= 2, elem_id=f"interp-row-{i}") as row:
                inputs[kind_name] = gr.Radio(list(INPUT_KINDS), value="Text", label=f"Input {i}", elem_id=f"kind-{i}",
                                             scale=1)
                inputs[text_name] = gr.Textbox(label=f"Text {i}", elem_id=f"text-{i}", scale=3,
                                               value=FIRST_MIX_TEXTS[i - 1] if i <= len(FIRST_MIX_TEXTS) else "")
                inputs[image_name] = gr.Image(label=f"Image {i}", type="pil", image_mode=None, visible=False,
                                              elem_id=f"image-{i}", scale=3, height=160)
                inputs[weight_name] = gr.Slider(0, limits.MAX_MIX_WEIGHT, value=0.5, step=0.05, label=f"Weight {i}",
                                                elem_id=f"weight-{i}", scale=2)
            rows.append(row)
        normalized = gr.Markdown(Page.normalized_weights(2, *[0.5] * limits.MAX_MIX_INPUTS),
                                 elem_id="normalized-weights")
        # the values the request allows: 0 (off) or 2..MAX_WALK_STEPS (backend/requests.py InterpolateRequest)
        inputs["walk_steps"] = gr.Dropdown([("Off", 0)] + [(str(n), n) for n in range(2, limits.MAX_WALK_STEPS + 1)],
                                           value=0, elem_id="walk-steps",
                                           label="Walk: extra images from input 1 to input 2")
        button = _generate_button(spec, "interpolate")
    return SimpleNamespace(tab=tab, note=note, button=button, rows=rows, normalized=normalized, inputs=inputs)


def controlnet_tab(spec):
    with gr.Tab(tab_label(spec, "controlnet"), id="controlnet", elem_id="tab-controlnet") as tab:
        note = _unavailable_note(spec, "controlnet")
        source = gr.Radio(list(HINT_LABELS), value="Estimate depth from this photo", label="Hint",
                          elem_id="hint-source")
        with gr.Row():
            depth = gr.Image(label="Photo or depth map (white = near)", type="pil", image_mode=None, elem_id="depth",
                             sources=["upload", "clipboard"])
            hint = gr.Image(label="Hint the model sees (the estimated depth of a photo)", interactive=False,
                            elem_id="hint", format="png")
        hint_note = gr.Markdown("", elem_id="hint-note")
        gr.Examples([[str(SAMPLES / "landscape.png"), "Estimate depth from this photo"],
                     [str(SAMPLES / "depth.png"), "Use my depth map"]], inputs=[depth, source],
                    label="Sample photo and depth map")
        mode = gr.Radio(list(MODE_LABELS), value="Text to image", label="Mode", elem_id="controlnet-mode")
        with gr.Row(visible=False) as img2img_row:
            image = gr.Image(label="Start image", type="pil", image_mode=None, elem_id="controlnet-image")
            strength = gr.Slider(0, 1, value=0.5, step=0.05, label="Strength", elem_id="controlnet-strength")
        button = _generate_button(spec, "controlnet")
        estimate = gr.Button(visible=False)   # the /estimate_depth endpoint's trigger (API only)
    return SimpleNamespace(tab=tab, note=note, button=button, hint=hint, hint_note=hint_note, img2img_row=img2img_row,
                           estimate=estimate,
                           inputs={"depth": depth, "hint_source": source, "controlnet_mode": mode,
                                   "controlnet_image": image, "controlnet_strength": strength})


def png_info_tab():
    with gr.Tab("PNG info", id="pnginfo", elem_id="tab-pnginfo"):
        file = gr.File(label="Drop a PNG made by this app (or by A1111)", file_types=[".png"], type="filepath",
                       elem_id="png-file")
        parameters = gr.Textbox(label="parameters", lines=4, interactive=False, elem_id="png-parameters")
        settings = gr.Code(label="All settings (JSON)", language="json", interactive=False, elem_id="png-json")
        apply = gr.Button("Use these settings", elem_id="png-apply")
    return SimpleNamespace(file=file, parameters=parameters, settings=settings, apply=apply)


def models_tab(memory_budget: int):
    with gr.Tab("Models", id="models", elem_id="tab-models"):
        status = gr.Markdown(elem_id="models-status")
        note = gr.Markdown(visible=False, elem_id="models-note")   # why the server-wide actions are off
        with gr.Row():
            refresh = gr.Button("Refresh", elem_id="models-refresh")
            unload = gr.Button("Unload all models", variant="stop", elem_id="models-unload")
        # unloading affects every user of the server: a second, explicit click does it
        with gr.Row(visible=False, elem_id="unload-confirm-row") as confirm_row:
            gr.Markdown("Unload every loaded model? Jobs of every user then load them again.")
            confirm = gr.Button("Yes, unload all models", variant="stop", size="sm", elem_id="models-unload-confirm")
            cancel = gr.Button("Cancel", size="sm", elem_id="models-unload-cancel")
        with gr.Row():
            budget = gr.Textbox(label="Memory budget (e.g. 12GB, 800MB, auto)", value=f"{memory_budget / 1e9:.1f}GB",
                                elem_id="memory-budget")
            apply = gr.Button("Apply budget", elem_id="apply-budget")
    return SimpleNamespace(status=status, note=note, refresh=refresh, unload=unload, confirm_row=confirm_row,
                           confirm=confirm, cancel=cancel, budget=budget, apply=apply)


def prompts(defaults: dict):
    """The prompts and, beside them, the action bar (the same on every tab): Generate (Ctrl+Enter), which
    becomes Stop while this browser's job runs, the note that says why a click did nothing, and the opt-in
    notification. Returns (prompt controls by field, action bar)."""
    with gr.Row(elem_id="prompt-row", equal_height=False):
        with gr.Column(scale=5, min_width=280, elem_id="prompt-col"):
            prompt = gr.Textbox(label="Prompt (Ctrl+Enter generates)", lines=2, value=defaults["prompt"],
                                elem_id="prompt", placeholder="a red fox in a snowy forest, oil painting")
            with gr.Row():
                negative = gr.Textbox(label="Negative prompt", value="", elem_id="negative-prompt",
                                      placeholder="what the image should not look like")
                negative_prior = gr.Textbox(label="Negative prior prompt", value="", elem_id="negative-prior-prompt",
                                            placeholder="lowres, text, watermark")
            with gr.Row(elem_id="prompt-tools"):
                history = gr.Dropdown([], value=None, label="Recent prompts (this browser)", elem_id="prompt-history",
                                      scale=3)
                style = gr.Dropdown([], value=None, label="Style (wraps the prompt)", elem_id="style", scale=2)
                style_name = gr.Textbox(label="Save as style", placeholder="style name", elem_id="style-name",
                                        scale=2, min_width=120)
                save_style = gr.Button("Save style", size="sm", elem_id="save-style", scale=1, min_width=90)
        with gr.Column(scale=1, min_width=170, elem_id="action-bar"):
            generate = gr.Button("Generate", variant="primary", elem_id="generate")
            stop = gr.Button("Stop", variant="stop", elem_id="stop")
            note = gr.Markdown("", elem_id="action-note")
            notify = gr.Checkbox(False, label="Notify me when a job ends", elem_id="notify", container=False)
    fields = {"prompt": prompt, "negative_prompt": negative, "negative_prior_prompt": negative_prior}
    # what the page's JS reads from the browser's storage, handed to a handler (never shown)
    store = gr.Textbox("", visible="hidden", elem_id="ks-store")
    return fields, SimpleNamespace(generate=generate, stop=stop, note=note, notify=notify, history=history,
                                   style=style, style_name=style_name, save_style=save_style, store=store)


def settings(config, page: Page):
    """The shared settings accordion: `fields` are the shared request fields' controls; `extra` the
    page's own (size presets, seed buttons)."""
    d = config.defaults
    with gr.Accordion("Settings", open=True, elem_id="settings"):
        with gr.Row():
            model = gr.Dropdown(config.choices, value=d["model"], label="Model", elem_id="model")
            # custom values reach the request, which refuses an unknown name with the list (the API may send
            # any case, or "default")
            scheduler = gr.Dropdown(scheduler_choices(config.models[d["model"]].family), value=d["scheduler"],
                                    label="Sampler", elem_id="scheduler", allow_custom_value=True, min_width=230)
            preview = gr.Dropdown([(PREVIEW_LABELS[mode], mode) for mode in PREVIEW_MODES], value=d["preview"],
                                  label="Previews", elem_id="preview-mode", min_width=300)
            preview_every = gr.Slider(1, limits.MAX_PREVIEW_EVERY, value=d["preview_every"], step=1,
                                      label="A preview every N steps", elem_id="preview-every")
        with gr.Row():
            size_preset = gr.Dropdown([label for label, _ in config.size_presets] + ["Custom"],
                                      value=page.preset_from_size(d["width"], d["height"]), label="Size",
                                      elem_id="size-preset")
            width = gr.Slider(limits.SIZE_MULTIPLE, limits.APP_MAX_SIDE, value=d["width"], step=limits.SIZE_MULTIPLE,
                              label="Width", elem_id="width")
            height = gr.Slider(limits.SIZE_MULTIPLE, limits.APP_MAX_SIDE, value=d["height"],
                               step=limits.SIZE_MULTIPLE, label="Height", elem_id="height")
        with gr.Row():
            docs_steps = config.models[d["model"]].family.defaults["num_inference_steps"]
            steps = gr.Slider(1, limits.APP_MAX_STEPS, value=d["num_inference_steps"], step=1, label="Decoder steps",
                              elem_id="steps", info=render.steps_eta(d["num_inference_steps"], docs_steps, None, None))
            prior_steps = gr.Slider(limits.MIN_PRIOR_STEPS, limits.APP_MAX_STEPS, value=d["prior_num_inference_steps"],
                                    step=1, label="Prior steps", elem_id="prior-steps")
        with gr.Row():
            docs_preset = gr.Button("Docs' settings", size="sm", elem_id="preset-docs")
            fast_preset = gr.Button(f"Fast: {FAST_SETTINGS['scheduler']}, {FAST_SETTINGS['num_inference_steps']} steps",
                                    size="sm", elem_id="preset-fast")
        with gr.Row():
            guidance = gr.Slider(0, limits.MAX_GUIDANCE, value=d["guidance_scale"], step=0.5, label="Decoder guidance",
                                 elem_id="guidance")
            prior_guidance = gr.Slider(0, limits.MAX_GUIDANCE, value=d["prior_guidance_scale"], step=0.5,
                                       label="Prior guidance", elem_id="prior-guidance")
        with gr.Row():
            seed = gr.Number(value=d["seed"], precision=0, label="Seed (-1 = random)", elem_id="seed")
            random_seed = gr.Button("Random seed", size="sm", elem_id="random-seed")
            reuse_seed = gr.Button("Reuse seed", size="sm", elem_id="reuse-seed")
            batch_count = gr.Slider(1, limits.MAX_BATCH_COUNT, value=d["batch_count"], step=1,
                                    label="Batch count (runs)", elem_id="batch-count")
            batch_size = gr.Slider(1, limits.APP_MAX_BATCH_SIZE, value=d["batch_size"], step=1,
                                   label="Batch size (images per run)", elem_id="batch-size")
        with gr.Row():  # AUTOMATIC1111's variation seed: the seed's noise slerped towards another seed's
            variation_seed = gr.Number(value=d["variation_seed"], precision=0, label="Variation seed (-1 = random)",
                                       elem_id="variation-seed")
            variation_strength = gr.Slider(0, 1, value=d["variation_strength"], step=0.05,
                                           label="Variation strength (0 = off)", elem_id="variation-strength")
    fields = {"model": model, "width": width, "height": height, "num_inference_steps": steps,
              "prior_num_inference_steps": prior_steps, "guidance_scale": guidance,
              "prior_guidance_scale": prior_guidance, "scheduler": scheduler, "seed": seed, "batch_count": batch_count,
              "batch_size": batch_size, "preview": preview, "preview_every": preview_every,
              "variation_seed": variation_seed, "variation_strength": variation_strength}
    return SimpleNamespace(fields=fields, size_preset=size_preset, random_seed=random_seed, reuse_seed=reuse_seed,
                           docs_preset=docs_preset, fast_preset=fast_preset)


def outputs():
    progress = gr.HTML(elem_id="progress")
    preview = gr.Image(label="Preview", interactive=False, elem_id="preview", format="png", height=384)
    seeds = gr.Textbox(label="Seed(s) used", interactive=False, elem_id="seeds")
    gallery = gr.Gallery(label="Your images (newest first)", columns=4, height=420, fit_columns=False,
                         elem_id="gallery", format="png", interactive=False)
    selected = gr.Markdown("Select an image to reuse it.", elem_id="selected")
    with gr.Row():
        send = {"img2img": gr.Button("→ Image to image", size="sm", elem_id="send-img2img"),
                "inpaint": gr.Button("→ Inpaint", size="sm", elem_id="send-inpaint"),
                "controlnet": gr.Button("→ ControlNet", size="sm", elem_id="send-controlnet"),
                "pnginfo": gr.Button("→ PNG info", size="sm", elem_id="send-pnginfo")}
    return SimpleNamespace(progress=progress, preview=preview, seeds=seeds,
                           gallery=gallery, selected=selected, send=send)
