"""The page's controls <-> the request fields, both ways, from the request dataclasses.

Generating, a handler gets the control values by name (they are also the HTTP API's parameters)
and `request_from_controls` makes the typed request; "Use these settings" in PNG info turns a
PNG's stored settings back into control values with `controls_from_settings`. Both walk the
fields of the request classes (backend/requests.py): a shared field is the control of the same
name, of the field's type; a task's own field is the control of the same name unless
CONTROL_NAMES says otherwise, and its value converts where the control shows it differently
(TO_REQUEST, TO_CONTROL). A new request field thus needs a control, not a new list here.
"""
from __future__ import annotations

import typing
from dataclasses import fields

import gradio as gr

from backend.limits import MAX_MIX_INPUTS
from backend.requests import REQUEST_TYPES, TASKS, GenerationRequest, check_sampler
from kandinsky_ui import masks

# Shared controls: request field -> its type (what a control's value is converted to).
SHARED_FIELDS = {f.name: typing.get_type_hints(GenerationRequest)[f.name] for f in fields(GenerationRequest)}
TEXT_FIELDS = ("prompt", "negative_prompt", "negative_prior_prompt")   # an emptied box means an empty text
PRIOR_FIELDS = ("negative_prior_prompt", "prior_num_inference_steps", "prior_guidance_scale")

MODE_LABELS = {"Text to image": "text2img", "Image to image": "img2img"}   # ControlNet mode radio
# ControlNet hint radio -> the request's hint_source (backend/requests.py HINT_SOURCES)
HINT_LABELS = {"Estimate depth from this photo": "photo", "Use my depth map": "depth map"}
INPUT_KINDS = ("Text", "Image")
# Interpolation input i (1-based) is the row of controls kind_i, text_i, image_i and weight_i.
ROW_CONTROLS = ("kind", "text", "image", "weight")

# task -> request field -> the control holding it, where the names differ
CONTROL_NAMES = {
    "inpaint": {"image": "editor", "mask": "mask_upload"},
    "controlnet": {"hint": "depth", "mode": "controlnet_mode", "image": "controlnet_image",
                   "strength": "controlnet_strength"},
}


def _editor_value(image):
    return {"background": image, "layers": [], "composite": image}


# control -> (control value -> field value) and (stored field value -> control values), where they differ
TO_REQUEST = {"editor": masks.editor_background, "controlnet_mode": lambda label: MODE_LABELS.get(label, label),
              "hint_source": lambda label: HINT_LABELS.get(label, label)}
TO_CONTROL = {"editor": lambda image: {"editor": _editor_value(image)},
              "controlnet_mode": lambda mode: {"controlnet_mode": {v: k for k, v in MODE_LABELS.items()}.get(
                  mode, "Text to image")},
              "hint_source": lambda source: {"hint_source": {v: k for k, v in HINT_LABELS.items()}.get(
                  source, source)}}


def task_fields(task: str) -> list[str]:
    """The request fields a task adds to the shared ones."""
    return [f.name for f in fields(REQUEST_TYPES[task]) if f.name not in SHARED_FIELDS]


def control_name(task: str, field: str) -> str:
    return CONTROL_NAMES.get(task, {}).get(field, field)


def row_names(index: int) -> list[str]:
    """The controls of interpolation input `index` (1-based)."""
    return [f"{name}_{index}" for name in ROW_CONTROLS]


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


def request_from_controls(task: str, values: dict, defaults: dict) -> GenerationRequest:
    """The typed request of `task` from control values by name; shared controls left out or empty
    take `defaults` (an emptied text box is an empty text)."""
    kwargs = {name: value for name, value in defaults.items() if name in SHARED_FIELDS}
    own = {control_name(task, field): field for field in task_fields(task)}
    unknown = set(values) - set(SHARED_FIELDS) - set(own)
    if unknown:
        raise gr.Error(f"unknown settings: {sorted(unknown)}")
    for name, value in values.items():
        if name in SHARED_FIELDS:
            converted = _convert(name, value, SHARED_FIELDS[name])
            if converted is not None:
                kwargs[name] = converted
            elif name in TEXT_FIELDS:
                kwargs[name] = ""
        elif value is not None:
            kwargs[own[name]] = TO_REQUEST.get(name, lambda v: v)(value)
    return REQUEST_TYPES[task](**kwargs)


def mix_from_rows(count, rows: list[tuple]) -> tuple[list, list]:
    """Interpolation rows (kind, text, image, weight) -> the request's inputs and weights, for the
    first `count` rows."""
    inputs, weights = [], []
    for index, (kind, text, image, weight) in enumerate(rows[:int(count or 2)]):
        if kind == "Image":
            if image is None:
                raise ValueError(f"inputs[{index}] is an image input without an image: upload one or switch "
                                 f"input {index + 1} to text")
            inputs.append(image)
        else:
            inputs.append(text or "")
        weights.append(weight)
    return inputs, weights


def rows_from_mix(inputs: list, weights: list | None, images: dict) -> dict:
    """The request's inputs and weights (as stored: None for an image input) -> row control values."""
    values = {"input_count": len(inputs)}
    weights = weights or [1.0] * len(inputs)
    for index, item in enumerate(inputs[:MAX_MIX_INPUTS]):
        kind, text, image, weight = row_names(index + 1)
        values[weight] = weights[index]
        if isinstance(item, str):
            values[kind], values[text] = "Text", item
        else:
            values[kind], values[image] = "Image", images.get(f"inputs[{index}]")
    return values


def controls_from_settings(settings: dict, images: dict) -> tuple[dict, str]:
    """A PNG's settings (and its input images, by field name) -> control values by name, and the tab."""
    values = {name: kind(settings[name]) for name, kind in SHARED_FIELDS.items() if settings.get(name) is not None}
    if "scheduler" in values:  # a known sampler as the menu writes it ("ddpm", "default" from older PNGs)
        try:
            values["scheduler"] = check_sampler("scheduler", values["scheduler"])
        except ValueError:
            pass  # shown as it is; Generate then says which names there are
    task = settings.get("task") if settings.get("task") in TASKS else "text2img"
    if task == "controlnet" and "hint_source" not in settings:  # made before the estimator: a depth map
        settings = dict(settings, hint_source="depth map")
    for field in task_fields(task):
        stored = images.get(field, settings.get(field))
        if field == "inputs":
            values.update(rows_from_mix(settings.get("inputs") or [], settings.get("weights"), images))
        elif field != "weights" and stored is not None:
            control = control_name(task, field)
            values.update(TO_CONTROL.get(control, lambda v, c=control: {c: v})(stored))
    return {name: value for name, value in values.items() if value is not None}, task
