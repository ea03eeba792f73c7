"""What the page's events do: build typed requests, follow their jobs, render the events.

Generation handlers are generators: each event of the job becomes one update of
(owner, progress, preview, gallery, seeds). A browser is identified by a random "owner" id kept
in its localStorage; its images live in their own outputs folder, so sessions never see each
other's previews (each job streams to the handler that submitted it) or images.
"""
from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
from PIL import Image

from backend import metadata
from backend.jobs import (Cancelled, ControlNetRequest, Failed, Image2ImageRequest, InpaintRequest,
                          InterpolateRequest, JobRunner, Result, Step, Text2ImageRequest)
from backend.manager import (FAMILY_DEFAULTS, FAMILY_SCHEDULERS, TASK_KINDS, ModelManager, format_bytes,
                             parse_memory)
from kandinsky_ui import masks, render

logger = logging.getLogger(__name__)

MAX_INPUTS = 6
_OWNER_RE = re.compile(r"^[0-9a-f]{32}$")

# Shared controls: request field -> converter from the component's value.
SHARED_FIELDS = {
    "model": str, "prompt": str, "negative_prompt": str, "negative_prior_prompt": str,
    "width": int, "height": int, "num_inference_steps": int, "prior_num_inference_steps": int,
    "guidance_scale": float, "prior_guidance_scale": float, "scheduler": str, "seed": int,
    "batch_count": int, "batch_size": int, "preview": str, "preview_every": int,
}
MODE_LABELS = {"Text to image": "text2img", "Image to image": "img2img"}
TASKS = tuple(TASK_KINDS)          # the tabs that generate, in page order
PRIOR_FIELDS = ("negative_prior_prompt", "prior_num_inference_steps", "prior_guidance_scale")


@dataclass
class UIConfig:
    demo: bool
    models: list                                   # (label, key)
    defaults: dict                                 # shared field -> default value
    size_presets: list                             # (label, (width, height))
    title: str = "Kandinsky Studio"
    gallery_limit: int = 100
    notes: list = field(default_factory=list)      # lines for the header
    browser_secret: str | None = None              # key of the owner id in localStorage (None: per start)


def _convert(name: str, value, kind):
    if value is None or value == "":
        return None
    if kind is int:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise gr.Error(f"{name} must be a number; got {value!r}") from None
        return int(number) if number.is_integer() else number  # the request check names the field
    if kind is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise gr.Error(f"{name} must be a number; got {value!r}") from None
    return str(value)


class Studio:
    def __init__(self, runner: JobRunner, manager: ModelManager, store: metadata.OutputStore, config: UIConfig):
        self.runner, self.manager, self.store, self.config = runner, manager, store, config

    # ------------------------------------------------------------------ owners
    @staticmethod
    def owner_of(owner) -> str:
        """A valid owner id: the browser's own, or a fresh one."""
        if isinstance(owner, str) and _OWNER_RE.match(owner):
            return owner
        return uuid.uuid4().hex

    def gallery(self, owner: str) -> list:
        return render.gallery_items(self.store.list(owner, self.config.gallery_limit))

    def on_load(self, stored):
        owner = self.owner_of(stored)
        items = self.gallery(owner)
        jobs = self.runner.jobs_of(owner)
        if jobs:
            text = render.progress_html("Your job from before the reload is still running…", None, "running")
        elif items:
            text = render.progress_html(f"{len(items)} earlier image(s) of this browser are in the gallery.",
                                        None, "idle")
        else:
            text = render.progress_html("Ready.", None, "idle")
        return owner, owner, items, text

    def resume(self, owner):
        """After a reload: follow this browser's running job again, if there is one."""
        owner = self.owner_of(owner)
        jobs = self.runner.jobs_of(owner)
        if jobs:
            yield from self._follow(owner, jobs[0])
        else:  # a generator that yields nothing would blank every output
            yield (gr.skip(),) * 5

    # ------------------------------------------------------------------ generation
    def _shared(self, settings: dict) -> dict:
        unknown = set(settings) - set(SHARED_FIELDS)
        if unknown:
            raise gr.Error(f"unknown settings: {sorted(unknown)}")
        values = dict(self.config.defaults)
        for name, value in settings.items():
            converted = _convert(name, value, SHARED_FIELDS[name])
            if converted is not None:
                values[name] = converted
            elif name in ("prompt", "negative_prompt", "negative_prior_prompt"):
                values[name] = ""  # an emptied text box; other empty controls keep their defaults
        return values

    def text2img(self, owner="", **settings):
        yield from self._submit(owner, lambda: Text2ImageRequest(**self._shared(settings)))

    def img2img(self, owner="", image=None, strength=0.3, **settings):
        yield from self._submit(owner, lambda: Image2ImageRequest(image=image, strength=strength,
                                                                  **self._shared(settings)))

    def inpaint(self, owner="", editor=None, mask_upload=None, mask_invert=False, mask_grow=0, mask_blur=0,
                **settings):
        def build():
            image = masks.editor_background(editor)
            if image is None:
                raise ValueError("image is required: upload an image in the Inpaint tab")
            if mask_upload is not None:
                mask = masks.uploaded_mask(mask_upload, image.size)
            else:
                mask = masks.painted_mask(editor)
            if mask is None or mask.getextrema()[1] == 0:
                if not mask_invert:
                    raise ValueError("mask is empty: paint over the part of the image to repaint")
            return InpaintRequest(image=image, mask=mask, mask_invert=bool(mask_invert), mask_grow=mask_grow,
                                  mask_blur=mask_blur, **self._shared(settings))
        yield from self._submit(owner, build)

    def interpolate(self, owner="", input_count=2, walk_steps=0,
                    kind_1="Text", text_1="", image_1=None, weight_1=0.5,
                    kind_2="Text", text_2="", image_2=None, weight_2=0.5,
                    kind_3="Text", text_3="", image_3=None, weight_3=0.5,
                    kind_4="Text", text_4="", image_4=None, weight_4=0.5,
                    kind_5="Text", text_5="", image_5=None, weight_5=0.5,
                    kind_6="Text", text_6="", image_6=None, weight_6=0.5, **settings):
        """Inputs 1..input_count, each a text or an image (by its kind), with a weight each.

        Images default to None in the signature so API clients may leave them out.
        """
        rows = [(kind_1, text_1, image_1, weight_1), (kind_2, text_2, image_2, weight_2),
                (kind_3, text_3, image_3, weight_3), (kind_4, text_4, image_4, weight_4),
                (kind_5, text_5, image_5, weight_5), (kind_6, text_6, image_6, weight_6)]

        def build():
            count = int(input_count or 2)
            inputs, weights = [], []
            for i, (kind, text, image, weight) in enumerate(rows[:count], start=1):
                if kind == "Image":
                    if image is None:
                        raise ValueError(f"inputs[{i - 1}] is an image input without an image: upload one or "
                                         f"switch input {i} to text")
                    inputs.append(image)
                else:
                    inputs.append(text or "")
                weights.append(weight)
            return InterpolateRequest(inputs=inputs, weights=weights, walk_steps=walk_steps,
                                      **self._shared(settings))
        yield from self._submit(owner, build)

    def controlnet(self, owner="", depth=None, controlnet_mode="Text to image", controlnet_image=None,
                   controlnet_strength=0.5, **settings):
        def build():
            mode = MODE_LABELS.get(controlnet_mode, controlnet_mode)
            return ControlNetRequest(hint=depth, mode=mode, image=controlnet_image,
                                     strength=controlnet_strength, **self._shared(settings))
        yield from self._submit(owner, build)

    def _submit(self, owner, build):
        owner = self.owner_of(owner)
        try:
            request = build()
            self.manager.check_task(request.model, request.task)
            job = self.runner.submit(request, owner)
        except (ValueError, TypeError, RuntimeError) as error:
            raise gr.Error(str(error)) from None
        yield from self._follow(owner, job)

    def _follow(self, owner: str, job):
        skip = gr.skip()
        events = job.events()
        try:
            for event in events:
                text = render.event_html(event)
                if isinstance(event, Step):
                    yield owner, text, event.preview if event.preview is not None else skip, skip, skip
                elif isinstance(event, Result):
                    first = event.images[0].image if event.images else skip
                    yield owner, text, first, self.gallery(owner), render.seeds_text(event.seeds)
                elif isinstance(event, Cancelled):
                    partial = event.partials[0].image if event.partials else skip
                    yield owner, text, partial, self.gallery(owner), render.seeds_text(event.seeds)
                elif isinstance(event, Failed):
                    yield owner, text, skip, skip, skip
                    raise gr.Error(event.message)
                else:
                    yield owner, text, skip, skip, skip
        finally:
            events.close()
            # Nobody follows a job that has not started (the tab was closed): drop it.
            if not job.done and job.started_at is None and job.subscriber_count() == 0:
                job.cancel()

    def stop(self, owner=""):
        owner = self.owner_of(owner)
        count = self.runner.cancel_owner(owner)
        # Not written to the progress line: this answer may reach the page after the job's own
        # "stopped" update and would overwrite it.
        if count:
            return "Stopping after the current step…"
        return "Nothing of yours is running."

    # ------------------------------------------------------------------ gallery
    def select(self, owner, evt: gr.SelectData):
        owner = self.owner_of(owner)
        paths = self.store.list(owner, self.config.gallery_limit)
        index = evt.index if isinstance(evt.index, int) else None
        if index is None or not 0 <= index < len(paths):
            return None, "Select an image in the gallery."
        path = paths[index]
        return str(path), f"Selected: `{path.name}` ({render.caption(path)})"

    def _selected_image(self, owner, selected) -> Image.Image:
        owner = self.owner_of(owner)
        if not selected or not self.store.owns(owner, selected) or not Path(selected).is_file():
            raise gr.Error("Select one of your images in the gallery first.")
        with Image.open(selected) as image:
            return image.convert("RGB")

    def send_to_img2img(self, owner, selected):
        return self._selected_image(owner, selected), gr.Tabs(selected="img2img")

    def send_to_inpaint(self, owner, selected):
        image = self._selected_image(owner, selected)
        return {"background": image, "layers": [], "composite": image}, gr.Tabs(selected="inpaint")

    def send_to_controlnet(self, owner, selected):
        return (self._selected_image(owner, selected), "Image to image", gr.Tabs(selected="controlnet"))

    def send_to_png_info(self, owner, selected):
        self._selected_image(owner, selected)
        return selected, gr.Tabs(selected="pnginfo")

    # ------------------------------------------------------------------ PNG info
    def png_info(self, file):
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
        return parameters, json.dumps(settings, indent=2, ensure_ascii=False) if not raw_json else \
            json.dumps(json.loads(raw_json), indent=2, ensure_ascii=False)

    def settings_from_png(self, owner, file) -> tuple[dict, str]:
        """Control values (by name) stored in a PNG, and the tab to show."""
        owner = self.owner_of(owner)
        if not file:
            raise gr.Error("Drop a PNG first.")
        try:
            settings = metadata.read_settings(file)
        except (OSError, ValueError) as error:
            raise gr.Error(f"cannot read the PNG's settings: {error}") from None
        if not settings:
            raise gr.Error("This PNG carries no generation settings.")
        values = {}
        for name, kind in SHARED_FIELDS.items():
            if name in settings and settings[name] is not None:
                values[name] = kind(settings[name])
        if values.get("model") not in dict((key, label) for label, key in self.config.models):
            values.pop("model", None)
        task = settings.get("task", "text2img")
        images = {}
        for name, reference in (settings.get("input_images") or {}).items():
            try:
                path = self.store.input_path(owner, reference)
            except ValueError:
                continue
            if path.is_file():
                with Image.open(path) as image:
                    images[name] = image.convert("RGB")
        if task == "img2img":
            values["strength"] = settings.get("strength")
            values["image"] = images.get("image")
        elif task == "inpaint":
            for name in ("mask_invert", "mask_grow", "mask_blur"):
                values[name] = settings.get(name)
            if "image" in images:
                values["editor"] = {"background": images["image"], "layers": [], "composite": images["image"]}
            if "mask" in images:
                values["mask_upload"] = images["mask"]
        elif task == "interpolate":
            inputs = settings.get("inputs") or []
            values["input_count"] = len(inputs)
            values["walk_steps"] = settings.get("walk_steps", 0)
            for i, item in enumerate(inputs, start=1):
                values[f"weight_{i}"] = (settings.get("weights") or [1.0] * len(inputs))[i - 1]
                if isinstance(item, str):
                    values[f"kind_{i}"], values[f"text_{i}"] = "Text", item
                else:
                    values[f"kind_{i}"] = "Image"
                    values[f"image_{i}"] = images.get(f"inputs[{i - 1}]")
        elif task == "controlnet":
            values["depth"] = images.get("hint")
            values["controlnet_mode"] = {v: k for k, v in MODE_LABELS.items()}.get(settings.get("mode"),
                                                                                   "Text to image")
            values["controlnet_strength"] = settings.get("strength")
            values["controlnet_image"] = images.get("image")
        tab = task if task in ("text2img", "img2img", "inpaint", "interpolate", "controlnet") else "text2img"
        return {k: v for k, v in values.items() if v is not None}, tab

    # ------------------------------------------------------------------ small helpers for the page
    @staticmethod
    def normalized_weights(count, *weights) -> str:
        count = int(count or 2)
        used = [max(0.0, float(w or 0)) for w in weights[:count]]
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
        request = InpaintRequest(image=image, mask=mask, mask_invert=bool(mask_invert),
                                 mask_grow=int(mask_grow or 0), mask_blur=int(mask_blur or 0))
        return masks.overlay(image, request)

    @staticmethod
    def clear_mask(editor):
        image = masks.editor_background(editor)
        if image is None:
            return None
        return {"background": image, "layers": [], "composite": image}

    @staticmethod
    def hint_view(depth, width, height):
        """What the ControlNet sees: the depth map as grey, resized to the output size."""
        if depth is None:
            return None
        return depth.convert("L").resize((int(width), int(height)), Image.BICUBIC).convert("RGB")

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

    @staticmethod
    def reuse_seed(seeds):
        first = str(seeds or "").split(",")[0].strip()
        return int(first) if first.isdigit() else -1

    # ------------------------------------------------------------------ model choice
    def model_view(self, model):
        """What the page shows for a model: per tab a note when it cannot run there (and its Generate
        button off), the prior's controls off where there is no prior, the scheduler the repo ships.
        Returns (notes per task, buttons per task, prior controls, scheduler) updates, in that order."""
        try:
            spec = self.manager.spec(model)
        except ValueError:
            return (gr.skip(),) * (2 * len(TASKS) + len(PRIOR_FIELDS) + 1)
        notes, buttons = [], []
        for task in TASKS:
            reason = spec.unsupported_reason(task)
            notes.append(gr.Markdown(f"**Not available with {spec.label}**: {reason}." if reason else "",
                                     visible=bool(reason)))
            buttons.append(gr.Button(interactive=not reason))
        has_prior = spec.family != "3"
        prior_info = None if has_prior else f"Kandinsky {spec.family} has no prior: not used"
        prior = [gr.update(interactive=has_prior, info=prior_info) for _ in PRIOR_FIELDS]
        choices = [(f"Repository default ({FAMILY_SCHEDULERS.get(spec.family, 'DDPM')})", "default"),
                   ("DDPM", "ddpm"), ("DDIM", "ddim")]
        return (*notes, *buttons, *prior, gr.Dropdown(choices=choices))

    def model_defaults(self, model, width, height, steps, guidance):
        """The settings a family's docs use, applied when the user picks a model (demo models keep
        their small sizes and step counts). Returns (width, height, steps, guidance, size preset)."""
        try:
            spec = self.manager.spec(model)
        except ValueError:
            return (gr.skip(),) * 5
        values = dict(FAMILY_DEFAULTS.get(spec.family, {}))
        if spec.demo:
            values = {"guidance_scale": values.get("guidance_scale", guidance)}
        width, height = values.get("width", width), values.get("height", height)
        return (width, height, values.get("num_inference_steps", steps), values.get("guidance_scale", guidance),
                self.preset_from_size(width, height))

    # ------------------------------------------------------------------ models
    def models_status(self) -> str:
        running = self.runner.running
        label = f"{running.request.task} ({running.id})" if running is not None else None
        return render.status_markdown(self.manager.status(), self.runner.waiting_count, label)

    def unload_all(self):
        future = self.runner.call_soon(self.manager.unload)
        try:
            freed = future.result(timeout=3)
            note = f"Unloaded {len(freed)} folder(s)." if freed else "Nothing to unload."
        except TimeoutError:
            note = "A job is running: the models will be unloaded when it ends."
        return note + "\n\n" + self.models_status()

    def set_budget(self, text):
        try:
            budget = parse_memory(text)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        if budget is None:
            from backend.manager import default_memory_budget
            budget = default_memory_budget()
        future = self.runner.call_soon(self.manager.set_memory_budget, budget)
        try:
            evicted = future.result(timeout=3)
            note = f"Budget set to {format_bytes(budget)}." + (f" Evicted: {', '.join(evicted)}." if evicted else "")
        except TimeoutError:
            note = f"Budget {format_bytes(budget)} applies when the running job ends."
        return note + "\n\n" + self.models_status()
