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
from PIL import Image

from backend.limits import MAX_MIX_INPUTS
from backend.requests import REQUEST_TYPES, TASKS, GenerationRequest
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


# A placeholder for the image fields while a PNG's other settings are checked (its images are never checked:
# they come from the owner's own stored inputs only, never from the PNG's text).
_PLACEHOLDER = Image.new("RGB", (8, 8))
_IMAGE_TYPE = typing.Optional[Image.Image]


def _image_fields(task: str) -> list[str]:
    return [name for name, kind in typing.get_type_hints(REQUEST_TYPES[task]).items() if kind == _IMAGE_TYPE]


def _checked_request(task: str, **values) -> GenerationRequest:
    """A request of `task` holding `values` and valid placeholders elsewhere, validated: the request's own
    checks (backend/requests.py) raise ValueError naming the field of `values` that is not allowed."""
    base = {name: _PLACEHOLDER for name in _image_fields(task)}
    if task == "interpolate":
        base.update(inputs=["a", "b"], weights=[1.0, 1.0])
    request = REQUEST_TYPES[task](**{**base, **values})
    request.validate()
    return request


def _mix_controls(settings: dict, images: dict, skipped: list) -> dict:
    """A PNG's interpolation inputs and weights -> row control values, when the request allows them."""
    inputs, weights = settings.get("inputs"), settings.get("weights")
    if inputs is None:
        return {}
    if isinstance(inputs, list):
        weights = [1.0] * len(inputs) if weights is None else weights
        checked = [images.get(f"inputs[{i}]", _PLACEHOLDER) if item is None else item for i, item in enumerate(inputs)]
    else:
        checked = inputs
    try:
        request = _checked_request("interpolate", inputs=checked, weights=weights)
    except (ValueError, TypeError) as error:
        skipped.append(str(error))
        return {}
    return rows_from_mix(inputs, request.weights, images)


def controls_from_settings(settings: dict, images: dict) -> tuple[dict, str, list[str]]:
    """A PNG's settings (and its input images, by field name) -> control values by name, the tab, and the
    settings left out: each value is checked as a request checks it (a PNG may carry anything), and one that
    is not allowed is skipped with the request's message, which names the field and what is allowed."""
    skipped: list[str] = []

    def checked(task: str, name: str, value):
        try:
            return getattr(_checked_request(task, **{name: value}), name)
        except (ValueError, TypeError, OverflowError) as error:
            skipped.append(str(error))
            return None

    # shared fields as the request writes them: a known sampler as the menu does ("ddpm", "default" of older PNGs)
    values = {name: checked("text2img", name, settings[name]) for name in SHARED_FIELDS
              if settings.get(name) is not None}
    task = settings.get("task", "text2img")
    if task not in TASKS:
        skipped.append(f"task must be one of {list(TASKS)}; got {task!r} (read as text to image)")
        task = "text2img"
    if task == "controlnet" and "hint_source" not in settings:  # made before the estimator: a depth map
        settings = dict(settings, hint_source="depth map")
    image_fields = _image_fields(task)
    for field in task_fields(task):
        control = control_name(task, field)
        if field == "inputs":
            values.update(_mix_controls(settings, images, skipped))
        elif field in image_fields:  # the owner's own stored input image, if any
            if images.get(field) is not None:
                values.update(TO_CONTROL.get(control, lambda v, c=control: {c: v})(images[field]))
        elif field != "weights" and settings.get(field) is not None:
            value = checked(task, field, settings[field])
            if value is not None:
                values.update(TO_CONTROL.get(control, lambda v, c=control: {c: v})(value))
    return {name: value for name, value in values.items() if value is not None}, task, skipped
