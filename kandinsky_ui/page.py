"""Handlers that only serve the page, no job: what the model choice changes, PNG info, the mask
overlay, the ControlNet hint, sizes, seeds and weights; and what the browser keeps (the controls' values,
recent prompts, styles: checked here when they come back, since a browser may store anything)."""
from __future__ import annotations

import json

import gradio as gr

from backend import limits, metadata, outpaint
from backend.families import FAST_SETTINGS
from backend.progress import StepTimes
from backend.requests import REPOSITORY_DEFAULT, SAMPLER_NAMES, TASKS, Text2ImageRequest
from kandinsky_ui import masks, render
from kandinsky_ui.config import UIConfig
from kandinsky_ui.controls import PRIOR_FIELDS, controls_from_settings
from kandinsky_ui.gallery import Gallery


class Page:
    def __init__(self, config: UIConfig, gallery: Gallery, step_times: StepTimes | None = None):
        self.config, self.gallery = config, gallery
        self.step_times = step_times if step_times is not None else StepTimes()

    # ------------------------------------------------------------------ model choice
    def model_view(self, model):
        """What the page shows for a model: per tab a note when it cannot run there (and its Generate
        button off), the prior's controls off where there is no prior, the scheduler the repo ships.
        Returns (tab labels per task, notes per task, buttons per task, prior controls, scheduler) updates, in
        that order."""
        spec = self.config.models.get(model)
        if spec is None:
            return (gr.skip(),) * (3 * len(TASKS) + len(PRIOR_FIELDS) + 1)
        from kandinsky_ui.tabs import tab_label  # tabs.py builds on this module
        labels, notes, buttons = [], [], []
        for task in TASKS:
            reason = spec.unsupported_reason(task)
            labels.append(gr.Tab(label=tab_label(spec, task)))
            notes.append(gr.Markdown(unavailable_text(spec, task), visible=bool(reason)))
            buttons.append(gr.Button(interactive=not reason))
        family = spec.family
        info = None if family.has_prior else f"{family.label} has no prior: not used"
        prior = [gr.update(interactive=family.has_prior, info=info) for _ in PRIOR_FIELDS]
        return (*labels, *notes, *buttons, *prior, gr.Dropdown(choices=scheduler_choices(family)))

    def model_defaults(self, model):
        """The settings a family's docs use, applied when the user picks a model (demo models keep
        their small sizes and step counts). Returns (width, height, steps, guidance, size preset)
        updates; what the model does not set is left alone (a skip, not the value read when the
        choice was made: the user may have moved it since)."""
        spec = self.config.models.get(model)
        values = self.config.model_defaults(spec) if spec is not None else {}
        names = ("width", "height", "num_inference_steps", "guidance_scale")
        updates = [values.get(name, gr.skip()) for name in names]
        preset = self.preset_from_size(values["width"], values["height"]) if "width" in values else gr.skip()
        return (*updates, preset)

    # ------------------------------------------------------------------ presets and the time they take
    def docs_settings(self, model):
        """The docs' settings of the model's family (as picking the model applies them) with the decoder repo's own
        sampler. Returns (width, height, steps, guidance, size preset, sampler) updates."""
        spec = self.config.models.get(model)
        if spec is None:
            return (gr.skip(),) * 6
        width, height, steps, guidance, preset = self.model_defaults(model)
        if spec.demo:  # the demo models keep their small sizes and the page's first step count
            steps = self.config.defaults["num_inference_steps"]
        return width, height, steps, guidance, preset, REPOSITORY_DEFAULT

    @staticmethod
    def fast_settings():
        """The "Fast" preset (backend/families.py FAST_SETTINGS): (steps, sampler) updates."""
        return FAST_SETTINGS["num_inference_steps"], FAST_SETTINGS["scheduler"]

    def steps_info(self, model, steps, width, height, guidance, batch_size, batch_count, prior_steps,
                   negative_prompt):
        """The steps slider's note: what a run with these settings takes (from the model's last finished job;
        every sampler costs one UNet evaluation per step), against the docs' step count."""
        spec = self.config.models.get(model)
        if spec is None:
            return gr.skip()
        try:
            request = Text2ImageRequest(model=model, num_inference_steps=int(steps), width=int(width),
                                        height=int(height), guidance_scale=float(guidance),
                                        batch_size=int(batch_size), batch_count=int(batch_count),
                                        prior_num_inference_steps=int(prior_steps),
                                        negative_prompt=negative_prompt or "")
        except (TypeError, ValueError):
            return gr.skip()
        family = spec.family
        docs_steps = family.defaults["num_inference_steps"]
        text_steps = family.text_steps(request) * (request.batch_count if family.text_per_run else 1)
        estimate = self.step_times.estimate(request, text_steps)
        docs = self.step_times.estimate(request, text_steps, docs_steps)
        return gr.update(info=render.steps_eta(int(steps), docs_steps, estimate, docs))

    # ------------------------------------------------------------------ PNG info
    @staticmethod
    def png_info(file):
        """(parameters text, JSON text) of a dropped PNG."""
        if not file:
            return "", ""
        try:
            parameters, raw_json = metadata.read_texts(file)
            settings = metadata.read_settings(file)
        except (OSError, ValueError) as error:
            raise gr.Error(f"cannot read the PNG's settings: {error}") from None
        if not settings:
            return parameters, "{}  // no Kandinsky Studio or A1111 settings in this file"
        return parameters, json.dumps(json.loads(raw_json) if raw_json else settings, indent=2, ensure_ascii=False)

    def settings_from_png(self, owner, file) -> tuple[dict, str]:
        """Control values (by name) stored in a PNG, and the tab to show; input images come back when
        they are this browser's own."""
        if not file:
            raise gr.Error("Drop a PNG first.")
        try:
            settings = metadata.read_settings(file)
        except (OSError, ValueError) as error:
            raise gr.Error(f"cannot read the PNG's settings: {error}") from None
        if not settings:
            raise gr.Error("This PNG carries no generation settings.")
        references = settings.get("input_images")  # field -> "inputs/<hex>.png"; anything else is no reference
        references = {name: reference for name, reference in references.items()
                      if isinstance(name, str) and isinstance(reference, str)} if isinstance(references, dict) else {}
        images = self.gallery.input_images(owner, references)
        values, task, skipped = controls_from_settings(settings, images)
        if "model" in values and values["model"] not in self.config.models:
            skipped.append(f"model must be one of {sorted(self.config.models)}; got {values.pop('model')!r}")
        if not values:
            raise gr.Error("None of this PNG's settings can be used" +
                           (": " + " · ".join(skipped) if skipped else " (it has none of the page's fields)"))
        for message in skipped:  # what is allowed instead, per field; the rest is applied
            gr.Warning(f"Not applied from this PNG: {message}")
        return values, task

    # ------------------------------------------------------------------ small helpers
    @staticmethod
    def normalized_weights(count, *weights) -> str:
        used = [max(0.0, float(w or 0)) for w in weights[:int(count or 2)]]
        total = sum(used)
        if total <= 0:
            return "Normalised weights: all weights are zero; raise at least one."
        return "Normalised weights: " + " · ".join(f"**{i + 1}:** {w / total:.2f}" for i, w in enumerate(used))

    @staticmethod
    def mask_overlay(editor, mask_upload, mask_invert, mask_grow, mask_blur):
        image = masks.editor_background(editor)
        if image is None:
            return None
        mask = masks.uploaded_mask(mask_upload, image.size) if mask_upload is not None else masks.painted_mask(editor)
        return masks.overlay(image, mask, bool(mask_invert), int(mask_grow or 0), int(mask_blur or 0))

    @staticmethod
    def outpaint_to_aspect(ratio, width, height):
        """The outpaint sides (left, right, top, bottom) that take a width x height image to `ratio` ("16:9"),
        centred, each rounded up to the sliders' step (the canvas is rounded to it anyway)."""
        if not ratio:
            return (gr.skip(),) * 4
        across, down = (int(part) for part in str(ratio).split(":"))
        step = limits.SIZE_MULTIPLE
        return tuple(-(-side // step) * step
                     for side in outpaint.extension_for_aspect(int(width), int(height), across / down))

    @staticmethod
    def clear_mask(editor):
        """(the editor without paint, the overlay without red): both at once, so the overlay never shows
        a mask that is gone."""
        image = masks.editor_background(editor)
        if image is None:
            return None, None
        return {"background": image, "layers": [], "composite": image}, image

    def size_from_preset(self, preset):
        sizes = dict(self.config.size_presets)
        if preset not in sizes:
            return gr.skip(), gr.skip()
        return sizes[preset]

    def preset_from_size(self, width, height):
        for label, size in self.config.size_presets:
            if tuple(size) == (int(width), int(height)):
                return label
        return "Custom"

    def reuse_seed(self, owner, selected, seeds):
        """The selected image's seed (from its PNG settings); without a selection, the last run's first."""
        settings = self.gallery.selected_settings(owner, selected) if selected else None
        if settings and isinstance(settings.get("seed"), int):
            return settings["seed"]
        first = str(seeds or "").split(",")[0].strip()
        if not first.isdigit():
            gr.Warning("Select an image in the gallery (or generate one) to reuse its seed.")
            return gr.skip()
        return int(first)


# Browser storage (localStorage, kandinsky_ui/layout.py): the controls' values, the recent prompts, the user's styles.
SETTINGS_KEY, HISTORY_KEY, STYLES_KEY = "kandinsky-studio-settings", "kandinsky-studio-history", "kandinsky-studio-styles"
HISTORY_KEPT = 20
MAX_STORED_TEXT = 4000
# Named styles: a prompt template ("{prompt}" is the prompt typed) and a negative prompt.
STYLES = {
    "Photograph": ("{prompt}, photograph, 35mm, natural light, sharp focus, highly detailed",
                   "painting, drawing, cartoon, lowres, blurry"),
    "Oil painting": ("{prompt}, oil painting on canvas, visible brush strokes, rich colours",
                     "photo, 3d render, lowres, text, watermark"),
    "Watercolour": ("{prompt}, watercolour painting, soft washes, paper texture", "photo, harsh lines, lowres"),
    "Anime": ("{prompt}, anime style, clean line art, vibrant colours", "photo, realistic, lowres, blurry"),
    "Cinematic": ("{prompt}, cinematic still, dramatic lighting, shallow depth of field, film grain",
                  "cartoon, flat lighting, lowres, text"),
}


def loads_json(text, kind):
    """`text` parsed as JSON if it is a `kind` (dict or list), else an empty one."""
    try:
        value = json.loads(text or "null")
    except (TypeError, ValueError):
        return kind()
    return value if isinstance(value, kind) else kind()


def stored_value(component, value):
    """`value` from the browser's storage if `component` takes it as it is now (choices, range, type), else None:
    a stored value may be from an older page, or anything."""
    if isinstance(component, (gr.Dropdown, gr.Radio)):
        choices = [choice[1] if isinstance(choice, (tuple, list)) else choice for choice in component.choices]
        return value if value in choices else None
    if isinstance(component, gr.Checkbox):
        return value if isinstance(value, bool) else None
    if isinstance(component, (gr.Slider, gr.Number)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
            return None
        low, high = getattr(component, "minimum", None), getattr(component, "maximum", None)
        if (low is not None and value < low) or (high is not None and value > high):
            return None
        return value
    if isinstance(component, gr.Textbox):
        return value[:MAX_STORED_TEXT] if isinstance(value, str) else None
    return None


def restore(components: dict, stored: str):
    """Updates for `components` (name -> component) from the browser's stored values (a JSON object); what is
    not stored, or no longer allowed, is left alone."""
    values = loads_json(stored, dict)
    updates = []
    for name, component in components.items():
        value = stored_value(component, values.get(name)) if name in values else None
        updates.append(gr.skip() if value is None else value)
    return updates


def history_choices(stored: str):
    """The recent-prompts menu from the browser's list (newest first)."""
    prompts = [p[:MAX_STORED_TEXT] for p in loads_json(stored, list) if isinstance(p, str) and p.strip()]
    return gr.Dropdown(choices=list(dict.fromkeys(prompts))[:HISTORY_KEPT], value=None)


def user_styles(stored: str) -> dict:
    styles = {}
    for name, style in loads_json(stored, dict).items():
        if isinstance(name, str) and name.strip() and isinstance(style, dict) and name not in STYLES:
            styles[name.strip()[:80]] = (str(style.get("prompt") or "")[:MAX_STORED_TEXT],
                                         str(style.get("negative_prompt") or "")[:MAX_STORED_TEXT])
    return styles


def style_choices(stored: str, value=None):
    return gr.Dropdown(choices=[*STYLES, *user_styles(stored)], value=value)


def apply_style(name, prompt, negative, stored):
    """(prompt, negative prompt) with the style: its template around the prompt typed ("{prompt}"), or, for a
    template without one (a saved prompt), the template itself; the style's negative prompt."""
    styles = {**STYLES, **user_styles(stored)}
    if name not in styles:
        return gr.skip(), gr.skip()
    template, style_negative = styles[name]
    text = template.replace("{prompt}", (prompt or "").strip()) if "{prompt}" in template else template
    return text.strip(" ,"), style_negative or negative


def save_style(name, prompt, negative, stored):
    """The style menu after the browser saved the current prompts as style `name` (the page's JS stores it)."""
    name = (name or "").strip()
    if not name:
        gr.Warning("Name the style first (the box beside Save style).")
        return gr.skip(), gr.skip()
    if name in STYLES:
        gr.Warning(f"{name!r} is a built-in style: choose another name.")
        return gr.skip(), gr.skip()
    return style_choices(stored, name), ""


def unavailable_text(spec, task: str) -> str:
    reason = spec.unsupported_reason(task)
    return f"**Not available with {spec.label}**: {reason}." if reason else ""


def scheduler_choices(family) -> list[tuple[str, str]]:
    """The sampler menu (backend.requests.SAMPLER_NAMES), the repository default labelled with what the repo
    ships."""
    return [(f"{name} ({family.repo_scheduler})" if name == REPOSITORY_DEFAULT else name, name)
            for name in SAMPLER_NAMES]
