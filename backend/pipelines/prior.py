"""The unCLIP prior of Kandinsky 2.1 and 2.2: text (and images, through `interpolate`) -> CLIP
image embeddings for the decoders.

Port of diffusers 0.35.2 `pipelines/kandinsky2_2/pipeline_kandinsky2_2_prior.py` and
`pipeline_kandinsky2_2_prior_emb2emb.py`, same names and arguments, step for step: CLIP encodes
the prompt, the PriorTransformer denoises an embedding with the UnCLIP scheduler under
classifier-free guidance, the result is un-normalised with the CLIP statistics. Differences, each
on purpose: `generator` is a numpy Generator (all noise from backend/random.py), one
`callback(step, total, latents, x0)` per step replaces diffusers' two callback styles, and the image
encoder may be left out when its zero-image embedding is given (`zero_image_embeds`, see the class).
"""
from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
import numpy as np
from PIL import Image

from backend.pipelines import inputs
from backend.pipelines.base import (
    DiffusionPipeline,
    StepCallback,
    apply_guidance,
    do_classifier_free_guidance,
    get_timesteps,
)
from backend.random import randn


@dataclass
class _TextConditioning:
    """What the prior loop needs from the prompts (negative half first when guiding)."""

    batch_size: int                 # prompts (x2 with a negative prompt) x images per prompt
    has_negative_prompt: bool       # the batch's second half is the negative prompt's embedding
    num_images_per_prompt: int
    num_inference_steps: int
    guidance_scale: float
    prompt_embeds: np.ndarray       # (B or 2B, D) CLIP text embeddings
    hidden_states: np.ndarray       # (B or 2B, 77, D) CLIP last hidden states
    text_mask: np.ndarray           # (B or 2B, 77) bool padding mask


class KandinskyV22PriorPipeline(DiffusionPipeline):
    """Text (and images, through `interpolate`) -> CLIP image embeddings for the decoders.

    A call without `negative_prompt` returns, as its negative embedding, CLIP's embedding of an
    all-zero image (`get_zero_embed`): the same for every call of a checkpoint, and the only use of
    the image encoder (Kandinsky 2.2: ViT-bigG, 1.8B parameters, more than the prior and the text
    encoder together) in calls that encode no image. So the encoder may be left out
    (`image_encoder=None`, in `from_pretrained` too) and that embedding given instead:

        full = KandinskyV22PriorPipeline.from_pretrained(repo)
        zero = full.get_zero_embed()          # (1, D) float32; store it (np.save keeps every bit)
        text_only = KandinskyV22PriorPipeline.from_pretrained(repo, image_encoder=None, zero_image_embeds=zero)

    `text_only` returns what `full` returns, bit for bit, for every call that encodes no image;
    encoding one (`interpolate` with an image, Emb2Emb from a PIL image) raises a ValueError
    naming the missing encoder, before any work.
    """

    component_names = ("prior", "image_encoder", "text_encoder", "tokenizer", "scheduler", "image_processor")
    optional_components = ("image_encoder",)
    derived_values = {"zero_image_embeds": ("image_encoder", "embed_zero_image")}

    def __init__(self, dtype=ms.float32, zero_image_embeds=None, **components):
        super().__init__(dtype, **components)
        self.zero_image_embeds = zero_image_embeds

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, zero_image_embeds=None, **kwargs):
        """DiffusionPipeline.from_pretrained; `image_encoder=None` leaves the image encoder unloaded,
        `zero_image_embeds` gives its zero-image embedding (see the class)."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        pipe.zero_image_embeds = zero_image_embeds
        return pipe

    @property
    def embedding_dim(self) -> int:
        return int(self.prior.config.embedding_dim)

    @property
    def zero_image_embeds(self) -> np.ndarray | None:
        """(1, D) float32: the zero-image embedding given instead of computing it with the image
        encoder, or None (`get_zero_embed` runs the encoder)."""
        return self._zero_image_embeds

    @zero_image_embeds.setter
    def zero_image_embeds(self, value) -> None:
        if value is not None:
            value = inputs.as_embeds("zero_image_embeds", value, self.embedding_dim)
            if value.shape[0] != 1:
                raise ValueError(f"`zero_image_embeds` must have shape (1, {self.embedding_dim}); "
                                 f"got {tuple(value.shape)}")
        self._zero_image_embeds = value

    def _require_image_encoder(self, what: str, instead: str = ""):
        """The image encoder, or a ValueError saying that `what` needs it (and what else would do)."""
        if self.image_encoder is None:
            raise ValueError(f"{what} needs the image encoder, and this {type(self).__name__} was built "
                             f"without one (image_encoder=None): load it with its `image_encoder`"
                             + (f", or {instead}" if instead else ""))
        return self.image_encoder

    def _encode_prompt(self, prompt: list[str], num_images_per_prompt: int, guided: bool,
                       negative_prompt: list[str] | None):
        """CLIP text embeddings, hidden states and padding mask; negative first when guiding."""
        text_inputs = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                                     truncation=True, return_tensors="np")
        self.record_truncation(prompt, self.tokenizer.model_max_length)
        text_mask = text_inputs["attention_mask"].astype(bool)
        output = self.text_encoder(text_inputs["input_ids"])
        prompt_embeds = self.to_numpy(output.text_embeds).repeat(num_images_per_prompt, axis=0)
        hidden = self.to_numpy(output.last_hidden_state).repeat(num_images_per_prompt, axis=0)
        text_mask = text_mask.repeat(num_images_per_prompt, axis=0)

        if guided:
            if negative_prompt is None:
                uncond_tokens = [""] * len(prompt)
            elif len(negative_prompt) == 1:
                uncond_tokens = negative_prompt * len(prompt) if len(prompt) > 1 else negative_prompt
            elif len(negative_prompt) != len(prompt):
                raise ValueError(f"`negative_prompt` has {len(negative_prompt)} entries but `prompt` has "
                                 f"{len(prompt)}; give one negative prompt or one per prompt")
            else:
                uncond_tokens = negative_prompt
            uncond = self.tokenizer(uncond_tokens, padding="max_length",
                                    max_length=self.tokenizer.model_max_length, truncation=True,
                                    return_tensors="np")
            uncond_mask = uncond["attention_mask"].astype(bool)
            output = self.text_encoder(uncond["input_ids"])
            negative_embeds = self.to_numpy(output.text_embeds)
            uncond_hidden = self.to_numpy(output.last_hidden_state)
            # diffusers repeats the negative batch with repeat (tile), not repeat_interleave
            negative_embeds = np.tile(negative_embeds, (1, num_images_per_prompt)).reshape(
                len(uncond_tokens) * num_images_per_prompt, -1)
            seq_len = uncond_hidden.shape[1]
            uncond_hidden = np.tile(uncond_hidden, (1, num_images_per_prompt, 1)).reshape(
                len(uncond_tokens) * num_images_per_prompt, seq_len, -1)
            uncond_mask = uncond_mask.repeat(num_images_per_prompt, axis=0)

            prompt_embeds = np.concatenate([negative_embeds, prompt_embeds])
            hidden = np.concatenate([uncond_hidden, hidden])
            text_mask = np.concatenate([uncond_mask, text_mask])
        return prompt_embeds, hidden, text_mask

    def _encode_image(self, images: list, num_images_per_prompt: int) -> np.ndarray:
        encoder = self._require_image_encoder("Encoding an image", "pass image embeddings instead")
        pixel_values = self.image_processor.preprocess([inputs.to_rgb(i, "image") for i in images])
        embeds = self.to_numpy(encoder(pixel_values).image_embeds)
        return embeds.repeat(num_images_per_prompt, axis=0)

    def get_zero_embed(self, batch_size: int = 1) -> np.ndarray:
        """(batch_size, D) float32: CLIP's embedding of an all-zero image, repeated; `zero_image_embeds`
        when given, else computed by the image encoder."""
        embeds = self.zero_image_embeds
        if embeds is None:
            embeds = self.embed_zero_image(self._require_zero_embed_source())
        return np.tile(embeds, (batch_size, 1))

    @classmethod
    def embed_zero_image(cls, image_encoder) -> np.ndarray:
        """(1, D) float32: `image_encoder`'s embedding of an all-zero image. Needs nothing else of the
        pipeline, so the app computes it before the rest of the prior loads (backend/manager.py)."""
        size = int(image_encoder.config.image_size)
        zero_img = np.zeros((1, 3, size, size), np.float32)
        return cls.to_numpy(image_encoder(zero_img).image_embeds)

    def _require_zero_embed_source(self):
        return self._require_image_encoder(
            "The zero-image embedding (the negative embedding of a call without `negative_prompt`)",
            "give `zero_image_embeds` (`get_zero_embed()` of a pipeline that has the encoder)")

    def _denoise(self, latents, text: "_TextConditioning", timesteps, generator, callback: StepCallback | None):
        """The prior loop shared by text-to-embedding and embedding-to-embedding."""
        guided = do_classifier_free_guidance(text.guidance_scale)
        total = len(timesteps)
        for i, t in enumerate(timesteps):
            # expand the latents if we are doing classifier-free guidance
            model_input = np.concatenate([latents] * 2) if guided else latents
            predicted = self.to_numpy(self.prior(model_input, timestep=int(t), proj_embedding=text.prompt_embeds,
                                                 encoder_hidden_states=text.hidden_states,
                                                 attention_mask=text.text_mask))
            if guided:
                predicted = apply_guidance(predicted, text.guidance_scale, learned_variance=False)
            prev_timestep = None if i + 1 == total else timesteps[i + 1]
            out = self.scheduler.step(predicted, timestep=t, sample=latents, generator=generator,
                                      prev_timestep=prev_timestep)
            latents = out.prev_sample
            if callback is not None:
                callback(i, total, latents, out.pred_original_sample)
        return self.to_numpy(self.prior.post_process_latents(latents))

    def __call__(self, prompt, negative_prompt=None, num_images_per_prompt: int = 1,
                 num_inference_steps: int = 25, generator: np.random.Generator | None = None,
                 latents=None, guidance_scale: float = 4.0, output_type: str = "np",
                 callback: StepCallback | None = None):
        """Returns (image_embeds, negative_image_embeds), each float32 (B * num_images_per_prompt, D)."""
        # CLIP text conditioning, negative half first when guiding
        text = self._prepare_text(prompt, negative_prompt, num_images_per_prompt, num_inference_steps,
                                  guidance_scale, output_type)
        # timesteps and initial latents
        self.scheduler.set_timesteps(text.num_inference_steps)
        timesteps = self.scheduler.timesteps
        shape = (text.batch_size, self.embedding_dim)
        latents = randn(shape, generator) if latents is None else inputs.as_latents("latents", latents, shape)
        latents = latents * np.float32(self.scheduler.init_noise_sigma)
        # denoising loop, then the CLIP statistics put back
        embeds = self._denoise(latents, text, timesteps, generator, callback)
        return self._split_negative(embeds, text)

    def _prepare_text(self, prompt, negative_prompt, num_images_per_prompt, num_inference_steps, guidance_scale,
                      output_type) -> "_TextConditioning":
        """Checked arguments and the CLIP text conditioning shared by both prior pipelines."""
        prompt = inputs.prompts_list("prompt", prompt)
        if negative_prompt is not None:
            negative_prompt = inputs.prompts_list("negative_prompt", negative_prompt)
        num_images_per_prompt = inputs.check_batch("num_images_per_prompt", num_images_per_prompt)
        num_inference_steps = inputs.check_steps("num_inference_steps", num_inference_steps)
        guidance_scale = inputs.check_guidance("guidance_scale", guidance_scale)
        inputs.check_output_type(output_type, ("np", "pt"))
        if negative_prompt is None and self.zero_image_embeds is None:
            self._require_zero_embed_source()   # now, not after the denoising loop
        # With a negative prompt the batch is doubled to get its embedding from the same run.
        if negative_prompt is not None:
            prompt = prompt + negative_prompt
            negative_prompt = 2 * negative_prompt
        prompt_embeds, hidden, text_mask = self._encode_prompt(prompt, num_images_per_prompt,
                                                               do_classifier_free_guidance(guidance_scale),
                                                               negative_prompt)
        return _TextConditioning(len(prompt) * num_images_per_prompt, negative_prompt is not None,
                                 num_images_per_prompt, num_inference_steps, guidance_scale, prompt_embeds,
                                 hidden, text_mask)

    def _split_negative(self, embeds: np.ndarray, text: "_TextConditioning"):
        """(image_embeds, negative_image_embeds): the negative prompt's half, or the zero-image embedding."""
        if text.has_negative_prompt:
            return tuple(np.split(embeds, 2))
        return embeds, self.get_zero_embed(embeds.shape[0])

    def interpolate(self, images_and_prompts: list, weights: list[float], num_images_per_prompt: int = 1,
                    num_inference_steps: int = 25, generator: np.random.Generator | None = None,
                    latents=None, negative_prior_prompt: str | None = None, negative_prompt: str = "",
                    guidance_scale: float = 4.0, callback: StepCallback | None = None):
        """Weighted sum of the embeddings of texts and images; returns (image_embeds, negative_image_embeds)."""
        if not isinstance(images_and_prompts, (list, tuple)) or not images_and_prompts:
            raise ValueError("`images_and_prompts` must be a non-empty list of strings and PIL images")
        if not isinstance(weights, (list, tuple)) or len(images_and_prompts) != len(weights):
            raise ValueError(f"`images_and_prompts` contains {len(images_and_prompts)} items and `weights` "
                             f"contains {len(weights) if isinstance(weights, (list, tuple)) else weights} "
                             f"- they should be lists of same length")
        try:
            weights = [float(w) for w in weights]
        except (TypeError, ValueError):
            raise ValueError(f"`weights` must be numbers; got {weights}") from None
        if not all(np.isfinite(w) for w in weights):
            raise ValueError(f"`weights` must be finite numbers; got {weights}")
        for index, cond in enumerate(images_and_prompts):  # check everything before any work starts
            if not isinstance(cond, (str, Image.Image)):
                raise ValueError(f"`images_and_prompts[{index}]` must be a string or a PIL image; "
                                 f"got {type(cond).__name__}")
            if isinstance(cond, Image.Image):
                self._require_image_encoder(f"`images_and_prompts[{index}]`, an image,")
        if negative_prior_prompt is None and self.zero_image_embeds is None:
            self._require_zero_embed_source()

        total = np.zeros((num_images_per_prompt, self.embedding_dim), np.float32)
        for cond, weight in zip(images_and_prompts, weights):
            if isinstance(cond, str):
                emb = self(cond, num_inference_steps=num_inference_steps,
                           num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents,
                           negative_prompt=negative_prior_prompt, guidance_scale=guidance_scale,
                           callback=callback)[0]
            else:
                emb = self._encode_image([cond], num_images_per_prompt)
            total = total + emb * np.float32(weight)

        out_zero = self(negative_prompt, num_inference_steps=num_inference_steps,
                        num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents,
                        negative_prompt=negative_prior_prompt, guidance_scale=guidance_scale)
        zero_image_emb = out_zero[1] if negative_prompt == "" else out_zero[0]
        return total, zero_image_emb


class KandinskyV22PriorEmb2EmbPipeline(KandinskyV22PriorPipeline):
    """The prior started from an image's embedding instead of noise (`strength` of it is re-noised)."""

    def __call__(self, prompt, image, strength: float = 0.3, negative_prompt=None,
                 num_images_per_prompt: int = 1, num_inference_steps: int = 25,
                 generator: np.random.Generator | None = None, guidance_scale: float = 4.0,
                 output_type: str = "np", callback: StepCallback | None = None):
        strength = inputs.check_strength(strength)
        # CLIP text conditioning, negative half first when guiding
        text = self._prepare_text(prompt, negative_prompt, num_images_per_prompt, num_inference_steps,
                                  guidance_scale, output_type)
        num_images_per_prompt, batch_size = text.num_images_per_prompt, text.batch_size
        # the starting embeddings: CLIP's of the images, or the embeddings given
        images = inputs.images_list("image", image)
        if all(isinstance(i, Image.Image) for i in images):
            image_embeds = self._encode_image(images, num_images_per_prompt)
        else:
            image_embeds = inputs.as_embeds("image", images, self.embedding_dim)
            image_embeds = image_embeds.repeat(num_images_per_prompt, axis=0)

        # the last `strength` of the schedule, and the embeddings noised to its first step
        self.scheduler.set_timesteps(text.num_inference_steps)
        timesteps = get_timesteps(self.scheduler, text.num_inference_steps, strength)
        if batch_size > image_embeds.shape[0]:
            if batch_size % image_embeds.shape[0]:
                raise ValueError(f"Cannot duplicate `image` of batch size {image_embeds.shape[0]} "
                                 f"to {batch_size} text prompts.")
            image_embeds = np.concatenate([image_embeds] * (batch_size // image_embeds.shape[0]))
        latents = image_embeds
        if len(timesteps):
            noise = randn(latents.shape, generator)
            latents = self.scheduler.add_noise(latents, noise, np.repeat(timesteps[:1], batch_size))
        # denoising loop, then the CLIP statistics put back
        embeds = self._denoise(latents, text, timesteps, generator, callback)
        return self._split_negative(embeds, text)
