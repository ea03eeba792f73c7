"""Requests -> pipeline calls, on the engine thread: seeds, phases, progress, previews, stop, saving.

`TaskExecutor` is what the JobRunner runs for each job. For a request it
1. picks the seeds (seed, seed+1, ... for batch_count runs; a random seed when seed < 0),
2. runs the prior for every run (texts -> CLIP image embeddings), then the decoder for every run,
   so a memory budget that cannot hold both models loads each once, not once per run; each run
   has its own numpy generator, so the noise is the same as running them one after the other,
3. turns every step callback into a Step event (with a preview and an ETA) and checks for stop,
4. saves each image with its settings (backend/metadata.py) and ends with Result, or with
   Cancelled carrying the last preview of the stopped run, saved and marked partial.

Negative prompts follow diffusers' `KandinskyV22PriorPipeline.interpolate` for every 2.x task:
`negative_prior_prompt` is the prior's own guidance negative, and its embedding is the
decoder's negative; a `negative_prompt`, when given, replaces that decoder negative with the
prior's embedding of the negative prompt.

The families differ in what conditions the decoder (`_conditioning`):
- 2.2: the prior's image embeddings.
- 2.1: those and the prompt itself, which the decoder reads with its MultilingualCLIP (the negative
  prompt is its unconditional text; interpolation decodes with an empty prompt, as diffusers' docs do).
- 3: no prior; the T5 encoder (its own loading unit, see backend/manager.py) encodes the prompt and
  negative prompt once per job, then the UNet runs from those states (`prompt_embeds`), so under a
  tight budget the encoder is evicted before the UNet loads.
"""
from __future__ import annotations

import datetime
import logging
import secrets
import time

import numpy as np
from PIL import Image

from backend import interrupt, previews
from backend.jobs import (MAX_SEED, Cancelled, GeneratedImage, GenerationRequest, InterpolateRequest, Job,
                          JobCancelled, Loading, Result, Step)
from backend.manager import LoadReport, ModelManager
from backend.metadata import OutputStore

logger = logging.getLogger(__name__)

APP_NAME = "Kandinsky Studio"
# Until a decode has been timed, assume it costs this many decoder steps (DESIGN.md: a 512x512
# MoVQ decode takes about two UNet steps on CPU).
DECODE_STEPS_GUESS = 2.0
LOADING_INTERVAL_S = 0.25
NOTE_CHARS = 300          # the dropped part of a long prompt is quoted up to this length
# What reads the prompt, per family and stage, for the note on a truncated prompt.
TEXT_READERS = {("2.1", "prior"): "CLIP reads 77 tokens", ("2.2", "prior"): "CLIP reads 77 tokens",
                ("2.1", "decoder"): "The decoder's MultilingualCLIP reads 77 tokens",
                ("3", "prior"): "T5 reads 128 tokens"}


def decoder_kind(request: GenerationRequest) -> str:
    if request.task == "controlnet":
        return "controlnet_img2img" if request.mode == "img2img" else "controlnet"
    if request.task == "interpolate":
        return "text2img"
    return request.task


def decoder_steps(request: GenerationRequest) -> int:
    """Denoising steps the decoder will run (img2img runs the last `strength` of the schedule)."""
    steps = request.num_inference_steps
    if request.task == "img2img" or (request.task == "controlnet" and request.mode == "img2img"):
        return min(int(steps * request.strength), steps)
    return steps


class Progress:
    """Counts the steps of a job's phases, emits Step events and estimates the time left."""

    def __init__(self, job: Job, remaining: dict[str, int], batch_count: int):
        self.job = job
        self.remaining = dict(remaining)          # phase -> steps still to run
        self.batch_count = batch_count
        self.spent = {phase: [0.0, 0] for phase in remaining}   # phase -> [seconds, steps]
        self.started = time.monotonic()
        self.last = self.started

    def mark(self) -> None:
        """A phase run starts: its first step is timed from here."""
        self.last = time.monotonic()

    def record(self, phase: str, seconds: float) -> None:
        self.spent[phase][0] += seconds
        self.spent[phase][1] += 1
        self.remaining[phase] = max(0, self.remaining[phase] - 1)

    def tick(self, phase: str, step: int, total: int, batch: int, preview=None) -> None:
        now = time.monotonic()
        self.record(phase, now - self.last)
        self.last = now
        self.emit(phase, step, total, batch, preview)

    def emit(self, phase: str, step: int, total: int, batch: int, preview=None) -> None:
        self.job.emit(Step(phase=phase, step=step, total=total, batch=batch, batch_count=self.batch_count,
                           preview=preview, eta_s=self.eta(), elapsed_s=time.monotonic() - self.started))

    def per_step(self, phase: str) -> float | None:
        seconds, steps = self.spent.get(phase, (0.0, 0))
        if steps:
            return seconds / steps
        if phase == "decode" and self.spent["decoder"][1]:
            return DECODE_STEPS_GUESS * self.per_step("decoder")
        return None

    def eta(self) -> float | None:
        total = 0.0
        for phase, steps in self.remaining.items():
            if steps <= 0:
                continue
            cost = self.per_step(phase)
            if cost is None:
                return None
            total += steps * cost
        return total


class TaskExecutor:
    """Callable run by the JobRunner for each job (engine thread)."""

    def __init__(self, manager: ModelManager, store: OutputStore):
        self.manager = manager
        self.store = store

    def __call__(self, job: Job) -> None:
        # the models check for a Stop between their blocks too, not only between steps
        with interrupt.checking(job.check_cancelled):
            _Run(self.manager, self.store, job).execute()


class _Run:
    def __init__(self, manager: ModelManager, store: OutputStore, job: Job):
        self.manager, self.store, self.job = manager, store, job
        self.request = job.request
        self.started = time.monotonic()
        self.preview_s = 0.0
        self.completed: list[GeneratedImage] = []
        self.seeds: list[int] = []
        self.notes: list[str] = []
        self.last_previews: list[Image.Image] = []    # one per image of the decoder run in progress
        self.current: tuple | None = None              # (seed, batch index, step, total) of that run
        self._input_refs: dict | None = None
        self._last_load = ("", 0.0)                    # (component, time) of the last Loading event

    # ------------------------------------------------------------------ driver
    def execute(self) -> None:
        request = self.request
        self.family = self.manager.check_task(request.model, request.task).family
        seed = request.seed if request.seed >= 0 else secrets.randbelow(MAX_SEED - request.batch_count)
        self.seeds = [(seed + b) % (MAX_SEED + 1) for b in range(request.batch_count)]
        walk = request.walk_steps if isinstance(request, InterpolateRequest) else 0
        self.progress = Progress(self.job, self._plan(walk), request.batch_count)
        try:
            generators = [np.random.default_rng(s) for s in self.seeds]
            if self.family == "3":
                conditioning = [self._text_states()] * len(generators)
            else:
                conditioning = [self._conditioning(*self._embeddings(gen, b)) for b, gen in enumerate(generators)]
            walk_ends = self._walk_ends(generators[0]) if walk else None
            for b, (gen, condition) in enumerate(zip(generators, conditioning)):
                images = self._decode(gen, condition, b)
                for k, image in enumerate(images):
                    self._save(image, self.seeds[b], b, k)
            if walk:
                self._walk(walk_ends, walk)
        except JobCancelled:
            cancelled = self._cancelled()
            self.job.emit(cancelled)
            logger.info("job %s stopped %.3f s after the request, %d partial image(s) kept", self.job.id,
                        cancelled.latency_s or 0.0, len(cancelled.partials))
            return
        self.job.emit(Result(images=list(self.completed), seeds=list(self.seeds),
                             elapsed_s=time.monotonic() - self.started, preview_s=self.preview_s,
                             notes=tuple(self.notes)))
        logger.info("job %s: %d image(s) in %.2f s, previews %.3f s (%.1f%%)", self.job.id, len(self.completed),
                    time.monotonic() - self.started, self.preview_s,
                    100 * self.preview_s / max(1e-9, time.monotonic() - self.started))

    def _plan(self, walk: int) -> dict[str, int]:
        r = self.request
        if isinstance(r, InterpolateRequest):
            texts = sum(isinstance(item, str) for item in r.inputs)
            prior = texts * r.prior_num_inference_steps
            walk_prior = sum(isinstance(item, str) for item in r.inputs[:2]) * r.prior_num_inference_steps
        else:
            prior = r.prior_num_inference_steps * (2 if r.negative_prompt else 1)
            walk_prior = 0
        runs = r.batch_count
        if self.family == "3":  # one text encoding per job instead of a prior per run
            return {"text": 1, "decoder": runs * decoder_steps(r), "decode": runs}
        return {"prior": runs * prior + (walk_prior if walk else 0),
                "decoder": (runs + walk) * decoder_steps(r),
                "decode": runs + walk}

    def _on_load(self, report: LoadReport) -> None:
        # A checkpoint reports every tensor (the real UNet has 724): a few updates a second are enough.
        now = time.monotonic()
        if report.done < report.total and report.component == self._last_load[0] and \
                now - self._last_load[1] < LOADING_INTERVAL_S:
            return
        self._last_load = (report.component, now)
        self.job.emit(Loading(report.component, report.done, report.total))
        self.progress.mark()

    # ------------------------------------------------------------------ prior
    def _prior_callback(self, batch: int):
        def callback(i, total, latents, x0):
            self.progress.tick("prior", i + 1, total, batch + 1)
            self.job.check_cancelled()
        return callback

    def _embeddings(self, generator, batch: int):
        """(image_embeds, negative_image_embeds), each (batch_size, D), for one run."""
        r = self.request
        negative_prior = r.negative_prior_prompt or None
        with self.manager.use("prior", r.model, on_progress=self._on_load) as prior:
            self.progress.mark()
            callback = self._prior_callback(batch)
            if isinstance(r, InterpolateRequest):
                embeds, negative = prior.interpolate(
                    list(r.inputs), r.normalized_weights(), num_images_per_prompt=r.batch_size,
                    num_inference_steps=r.prior_num_inference_steps, generator=generator,
                    negative_prior_prompt=negative_prior, negative_prompt=r.negative_prompt,
                    guidance_scale=r.prior_guidance_scale, callback=callback)
                self._note_truncation(prior, "prior")
            else:
                embeds, negative = prior(r.prompt, negative_prompt=negative_prior,
                                         num_images_per_prompt=r.batch_size,
                                         num_inference_steps=r.prior_num_inference_steps, generator=generator,
                                         guidance_scale=r.prior_guidance_scale, callback=callback)
                self._note_truncation(prior, "prior")  # the prompt's: the negative prompt's run resets it
                if r.negative_prompt:
                    negative = prior(r.negative_prompt, negative_prompt=negative_prior,
                                     num_images_per_prompt=r.batch_size,
                                     num_inference_steps=r.prior_num_inference_steps, generator=generator,
                                     guidance_scale=r.prior_guidance_scale, callback=callback)[0]
        return embeds, negative

    def _note_truncation(self, pipe, stage: str) -> None:
        """A note for the page when a text encoder dropped the end of a prompt."""
        truncated = getattr(pipe, "truncated_text", None)
        if not truncated:
            return
        dropped = " | ".join(truncated)
        if len(dropped) > NOTE_CHARS:  # a 10,000-character prompt must not flood the page
            dropped = dropped[:NOTE_CHARS] + f"… ({len(dropped) - NOTE_CHARS} more characters)"
        reader = TEXT_READERS.get((self.family, stage), "The text encoder has a token limit")
        note = f"{reader}; this part of the prompt was dropped: {dropped}"
        if note not in self.notes:
            self.notes.append(note)

    def _conditioning(self, embeds, negative) -> dict:
        """Decoder arguments for one run's prior embeddings (2.1 also reads the prompt itself)."""
        condition = {"image_embeds": embeds, "negative_image_embeds": negative}
        if self.family == "2.1":
            r = self.request
            prompt = "" if isinstance(r, InterpolateRequest) else r.prompt
            condition["prompt"] = [prompt] * len(embeds)
            if r.negative_prompt:
                condition["negative_prompt"] = [r.negative_prompt] * len(embeds)
        return condition

    # ------------------------------------------------------------------ Kandinsky 3 text encoder
    def _text_states(self) -> dict:
        """T5 states of the prompt and negative prompt (Kandinsky 3), as decoder arguments."""
        r = self.request
        with self.manager.use("prior", r.model, on_progress=self._on_load) as encoder:
            self.progress.mark()
            self.progress.emit("text", 0, 1, 1)
            embeds, negative, mask, negative_mask = encoder.encode_prompt(
                [r.prompt], r.guidance_scale > 1.0, 1, [r.negative_prompt] if r.negative_prompt else None)
            self.progress.tick("text", 1, 1, 1)
            self.job.check_cancelled()
            self._note_truncation(encoder, "prior")
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative, "attention_mask": mask,
                "negative_attention_mask": negative_mask, "num_images_per_prompt": r.batch_size}

    def _walk_ends(self, generator):
        """Embeddings of input 1 and input 2 alone: the walk mixes them linearly."""
        r = self.request
        ends = []
        with self.manager.use("prior", r.model, on_progress=self._on_load) as prior:
            for item in r.inputs[:2]:
                self.progress.mark()
                embeds, negative = prior.interpolate(
                    [item], [1.0], num_images_per_prompt=1, num_inference_steps=r.prior_num_inference_steps,
                    generator=generator, negative_prior_prompt=r.negative_prior_prompt or None,
                    negative_prompt=r.negative_prompt, guidance_scale=r.prior_guidance_scale,
                    callback=self._prior_callback(0))
                ends.append((embeds, negative))
        return ends

    # ------------------------------------------------------------------ decoder
    def _decode(self, generator, condition: dict, batch: int, seed: int | None = None) -> list[Image.Image]:
        r = self.request
        kind = decoder_kind(r)
        seed = self.seeds[batch] if seed is None else seed
        with self.manager.use(kind, r.model, scheduler=r.scheduler, on_progress=self._on_load) as pipe:
            factors = None
            if r.preview == "fast":
                if not self.manager.has_preview_factors(kind, r.model):
                    self.job.emit(Loading("preview colours: fitting the latent -> RGB map", 0, 0))
                factors = self.manager.preview_factors(kind, r.model, pipe)
            size = (r.width, r.height)
            args = dict(condition, height=r.height, width=r.width, num_inference_steps=r.num_inference_steps,
                        guidance_scale=r.guidance_scale, generator=generator,
                        callback=self._decoder_callback(pipe, factors, batch, seed))
            if r.task == "img2img" and self.family == "3":
                # Kandinsky 3 works at the image's own size: give it the requested one
                del args["height"], args["width"]
                args.update(image=r.image.convert("RGB").resize(size, Image.BICUBIC), strength=r.strength)
            elif r.task == "img2img":
                args.update(image=r.image, strength=r.strength)
            elif r.task == "inpaint":
                args.update(image=r.image, mask_image=r.repaint_mask(size))
            elif r.task == "controlnet":
                args.update(hint=r.hint)
                if r.mode == "img2img":
                    args.update(image=r.image, strength=r.strength)
            self.last_previews, self.current = [], (seed, batch, 0, decoder_steps(r))
            self.progress.mark()
            if decoder_steps(r) == 0:  # strength 0: no step callback, only the decode
                self.progress.emit("decode", 1, 1, batch + 1)
            images = pipe(**args)[0]
            if self.family == "2.1":
                self._note_truncation(pipe, "decoder")
            # the decode ran since the last step's mark
            self.progress.record("decode", time.monotonic() - self.progress.last)
        if r.task == "inpaint" and r.mask_blur:
            original = r.image.convert("RGB").resize(size, Image.BICUBIC)
            images = [Image.composite(image, original, r.blend_mask(size)) for image in images]
        self.current = None
        return images

    def _decoder_callback(self, pipe, factors, batch: int, seed: int):
        r = self.request

        def callback(i, total, latents, x0):
            preview = None
            if r.preview != "off" and ((i + 1) % r.preview_every == 0 or i + 1 == total):
                started = time.perf_counter()
                if factors is not None:
                    self.last_previews = [previews.preview_image(x0[k:k + 1], factors) for k in range(len(x0))]
                else:  # "decode": the full MoVQ decode of x0, slow but exact
                    self.last_previews = pipe.decode(x0.astype(np.float32), "pil")
                preview = previews.tile(self.last_previews)
                self.preview_s += time.perf_counter() - started
            self.current = (seed, batch, i + 1, total)
            self.progress.tick("decoder", i + 1, total, batch + 1, preview)
            self.job.check_cancelled()
            if i + 1 == total:
                self.progress.emit("decode", 1, 1, batch + 1, preview)
                self.progress.mark()
        return callback

    def _walk(self, ends, steps: int) -> None:
        (start, negative), (end, _) = ends
        seed = self.seeds[0]
        for index, t in enumerate(np.linspace(0.0, 1.0, steps)):
            embeds = (1.0 - t) * start + t * end
            generator = np.random.default_rng(seed)  # the same noise along the walk: only the mix changes
            image = self._decode(generator, self._conditioning(embeds.astype(np.float32), negative), 0, seed=seed)[0]
            self._save(image, seed, 0, 0, extra={"walk_index": index, "walk_t": float(t),
                                                 "walk_weights": [float(1 - t), float(t)]})

    # ------------------------------------------------------------------ saving
    def _input_references(self) -> dict:
        if self._input_refs is None:
            self._input_refs = {name: self.store.save_input(image, self.job.owner)
                                for name, image in self.request.image_fields().items()}
        return self._input_refs

    def _settings(self, seed: int, batch: int, position: int, partial: bool = False, extra=None) -> dict:
        settings = self.request.settings()
        spec = self.manager.spec(self.request.model)
        settings.update(seed=seed, batch_index=batch, batch_position=position, partial=partial,
                        app=APP_NAME, created=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                        repos=dict(spec.repos), dtype=self.manager.dtype, device=self.manager.device,
                        input_images=self._input_references())
        if extra:
            settings.update(extra)
        return settings

    def _save(self, image: Image.Image, seed: int, batch: int, position: int, extra=None) -> GeneratedImage:
        settings = self._settings(seed, batch, position, extra=extra)
        path = self.store.save(image, settings, self.job.owner)
        generated = GeneratedImage(image=image, settings=settings, path=path)
        self.completed.append(generated)
        return generated

    def _cancelled(self) -> Cancelled:
        """Save the stopped run's last previews, full size and marked partial."""
        partials = []
        if self.current is not None and self.last_previews:
            seed, batch, step, total = self.current
            r = self.request
            for position, preview in enumerate(self.last_previews):
                image = preview.convert("RGB").resize((r.width, r.height), Image.BILINEAR)
                settings = self._settings(seed, batch, position, partial=True,
                                          extra={"stopped_at_step": step, "steps_planned": total})
                path = self.store.save(image, settings, self.job.owner)
                partials.append(GeneratedImage(image=image, settings=settings, path=path, partial=True))
        latency = None
        if self.job.cancel_requested_at is not None:
            latency = time.monotonic() - self.job.cancel_requested_at
        return Cancelled(partials=partials, images=list(self.completed), seeds=list(self.seeds),
                         latency_s=latency)
