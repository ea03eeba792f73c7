"""The model families: one object each (Kandinsky 2.2, 2.1, 3), and the models built from them.

A family says what it is made of and what differs between families, and nothing else branches on
which family it is:
- its stages: the units the model manager loads (backend/manager.py) and the pipeline class that
  runs each; the text stage reads the prompt first (the 2.x image prior, Kandinsky 3's T5 text
  encoder), a decoder stage per task makes the image;
- its published repos, the settings its docs use, the scheduler its decoder repo ships, which
  tasks it offers (and why not the others), what reads the prompt and how many tokens;
- the two functions that differ: `condition` (run the text stage for a request -> the decoder's
  conditioning arguments) and `decoder_arguments` (the request -> the decoder call's arguments).

How the families split their work:
- 2.1 and 2.2: a prior folder (text -> CLIP image embedding, sampled with each run's generator)
  and decoder folders (embedding -> image); 2.1's decoders also read the prompt through their
  own MultilingualCLIP. The prior's image encoder is on demand: only interpolation with an image
  loads it; the other jobs need only its zero-image embedding, computed once per checkpoint and
  cached (backend/manager.py).
- 3: one folder loaded as two units: the T5 text encoder (8.7B parameters) encodes the prompt once
  per job, then the UNet + MoVQ run from its states. Under a budget that cannot hold both,
  loading the UNet evicts the encoder, so the peak is the larger unit, not their sum.

No MindSpore here: the page reads the families too (what a model offers, its defaults).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from PIL import Image

from backend.requests import TASKS, GenerationRequest, InterpolateRequest

TASK_LABELS = {"text2img": "text to image", "img2img": "image to image", "inpaint": "inpainting",
               "interpolate": "interpolation", "controlnet": "ControlNet depth"}
# The decoder stages each task may use (ControlNet: text-to-image or image-to-image by its mode).
TASK_STAGES = {"text2img": ("text2img",), "img2img": ("img2img",), "inpaint": ("inpaint",),
               "interpolate": ("text2img",), "controlnet": ("controlnet", "controlnet_img2img")}
DEPTH_STAGE = "depth"   # the stage estimating a photo's depth for ControlNet (2.2)
CONTROLNET_2_2_ONLY = "ControlNet depth exists for Kandinsky 2.2 only (kandinsky-2-2-controlnet-depth)"


@dataclass(frozen=True)
class Stage:
    """One unit the model manager loads, and the pipeline class (backend.pipelines) that runs it."""

    pipeline: str
    role: str                       # the folder it reads: a key of ModelSpec.repos
    part: str = ""                  # "" = the folder (but its on-demand components); else this part's name
    components: tuple = ()          # that part's components (the others stay unloaded)
    # With a float32 app, keep the checkpoint's precision (weights.CHECKPOINT_PRECISION): for a
    # model that computes in float32 whatever its weights' dtype (Kandinsky 3's T5, whose residual
    # stream outgrows float16), only the memory changes. A bfloat16 app loads it in bfloat16 (17.4
    # GB, not 21.7 as stored): its activations and residual sums stay float32, only the products
    # take bfloat16 operands.
    keeps_checkpoint_precision: bool = False

    # Components left out of the unit: each loads as a unit of its own for the jobs that need it
    # (Family.text_stage_needs), or once to compute what the pipeline takes in its place (the
    # pipeline class's `derived_values`, cached per checkpoint by the model manager).
    on_demand: tuple = ()


@dataclass(frozen=True)
class DecoderFigures:
    """What the working-memory estimate (backend/working_memory.py) reads of a family's published decoder
    when its folders are not on this machine yet (before the first download): the real configs'
    widths (../shared/reference-configs) and the parameter counts of docs/MEMORY.md."""

    movq_channels: tuple            # the MoVQ's block_out_channels (its decoder runs them in reverse)
    unet_channels: int              # the UNet's first block_out_channels: its width at latent resolution
    parameters: int                 # the largest unit that decodes (a decoder folder; K3's UNet + MoVQ)


@dataclass(frozen=True, kw_only=True, repr=False)
class Family:
    name: str                       # "2.2", as --models names it
    label: str
    repos: dict                     # role -> published Hub repo
    stages: dict                    # stage name -> Stage: the text stage, then decoder stages by task
    defaults: dict                  # the settings the docs use (diffusers' defaults, model cards)
    repo_scheduler: str             # what the decoder repo ships: "repository default" on the page
    text_stage: str                 # the stage that reads the prompt first
    text_phase: str                 # its Step phase (backend/events.py PHASES)
    text_reader: str                # what reads the prompt there, and how much of it
    decoder_text_reader: str = ""   # the same for a decoder that reads the prompt too ("": it does not)
    unavailable: dict = field(default_factory=dict)   # task -> why this family does not offer it
    variant: str | None = None      # weights file variant the repos are read in ("fp16")
    decoder_figures: DecoderFigures | None = None   # the published decoder's widths and size
    # True: the text stage runs for every run of a batch (it samples with the run's generator);
    # False: once per job.
    text_per_run: ClassVar[bool]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    @property
    def key(self) -> str:
        return "kandinsky-" + self.name.replace(".", "-")

    @property
    def decoder_reads_prompt(self) -> bool:
        return bool(self.decoder_text_reader)

    @property
    def has_prior(self) -> bool:
        """Whether the prior's settings (its steps, guidance, negative prompt) mean anything."""
        return self.text_stage == "prior"

    def supports(self, task: str) -> bool:
        return task in TASK_STAGES and task not in self.unavailable and \
            all(stage in self.stages for stage in TASK_STAGES[task])

    def unsupported_reason(self, task: str) -> str:
        """Why `task` is not offered, for people (empty when it is)."""
        if self.supports(task):
            return ""
        return self.unavailable.get(task, f"{self.label} has no pipeline for {TASK_LABELS.get(task, task)}")

    def published_model(self, models_dir: str | Path | None = None) -> "ModelSpec":
        """The model of the published repos; a folder named like a repo under `models_dir` is used instead."""
        repos = dict(self.repos)
        if models_dir:
            for role, repo in repos.items():
                local = Path(models_dir) / repo.split("/")[-1]
                # a diffusers pipeline folder, or a transformers model repo (the depth estimator)
                if (local / "model_index.json").is_file() or (local / "config.json").is_file():
                    repos[role] = str(local)
        return ModelSpec(key=self.key, label=self.label, family=self, repos=repos, variant=self.variant)

    # --------------------------------------------------------------- what differs per family
    def text_steps(self, request: GenerationRequest) -> int:
        """Steps the text stage reports for one conditioning of `request` (for the ETA)."""
        raise NotImplementedError

    def condition(self, pipe, request: GenerationRequest, generator, callback, note) -> dict:
        """Run the text stage's pipeline `pipe` for `request` -> the decoder's conditioning arguments.
        `callback(i, total, latents, x0)` is called per step; `note(reader, truncated_text)` when the
        stage dropped part of a prompt."""
        raise NotImplementedError

    def text_stage_needs(self, request: GenerationRequest) -> tuple:
        """The text stage's on-demand components (Stage.on_demand) that `request` uses."""
        return ()

    def decoder_arguments(self, request: GenerationRequest) -> dict:
        """The decoder call's arguments besides the conditioning, the generator and the callback."""
        return dict(request.pipeline_inputs(), height=request.height, width=request.width,
                    num_inference_steps=request.num_inference_steps, guidance_scale=request.guidance_scale)


@dataclass(frozen=True, kw_only=True, repr=False)
class PriorFamily(Family):
    """Kandinsky 2.x: an image prior turns the prompt into CLIP image embeddings for the decoder.

    Negative prompts follow diffusers' `KandinskyV22PriorPipeline.interpolate` for every task:
    `negative_prior_prompt` is the prior's own guidance negative and its embedding the decoder's
    negative; a `negative_prompt`, when given, replaces that decoder negative with the prior's
    embedding of the negative prompt.
    """

    text_stage: str = "prior"
    text_phase: str = "prior"
    text_reader: str = "CLIP reads 77 tokens"
    text_per_run: ClassVar[bool] = True

    def text_steps(self, request):
        if isinstance(request, InterpolateRequest):
            return sum(isinstance(item, str) for item in request.inputs) * request.prior_num_inference_steps
        return request.prior_num_inference_steps * (2 if request.negative_prompt else 1)

    def text_stage_needs(self, request):
        """The image encoder for the images of an interpolation; the other tasks' images go to the
        decoder, and their prior reads text only."""
        if isinstance(request, InterpolateRequest) and any(isinstance(i, Image.Image) for i in request.inputs):
            return ("image_encoder",)
        return ()

    def condition(self, prior, request, generator, callback, note):
        common = dict(num_images_per_prompt=request.batch_size, num_inference_steps=request.prior_num_inference_steps,
                      generator=generator, guidance_scale=request.prior_guidance_scale, callback=callback)
        negative_prior = request.negative_prior_prompt or None
        if isinstance(request, InterpolateRequest):
            embeds, negative = prior.interpolate(list(request.inputs), request.normalized_weights(),
                                                 negative_prior_prompt=negative_prior,
                                                 negative_prompt=request.negative_prompt, **common)
            note(self.text_reader, prior.truncated_text)
        else:
            embeds, negative = prior(request.prompt, negative_prompt=negative_prior, **common)
            note(self.text_reader, prior.truncated_text)  # the prompt's: the negative prompt's run resets it
            if request.negative_prompt:
                negative = prior(request.negative_prompt, negative_prompt=negative_prior, **common)[0]
        condition = {"image_embeds": embeds, "negative_image_embeds": negative}
        if self.decoder_reads_prompt:  # 2.1 (none when mixing inputs, as diffusers' docs do)
            prompt = "" if isinstance(request, InterpolateRequest) else request.prompt
            condition["prompt"] = [prompt] * len(embeds)
            if request.negative_prompt:
                condition["negative_prompt"] = [request.negative_prompt] * len(embeds)
        return condition


@dataclass(frozen=True, kw_only=True, repr=False)
class TextEncoderFamily(Family):
    """Kandinsky 3: a T5 text encoder's states condition the UNet directly (no prior)."""

    text_stage: str = "text_encoder"
    text_phase: str = "encode"
    text_per_run: ClassVar[bool] = False

    def text_steps(self, request):
        return 1

    def condition(self, encoder, request, generator, callback, note):
        from backend.pipelines.base import do_classifier_free_guidance  # loaded with the encoder already

        embeds, negative, mask, negative_mask = encoder.encode_prompt(
            [request.prompt], do_classifier_free_guidance(request.guidance_scale), 1,
            [request.negative_prompt] if request.negative_prompt else None)
        callback(0, 1, None, None)
        note(self.text_reader, encoder.truncated_text)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative, "attention_mask": mask,
                "negative_attention_mask": negative_mask, "num_images_per_prompt": request.batch_size}

    def decoder_arguments(self, request):
        args = super().decoder_arguments(request)
        if "image" in args:  # Kandinsky 3 works at the image's own size: give it the requested one
            args["image"] = args["image"].convert("RGB").resize((request.width, request.height), Image.BICUBIC)
            del args["height"], args["width"]
        return args


# The 2.x prior's CLIP image encoder (2.2: ViT-bigG, 7.4 GB in float32; 2.1: ViT-L/14, 1.2 GB).
_PRIOR_ON_DEMAND = ("image_encoder",)
_K3_ENCODER = ("tokenizer", "text_encoder")
_K3_DECODER = ("unet", "scheduler", "movq")

KANDINSKY_2_2 = PriorFamily(
    name="2.2", label="Kandinsky 2.2",
    repos={"prior": "kandinsky-community/kandinsky-2-2-prior",
           "decoder": "kandinsky-community/kandinsky-2-2-decoder",
           "inpaint": "kandinsky-community/kandinsky-2-2-decoder-inpaint",
           "controlnet": "kandinsky-community/kandinsky-2-2-controlnet-depth",
           # the ControlNet hint from a photo (a transformers model repo, Apache-2.0)
           "depth_estimator": "depth-anything/Depth-Anything-V2-Small-hf"},
    stages={"prior": Stage("KandinskyV22PriorPipeline", "prior", on_demand=_PRIOR_ON_DEMAND),
            "text2img": Stage("KandinskyV22Pipeline", "decoder"),
            "img2img": Stage("KandinskyV22Img2ImgPipeline", "decoder"),
            "inpaint": Stage("KandinskyV22InpaintPipeline", "inpaint"),
            "controlnet": Stage("KandinskyV22ControlnetPipeline", "controlnet"),
            "controlnet_img2img": Stage("KandinskyV22ControlnetImg2ImgPipeline", "controlnet"),
            DEPTH_STAGE: Stage("DepthEstimationPipeline", "depth_estimator")},
    defaults={"num_inference_steps": 50, "guidance_scale": 4.0, "width": 768, "height": 768},
    repo_scheduler="DDPM",
    # the ControlNet folder is the largest decoder: 1,321,261,707 parameters (decoder 1,320,889,783)
    decoder_figures=DecoderFigures(movq_channels=(128, 256, 256, 512), unet_channels=384, parameters=1_321_261_707),
)
KANDINSKY_2_1 = PriorFamily(
    name="2.1", label="Kandinsky 2.1",
    repos={"prior": "kandinsky-community/kandinsky-2-1-prior",
           "decoder": "kandinsky-community/kandinsky-2-1",
           "inpaint": "kandinsky-community/kandinsky-2-1-inpaint"},
    stages={"prior": Stage("KandinskyPriorPipeline", "prior", on_demand=_PRIOR_ON_DEMAND),
            "text2img": Stage("KandinskyPipeline", "decoder"),
            "img2img": Stage("KandinskyImg2ImgPipeline", "decoder"),
            "inpaint": Stage("KandinskyInpaintPipeline", "inpaint")},
    defaults={"num_inference_steps": 100, "guidance_scale": 4.0, "width": 768, "height": 768},
    repo_scheduler="DDIM",
    # the inpainting folder, with its MultilingualCLIP: 1,857,189,175 parameters (decoder 1,857,171,895)
    decoder_figures=DecoderFigures(movq_channels=(128, 256, 256, 512), unet_channels=384, parameters=1_857_189_175),
    decoder_text_reader="The decoder's MultilingualCLIP reads 77 tokens",
    unavailable={"controlnet": CONTROLNET_2_2_ONLY},
)
KANDINSKY_3 = TextEncoderFamily(
    name="3", label="Kandinsky 3",
    repos={"decoder": "kandinsky-community/kandinsky-3"},
    stages={
        # T5 runs once per job and computes in float32 from half weights (backend/models/t5.py): the
        # published fp16 shards stay half (17.4 GB + 4.3 GB of float32 `wo`) instead of 34.9 GB.
        "text_encoder": Stage("Kandinsky3Pipeline", "decoder", "text encoder", _K3_ENCODER,
                              keeps_checkpoint_precision=True),
        "text2img": Stage("Kandinsky3Pipeline", "decoder", "unet and movq", _K3_DECODER),
        "img2img": Stage("Kandinsky3Img2ImgPipeline", "decoder", "unet and movq", _K3_DECODER)},
    defaults={"num_inference_steps": 25, "guidance_scale": 3.0, "width": 1024, "height": 1024},
    repo_scheduler="DDPM",
    text_reader="T5 reads 128 tokens",
    unavailable={
        "inpaint": "there is no published Kandinsky 3 inpainting checkpoint in diffusers format (diffusers "
                   "0.35 has no Kandinsky 3 inpainting pipeline); use Kandinsky 2.2 or 2.1 to inpaint",
        "interpolate": "Kandinsky 3 has no image-embedding prior to mix texts and images; use Kandinsky 2.2 "
                       "or 2.1 to interpolate",
        "controlnet": CONTROLNET_2_2_ONLY},
    # The repo ships fp16 files only (unet/diffusion_pytorch_model.fp16.safetensors, text_encoder/
    # model.fp16-0000N-of-00005.safetensors); they load into the app's dtype (float32 by default).
    variant="fp16",
    # the UNet + MoVQ unit: 3,055,348,228 + 270,669,103 parameters
    decoder_figures=DecoderFigures(movq_channels=(256, 512, 512, 1024), unet_channels=384, parameters=3_326_017_331),
)
# The families --models may name, in the order the model selector lists them.
FAMILIES = {family.name: family for family in (KANDINSKY_2_2, KANDINSKY_2_1, KANDINSKY_3)}

# The page's "Fast" preset, the same for every family: DPM-Solver++(2M) with Karras sigmas in 20 steps
# (the DPM-Solver++ paper reports 15-20 steps for guided latent diffusion; AUTOMATIC1111's default sampler
# since 1.6 and its default step count; every sampler costs one UNet evaluation per step).
FAST_SETTINGS = {"scheduler": "DPM++ 2M Karras", "num_inference_steps": 20}


# ------------------------------------------------------------------------------------ models

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def public_source(source: str | Path) -> str:
    """How a saved image's settings name a model folder: a repo id as it is ("owner/name"); a local
    folder by its own name only, never the server's path to it."""
    text = str(source)
    if _REPO_ID.fullmatch(text) and not Path(text).is_dir():
        return text
    return re.split(r"[\\/]", text.rstrip("\\/"))[-1]


@dataclass(frozen=True)
class ModelStage:
    """A family stage read from one model's folder: what the model manager loads as one unit."""

    source: str                     # repo id or local folder
    stage: Stage
    variant: str | None = None

    @property
    def key(self) -> str:
        return f"{self.source}#{self.stage.part}" if self.stage.part else self.source

    @property
    def label(self) -> str:
        return f"{self.stage.role} {self.stage.part}" if self.stage.part else self.stage.role

    def on_demand_part(self, component: str) -> "ModelStage":
        """The unit of one of the stage's on-demand components: that component alone, from the same folder."""
        if component not in self.stage.on_demand:
            raise ValueError(f"{component!r} is not an on-demand component of {self.label} "
                             f"(those are {list(self.stage.on_demand)})")
        part = replace(self.stage, part=component.replace("_", " "), components=(component,), on_demand=())
        return ModelStage(self.source, part, self.variant)


@dataclass(frozen=True)
class ModelSpec:
    """One selectable model: a family, and the folder (repo id or path) of each of its roles."""

    key: str
    label: str
    family: Family
    repos: dict                     # role -> "owner/name" or a local folder: prior, decoder, inpaint, controlnet
    demo: bool = False              # tiny random weights (backend/demo.py)
    variant: str | None = None

    def supports(self, task: str) -> bool:
        """Whether the app task runs on this model: its family offers it and the folders are there."""
        return self.family.supports(task) and all(
            self.family.stages[stage].role in self.repos for stage in (self.family.text_stage, *TASK_STAGES[task]))

    def unsupported_reason(self, task: str) -> str:
        if self.supports(task) or not self.family.supports(task):
            return self.family.unsupported_reason(task)
        offered = ", ".join(TASK_LABELS[t] for t in self.tasks) or "nothing"
        return f"this model has no folder for it (it offers {offered})"

    @property
    def tasks(self) -> tuple:
        return tuple(task for task in TASKS if self.supports(task))

    def check_task(self, task: str) -> None:
        """ValueError naming the `model` field when this model cannot do `task`."""
        if not self.supports(task):
            raise ValueError(f"model: {self.label} cannot do {TASK_LABELS.get(task, task)}: "
                             f"{self.unsupported_reason(task)}")

    def stage(self, name: str) -> ModelStage:
        stage = self.family.stages.get(name)
        if stage is None or stage.role not in self.repos:
            raise ValueError(f"{self.label} has no {name} stage (it has {sorted(self.family.stages)})")
        return ModelStage(str(self.repos[stage.role]), stage, self.variant)

    def public_repos(self) -> dict:
        """role -> repo id, or a local folder's name (public_source): what saved settings store."""
        return {role: public_source(source) for role, source in self.repos.items()}


# The published models, in the order the model selector lists them.
CATALOGUE = {spec.key: spec for spec in (family.published_model() for family in FAMILIES.values())}
