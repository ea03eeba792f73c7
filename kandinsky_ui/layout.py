"""The page: the prompts, one tab per task, PNG info, Models, the shared settings, the preview and
the browser's gallery (built by kandinsky_ui/tabs.py), and what each event calls.

API names (gradio_client): text2img, img2img, inpaint, interpolate, controlnet (streaming
generators), estimate_depth, stop, png_info, models_status, unload, set_memory_budget. Their parameters are the
controls' names (kandinsky_ui/controls.py). Events that only serve the page are private.

The action bar's Generate, the busy state, the tab title and notifications live in the browser
(kandinsky_ui/page.js, installed at load): Generate clicks the selected tab's own (hidden) Generate
button, whose click is the task's API event.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import gradio as gr

from kandinsky_ui import cache, guards, page as page_storage, tabs
from kandinsky_ui.config import UIConfig
from kandinsky_ui.controls import PRIOR_FIELDS, SHARED_FIELDS
from kandinsky_ui.handlers import Studio
from kandinsky_ui.page import Page

# Generation handlers are async and only wait on the Engine (which queues, orders and limits jobs per
# owner), holding no thread; so Gradio hands every request to a handler at once (up to as many as the
# Engine holds: UIConfig.engine_capacity), and its own queue never holds one the Engine does not know
# about (Stop, positions and limits see them all). Gradio also runs at most `max_threads` events at
# once, whatever their limits: app.py launches with OTHER_EVENTS more than that.
OTHER_EVENTS = 64
PRIVATE = {"api_visibility": "private"}

CSS = """
.ks-progress { font-size: 0.95rem; min-height: 2.2em; }
.ks-bar { height: 6px; background: var(--neutral-200); border-radius: 3px; overflow: hidden; margin-bottom: 4px; }
.ks-bar > span { display: block; height: 100%; background: var(--color-accent); transition: width 0.2s; }
.ks-progress[data-state="failed"] .ks-text { color: var(--error-text-color); }
#preview img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
.ks-unavailable { background: var(--neutral-100); border-left: 4px solid var(--color-accent); padding: 4px 10px; }
/* the theme's own colours: readable in light and dark mode */
#demo-banner { background: var(--color-accent-soft); border: 1px solid var(--border-color-accent);
               border-radius: 6px; padding: 4px 10px; color: var(--body-text-color); }
#demo-banner * { color: var(--body-text-color); }
/* the action bar: Generate, or Stop while this browser's job runs (kandinsky_ui/page.js sets body.ks-busy);
   the tabs' own Generate buttons carry the API events and are clicked by it */
.ks-task-button { display: none !important; }
body:not(.ks-busy) #stop { display: none !important; }
body.ks-busy #generate { display: none !important; }
#action-bar { align-self: flex-start; }
#ks-note { font-size: 0.9rem; color: var(--body-text-color-subdued); }
#ks-note:empty { display: none; }
/* a phone: the prompt, the action bar, the progress and
   the preview first; then the other prompts, the tabs (wrapped, none behind a menu) and Settings (closed) */
@media (max-width: 720px) {
  #main-row { flex-direction: column; flex-wrap: nowrap; }
  #main-col, #out-col, #prompt-row, #prompt-col { display: contents; }
  #main-col > *, #out-col > *, #prompt-col > * { order: 5; }
  #prompt-col > #prompt, #prompt-col > :has(#prompt) { order: 0; }
  #prompt-row > #action-bar { order: 1; }
  #out-col > #progress { order: 2; }
  #out-col > #preview { order: 3; }
  #preview img { max-height: 300px; }
  #header p { display: none; }
  #demo-banner { font-size: 0.85rem; }
}
/* gallery captions wrap rather than cut "· partial" off */
#gallery .caption-label { white-space: normal; overflow: visible; text-overflow: clip; max-width: none; }
"""
PAGE_JS = (Path(__file__).parent / "page.js").read_text()


def build_ui(engine, config: UIConfig) -> gr.Blocks:
    """The Gradio app over `engine` (backend/engine.py)."""
    studio = Studio(engine, config)
    page = Page(config, studio.gallery, studio.step_times)
    spec = config.models[config.defaults["model"]]
    # Gradio's cache folder bounded by age (delete_cache) and size (CacheBound): kandinsky_ui/cache.py
    with gr.Blocks(title=config.title, fill_width=True, delete_cache=cache.DELETE_CACHE) as demo:
        browser_owner = gr.BrowserState("", storage_key="kandinsky-studio-owner", secret=config.browser_secret)
        owner = gr.Textbox("", visible="hidden", label="owner", elem_id="owner")
        selected = gr.State(None)
        gr.Markdown(f"# {config.title}\nText to image, image to image, inpainting, interpolation and "
                    f"ControlNet depth with Kandinsky 2.1, 2.2 and 3 on MindSpore.\n\n"
                    f"Running on {engine.device}, {engine.dtype_note}.", elem_id="header")
        if config.demo:
            gr.Markdown("**Demo mode**: tiny random-weight models built on this machine, so everything works "
                        "offline and fast, but the images are coloured noise. Start without `--demo` for the "
                        "real Kandinsky models.", elem_id="demo-banner")
        for note in config.notes:
            gr.Markdown(note)
        with gr.Row(equal_height=False, elem_id="main-row"):
            with gr.Column(scale=5, elem_id="main-col"):
                prompts, action = tabs.prompts(config.defaults)
                with gr.Tabs(selected="text2img", elem_id="tabs", overflow_behavior="wrap") as tab_set:
                    task_tabs = {"text2img": tabs.text2img_tab(spec), "img2img": tabs.img2img_tab(spec),
                                 "inpaint": tabs.inpaint_tab(spec), "interpolate": tabs.interpolate_tab(spec),
                                 "controlnet": tabs.controlnet_tab(spec)}
                    png = tabs.png_info_tab()
                    models = tabs.models_tab(engine.memory_budget)
                settings = tabs.settings(config, page)
            with gr.Column(scale=4, elem_id="out-col"):
                out = tabs.outputs()
        # the shared controls, in the request's field order (the API's parameter order); a field without a
        # control yet takes the request's default
        available = {**prompts, **settings.fields}
        shared = {name: available[name] for name in SHARED_FIELDS if name in available}

        _guard_inputs(owner, shared, task_tabs, png, models)
        steps_info = _steps_info(demo, page, shared)
        _generation(studio, config, owner, shared, task_tabs, out, action, steps_info)
        demo.load(None, js=PAGE_JS, **PRIVATE)
        _session(demo, studio, config, owner, browser_owner, out, models)
        _gallery(studio, owner, selected, out, tab_set, task_tabs, png)
        _settings_events(studio, page, owner, selected, shared, settings, out)
        _task_events(studio, page, shared, task_tabs)
        _png_info(studio, page, owner, png, shared, settings, task_tabs, tab_set)
        model_view = _model_choice(demo, page, shared, settings, task_tabs)
        _browser_storage(demo, shared, settings, task_tabs, action, model_view)
        _models_panel(studio, owner, models, tab_set)
    studio.cache = cache.CacheBound(demo).start()
    return demo


def _guard_inputs(owner, shared, task_tabs, png, models) -> None:
    """Every input names its field (the API parameter) in its errors; image uploads are checked
    before they are decoded (kandinsky_ui/guards.py)."""
    named = {**shared, "owner": owner, "file": png.file, "text": models.budget}
    for tab in task_tabs.values():
        named.update(tab.inputs)
    for name, component in named.items():
        if isinstance(component, (gr.Image, gr.ImageEditor)):
            guards.guard_image(component, name)
        elif isinstance(component, gr.File):  # PNG info: PNGs only, by content
            guards.guard_png(component, name)
        else:
            guards.name_errors(component, name)


def _generation(studio, config, owner, shared, task_tabs, out, action, steps_info) -> None:
    outputs = [owner, out.progress, out.preview, out.gallery, out.seeds]
    for task, tab in task_tabs.items():
        late = getattr(tab, "late", ())  # controls added later come last (tabs.py LATE_INPUTS)
        controls = {"owner": owner, **{name: c for name, c in tab.inputs.items() if name not in late}, **shared,
                    **{name: tab.inputs[name] for name in late}}
        tab.button.click(_api(getattr(studio, task), controls), inputs_kwargs=controls, api_name=task, outputs=outputs,
                         show_progress="hidden", concurrency_limit=config.engine_capacity, concurrency_id="generate").then(
            **steps_info)  # the job's step times now estimate the next run
        tab.button.click(lambda: "", outputs=[action.note], queue=False, show_progress="hidden", **PRIVATE)
    # the action bar's Generate is handled in the browser (page.js clicks the selected tab's button)
    action.stop.click(studio.stop, inputs=[owner], outputs=[action.note], queue=False, api_name="stop",
                      show_progress="hidden")


def _api(handler, controls: dict):
    """A generation handler (`handler(owner, **values)`) as the API shows it: one keyword parameter
    per control, each optional. Gradio reads an endpoint's parameter names and defaults from the
    function's signature, and only a control with an initial value, or a parameter defaulting to
    None, may be left out by a client (an image input has no initial value)."""
    async def generate(request: gr.Request, **values):
        async for update in handler(request=request, **values):
            yield update
    generate.__name__ = handler.__name__
    # the request (first, positional) is Gradio's gr.Request: hidden from the API, it tells who sends
    # (the login, the page's session) and when the server received the call (a Stop after it wins)
    generate.__signature__ = inspect.Signature(
        [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request),
         *(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in controls)])
    return generate


def _session(demo, studio, config, owner, browser_owner, out, models) -> None:
    """Page load: restore this browser's owner id and gallery, re-attach to a running job."""
    outputs = [owner, out.progress, out.preview, out.gallery, out.seeds]
    demo.load(studio.on_load, inputs=[browser_owner], outputs=[owner, browser_owner, out.gallery, out.progress],
              queue=False, **PRIVATE).then(
        studio.resume, inputs=[owner], outputs=outputs, show_progress="hidden", concurrency_limit=config.engine_capacity,
        concurrency_id="generate", **PRIVATE)
    # an owner id made by a handler (e.g. the first generation) is kept in the browser too
    owner.change(lambda value: value, inputs=[owner], outputs=[browser_owner], queue=False, show_progress="hidden",
                 **PRIVATE)
    demo.load(studio.models_status, inputs=[owner], outputs=[models.status], queue=False,
              api_name="models_status_on_load", **PRIVATE)
    demo.load(studio.server_actions_view, outputs=[models.unload, models.apply, models.budget, models.note],
              queue=False, **PRIVATE)
    # the page's heartbeat ended (closed, killed, reloading): its jobs stop unless it comes back in time
    demo.unload(studio.session_closed)


def _gallery(studio, owner, selected, out, tab_set, task_tabs, png) -> None:
    """Gallery -> other tabs."""
    img2img, inpaint, controlnet = (task_tabs[t].inputs for t in ("img2img", "inpaint", "controlnet"))
    out.gallery.select(studio.select, inputs=[owner], outputs=[selected, out.selected], queue=False, **PRIVATE)
    sends = {"img2img": (studio.send_to_img2img, [img2img["image"]]),
             "inpaint": (studio.send_to_inpaint, [inpaint["editor"], task_tabs["inpaint"].overlay]),
             "controlnet": (studio.send_to_controlnet, [controlnet["controlnet_image"], controlnet["controlnet_mode"]]),
             "pnginfo": (studio.send_to_png_info, [png.file])}
    # queued: a warning (nothing selected) reaches the page only from a queued event
    for name, (handler, targets) in sends.items():
        out.send[name].click(handler, inputs=[owner, selected], outputs=[*targets, tab_set], show_progress="hidden",
                             **PRIVATE)


def _steps_info(demo, page, shared) -> dict:
    """The steps slider's time estimate, refreshed as the settings it depends on change; returns the event's
    arguments for a refresh after each generation."""
    names = ("model", "num_inference_steps", "width", "height", "guidance_scale", "batch_size", "batch_count",
             "prior_num_inference_steps", "negative_prompt")
    event = dict(fn=page.steps_info, inputs=[shared[name] for name in names], outputs=[shared["num_inference_steps"]],
                 queue=False, show_progress="hidden", **PRIVATE)
    gr.on([shared[name].change for name in names if name != "negative_prompt"], trigger_mode="always_last", **event)
    demo.load(**event)
    return event


def _settings_events(studio, page, owner, selected, shared, settings, out) -> None:
    """Seeds, sizes and the presets (the docs' settings of the model; Fast)."""
    settings.random_seed.click(lambda: -1, outputs=[shared["seed"]], queue=False, **PRIVATE)

    def reuse_seed(owner_id, selected_path, seeds, request: gr.Request):
        return page.reuse_seed(studio.owner(owner_id, request), selected_path, seeds)
    settings.reuse_seed.click(reuse_seed, inputs=[owner, selected, out.seeds], outputs=[shared["seed"]],
                              show_progress="hidden", **PRIVATE)
    width, height = shared["width"], shared["height"]
    settings.size_preset.input(page.size_from_preset, inputs=[settings.size_preset], outputs=[width, height],
                               queue=False, **PRIVATE)
    for slider in (width, height):
        slider.input(page.preset_from_size, inputs=[width, height], outputs=[settings.size_preset], queue=False,
                     **PRIVATE)
    settings.docs_preset.click(page.docs_settings, inputs=[shared["model"]],
                               outputs=[width, height, shared["num_inference_steps"], shared["guidance_scale"],
                                        settings.size_preset, shared["scheduler"]], queue=False, **PRIVATE)
    settings.fast_preset.click(page.fast_settings, outputs=[shared["num_inference_steps"], shared["scheduler"]],
                               queue=False, **PRIVATE)


def _task_events(studio, page, shared, task_tabs) -> None:
    """What a task tab shows as its controls change: the mask overlay, interpolation rows and
    weights, the ControlNet hint and mode."""
    # One event per view, whichever control changed: "always_last" then runs it once more after a
    # burst of changes, so the last answer to arrive is the one for the controls' final values.
    inpaint = task_tabs["inpaint"]
    editor, upload, invert, grow, blur = (inpaint.inputs[name] for name in
                                          ("editor", "mask_upload", "mask_invert", "mask_grow", "mask_blur"))
    # .change of the sliders: a value typed in their number box counts as much as a drag
    gr.on([editor.change, upload.change, invert.change, grow.change, blur.change], page.mask_overlay,
          inputs=[editor, upload, invert, grow, blur], outputs=[inpaint.overlay], trigger_mode="always_last",
          show_progress="hidden", **PRIVATE)
    sides = [inpaint.inputs[f"outpaint_{side}"] for side in ("left", "right", "top", "bottom")]
    inpaint.outpaint_aspect.input(page.outpaint_to_aspect, inputs=[inpaint.outpaint_aspect, shared["width"],
                                                                   shared["height"]], outputs=sides, queue=False,
                                  show_progress="hidden", **PRIVATE)
    inpaint.clear.click(page.clear_mask, inputs=[inpaint.editor], outputs=[inpaint.editor, inpaint.overlay],
                        show_progress="hidden", **PRIVATE)

    mix = task_tabs["interpolate"]
    count = mix.inputs["input_count"]
    count.change(lambda n: [gr.Row(visible=i < int(n)) for i in range(len(mix.rows))], inputs=[count],
                 outputs=mix.rows, queue=False, **PRIVATE)
    weights = [mix.inputs[f"weight_{i + 1}"] for i in range(len(mix.rows))]
    for i in range(len(mix.rows)):
        kind, text, image = (mix.inputs[f"{name}_{i + 1}"] for name in ("kind", "text", "image"))
        kind.change(lambda k: (gr.Textbox(visible=k == "Text"), gr.Image(visible=k == "Image")), inputs=[kind],
                    outputs=[text, image], queue=False, **PRIVATE)
    gr.on([component.change for component in (count, *weights)], page.normalized_weights, inputs=[count, *weights],
          outputs=[mix.normalized], queue=False, trigger_mode="always_last", show_progress="hidden", **PRIVATE)

    controlnet = task_tabs["controlnet"]
    depth, mode = controlnet.inputs["depth"], controlnet.inputs["controlnet_mode"]
    source, start = controlnet.inputs["hint_source"], controlnet.inputs["controlnet_image"]
    view = [shared["model"], depth, source, mode, start, shared["width"], shared["height"]]
    # a photo's depth is estimated on the engine (queued, after a running job)
    gr.on([component.change for component in view], studio.hint_view, inputs=view,
          outputs=[controlnet.hint, controlnet.hint_note], show_progress="minimal", trigger_mode="always_last",
          **PRIVATE)
    controlnet.estimate.click(studio.estimate_depth, inputs=[depth, shared["model"]], outputs=[controlnet.hint],
                              api_name="estimate_depth")
    mode.change(lambda m: gr.Row(visible=m == "Image to image"), inputs=[mode], outputs=[controlnet.img2img_row],
                queue=False, **PRIVATE)


def _png_info(studio, page, owner, png, shared, settings, task_tabs, tab_set) -> None:
    png.file.change(page.png_info, inputs=[png.file], outputs=[png.parameters, png.settings], api_name="png_info")
    controls = dict(shared)
    for tab in task_tabs.values():
        controls.update(tab.inputs)

    def apply(owner_id, file, request: gr.Request):
        try:
            values, task = page.settings_from_png(studio.owner(owner_id, request), file)
        except gr.Error as error:  # one warning; raising would mark every control it fills red
            gr.Warning(str(error.message))
            return {tab_set: gr.skip()}
        updates = {controls[name]: value for name, value in values.items() if name in controls}
        updates[tab_set] = gr.Tabs(selected=task)
        if "width" in values and "height" in values:
            updates[settings.size_preset] = page.preset_from_size(values["width"], values["height"])
        return updates
    png.apply.click(apply, inputs=[owner, png.file], outputs=[*controls.values(), tab_set, settings.size_preset],
                    **PRIVATE)


def _model_choice(demo, page, shared, settings, task_tabs) -> None:
    """Tabs the model cannot run say why; the prior's controls are off without a prior; picking a
    model (not a PNG's settings) applies its family's recommended settings."""
    model = shared["model"]
    view = [*(tab.tab for tab in task_tabs.values()), *(tab.note for tab in task_tabs.values()),
            *(tab.button for tab in task_tabs.values()),
            *(shared[name] for name in PRIOR_FIELDS), shared["scheduler"]]
    event = dict(fn=page.model_view, inputs=[model], outputs=view, queue=False, show_progress="hidden", **PRIVATE)
    model.change(**event)
    sized = [shared["width"], shared["height"], shared["num_inference_steps"], shared["guidance_scale"]]
    model.input(page.model_defaults, inputs=[model], outputs=[*sized, settings.size_preset], queue=False,
                show_progress="hidden", **PRIVATE)
    return event  # run at load, after the browser's stored settings are restored


def _models_panel(studio, owner, models, tab_set) -> None:
    models.refresh.click(studio.models_status, inputs=[owner], outputs=[models.status], queue=False,
                         api_name="models_status")
    # two steps: unloading affects every user of the server
    models.unload.click(lambda: gr.Row(visible=True), outputs=[models.confirm_row], queue=False, **PRIVATE)
    models.cancel.click(lambda: gr.Row(visible=False), outputs=[models.confirm_row], queue=False, **PRIVATE)
    models.confirm.click(lambda: gr.Row(visible=False), outputs=[models.confirm_row], queue=False, **PRIVATE)
    models.confirm.click(studio.unload_all, outputs=[models.status], api_name="unload")
    models.apply.click(studio.set_budget, inputs=[models.budget], outputs=[models.status], api_name="set_memory_budget")
    tab_set.select(studio.models_status, inputs=[owner], outputs=[models.status], queue=False,
                   api_name="models_status_on_tab",
                   **PRIVATE)


def _browser_storage(demo, shared, settings, task_tabs, action, model_view) -> None:
    """The prompt and every control kept in the browser (localStorage) across reloads, and restored at load,
    also when the page re-attaches to a running job; the recent prompts and the user's styles too."""
    kept = {**shared, "size_preset": settings.size_preset, "notify": action.notify}
    for tab in task_tabs.values():
        kept.update({name: control for name, control in tab.inputs.items()
                     if not isinstance(control, (gr.Image, gr.ImageEditor))})   # images stay on the server
    names = list(kept)
    keys = {"settings": page_storage.SETTINGS_KEY, "history": page_storage.HISTORY_KEY,
            "styles": page_storage.STYLES_KEY}
    read_js = "() => [JSON.stringify(Object.fromEntries(Object.entries(%s).map(([k, v]) => [k, localStorage.getItem(v)])))]"

    def restore(stored):
        parts = page_storage.loads_json(stored, dict)
        return (*page_storage.restore(kept, parts.get("settings")), page_storage.history_choices(parts.get("history")),
                page_storage.style_choices(parts.get("styles")))
    demo.load(restore, inputs=[action.store], outputs=[*kept.values(), action.history, action.style],
              js=read_js % json.dumps(keys), queue=False, show_progress="hidden", **PRIVATE).then(**model_view)
    save_js = ("(...values) => { const names = %s; localStorage.setItem(%s, JSON.stringify("
               "Object.fromEntries(names.map((name, i) => [name, values[i]])))); }"
               % (json.dumps(names), json.dumps(page_storage.SETTINGS_KEY)))
    gr.on([control.change for control in kept.values()], None, inputs=list(kept.values()), js=save_js,
          trigger_mode="always_last", **PRIVATE)

    # recent prompts: each Generate that is sent adds its prompt (newest first, no repeats)
    push_js = ("(prompt) => { const key = %s; let list = []; try { list = JSON.parse(localStorage.getItem(key)) || []; }"
               " catch (e) {} if (prompt && prompt.trim()) list = [prompt, ...list.filter(p => p !== prompt)].slice(0, %d);"
               " localStorage.setItem(key, JSON.stringify(list)); return [JSON.stringify(list)]; }"
               % (json.dumps(page_storage.HISTORY_KEY), page_storage.HISTORY_KEPT))
    for tab in task_tabs.values():
        tab.button.click(page_storage.history_choices, inputs=[shared["prompt"]], outputs=[action.history],
                         js=push_js, queue=False, show_progress="hidden", **PRIVATE)
    action.history.input(lambda text: text if text else gr.skip(), inputs=[action.history],
                         outputs=[shared["prompt"]], queue=False, show_progress="hidden", **PRIVATE)

    styles_js = "localStorage.getItem(%s) || '{}'" % json.dumps(page_storage.STYLES_KEY)
    action.style.input(page_storage.apply_style, inputs=[action.style, shared["prompt"], shared["negative_prompt"],
                                                        action.store],
                       outputs=[shared["prompt"], shared["negative_prompt"]],
                       js="(name, prompt, negative, store) => [name, prompt, negative, %s]" % styles_js,
                       queue=True, show_progress="hidden", **PRIVATE)
    save_js = ("(name, prompt, negative, store) => { const key = %s; const builtin = %s; let styles = {};"
               " try { styles = JSON.parse(localStorage.getItem(key)) || {}; } catch (e) {}"
               " const clean = (name || '').trim(); if (clean && !builtin.includes(clean)) {"
               " styles[clean] = {prompt: prompt, negative_prompt: negative};"
               " localStorage.setItem(key, JSON.stringify(styles)); }"
               " return [name, prompt, negative, JSON.stringify(styles)]; }"
               % (json.dumps(page_storage.STYLES_KEY), json.dumps(list(page_storage.STYLES))))
    action.save_style.click(page_storage.save_style, inputs=[action.style_name, shared["prompt"],
                                                            shared["negative_prompt"], action.store],
                            outputs=[action.style, action.style_name], js=save_js, show_progress="hidden", **PRIVATE)
