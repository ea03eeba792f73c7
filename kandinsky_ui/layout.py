"""The page: shared controls, one tab per task, the preview and the session's gallery.

API names (gradio_client): text2img, img2img, inpaint, interpolate, controlnet (streaming
generators), stop, png_info, models_status, unload, set_memory_budget. Events that only
serve the page are private.
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from kandinsky_ui import guards
from kandinsky_ui.handlers import MAX_INPUTS, MODE_LABELS, PRIOR_FIELDS, Studio

SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "samples"
GENERATE_LIMIT = 64     # handlers only wait on the JobRunner, which runs one job at a time

CSS = """
.ks-progress { font-size: 0.95rem; min-height: 2.2em; }
.ks-bar { height: 6px; background: var(--neutral-200); border-radius: 3px; overflow: hidden; margin-bottom: 4px; }
.ks-bar > span { display: block; height: 100%; background: var(--color-accent); transition: width 0.2s; }
.ks-progress[data-state="failed"] .ks-text { color: var(--error-text-color); }
#preview img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
.ks-unavailable { background: var(--neutral-100); border-left: 4px solid var(--color-accent); padding: 4px 10px; }
#demo-banner { background: #fff4d6; border: 1px solid #e7c76d; border-radius: 6px; padding: 4px 10px; color: #5a4300; }
"""

SCHEDULER_CHOICES = [("Repository default (DDPM)", "default"), ("DDPM", "ddpm"), ("DDIM", "ddim")]
PREVIEW_CHOICES = [("Fast (linear colour map of the predicted image)", "fast"),
                   ("Exact (MoVQ decode, slower)", "decode"), ("Off", "off")]


def build_ui(studio: Studio) -> gr.Blocks:
    config = studio.config
    d = config.defaults
    private = {"api_visibility": "private"}
    with gr.Blocks(title=config.title, fill_width=True) as demo:
        browser_owner = gr.BrowserState("", storage_key="kandinsky-studio-owner",
                                        secret=config.browser_secret)
        owner = gr.Textbox("", visible="hidden", label="owner", elem_id="owner")
        selected = gr.State(None)

        gr.Markdown(f"# {config.title}\nText to image, image to image, inpainting, interpolation and "
                    f"ControlNet depth with Kandinsky 2.1, 2.2 and 3 on MindSpore.")
        if config.demo:
            gr.Markdown("**Demo mode**: tiny random-weight models built on this machine, so everything works "
                        "offline and fast, but the images are coloured noise. Start without `--demo` for the "
                        "real Kandinsky models.", elem_id="demo-banner")
        # per tab: why the selected model cannot run there (hidden when it can)
        default_spec = studio.manager.spec(d["model"])

        def unavailable_note(task):
            reason = default_spec.unsupported_reason(task)
            return gr.Markdown(f"**Not available with {default_spec.label}**: {reason}." if reason else "",
                               visible=bool(reason), elem_id=f"unavailable-{task}", elem_classes="ks-unavailable")
        for note in config.notes:
            gr.Markdown(note)

        with gr.Row(equal_height=False):
            # ---------------------------------------------------------------- inputs
            with gr.Column(scale=5):
                prompt = gr.Textbox(label="Prompt", lines=2, value=d.get("prompt", ""), elem_id="prompt",
                                    placeholder="a red fox in a snowy forest, oil painting")
                with gr.Row():
                    negative_prompt = gr.Textbox(label="Negative prompt", value="", elem_id="negative-prompt",
                                                 placeholder="what the image should not look like")
                    negative_prior_prompt = gr.Textbox(label="Negative prior prompt", value="",
                                                       elem_id="negative-prior-prompt",
                                                       placeholder="lowres, text, watermark")
                with gr.Tabs(selected="text2img", elem_id="tabs") as tabs:
                    with gr.Tab("Text to image", id="text2img", elem_id="tab-text2img"):
                        note_text2img = unavailable_note("text2img")
                        gr.Markdown("Generate from the prompt.")
                        go_text2img = gr.Button("Generate", variant="primary", elem_id="generate-text2img",
                                          interactive=default_spec.supports("text2img"))
                    with gr.Tab("Image to image", id="img2img", elem_id="tab-img2img"):
                        note_img2img = unavailable_note("img2img")
                        img2img_image = gr.Image(label="Start image", type="pil", image_mode=None,
                                                 elem_id="img2img-image", sources=["upload", "clipboard"])
                        strength = gr.Slider(0, 1, value=0.3, step=0.05, label="Strength (0 keeps the image, "
                                             "1 ignores it)", elem_id="img2img-strength")
                        gr.Examples([[str(SAMPLES / "landscape.png")], [str(SAMPLES / "portrait.png")]],
                                    inputs=[img2img_image], label="Sample images")
                        go_img2img = gr.Button("Generate", variant="primary", elem_id="generate-img2img",
                                          interactive=default_spec.supports("img2img"))
                    with gr.Tab("Inpaint", id="inpaint", elem_id="tab-inpaint"):
                        note_inpaint = unavailable_note("inpaint")
                        gr.Markdown("Upload an image, pick the brush and paint over what to repaint "
                                    "(white = repaint in an uploaded mask).")
                        with gr.Row():
                            editor = gr.ImageEditor(label="Image and mask", type="pil", image_mode="RGBA",
                                                    format="png", layers=False, transforms=(),
                                                    sources=("upload", "clipboard"),
                                                    brush=gr.Brush(colors=["#ff3030"], color_mode="fixed",
                                                                   default_size=24),
                                                    eraser=gr.Eraser(default_size=24), canvas_size=(512, 512),
                                                    elem_id="inpaint-editor", scale=3)
                            mask_overlay = gr.Image(label="Mask over the image (red = repaint)", interactive=False,
                                                    elem_id="mask-overlay", scale=2, format="png")
                        with gr.Row():
                            mask_invert = gr.Checkbox(label="Invert mask", value=False, elem_id="mask-invert")
                            mask_grow = gr.Slider(0, 64, value=0, step=1, label="Grow mask (px)",
                                                  elem_id="mask-grow")
                            mask_blur = gr.Slider(0, 64, value=0, step=1, label="Blur edge (px)",
                                                  elem_id="mask-blur")
                            clear_mask = gr.Button("Clear mask", elem_id="clear-mask", size="sm")
                        with gr.Accordion("Or upload a mask image", open=False):
                            mask_upload = gr.Image(label="Mask (white = repaint)", type="pil",
                                                   image_mode=None, elem_id="mask-upload")
                        gr.Examples([[str(SAMPLES / "landscape.png")]], inputs=[editor], label="Sample image")
                        go_inpaint = gr.Button("Generate", variant="primary", elem_id="generate-inpaint",
                                          interactive=default_spec.supports("inpaint"))
                    with gr.Tab("Interpolate", id="interpolate", elem_id="tab-interpolate"):
                        note_interpolate = unavailable_note("interpolate")
                        gr.Markdown("Mix 2 to 6 texts and images; the weights are normalised to sum to 1. "
                                    "The prompt above is not used here.")
                        input_count = gr.Slider(2, MAX_INPUTS, value=2, step=1, label="Inputs",
                                                elem_id="input-count")
                        rows, kinds, texts, images, weights = [], [], [], [], []
                        for i in range(1, MAX_INPUTS + 1):
                            with gr.Row(visible=i <= 2, elem_id=f"interp-row-{i}") as row:
                                kind = gr.Radio(["Text", "Image"], value="Text", label=f"Input {i}",
                                                elem_id=f"kind-{i}", scale=1)
                                text = gr.Textbox(label=f"Text {i}", elem_id=f"text-{i}", scale=3,
                                                  value=("a cat" if i == 1 else "a lighthouse" if i == 2 else ""))
                                image = gr.Image(label=f"Image {i}", type="pil", image_mode=None,
                                                 visible=False, elem_id=f"image-{i}", scale=3, height=160)
                                weight = gr.Slider(0, 1, value=0.5, step=0.05, label=f"Weight {i}",
                                                   elem_id=f"weight-{i}", scale=2)
                            rows.append(row), kinds.append(kind), texts.append(text)
                            images.append(image), weights.append(weight)
                        normalized = gr.Markdown(Studio.normalized_weights(2, *[0.5] * MAX_INPUTS),
                                                 elem_id="normalized-weights")
                        walk_steps = gr.Slider(0, 8, value=0, step=1, elem_id="walk-steps",
                                               label="Walk: extra images from input 1 to input 2 (0 = off, 2-8)")
                        go_interpolate = gr.Button("Generate", variant="primary", elem_id="generate-interpolate",
                                          interactive=default_spec.supports("interpolate"))
                    with gr.Tab("ControlNet depth", id="controlnet", elem_id="tab-controlnet"):
                        note_controlnet = unavailable_note("controlnet")
                        with gr.Row():
                            depth = gr.Image(label="Depth map (white = near)", type="pil", image_mode=None,
                                             elem_id="depth", sources=["upload", "clipboard"])
                            hint = gr.Image(label="Hint the model sees", interactive=False, elem_id="hint",
                                            format="png")
                        gr.Examples([[str(SAMPLES / "depth.png")]], inputs=[depth], label="Sample depth map")
                        controlnet_mode = gr.Radio(list(MODE_LABELS), value="Text to image", label="Mode",
                                                   elem_id="controlnet-mode")
                        with gr.Row(visible=False) as controlnet_img2img_row:
                            controlnet_image = gr.Image(label="Start image", type="pil", image_mode=None,
                                                        elem_id="controlnet-image")
                            controlnet_strength = gr.Slider(0, 1, value=0.5, step=0.05, label="Strength",
                                                            elem_id="controlnet-strength")
                        go_controlnet = gr.Button("Generate", variant="primary", elem_id="generate-controlnet",
                                          interactive=default_spec.supports("controlnet"))
                    with gr.Tab("PNG info", id="pnginfo", elem_id="tab-pnginfo"):
                        png_file = gr.File(label="Drop a PNG made by this app (or by A1111)", file_types=[".png"],
                                           type="filepath", elem_id="png-file")
                        png_parameters = gr.Textbox(label="parameters", lines=4, interactive=False,
                                                    elem_id="png-parameters")
                        png_json = gr.Code(label="All settings (JSON)", language="json", interactive=False,
                                           elem_id="png-json")
                        png_apply = gr.Button("Use these settings", elem_id="png-apply")
                    with gr.Tab("Models", id="models", elem_id="tab-models"):
                        models_md = gr.Markdown(elem_id="models-status")
                        with gr.Row():
                            refresh_models = gr.Button("Refresh", elem_id="models-refresh")
                            unload = gr.Button("Unload all models", variant="stop", elem_id="models-unload")
                        with gr.Row():
                            budget = gr.Textbox(label="Memory budget (e.g. 12GB, 800MB, auto)",
                                                value=f"{studio.manager.memory_budget / 1e9:.1f}GB",
                                                elem_id="memory-budget")
                            apply_budget = gr.Button("Apply budget", elem_id="apply-budget")

                with gr.Accordion("Settings", open=True, elem_id="settings"):
                    with gr.Row():
                        model = gr.Dropdown(config.models, value=d["model"], label="Model", elem_id="model")
                        scheduler = gr.Dropdown(SCHEDULER_CHOICES, value=d.get("scheduler", "default"),
                                                label="Decoder scheduler", elem_id="scheduler")
                        preview = gr.Dropdown(PREVIEW_CHOICES, value=d.get("preview", "fast"), label="Previews",
                                              elem_id="preview-mode")
                        preview_every = gr.Slider(1, 20, value=1, step=1, label="A preview every N steps",
                                                  elem_id="preview-every")
                    with gr.Row():
                        size_preset = gr.Dropdown([label for label, _ in config.size_presets] + ["Custom"],
                                                  value=studio.preset_from_size(d["width"], d["height"]),
                                                  label="Size", elem_id="size-preset")
                        width = gr.Slider(64, 2048, value=d["width"], step=64, label="Width", elem_id="width")
                        height = gr.Slider(64, 2048, value=d["height"], step=64, label="Height", elem_id="height")
                    with gr.Row():
                        steps = gr.Slider(1, 200, value=d["num_inference_steps"], step=1, label="Decoder steps",
                                          elem_id="steps")
                        prior_steps = gr.Slider(2, 100, value=d["prior_num_inference_steps"], step=1,
                                                label="Prior steps", elem_id="prior-steps")
                    with gr.Row():
                        guidance = gr.Slider(0, 20, value=d["guidance_scale"], step=0.5, label="Decoder guidance",
                                             elem_id="guidance")
                        prior_guidance = gr.Slider(0, 20, value=d["prior_guidance_scale"], step=0.5,
                                                   label="Prior guidance", elem_id="prior-guidance")
                    with gr.Row():
                        seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", elem_id="seed")
                        random_seed = gr.Button("Random seed", size="sm", elem_id="random-seed")
                        reuse_seed = gr.Button("Reuse last seed", size="sm", elem_id="reuse-seed")
                        batch_count = gr.Slider(1, 16, value=1, step=1, label="Batch count (runs)",
                                                elem_id="batch-count")
                        batch_size = gr.Slider(1, 8, value=1, step=1, label="Batch size (images per run)",
                                               elem_id="batch-size")

            # ---------------------------------------------------------------- outputs
            with gr.Column(scale=4):
                progress = gr.HTML(elem_id="progress")
                preview_image = gr.Image(label="Preview", interactive=False, elem_id="preview", format="png",
                                         height=384)
                with gr.Row():
                    with gr.Column(min_width=120):
                        stop = gr.Button("Stop", variant="stop", elem_id="stop")
                        stop_note = gr.Markdown("", elem_id="stop-note")
                    seeds = gr.Textbox(label="Seed(s) used", interactive=False, elem_id="seeds")
                gallery = gr.Gallery(label="Your images (newest first)", columns=4, height=420, fit_columns=False,
                                     elem_id="gallery", format="png", interactive=False)
                selected_md = gr.Markdown("Select an image to reuse it.", elem_id="selected")
                with gr.Row():
                    to_img2img = gr.Button("→ Image to image", size="sm", elem_id="send-img2img")
                    to_inpaint = gr.Button("→ Inpaint", size="sm", elem_id="send-inpaint")
                    to_controlnet = gr.Button("→ ControlNet", size="sm", elem_id="send-controlnet")
                    to_png = gr.Button("→ PNG info", size="sm", elem_id="send-pnginfo")

        # ---------------------------------------------------------------- wiring
        shared = {"model": model, "prompt": prompt, "negative_prompt": negative_prompt,
                  "negative_prior_prompt": negative_prior_prompt, "width": width, "height": height,
                  "num_inference_steps": steps, "prior_num_inference_steps": prior_steps,
                  "guidance_scale": guidance, "prior_guidance_scale": prior_guidance, "scheduler": scheduler,
                  "seed": seed, "batch_count": batch_count, "batch_size": batch_size, "preview": preview,
                  "preview_every": preview_every}
        outputs = [owner, progress, preview_image, gallery, seeds]

        # Every input names its field (the API parameter) in its errors; image uploads are checked
        # before they are decoded (kandinsky_ui/guards.py).
        for name, component in {**shared, "owner": owner, "strength": strength, "mask_invert": mask_invert,
                                "mask_grow": mask_grow, "mask_blur": mask_blur, "input_count": input_count,
                                "walk_steps": walk_steps, "controlnet_mode": controlnet_mode,
                                "controlnet_strength": controlnet_strength, "file": png_file,
                                "text": budget}.items():
            guards.name_errors(component, name)
        for i in range(MAX_INPUTS):
            guards.name_errors(kinds[i], f"kind_{i + 1}")
            guards.name_errors(texts[i], f"text_{i + 1}")
            guards.name_errors(weights[i], f"weight_{i + 1}")
            guards.guard_image(images[i], f"image_{i + 1}")
        for name, component in {"image": img2img_image, "editor": editor, "mask_upload": mask_upload,
                                "depth": depth, "controlnet_image": controlnet_image}.items():
            guards.guard_image(component, name)
        generate = {"outputs": outputs, "show_progress": "hidden", "concurrency_limit": GENERATE_LIMIT,
                    "concurrency_id": "generate"}
        go_text2img.click(studio.text2img, inputs_kwargs={"owner": owner, **shared}, api_name="text2img",
                          **generate)
        go_img2img.click(studio.img2img, inputs_kwargs={"owner": owner, "image": img2img_image,
                                                        "strength": strength, **shared},
                         api_name="img2img", **generate)
        go_inpaint.click(studio.inpaint, inputs_kwargs={"owner": owner, "editor": editor, "mask_upload": mask_upload,
                                                        "mask_invert": mask_invert, "mask_grow": mask_grow,
                                                        "mask_blur": mask_blur, **shared},
                         api_name="inpaint", **generate)
        rows_inputs = {}
        for i in range(MAX_INPUTS):
            rows_inputs.update({f"kind_{i + 1}": kinds[i], f"text_{i + 1}": texts[i], f"image_{i + 1}": images[i],
                                f"weight_{i + 1}": weights[i]})
        go_interpolate.click(studio.interpolate, inputs_kwargs={"owner": owner, "input_count": input_count,
                                                                "walk_steps": walk_steps, **rows_inputs, **shared},
                             api_name="interpolate", **generate)
        go_controlnet.click(studio.controlnet, inputs_kwargs={
            "owner": owner, "depth": depth, "controlnet_mode": controlnet_mode, "controlnet_image": controlnet_image,
            "controlnet_strength": controlnet_strength, **shared}, api_name="controlnet", **generate)
        stop.click(studio.stop, inputs=[owner], outputs=[stop_note], queue=False, api_name="stop",
                   show_progress="hidden")
        for button in (go_text2img, go_img2img, go_inpaint, go_interpolate, go_controlnet):
            button.click(lambda: "", outputs=[stop_note], queue=False, show_progress="hidden", **private)

        # page load: restore this browser's owner id and gallery, re-attach to a running job
        demo.load(studio.on_load, inputs=[browser_owner], outputs=[owner, browser_owner, gallery, progress],
                  queue=False, **private).then(
            studio.resume, inputs=[owner], outputs=outputs, show_progress="hidden",
            concurrency_limit=GENERATE_LIMIT, concurrency_id="generate", **private)
        # an owner id made by a handler (e.g. the first generation) is kept in the browser too
        owner.change(lambda value: value, inputs=[owner], outputs=[browser_owner], queue=False,
                     show_progress="hidden", **private)
        demo.load(studio.models_status, outputs=[models_md], queue=False, api_name="models_status_on_load",
                  **private)

        # gallery -> other tabs
        gallery.select(studio.select, inputs=[owner], outputs=[selected, selected_md], queue=False, **private)
        to_img2img.click(studio.send_to_img2img, inputs=[owner, selected], outputs=[img2img_image, tabs],
                         queue=False, **private)
        to_inpaint.click(studio.send_to_inpaint, inputs=[owner, selected], outputs=[editor, tabs], queue=False,
                         **private)
        to_controlnet.click(studio.send_to_controlnet, inputs=[owner, selected],
                            outputs=[controlnet_image, controlnet_mode, tabs], queue=False, **private)
        to_png.click(studio.send_to_png_info, inputs=[owner, selected], outputs=[png_file, tabs], queue=False,
                     **private)

        # seeds and sizes
        random_seed.click(lambda: -1, outputs=[seed], queue=False, **private)
        reuse_seed.click(studio.reuse_seed, inputs=[seeds], outputs=[seed], queue=False, **private)
        size_preset.input(studio.size_from_preset, inputs=[size_preset], outputs=[width, height], queue=False,
                          **private)
        for slider in (width, height):
            slider.input(studio.preset_from_size, inputs=[width, height], outputs=[size_preset], queue=False,
                         **private)

        # inpaint mask overlay
        mask_inputs = [editor, mask_upload, mask_invert, mask_grow, mask_blur]
        for component, event in ((editor, "change"), (mask_upload, "change"), (mask_invert, "change"),
                                 (mask_grow, "release"), (mask_blur, "release")):
            getattr(component, event)(studio.mask_overlay, inputs=mask_inputs, outputs=[mask_overlay],
                                      trigger_mode="always_last", show_progress="hidden", **private)
        clear_mask.click(studio.clear_mask, inputs=[editor], outputs=[editor], **private)

        # interpolation rows and weights
        def show_rows(count):
            return [gr.Row(visible=i < int(count)) for i in range(MAX_INPUTS)]
        input_count.change(show_rows, inputs=[input_count], outputs=rows, queue=False, **private)
        for kind, text, image in zip(kinds, texts, images):
            kind.change(lambda k: (gr.Textbox(visible=k == "Text"), gr.Image(visible=k == "Image")),
                        inputs=[kind], outputs=[text, image], queue=False, **private)
        for component in [input_count, *weights]:
            component.change(studio.normalized_weights, inputs=[input_count, *weights], outputs=[normalized],
                             queue=False, show_progress="hidden", **private)

        # ControlNet hint and mode
        for component in (depth, width, height):
            component.change(studio.hint_view, inputs=[depth, width, height], outputs=[hint],
                             show_progress="hidden", trigger_mode="always_last", **private)
        controlnet_mode.change(lambda m: gr.Row(visible=m == "Image to image"), inputs=[controlnet_mode],
                               outputs=[controlnet_img2img_row], queue=False, **private)

        # PNG info
        png_file.change(studio.png_info, inputs=[png_file], outputs=[png_parameters, png_json], api_name="png_info")
        task_components = {"strength": strength, "image": img2img_image, "editor": editor, "mask_upload": mask_upload,
                           "mask_invert": mask_invert, "mask_grow": mask_grow, "mask_blur": mask_blur,
                           "input_count": input_count, "walk_steps": walk_steps, "depth": depth,
                           "controlnet_mode": controlnet_mode, "controlnet_strength": controlnet_strength,
                           "controlnet_image": controlnet_image, **rows_inputs}
        controls = {**shared, **task_components}

        def apply_png(owner_id, file):
            values, tab = studio.settings_from_png(owner_id, file)
            updates = {controls[name]: value for name, value in values.items() if name in controls}
            updates[tabs] = gr.Tabs(selected=tab)
            if "width" in values and "height" in values:
                updates[size_preset] = studio.preset_from_size(values["width"], values["height"])
            return updates
        png_apply.click(apply_png, inputs=[owner, png_file], outputs=[*controls.values(), tabs, size_preset],
                        **private)

        # model choice: tabs the model cannot run say why; the prior's controls are off without a prior;
        # picking a model (not a PNG's settings) applies its family's recommended settings
        notes = [note_text2img, note_img2img, note_inpaint, note_interpolate, note_controlnet]
        buttons = [go_text2img, go_img2img, go_inpaint, go_interpolate, go_controlnet]
        prior_controls = [shared[name] for name in PRIOR_FIELDS]
        model.change(studio.model_view, inputs=[model], outputs=[*notes, *buttons, *prior_controls, scheduler],
                     queue=False, show_progress="hidden", **private)
        model.input(studio.model_defaults, inputs=[model, width, height, steps, guidance],
                    outputs=[width, height, steps, guidance, size_preset], queue=False, show_progress="hidden",
                    **private)
        demo.load(studio.model_view, inputs=[model], outputs=[*notes, *buttons, *prior_controls, scheduler],
                  queue=False, show_progress="hidden", **private)

        # models panel
        refresh_models.click(studio.models_status, outputs=[models_md], queue=False, api_name="models_status")
        unload.click(studio.unload_all, outputs=[models_md], api_name="unload")
        apply_budget.click(studio.set_budget, inputs=[budget], outputs=[models_md], api_name="set_memory_budget")
        tabs.select(studio.models_status, outputs=[models_md], queue=False, api_name="models_status_on_tab",
                    **private)
    return demo
