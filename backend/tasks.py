"""Requests -> pipeline calls, on the engine thread: seeds, stages, previews, stop, saving.

`TaskExecutor` runs each job the JobRunner hands it, as one `Run`:
1. seeds: seed, seed+1, ... for batch_count runs (a random seed when seed < 0); each run has its
   own numpy generator, so its noise is what running it alone would draw; with a variation strength,
   the run's VariationGenerator (backend/random.py) of variation_seed, variation_seed+1, ...;
2. the family's text stage (backend/families.py) for every run (the 2.x prior samples with the
   run's generator) or once per job (Kandinsky 3's T5), then the decoder for every run: under a
   budget that cannot hold both stages, each loads once per job, not once per run;
3. every step callback becomes a Step event (with a preview and an ETA) and checks for a stop;
   a text-to-image job with a hi-res pass then refines each image at the pass's size ("hires" steps,
   then a "decode"), from the state its generator had after the text stage: the noise an
   image-to-image job of that seed would draw;
4. each image is saved with its settings (backend/metadata.py); the job ends with Result, or on a
   stop with Cancelled carrying the last preview of the stopped run, saved and marked partial.
   An image the disk refuses (full, read-only, no permission) does not fail the job: it stays in
   its GeneratedImage (path None, save_error saying why and where), the job's notes say so, and the
   next images are still tried; an input image that cannot be stored is left out of the settings.

What differs per family is asked of the family, what differs per task of the request
(backend/requests.py): nothing here branches on either.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import logging
import secrets
import time

import numpy as np
from PIL import Image

from backend import interrupt, previews
from backend.events import Cancelled, GeneratedImage, Loading, Result
from backend.families import DEPTH_STAGE, ModelSpec
from backend.jobs import Job, JobCancelled
from backend.limits import MAX_SEED
from backend.manager import ModelManager
from backend.metadata import OutputStore
from backend.progress import Progress
from backend.random import run_generator
from backend.requests import InterpolateRequest, scheduler_key

logger = logging.getLogger(__name__)

APP_NAME = "Kandinsky Studio"
NOTE_CHARS = 300          # the dropped part of a long prompt is quoted up to this length


class TaskExecutor:
    """What the JobRunner runs for each job (engine thread)."""

    def __init__(self, models: dict[str, ModelSpec], manager: ModelManager, store: OutputStore):
        self.models, self.manager, self.store = models, manager, store

    def estimate_depth(self, model: str, photo: Image.Image, name: str = "hint", on_progress=None) -> Image.Image:
        """The depth image (white = near) the model's depth estimator makes of `photo`; ValueError names
        `name` for an image it cannot take (smaller than one patch)."""
        with self.manager.use(self.models[model].stage(DEPTH_STAGE), on_progress) as unit:
            return unit.pipeline()(photo, name=name)["depth"]

    def __call__(self, job: Job) -> None:
        run = Run(self, job)
        try:
            # the models check for a Stop between their blocks too, not only between steps
            with interrupt.checking(job.check_cancelled):
                run.execute()
        except JobCancelled:
            cancelled = run.cancelled()
            job.emit(cancelled)
            logger.info("job %s stopped %.3f s after the request, %d partial image(s) kept", job.id,
                        cancelled.latency_s or 0.0, len(cancelled.partials))
            return
        result = run.result()
        job.emit(result)
        logger.info("job %s: %d image(s) in %.2f s, previews %.3f s (%.1f%%)", job.id, len(result.images),
                    result.elapsed_s, result.preview_s, 100 * result.preview_s / max(1e-9, result.elapsed_s))


class Run:
    """One job: its seeds and step plan, the images it saved, the previews a stop would keep."""

    def __init__(self, executor: TaskExecutor, job: Job):
        self.executor, self.manager, self.store, self.job = executor, executor.manager, executor.store, job
        self.request = r = job.request
        self.model = executor.models[r.model]
        self.family = self.model.family
        self.started = time.monotonic()
        seed = r.seed if r.seed >= 0 else secrets.randbelow(MAX_SEED - r.batch_count)
        self.seeds = [(seed + b) % (MAX_SEED + 1) for b in range(r.batch_count)]
        # variations: run b slerps towards variation_seed + b, as AUTOMATIC1111 pairs subseed + i with seed + i
        variation = r.variation_seed
        if r.variation_strength > 0 and variation < 0:
            variation = secrets.randbelow(MAX_SEED - r.batch_count)
        self.variation_seeds = [(variation + b) % (MAX_SEED + 1) if variation >= 0 else variation
                                for b in range(r.batch_count)]
        # an interpolation walk also decodes mixes of input 1 and input 2 alone
        walk = r.walk_steps if isinstance(r, InterpolateRequest) else 0
        self.walk = np.linspace(0.0, 1.0, walk)
        self.walk_ends = [dataclasses.replace(r, inputs=[item], weights=[1.0], batch_size=1)
                          for item in r.inputs[:2]] if walk else []
        self.depth: Image.Image | None = None           # the depth estimated from the request's photo
        self.progress = Progress(job, self._plan(), r.batch_count)
        if r.hires_pass_steps() is not None:  # a hi-res step (one image) costs a base step (batch_size images)
            width, height = r.decoded_size()  # times the ratio of their pixels
            self.progress.guesses["hires"] = ("denoise", width * height / (r.width * r.height * r.batch_size))
        self.previews = _Previews(r.preview, r.preview_every)
        self.completed: list[GeneratedImage] = []
        self.notes: list[str] = []
        self.current: tuple | None = None              # (seed, batch, step, total) of the decoder run in progress
        self.current_size = (r.width, r.height)        # the size it decodes at (a partial image's size)
        self.current_position = 0                      # its first image's place in the run (a hi-res pass: one)
        self._input_refs: dict | None = None

    def _plan(self) -> dict[str, int]:
        """Steps per phase for the whole job (the ETA)."""
        r, family = self.request, self.family
        text_runs = r.batch_count if family.text_per_run else 1
        decodes = r.batch_count + len(self.walk)
        plan = {family.text_phase: text_runs * family.text_steps(r) + sum(map(family.text_steps, self.walk_ends)),
                "denoise": decodes * r.denoise_steps(), "decode": decodes}
        hires_passes = r.batch_count * r.batch_size if r.hires_pass_steps() is not None else 0
        if hires_passes:  # one image-to-image pass per image, each decoded
            plan["hires"] = hires_passes * r.hires_pass_steps()
            plan["decode"] += hires_passes
        return plan

    # ------------------------------------------------------------------ driver
    def execute(self) -> None:
        r = self.request
        photo = r.depth_photo()
        if photo is not None:  # the ControlNet hint from a photo: its depth, before any other model loads
            self.progress.loading(Loading(f"depth estimator: the depth of {photo[0]}", 0, 0))
            self.depth = self.executor.estimate_depth(r.model, photo[1], photo[0], self.progress.loading)
            self.job.check_cancelled()
        for warning in r.warnings():
            self.notes.append(warning)
        generators = [self._generator(b) for b in range(len(self.seeds))]
        if self.family.text_per_run:
            conditions = [self._condition(r, generator, b) for b, generator in enumerate(generators)]
        else:
            conditions = [self._condition(r, generators[0], 0)] * len(generators)
        # the hi-res pass draws what an image-to-image job of the seed would: the stream after the text stage
        after_text = [copy.deepcopy(g) for g in generators] if r.hires_pass_steps() is not None else []
        ends = [self._condition(end, generators[0], 0) for end in self.walk_ends]
        for b, (generator, condition) in enumerate(zip(generators, conditions)):
            images = self._decode(generator, condition, b, self.seeds[b])
            if after_text:  # each image saved when its pass ends: a stop in the next one keeps it
                images = self._hires(after_text[b], condition, b, images)
            for position, image in enumerate(images):
                self._save(image, self.seeds[b], b, position)
        if ends:
            self._walk(*ends)

    def result(self) -> Result:
        return Result(images=list(self.completed), seeds=list(self.seeds), elapsed_s=time.monotonic() - self.started,
                      preview_s=self.previews.seconds, notes=self._notes(self.completed),
                      step_seconds=self.progress.step_seconds())

    def cancelled(self) -> Cancelled:
        """Save the stopped run's last previews, full size and marked partial."""
        partials = []
        if self.current is not None and self.previews.last:
            seed, batch, step, total = self.current
            for position, preview in enumerate(self.previews.last, self.current_position):
                image = preview.convert("RGB").resize(self.current_size, Image.BILINEAR)
                settings = self._settings(seed, batch, position, partial=True,
                                          extra={"stopped_at_step": step, "steps_planned": total})
                partials.append(self._keep(image, settings, partial=True))
        return Cancelled(partials=partials, images=list(self.completed), seeds=list(self.seeds),
                         latency_s=self.job.stop_latency(), notes=self._notes(partials + self.completed))

    # ------------------------------------------------------------------ text stage
    def _condition(self, request, generator, batch: int) -> dict:
        """The decoder's conditioning for one run (or for the job), from the family's text stage."""
        phase = self.family.text_phase
        with self.manager.use(self.model.stage(self.family.text_stage), self.progress.loading,
                              needs=self.family.text_stage_needs(request)) as unit:
            pipe = unit.pipeline()
            self.progress.mark()
            self.progress.emit(phase, 0, self.family.text_steps(request), batch + 1)

            def callback(i, total, latents, x0):
                self.progress.tick(phase, i + 1, total, batch + 1)
                self.job.check_cancelled()
            return self.family.condition(pipe, request, generator, callback, self._note)

    def _note(self, reader: str, truncated: list[str]) -> None:
        """A note for the page when a text encoder dropped the end of a prompt."""
        if not truncated:
            return
        dropped = " | ".join(truncated)
        if len(dropped) > NOTE_CHARS:  # a 10,000-character prompt must not flood the page
            dropped = dropped[:NOTE_CHARS] + f"… ({len(dropped) - NOTE_CHARS} more characters)"
        note = f"{reader}; this part of the prompt was dropped: {dropped}"
        if note not in self.notes:
            self.notes.append(note)

    # ------------------------------------------------------------------ decoder
    def _generator(self, batch: int) -> np.random.Generator:
        """Run `batch`'s generator: its seed's, slerped towards its variation seed's with a variation strength."""
        r = self.request
        return run_generator(self.seeds[batch], self.variation_seeds[batch], r.variation_strength)

    def _decode(self, generator, condition: dict, batch: int, seed: int, request=None,
                phase: str = "denoise", position: int = 0) -> list[Image.Image]:
        """One decoder call of `request` (default: the job's), its steps reported as `phase`; `position`: its
        first image's place in the run."""
        r = request or self.request
        with self.manager.use(self.model.stage(r.decoder_stage), self.progress.loading) as unit:
            pipe = unit.pipeline(scheduler_key(r.scheduler))
            factors = None
            if r.preview == "fast":
                factors = unit.preview_factors(on_fit=lambda: self.job.emit(
                    Loading("preview colours: fitting the latent -> RGB map", 0, 0)))
            steps = r.denoise_steps()
            decoder_request = (r.with_depth(self.depth) if self.depth is not None else r).on_canvas()
            self.previews.last, self.current = [], (seed, batch, 0, steps)
            self.current_size = (decoder_request.width, decoder_request.height)
            self.current_position = position
            self.progress.mark()
            if steps == 0:  # strength 0: no step callback, only the decode
                self.progress.emit("decode", 1, 1, batch + 1)
            images = pipe(**condition, **self.family.decoder_arguments(decoder_request), generator=generator,
                          callback=self._denoise_callback(pipe, factors, batch, seed, phase))[0]
            if self.family.decoder_reads_prompt:
                self._note(self.family.decoder_text_reader, pipe.truncated_text)
            self.progress.record("decode")  # the decode ran since the last step's mark
        self.current = None
        return r.finish(images)

    def _hires(self, generator, condition: dict, batch: int, images: list[Image.Image]):
        """The hi-res pass over a run's images, one image-to-image call per image (Kandinsky 3's image-to-image
        takes one image per prompt, and a run's images share one), drawing from `generator` in turn; yields
        each refined image."""
        for k, image in enumerate(images):
            one = {name: 1 if name == "num_images_per_prompt" else _row(value, k, len(images))
                   for name, value in condition.items()}
            yield from self._decode(generator, one, batch, self.seeds[batch], self.request.hires_pass(image),
                                    "hires", k)

    def _denoise_callback(self, pipe, factors, batch: int, seed: int, phase: str = "denoise"):
        def callback(i, total, latents, x0):
            preview = self.previews.make(i, total, x0, pipe, factors)
            self.current = (seed, batch, i + 1, total)
            self.progress.tick(phase, i + 1, total, batch + 1, preview)
            self.job.check_cancelled()
            if i + 1 == total:
                self.progress.emit("decode", 1, 1, batch + 1, preview)
                self.progress.mark()
        return callback

    def _walk(self, start: dict, end: dict) -> None:
        """Decode mixes of the two ends' image embeddings, with the same noise along the walk."""
        seed = self.seeds[0]
        for index, t in enumerate(self.walk):
            mix = ((1.0 - t) * start["image_embeds"] + t * end["image_embeds"]).astype(np.float32)
            image = self._decode(self._generator(0), dict(start, image_embeds=mix), 0, seed)[0]
            self._save(image, seed, 0, 0, extra={"walk_index": index, "walk_t": float(t),
                                                 "walk_weights": [float(1 - t), float(t)]})

    # ------------------------------------------------------------------ saving
    def _input_references(self) -> dict:
        if self._input_refs is None:
            images = self.request.image_fields()
            if self.depth is not None:  # what the model got, kept with the photo it came from
                images["estimated_depth"] = self.depth
            self._input_refs = {}
            for name, image in images.items():
                try:
                    self._input_refs[name] = self.store.save_input(image, self.job.owner)
                except OSError as error:  # the result matters more than the reference to its input
                    logger.warning("job %s: input image %r not stored: %s", self.job.id, name, error)
                    self.notes.append(f"the input image {name!r} could not be stored: {error}; "
                                      f"the saved settings lack that reference")
        return self._input_refs

    def _settings(self, seed: int, batch: int, position: int, partial: bool = False, extra=None) -> dict:
        settings = self.request.settings()
        if self.request.variation_strength > 0:  # the variation seed of this run, as `seed` is its seed
            settings["variation_seed"] = self.variation_seeds[batch]
        settings.update(seed=seed, batch_index=batch, batch_position=position, partial=partial,
                        app=APP_NAME, created=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                        repos=self.model.public_repos(), dtype=self.manager.dtype, device=self.manager.device,
                        input_images=self._input_references())
        settings.update(extra or {})
        return settings

    def _save(self, image: Image.Image, seed: int, batch: int, position: int, extra=None) -> None:
        settings = self._settings(seed, batch, position, extra=extra)
        self.completed.append(self._keep(image, settings))

    def _keep(self, image: Image.Image, settings: dict, partial: bool = False) -> GeneratedImage:
        """The image saved; or, when the disk refuses it, kept in memory with the reason (the job goes on)."""
        try:
            path = self.store.save(image, settings, self.job.owner)
        except OSError as error:  # metadata.SaveError: names the problem and the folder
            logger.warning("job %s: the image of seed %s was not saved: %s", self.job.id, settings.get("seed"), error)
            return GeneratedImage(image=image, settings=settings, partial=partial, save_error=str(error))
        return GeneratedImage(image=image, settings=settings, path=path, partial=partial)

    def _notes(self, images: list[GeneratedImage]) -> tuple:
        """The job's notes, then one per reason images were not saved, naming them."""
        unsaved: dict[str, list[str]] = {}
        for generated in images:
            if generated.save_error:
                unsaved.setdefault(generated.save_error, []).append(_label(generated))
        notes = list(self.notes)
        for reason, labels in unsaved.items():
            what = f"the image of {labels[0]}" if len(labels) == 1 else f"{len(labels)} images ({', '.join(labels)})"
            notes.append(f"{what} could not be saved: {reason}. It is shown here and kept in the gallery only "
                         f"until the app restarts: download it from there")
        return tuple(notes)


def _row(value, k: int, images: int):
    """Image k's part of a conditioning argument of a run of `images` images: row k of an array or list with one
    row per image (2.x embeddings, 2.1's prompts), anything else as it is (Kandinsky 3's one prompt's T5 states)."""
    if images > 1 and isinstance(value, (np.ndarray, list)) and len(value) == images:
        return value[k:k + 1]
    return value


def _label(generated: GeneratedImage) -> str:
    """"seed 5", "seed 5 #2" (batch position), "seed 5 walk 3", "seed 5 (partial)": which image a note means."""
    settings = generated.settings
    label = f"seed {settings.get('seed')}"
    if settings.get("batch_size", 1) > 1:
        label += f" #{settings.get('batch_position', 0) + 1}"
    if "walk_index" in settings:
        label += f" walk {settings['walk_index'] + 1}"
    return label + (" (partial)" if generated.partial else "")


class _Previews:
    """Step previews of the decoder run in progress: the latest per image, and their cost."""

    def __init__(self, mode: str, every: int):
        self.mode, self.every = mode, every
        self.last: list[Image.Image] = []     # one per image of the run; a stop saves them as partial
        self.seconds = 0.0

    def make(self, i: int, total: int, x0, pipe, factors) -> Image.Image | None:
        """The preview of step i (0-based) as one image, or None when none is due."""
        if self.mode == "off" or ((i + 1) % self.every and i + 1 != total):
            return None
        started = time.perf_counter()
        if factors is not None:
            self.last = [previews.preview_image(x0[k:k + 1], factors) for k in range(len(x0))]
        else:  # "decode": the full MoVQ decode of x0, slow but exact
            self.last = pipe.decode(np.asarray(x0, np.float32), "pil")
        preview = previews.tile(self.last)
        self.seconds += time.perf_counter() - started
        return preview
