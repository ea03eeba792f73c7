"""Typed requests: what the page, the HTTP API and library callers hand to the Engine.

One dataclass per task, plain data (settings, texts and PIL images), checked by `validate()`,
which raises ValueError naming the first field out of range and what is allowed. The limits
come from backend/limits.py; the choices (previews, modes) are declared here once, the samplers'
names in backend/schedulers (SAMPLERS).
`settings()` is what goes into the PNG's chunks; `dataclasses.fields` of these classes is what
the page reads back from a PNG (kandinsky_ui/controls.py), so a new field needs no second list.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Optional

import numpy as np
from PIL import Image

from backend import masks, outpaint
from backend.fields import check_choice, check_float, check_image, check_int, check_text
from backend.schedulers import SAMPLERS
from backend.limits import (APP_MAX_BATCH_SIZE, APP_MAX_SIDE, APP_MAX_STEPS, MAX_BATCH_COUNT, MAX_GUIDANCE,
                            MAX_HIRES_SCALE, MAX_MASK_EDIT, MAX_MIX_INPUTS, MAX_MIX_WEIGHT, MAX_OUTPAINT_BLEND,
                            MAX_PREVIEW_EVERY, MAX_SEED, MAX_WALK_STEPS, MIN_MIX_INPUTS, MIN_PRIOR_STEPS,
                            SIZE_MULTIPLE)

DEFAULT_MODEL = "kandinsky-2-2"
# The decoder samplers a request may name (in any case): the scheduler the decoder repo ships, or one of
# backend.schedulers.SAMPLERS (the one name -> scheduler table). Stored by these names in the PNGs.
REPOSITORY_DEFAULT = "Repository default"
SAMPLER_NAMES = (REPOSITORY_DEFAULT, *SAMPLERS)
# The model manager's keys for them (backend/manager.py UnitInUse.pipeline) -> the name scheduler_from_config
# builds: "default" (the repo's own), else the name in lower case, as a repo's own alternative folder is
# named (kandinsky-2-1/ddpm_scheduler: learned-range DDPM; "ddpm" finds it).
SCHEDULERS = {"default": None, **{name.lower(): name for name in SAMPLERS}}
PREVIEW_MODES = ("fast", "decode", "off")      # linear map of x0 | MoVQ decode of x0 | none
CONTROLNET_MODES = ("text2img", "img2img")
# What a ControlNet `hint` image is: a photo whose depth the depth estimator gives the model, or a depth map
# used as it is (white = near). "depth map" is what a request without the field meant before the estimator.
HINT_SOURCES = ("photo", "depth map")
# A depth map is grey: R = G = B. Beyond this mean spread of a pixel's channels (0-255 levels, on a 64x64
# thumbnail) an image given as a depth map is a colour photo, or a colour-mapped depth the model misreads.
DEPTH_MAP_MAX_CHROMA = 8.0

def check_sampler(name: str, value) -> str:
    """One of SAMPLER_NAMES, written as there, from any case of it; "default" is the repository default
    (the name the app stored before the samplers came)."""
    text = value.strip().lower() if isinstance(value, str) else None
    if text in ("", "default"):
        return REPOSITORY_DEFAULT
    for sampler in SAMPLER_NAMES:
        if sampler.lower() == text:
            return sampler
    raise ValueError(f"{name} must be one of {list(SAMPLER_NAMES)} (any case); got {value!r}")


def scheduler_key(sampler: str) -> str:
    """A sampler name (check_sampler) as the model manager takes it (SCHEDULERS)."""
    return "default" if sampler == REPOSITORY_DEFAULT else sampler.lower()


def depth_map_warning(name: str, image: Image.Image | None) -> str:
    """A warning for the page and the job's notes when an image given as a depth map is in colour ("": none)."""
    if image is None or image.mode in ("L", "LA", "I", "I;16", "F", "1"):
        return ""
    thumb = np.asarray(image.convert("RGB").resize((64, 64), Image.BILINEAR), np.int16)
    chroma = float((thumb.max(axis=2) - thumb.min(axis=2)).mean())
    if chroma <= DEPTH_MAP_MAX_CHROMA:
        return ""
    return (f"{name} does not look like a depth map: it is in colour (a depth map is grey, white = near). "
            f"Its grey levels are used as depth; to make the depth from this photo, choose "
            f"\"Estimate depth from this photo\" (hint_source \"photo\").")


def strength_steps(steps: int, strength: float) -> int:
    """Steps an image-to-image run takes: the last `strength` of the schedule (diffusers' get_timesteps)."""
    return min(int(steps * strength), steps)


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The hi-res pass's (width, height): the base size times `scale`, each side rounded to the nearest
    multiple of SIZE_MULTIPLE (halves up; e.g. 704 x 1.5 = 1056 -> 1088), at least the base size."""
    def side(base: int) -> int:
        return max(base, int(base * scale / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE)
    return side(width), side(height)


def _check_seed(name: str, value) -> int:
    """A seed, or -1 (any negative number) for a random one."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        return -1
    return check_int(name, value, -1, MAX_SEED)


# ---------------------------------------------------------------------------------- requests


@dataclass(kw_only=True)
class GenerationRequest:
    """Settings every task shares. Defaults follow the Kandinsky 2.2 docs."""

    task: ClassVar[str] = ""
    model: str = DEFAULT_MODEL                 # key of a model the Engine offers
    prompt: str = ""
    negative_prompt: str = ""                  # its prior embedding is the decoder's negative
    negative_prior_prompt: str = ""            # the prior's own classifier-free guidance negative
    width: int = 768                           # pixels, a multiple of 64
    height: int = 768
    num_inference_steps: int = 50              # decoder steps
    prior_num_inference_steps: int = 25
    guidance_scale: float = 4.0                # decoder guidance
    prior_guidance_scale: float = 1.0
    scheduler: str = REPOSITORY_DEFAULT        # decoder sampler, one of SAMPLER_NAMES
    seed: int = -1                             # < 0: a random seed, reported back
    batch_count: int = 1                       # runs one after another, seeds seed, seed+1, ...
    batch_size: int = 1                        # images per run
    preview: str = "fast"                      # one of PREVIEW_MODES
    preview_every: int = 1                     # a preview every n-th step
    # Variations (AUTOMATIC1111's variation seed): each run's noise is slerped this far (0 = none, 1 = all the
    # way) towards the noise of variation_seed (run b: variation_seed + b, as its seed is seed + b);
    # backend/random.py VariationGenerator
    variation_seed: int = -1                   # < 0: a random one when variation_strength > 0, reported back
    variation_strength: float = 0.0            # in [0, 1]

    def validate(self) -> None:
        """Raise ValueError naming the first field out of range."""
        for name in ("model", "prompt", "negative_prompt", "negative_prior_prompt", "scheduler", "preview"):
            setattr(self, name, check_text(name, getattr(self, name)))
        for name in ("width", "height"):
            value = check_int(name, getattr(self, name), SIZE_MULTIPLE, APP_MAX_SIDE)
            if value % SIZE_MULTIPLE:
                raise ValueError(f"{name} must be a multiple of {SIZE_MULTIPLE}; got {value}")
            setattr(self, name, value)
        self.num_inference_steps = check_int("num_inference_steps", self.num_inference_steps, 1, APP_MAX_STEPS)
        self.prior_num_inference_steps = check_int("prior_num_inference_steps", self.prior_num_inference_steps,
                                                   MIN_PRIOR_STEPS, APP_MAX_STEPS)
        self.guidance_scale = check_float("guidance_scale", self.guidance_scale, 0.0, MAX_GUIDANCE)
        self.prior_guidance_scale = check_float("prior_guidance_scale", self.prior_guidance_scale, 0.0,
                                                MAX_GUIDANCE)
        self.seed = _check_seed("seed", self.seed)
        self.variation_seed = _check_seed("variation_seed", self.variation_seed)
        self.variation_strength = check_float("variation_strength", self.variation_strength, 0, 1)
        self.batch_count = check_int("batch_count", self.batch_count, 1, MAX_BATCH_COUNT)
        self.batch_size = check_int("batch_size", self.batch_size, 1, APP_MAX_BATCH_SIZE)
        self.scheduler = check_sampler("scheduler", self.scheduler)
        check_choice("preview", self.preview, PREVIEW_MODES)
        self.preview_every = check_int("preview_every", self.preview_every, 1, MAX_PREVIEW_EVERY)

    # -------------------------------------------------------------- what the engine asks of a task
    @property
    def decoder_stage(self) -> str:
        """The family stage that makes the image (backend/families.py)."""
        return self.task

    def denoise_steps(self) -> int:
        """Denoising steps the decoder runs (image-to-image runs the last `strength` of the schedule)."""
        return self.num_inference_steps

    def pipeline_inputs(self) -> dict:
        """The task's own decoder arguments (images, strength), as the pipelines name them."""
        return {}

    def depth_photo(self) -> tuple[str, Image.Image] | None:
        """(field, photo) whose estimated depth the decoder takes (backend/tasks.py), or None."""
        return None

    def warnings(self) -> list[str]:
        """What the job should tell about inputs it takes but that look wrong (the result's notes)."""
        return []

    def with_depth(self, depth: Image.Image) -> "GenerationRequest":
        """The request as the decoder runs it, given the estimated depth of `depth_photo()`."""
        raise NotImplementedError

    def decoded_size(self, width: int | None = None, height: int | None = None) -> tuple[int, int]:
        """The (width, height) of the job's images for a request of this width x height (default: its own):
        the size itself, but for a hi-res pass or an outpainted canvas."""
        return width or self.width, height or self.height

    def largest_decode(self, width: int, height: int, images: int) -> tuple[int, int, int]:
        """(width, height, images) of the job's largest decoder call for a request of this width x height and
        batch_size `images` (the memory guard, backend/working_memory.py)."""
        width, height = self.decoded_size(width, height)
        return width, height, images

    def memory_fields(self) -> str:
        """The fields that set the largest decoder call, as a refusal names them."""
        return "width/height/batch_size"

    def on_canvas(self) -> "GenerationRequest":
        """The request as the decoder runs it: itself, but for outpainting (the canvas at its size)."""
        return self

    def hires_pass(self, image: Image.Image) -> "GenerationRequest | None":
        """The image-to-image request of a hi-res pass over the decoded `image` (None: no hi-res pass)."""
        return None

    def hires_pass_steps(self) -> int | None:
        """Denoising steps of the hi-res pass over one image (None: no hi-res pass)."""
        return None

    def finish(self, images: list[Image.Image]) -> list[Image.Image]:
        """The decoder's images -> what is saved."""
        return images

    # -------------------------------------------------------------- what is stored
    def image_fields(self) -> dict[str, Image.Image]:
        """The input images of this request (stored next to the outputs, referenced by name)."""
        return {}

    def settings(self) -> dict:
        """JSON-ready fields (input images left out; the caller adds references to them)."""
        out: dict[str, Any] = {"task": self.task}
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, Image.Image):
                out[f.name] = value
        return out


@dataclass(kw_only=True)
class Text2ImageRequest(GenerationRequest):
    """Text to image; with hires_scale > 1, AUTOMATIC1111's hi-res fix in the same job: the image made at width x
    height is upscaled (Lanczos) to hires_size and refined by an image-to-image pass there (same model, prompt,
    negative prompt and seed), whose result is the job's image."""

    task: ClassVar[str] = "text2img"
    hires_scale: float = 1.0                   # 1 = off; up to MAX_HIRES_SCALE (2)
    hires_strength: float = 0.5                # of the pass's schedule re-run, as image-to-image's strength
    hires_steps: int = 0                       # the pass's schedule length; 0 = num_inference_steps

    def validate(self) -> None:
        super().validate()
        self.hires_scale = check_float("hires_scale", self.hires_scale, 1, MAX_HIRES_SCALE)
        self.hires_strength = check_float("hires_strength", self.hires_strength, 0, 1)
        self.hires_steps = check_int("hires_steps", self.hires_steps, 0, APP_MAX_STEPS)
        width, height = self.decoded_size()
        if max(width, height) > APP_MAX_SIDE:
            raise ValueError(f"hires_scale: {self.width}x{self.height} x {self.hires_scale:g} is {width}x{height}; "
                             f"at most {APP_MAX_SIDE} pixels per side are allowed")

    @property
    def hires(self) -> bool:
        return self.hires_scale > 1

    def decoded_size(self, width=None, height=None):
        width, height = width or self.width, height or self.height
        return hires_size(width, height, self.hires_scale) if self.hires else (width, height)

    def largest_decode(self, width, height, images):
        """The base run decodes `images` images at once; the hi-res pass one image at a time, larger."""
        if not self.hires:
            return width, height, images
        hires = (*hires_size(width, height, self.hires_scale), 1)
        return max((width, height, images), hires, key=lambda call: (call[0] * call[1] * call[2], call[2] == 1))

    def memory_fields(self):
        return "width/height/hires_scale/batch_size" if self.hires else super().memory_fields()

    def hires_pass(self, image):
        if not self.hires:
            return None
        width, height = self.decoded_size()
        shared = {f.name: getattr(self, f.name) for f in fields(GenerationRequest)}
        return Image2ImageRequest(**dict(shared, width=width, height=height,
                                         num_inference_steps=self.hires_steps or self.num_inference_steps),
                                  image=image.convert("RGB").resize((width, height), Image.LANCZOS),
                                  strength=self.hires_strength)

    def hires_pass_steps(self):
        return strength_steps(self.hires_steps or self.num_inference_steps, self.hires_strength) if self.hires else None

    def settings(self) -> dict:
        out = super().settings()
        if self.hires:  # the pass's size (width and height are the base size's)
            out["hires_width"], out["hires_height"] = self.decoded_size()
        return out


@dataclass(kw_only=True)
class Image2ImageRequest(GenerationRequest):
    task: ClassVar[str] = "img2img"
    image: Optional[Image.Image] = None        # resized to width x height
    strength: float = 0.3                      # how much of the schedule is re-run: 0 keeps the image

    def validate(self) -> None:
        super().validate()
        check_image("image", self.image)
        self.strength = check_float("strength", self.strength, 0.0, 1.0)

    def denoise_steps(self) -> int:
        return strength_steps(self.num_inference_steps, self.strength)

    def pipeline_inputs(self) -> dict:
        return {"image": self.image, "strength": self.strength}

    def image_fields(self):
        return {"image": self.image}


@dataclass(kw_only=True)
class InpaintRequest(GenerationRequest):
    task: ClassVar[str] = "inpaint"
    image: Optional[Image.Image] = None
    mask: Optional[Image.Image] = None         # white = repaint; resized to the image
    mask_invert: bool = False                  # repaint what is black instead
    mask_grow: int = 0                         # pixels added around the painted region
    mask_blur: int = 0                         # Gaussian blur radius of the mask edge, pixels
    # Outpainting: pixels added on each side of the image (taken at width x height); when any is > 0 the new
    # area is the mask (the painted one is not used), feathered outpaint_blend pixels into the image, and the
    # canvas is rounded up to multiples of 64 (backend/outpaint.py)
    outpaint_left: int = 0
    outpaint_right: int = 0
    outpaint_top: int = 0
    outpaint_bottom: int = 0
    outpaint_blend: int = 16

    def validate(self) -> None:
        super().validate()
        check_image("image", self.image)
        for name in OUTPAINT_SIDES:
            setattr(self, name, check_int(name, getattr(self, name), 0, APP_MAX_SIDE))
        self.outpaint_blend = check_int("outpaint_blend", self.outpaint_blend, 0, MAX_OUTPAINT_BLEND)
        if not self.outpainting or self.mask is not None:  # outpainting makes its own mask
            check_image("mask", self.mask)
        self.mask_invert = bool(self.mask_invert)
        self.mask_grow = check_int("mask_grow", self.mask_grow, 0, MAX_MASK_EDIT)
        self.mask_blur = check_int("mask_blur", self.mask_blur, 0, MAX_MASK_EDIT)
        width, height = self.decoded_size()
        if max(width, height) > APP_MAX_SIDE:
            raise ValueError(f"outpaint_left/outpaint_right/outpaint_top/outpaint_bottom: the canvas would be "
                             f"{width}x{height}; at most {APP_MAX_SIDE} pixels per side are allowed")

    @property
    def outpainting(self) -> bool:
        return any(getattr(self, name) > 0 for name in OUTPAINT_SIDES)

    def decoded_size(self, width=None, height=None):
        width, height = width or self.width, height or self.height
        if not self.outpainting:
            return width, height
        return outpaint.canvas_size(width, height, self.outpaint_left, self.outpaint_right, self.outpaint_top,
                                    self.outpaint_bottom)

    def memory_fields(self):
        if self.outpainting:
            return "width/height/" + "/".join(name for name in OUTPAINT_SIDES if getattr(self, name)) + "/batch_size"
        return super().memory_fields()

    def outpainted(self) -> outpaint.Outpaint:
        """The image at width x height on its extended canvas, and the canvas's feathered mask."""
        image = self.image.convert("RGB").resize((self.width, self.height), Image.BICUBIC)
        return outpaint.extend(image, self.outpaint_left, self.outpaint_right, self.outpaint_top,
                               self.outpaint_bottom, self.outpaint_blend)

    def on_canvas(self) -> "InpaintRequest":
        """Outpainting: an inpainting request of the canvas at its size, whose mask is the new area and the
        band's outer half (the pipeline thresholds at 0.5); `finish` blends through the whole ramp."""
        if not self.outpainting:
            return self
        extended = self.outpainted()
        width, height = extended.size
        return replace(self, image=extended.canvas, mask=extended.mask, width=width, height=height,
                       mask_invert=False, mask_grow=0, mask_blur=0, **{name: 0 for name in OUTPAINT_SIDES})

    def pipeline_inputs(self) -> dict:
        # one image and mask per image of the run, as diffusers' KandinskyV22InpaintCombinedPipeline
        # repeats them to the prior's embeddings
        mask = masks.repaint_mask(self.mask, (self.width, self.height), self.mask_invert, self.mask_grow)
        return {"image": [self.image] * self.batch_size, "mask_image": [mask] * self.batch_size}

    def finish(self, images):
        """With a blurred edge, the result is pasted over the original through the blurred mask (the
        pipeline works with a hard mask: diffusers thresholds it at 0.5); outpainting pastes it over the
        canvas through the feathered mask, so the image beyond the band stays as it was."""
        if self.outpainting:
            extended = self.outpainted()
            return [extended.composite(image) for image in images]
        if not self.mask_blur:
            return images
        size = (self.width, self.height)
        original = self.image.convert("RGB").resize(size, Image.BICUBIC)
        blend = masks.blend_mask(self.mask, size, self.mask_invert, self.mask_grow, self.mask_blur)
        return [Image.composite(image, original, blend) for image in images]

    def image_fields(self):
        return {"image": self.image, "mask": self.mask} if self.mask is not None else {"image": self.image}

    def settings(self) -> dict:
        out = super().settings()
        if self.outpainting:  # the result's size (width and height are the image's before the extension)
            out["canvas_width"], out["canvas_height"] = self.decoded_size()
        return out


OUTPAINT_SIDES = ("outpaint_left", "outpaint_right", "outpaint_top", "outpaint_bottom")


@dataclass(kw_only=True)
class InterpolateRequest(GenerationRequest):
    """Mix 2 to 6 texts and images by weight; the shared `prompt` is not used."""

    task: ClassVar[str] = "interpolate"
    inputs: list = field(default_factory=list)     # each a str or a PIL image
    weights: list = field(default_factory=list)    # one per input, in [0, 1]; normalised to sum 1
    walk_steps: int = 0                            # > 1: also N images walking from input 1 to 2

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.inputs, (list, tuple)) or not MIN_MIX_INPUTS <= len(self.inputs) <= MAX_MIX_INPUTS:
            raise ValueError(f"inputs must be a list of {MIN_MIX_INPUTS} to {MAX_MIX_INPUTS} texts or images; got "
                             f"{len(self.inputs) if isinstance(self.inputs, (list, tuple)) else self.inputs!r}")
        for index, item in enumerate(self.inputs):
            if isinstance(item, str):
                check_text(f"inputs[{index}]", item)
                if not item.strip():
                    raise ValueError(f"inputs[{index}] is an empty text; give a text or an image")
            else:
                check_image(f"inputs[{index}]", item)
        if not isinstance(self.weights, (list, tuple)) or len(self.weights) != len(self.inputs):
            raise ValueError(f"weights must be a list with one weight per input ({len(self.inputs)})")
        self.weights = [check_float(f"weights[{i}]", w, 0.0, MAX_MIX_WEIGHT) for i, w in enumerate(self.weights)]
        if sum(self.weights) <= 0:
            raise ValueError("weights must not all be zero")
        self.walk_steps = check_int("walk_steps", self.walk_steps, 0, MAX_WALK_STEPS)
        if self.walk_steps == 1:
            raise ValueError(f"walk_steps must be 0 (no walk) or between 2 and {MAX_WALK_STEPS}; got 1")

    @property
    def decoder_stage(self) -> str:
        return "text2img"

    def normalized_weights(self) -> list[float]:
        total = float(sum(self.weights))
        return [float(w) / total for w in self.weights]

    def image_fields(self):
        return {f"inputs[{i}]": item for i, item in enumerate(self.inputs) if isinstance(item, Image.Image)}

    def settings(self) -> dict:
        out = super().settings()
        out["inputs"] = [item if isinstance(item, str) else None for item in self.inputs]
        out["normalized_weights"] = self.normalized_weights()
        return out


@dataclass(kw_only=True)
class ControlNetRequest(GenerationRequest):
    """Depth-guided generation: text-to-image, or image-to-image when `mode` is "img2img"."""

    task: ClassVar[str] = "controlnet"
    hint: Optional[Image.Image] = None         # a depth map (white = near) or a photo, by hint_source
    hint_source: str = "depth map"            # one of HINT_SOURCES
    mode: str = "text2img"                     # one of CONTROLNET_MODES
    image: Optional[Image.Image] = None        # the start image in img2img mode
    strength: float = 0.5

    def validate(self) -> None:
        super().validate()
        check_choice("hint_source", self.hint_source, HINT_SOURCES)
        check_choice("mode", self.mode, CONTROLNET_MODES)
        if self.mode == "img2img":
            check_image("image", self.image)
        check_image(*(self.depth_photo() or ("hint", self.hint)))
        self.strength = check_float("strength", self.strength, 0.0, 1.0)

    def depth_photo(self) -> tuple[str, Image.Image] | None:
        """(field, photo) whose depth is the hint, or None when the hint is a depth map: the hint photo, or
        in image-to-image without a hint the start image (the Kandinsky 2.2 docs' flow)."""
        if self.hint_source != "photo":
            return None
        if self.hint is None and self.mode == "img2img":
            return "image", self.image
        return "hint", self.hint

    def warnings(self) -> list[str]:
        warning = depth_map_warning("hint", self.hint) if self.hint_source == "depth map" else ""
        return [warning] if warning else []

    def with_depth(self, depth: Image.Image) -> "ControlNetRequest":
        """The request as the decoder runs it: the estimated `depth` as its depth map."""
        return replace(self, hint=depth, hint_source="depth map")

    @property
    def decoder_stage(self) -> str:
        return "controlnet_img2img" if self.mode == "img2img" else "controlnet"

    def denoise_steps(self) -> int:
        if self.mode == "img2img":
            return strength_steps(self.num_inference_steps, self.strength)
        return self.num_inference_steps

    def pipeline_inputs(self) -> dict:
        if self.mode == "img2img":
            return {"hint": self.hint, "image": self.image, "strength": self.strength}
        return {"hint": self.hint}

    def image_fields(self):
        out = {"hint": self.hint} if self.hint is not None else {}
        if self.mode == "img2img":
            out["image"] = self.image
        return out


REQUEST_TYPES = {cls.task: cls for cls in (Text2ImageRequest, Image2ImageRequest, InpaintRequest,
                                           InterpolateRequest, ControlNetRequest)}
TASKS = tuple(REQUEST_TYPES)     # the app's tasks, in page order
