"""Kandinsky 2.2 pipelines: prior (text/image -> CLIP image embedding) and decoders
(embedding -> image: text-to-image, image-to-image, inpainting, ControlNet depth).

Port of diffusers 0.35.2 `pipelines/kandinsky2_2/*.py`, same names and arguments, step for step.
Differences, each on purpose:
- `generator` is a numpy Generator and all noise comes from backend/random.py, so a seed gives
  the same result on every device.
- One `callback(step, total, latents, x0)` per step (progress, previews, stop) replaces
  diffusers' two callback styles.
- Img2img resizes the image to (height, width); diffusers 0.35.2 passes them swapped to its image
  processor, which transposes non-square outputs.
- With guidance off and `num_images_per_prompt > 1`, embeddings are repeated per image (diffusers
  forgets to and fails on the batch mismatch).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Union

import numpy as np
from mindspore import Tensor
from PIL import Image

from backend.pipelines import inputs
from backend.pipelines.base import DiffusionPipeline, StepCallback
from backend.random import randn

logger = logging.getLogger(__name__)

ImageInput = Union[Image.Image, np.ndarray]


def downscale_height_and_width(height: int, width: int, scale_factor: int = 8) -> tuple[int, int]:
    """Pixel size -> latent size, rounding up to a multiple of scale_factor**2 pixels (as diffusers)."""
    new_height = height // scale_factor**2 + (height % scale_factor**2 != 0)
    new_width = width // scale_factor**2 + (width % scale_factor**2 != 0)
    return new_height * scale_factor, new_width * scale_factor


def get_timesteps(scheduler, num_inference_steps: int, strength: float):
    """The tail of the schedule that img2img runs: the last `strength` fraction of the steps."""
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init_timestep, 0)
    return scheduler.timesteps[t_start:]


# ------------------------------------------------------------------------------------ prior


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
    """Text (and images, through `interpolate`) -> CLIP image embeddings for the decoders."""

    component_names = ("prior", "image_encoder", "text_encoder", "tokenizer", "scheduler", "image_processor")

    @property
    def embedding_dim(self) -> int:
        return int(self.prior.config.embedding_dim)

    def _encode_prompt(self, prompt: list[str], num_images_per_prompt: int, do_cfg: bool,
                       negative_prompt: list[str] | None):
        """CLIP text embeddings, hidden states and padding mask; negative first when guiding."""
        text_inputs = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                                     truncation=True, return_tensors="np")
        self._warn_truncation(prompt)
        text_mask = text_inputs["attention_mask"].astype(bool)
        output = self.text_encoder(Tensor(text_inputs["input_ids"].astype(np.int32)))
        prompt_embeds = self.to_numpy(output.text_embeds).repeat(num_images_per_prompt, axis=0)
        hidden = self.to_numpy(output.last_hidden_state).repeat(num_images_per_prompt, axis=0)
        text_mask = text_mask.repeat(num_images_per_prompt, axis=0)

        if do_cfg:
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
            output = self.text_encoder(Tensor(uncond["input_ids"].astype(np.int32)))
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

    def _warn_truncation(self, prompt: list[str]) -> None:
        """Record (and log) the part of each prompt CLIP cannot see; the UI shows `truncated_text`."""
        limit = self.tokenizer.model_max_length
        untruncated = self.tokenizer(prompt, padding="longest", return_tensors="np")["input_ids"]
        self.truncated_text = []
        if untruncated.shape[-1] > limit:
            removed = self.tokenizer.batch_decode(untruncated[:, limit - 1: -1])
            self.truncated_text = [r for r in removed if r.strip()]
            if self.truncated_text:
                logger.warning("CLIP can only handle %d tokens; this part of the prompt was dropped: %s",
                               limit, self.truncated_text)

    def _encode_image(self, images: list, num_images_per_prompt: int) -> np.ndarray:
        pixel_values = self.image_processor.preprocess([inputs.to_rgb(i, "image") for i in images])
        embeds = self.to_numpy(self.image_encoder(self.to_tensor(pixel_values)).image_embeds)
        return embeds.repeat(num_images_per_prompt, axis=0)

    def get_zero_embed(self, batch_size: int = 1) -> np.ndarray:
        size = int(self.image_encoder.config.image_size)
        zero_img = np.zeros((1, 3, size, size), np.float32)
        embeds = self.to_numpy(self.image_encoder(self.to_tensor(zero_img)).image_embeds)
        return np.tile(embeds, (batch_size, 1))

    def _denoise(self, latents, text: "_TextConditioning", timesteps, generator, callback: StepCallback | None):
        """The prior loop shared by text-to-embedding and embedding-to-embedding."""
        guidance_scale = text.guidance_scale
        do_cfg = guidance_scale > 1.0
        proj = self.to_tensor(text.prompt_embeds)
        hidden_t = self.to_tensor(text.hidden_states)
        mask_t = Tensor(text.text_mask)
        total = len(timesteps)
        for i, t in enumerate(timesteps):
            model_input = np.concatenate([latents] * 2) if do_cfg else latents
            predicted = self.to_numpy(self.prior(self.to_tensor(model_input), timestep=int(t),
                                                 proj_embedding=proj, encoder_hidden_states=hidden_t,
                                                 attention_mask=mask_t))
            if do_cfg:
                uncond, text = np.split(predicted, 2)
                predicted = uncond + guidance_scale * (text - uncond)
            prev_timestep = None if i + 1 == total else timesteps[i + 1]
            out = self.scheduler.step(predicted, timestep=t, sample=latents, generator=generator,
                                      prev_timestep=prev_timestep)
            latents = out.prev_sample
            if callback is not None:
                callback(i, total, latents, out.pred_original_sample)
        return self.to_numpy(self.prior.post_process_latents(self.to_tensor(latents)))

    def __call__(self, prompt, negative_prompt=None, num_images_per_prompt: int = 1,
                 num_inference_steps: int = 25, generator: np.random.Generator | None = None,
                 latents=None, guidance_scale: float = 4.0, output_type: str = "np",
                 callback: StepCallback | None = None):
        """Returns (image_embeds, negative_image_embeds), each float32 (B * num_images_per_prompt, D)."""
        text = self._prepare_text(prompt, negative_prompt, num_images_per_prompt, num_inference_steps,
                                  guidance_scale, output_type)
        self.scheduler.set_timesteps(text.num_inference_steps)
        timesteps = self.scheduler.timesteps
        shape = (text.batch_size, self.embedding_dim)
        latents = randn(shape, generator) if latents is None else inputs.as_latents("latents", latents, shape)
        latents = latents * np.float32(self.scheduler.init_noise_sigma)
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
        # With a negative prompt the batch is doubled to get its embedding from the same run.
        if negative_prompt is not None:
            prompt = prompt + negative_prompt
            negative_prompt = 2 * negative_prompt
        prompt_embeds, hidden, text_mask = self._encode_prompt(prompt, num_images_per_prompt,
                                                               guidance_scale > 1.0, negative_prompt)
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
        text = self._prepare_text(prompt, negative_prompt, num_images_per_prompt, num_inference_steps,
                                  guidance_scale, output_type)
        num_images_per_prompt, batch_size = text.num_images_per_prompt, text.batch_size
        images = inputs.images_list("image", image)
        if all(isinstance(i, Image.Image) for i in images):
            image_embeds = self._encode_image(images, num_images_per_prompt)
        else:
            image_embeds = inputs.as_embeds("image", images, self.embedding_dim)
            image_embeds = image_embeds.repeat(num_images_per_prompt, axis=0)

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
        embeds = self._denoise(latents, text, timesteps, generator, callback)
        return self._split_negative(embeds, text)


# ---------------------------------------------------------------------------------- decoders


class _DecoderPipeline(DiffusionPipeline):
    """UNet + scheduler + MoVQ; the shared parts of the 2.2 decoder pipelines."""

    component_names = ("unet", "scheduler", "movq")

    @property
    def movq_scale_factor(self) -> int:
        return 2 ** (len(self.movq.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.movq.config.latent_channels)

    @property
    def embed_dim(self) -> int:
        return int(self.unet.config.encoder_hid_dim)

    def _embeds(self, image_embeds, negative_image_embeds, num_images_per_prompt, do_cfg):
        """(B*n, D) conditioning, with the negative half first when guiding."""
        image_embeds = inputs.as_embeds("image_embeds", image_embeds, self.embed_dim)
        negative = inputs.as_embeds("negative_image_embeds", negative_image_embeds, self.embed_dim)
        if negative.shape[0] != image_embeds.shape[0]:
            if negative.shape[0] == 1:
                negative = np.repeat(negative, image_embeds.shape[0], axis=0)
            else:
                raise ValueError(f"`negative_image_embeds` has batch {negative.shape[0]} but `image_embeds` "
                                 f"has {image_embeds.shape[0]}")
        batch_size = image_embeds.shape[0] * num_images_per_prompt
        image_embeds = image_embeds.repeat(num_images_per_prompt, axis=0)
        negative = negative.repeat(num_images_per_prompt, axis=0)
        cond = np.concatenate([negative, image_embeds]) if do_cfg else image_embeds
        return cond, batch_size

    def _check_common(self, height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                      output_type):
        return (inputs.check_size("height", height), inputs.check_size("width", width),
                inputs.check_steps("num_inference_steps", num_inference_steps),
                inputs.check_guidance("guidance_scale", guidance_scale),
                inputs.check_batch("num_images_per_prompt", num_images_per_prompt),
                inputs.check_output_type(output_type))

    def _predict_noise(self, latents, t, cond, guidance_scale, extra_channels=None, hint=None):
        """One UNet call with classifier-free guidance; returns what the scheduler step takes."""
        do_cfg = guidance_scale > 1.0
        model_input = np.concatenate([latents] * 2) if do_cfg else latents
        if extra_channels is not None:
            model_input = np.concatenate([model_input, extra_channels], axis=1)
        added = {"image_embeds": cond}
        if hint is not None:
            added["hint"] = hint
        noise_pred = self.to_numpy(self.unet(self.to_tensor(model_input), int(t), encoder_hidden_states=None,
                                             added_cond_kwargs=added))
        channels = latents.shape[1]
        if do_cfg:
            noise_pred, variance_pred = noise_pred[:, :channels], noise_pred[:, channels:]
            noise_uncond, noise_text = np.split(noise_pred, 2)
            _, variance_text = np.split(variance_pred, 2)
            noise_pred = noise_uncond + np.float32(guidance_scale) * (noise_text - noise_uncond)
            noise_pred = np.concatenate([noise_pred, variance_text], axis=1)
        if self.scheduler.config.get("variance_type") not in ("learned", "learned_range"):
            noise_pred = noise_pred[:, :channels]
        return noise_pred

    def _denoise(self, latents, timesteps, cond, guidance_scale, generator, callback,
                 extra_channels=None, hint=None, after_step=None):
        cond_t = self.to_tensor(cond)
        hint_t = None if hint is None else self.to_tensor(hint)
        total = len(timesteps)
        for i, t in enumerate(timesteps):
            noise_pred = self._predict_noise(latents, t, cond_t, guidance_scale, extra_channels, hint_t)
            out = self.scheduler.step(noise_pred, t, latents, generator=generator)
            latents = out.prev_sample
            if after_step is not None:
                latents = after_step(i, latents)
            if callback is not None:
                callback(i, total, latents, out.pred_original_sample)
        return latents

    def _prepare_latents(self, shape, generator, latents):
        if latents is None:
            latents = randn(shape, generator)
        else:
            latents = inputs.as_latents("latents", latents, shape)
        return latents * np.float32(self.scheduler.init_noise_sigma)

    def decode(self, latents: np.ndarray, output_type: str = "pil"):
        """MoVQ decode to (B, H, W, 3) in [0, 1] (np) or PIL images; "latent" returns the latents."""
        if output_type == "latent":
            return latents
        image = self.to_numpy(self.movq.decode(self.to_tensor(latents), force_not_quantize=True)["sample"])
        image = np.clip(image * 0.5 + 0.5, 0, 1).transpose(0, 2, 3, 1)
        if output_type == "pil":
            return inputs.numpy_to_pil(image)
        return image

    def _inpaint_channels(self, keep_mask: np.ndarray, pixels: np.ndarray, num_images_per_prompt: int,
                          do_cfg: bool):
        """The image's MoVQ latents, and the inpainting UNet's extra input channels: masked image
        latents and the keep mask (1 = keep) at latent size, repeated per image and for both
        guidance halves. Returns (image_latents, keep_mask, extra)."""
        image_latents = self.to_numpy(self.movq.encode(self.to_tensor(pixels))["latents"])
        keep_mask = prepare_mask(nearest_resize(keep_mask, image_latents.shape[-2:]))
        masked_image = image_latents * keep_mask
        keep_mask = keep_mask.repeat(num_images_per_prompt, axis=0)
        masked_image = masked_image.repeat(num_images_per_prompt, axis=0)
        if do_cfg:
            keep_mask = np.concatenate([keep_mask] * 2)
            masked_image = np.concatenate([masked_image] * 2)
        return image_latents, keep_mask, np.concatenate([masked_image, keep_mask], axis=1)

    def _check_inpaint_size(self, latents: np.ndarray, image_latents: np.ndarray, height: int, width: int):
        if latents.shape[-2:] != image_latents.shape[-2:]:
            raise ValueError(f"`height`/`width` {height}x{width} give latents of {latents.shape[-2:]} but the "
                             f"image encodes to {image_latents.shape[-2:]}; use multiples of "
                             f"{self.movq_scale_factor ** 2} pixels")

    def encode_images(self, images: list, height: int, width: int) -> np.ndarray:
        """PIL images (or (H, W, 3) arrays in [0, 1]) -> MoVQ latents, as diffusers' VaeImageProcessor
        preprocesses: resize to the size rounded down to the MoVQ factor (bicubic), scale to [-1, 1]."""
        factor = self.movq_scale_factor
        height, width = height - height % factor, width - width % factor
        if height < factor or width < factor:
            raise ValueError(f"`height` and `width` must be at least {factor} pixels")
        arrays = []
        for index, image in enumerate(images):
            if isinstance(image, Image.Image):
                image = inputs.to_rgb(image, "image").resize((width, height), resample=Image.BICUBIC,
                                                              reducing_gap=1)
                arrays.append(np.asarray(image, np.float32) / 255.0)
            else:
                array = np.asarray(image, np.float32)
                if array.ndim != 3 or array.shape[-1] != 3:
                    raise ValueError(f"`image[{index}]` must be a PIL image or a (H, W, 3) array in [0, 1]")
                if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
                    raise ValueError(f"`image[{index}]` array values must be finite and in [0, 1]")
                if array.shape[:2] != (height, width):
                    raise ValueError(f"`image[{index}]` array is {array.shape[1]}x{array.shape[0]}, "
                                     f"expected {width}x{height} (PIL images are resized)")
                arrays.append(array)
        pixels = np.stack(arrays).transpose(0, 3, 1, 2) * 2.0 - 1.0
        return self.to_numpy(self.movq.encode(self.to_tensor(pixels))["latents"])


class KandinskyV22Pipeline(_DecoderPipeline):
    """Text-to-image decoder: image embeddings -> image."""

    def __call__(self, image_embeds, negative_image_embeds, height: int = 512, width: int = 512,
                 num_inference_steps: int = 100, guidance_scale: float = 4.0, num_images_per_prompt: int = 1,
                 generator: np.random.Generator | None = None, latents=None, output_type: str = "pil",
                 callback: StepCallback | None = None):
        height, width, num_inference_steps, guidance_scale, num_images_per_prompt, output_type = \
            self._check_common(height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                               output_type)
        do_cfg = guidance_scale > 1.0
        cond, batch_size = self._embeds(image_embeds, negative_image_embeds, num_images_per_prompt, do_cfg)

        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        latent_h, latent_w = downscale_height_and_width(height, width, self.movq_scale_factor)
        latents = self._prepare_latents((batch_size, self.unet.config.in_channels, latent_h, latent_w),
                                        generator, latents)
        latents = self._denoise(latents, timesteps, cond, guidance_scale, generator, callback)
        return (self.decode(latents, output_type),)


class KandinskyV22Img2ImgPipeline(_DecoderPipeline):
    """Image-to-image: the image is encoded, noised to `strength`, and denoised from there."""

    def __call__(self, image_embeds, image, negative_image_embeds, height: int = 512, width: int = 512,
                 num_inference_steps: int = 100, guidance_scale: float = 4.0, strength: float = 0.3,
                 num_images_per_prompt: int = 1, generator: np.random.Generator | None = None,
                 output_type: str = "pil", callback: StepCallback | None = None):
        height, width, num_inference_steps, guidance_scale, num_images_per_prompt, output_type = \
            self._check_common(height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                               output_type)
        strength = inputs.check_strength(strength)
        do_cfg = guidance_scale > 1.0
        cond, batch_size = self._embeds(image_embeds, negative_image_embeds, num_images_per_prompt, do_cfg)
        init_latents = self._init_latents(image, height, width, batch_size // num_images_per_prompt,
                                          num_images_per_prompt)
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = get_timesteps(self.scheduler, num_inference_steps, strength)
        latents = self._noise_to_strength(init_latents, timesteps, generator)
        latents = self._denoise(latents, timesteps, cond, guidance_scale, generator, callback)
        return (self.decode(latents, output_type),)

    def _init_latents(self, image, height, width, batch_size, num_images_per_prompt):
        images = inputs.images_list("image", image)
        latents = self.encode_images(images, height, width)
        if latents.shape[0] != batch_size:
            if latents.shape[0] == 1:
                latents = np.repeat(latents, batch_size, axis=0)
            else:
                raise ValueError(f"`image` has {latents.shape[0]} images but the embeddings have batch {batch_size}")
        return latents.repeat(num_images_per_prompt, axis=0)

    def _noise_to_strength(self, latents, timesteps, generator):
        if not len(timesteps):  # strength 0: nothing to denoise, the image comes back as it went in
            return latents
        noise = randn(latents.shape, generator)
        return self.scheduler.add_noise(latents, noise, np.repeat(timesteps[:1], latents.shape[0]))


def prepare_mask(mask: np.ndarray) -> np.ndarray:
    """Grow the repaint region (zeros) by one latent pixel, as diffusers' `prepare_mask` does.

    mask (B, 1, h, w): 1 = keep, 0 = repaint. diffusers loops over pixels and, for every repaint
    pixel, zeroes its neighbours up, left, up-left, down, right and down-right (not the two
    anti-diagonal ones); this is the same thing with array shifts.
    """
    repaint = mask[:, 0] != 1
    grown = repaint.copy()
    grown[:, :-1, :] |= repaint[:, 1:, :]      # (i-1, j) from a repaint pixel at (i, j)
    grown[:, :, :-1] |= repaint[:, :, 1:]      # (i, j-1)
    grown[:, :-1, :-1] |= repaint[:, 1:, 1:]   # (i-1, j-1)
    grown[:, 1:, :] |= repaint[:, :-1, :]      # (i+1, j)
    grown[:, :, 1:] |= repaint[:, :, :-1]      # (i, j+1)
    grown[:, 1:, 1:] |= repaint[:, :-1, :-1]   # (i+1, j+1)
    out = mask.copy()
    out[:, 0][grown] = 0
    return out


def prepare_mask_and_masked_image(image, mask, height: int, width: int):
    """PIL/array image and mask -> image in [-1, 1] (B, 3, H, W) and mask (B, 1, H, W) with 1 = keep."""
    images = inputs.images_list("image", image)
    masks = inputs.images_list("mask_image", mask)
    arrays = []
    for index, img in enumerate(images):
        if isinstance(img, Image.Image):
            img = inputs.to_rgb(img, "image").resize((width, height), resample=Image.BICUBIC, reducing_gap=1)
            arrays.append(np.asarray(img, np.float32))
        else:
            array = np.asarray(img, np.float32)
            if array.ndim != 3 or array.shape[-1] != 3:
                raise ValueError(f"`image[{index}]` must be a PIL image or a (H, W, 3) uint8-range array")
            arrays.append(array)
    pixels = np.stack(arrays).transpose(0, 3, 1, 2) / 127.5 - 1.0

    mask_arrays = []
    for m in masks:
        m = inputs.to_mask(m)
        if isinstance(m, Image.Image):
            m = np.asarray(m.resize((width, height), resample=Image.LANCZOS), np.float32) / 255.0
        mask_arrays.append(m)
    mask_array = np.stack(mask_arrays)[:, None]
    if mask_array.shape[-2:] != pixels.shape[-2:]:
        raise ValueError(f"`mask_image` is {mask_array.shape[-1]}x{mask_array.shape[-2]} but `image` is "
                         f"{pixels.shape[-1]}x{pixels.shape[-2]}; pass PIL images (they are resized) or "
                         f"arrays of the same size")
    if mask_array.shape[0] != pixels.shape[0]:
        if mask_array.shape[0] == 1:
            mask_array = np.repeat(mask_array, pixels.shape[0], axis=0)
        else:
            raise ValueError(f"`mask_image` has {mask_array.shape[0]} masks for {pixels.shape[0]} images")
    mask_array = (mask_array >= 0.5).astype(np.float32)
    return 1.0 - mask_array, pixels.astype(np.float32)


def nearest_resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torch F.interpolate(mode="nearest") over the last two axes: src = floor(dst * in / out)."""
    in_h, in_w = array.shape[-2:]
    rows = np.minimum((np.arange(size[0]) * (in_h / size[0])).astype(np.int64), in_h - 1)
    cols = np.minimum((np.arange(size[1]) * (in_w / size[1])).astype(np.int64), in_w - 1)
    return array[..., rows[:, None], cols[None, :]]


class KandinskyV22InpaintPipeline(_DecoderPipeline):
    """Inpainting: white in `mask_image` is repainted, black is kept."""

    def __call__(self, image_embeds, image, mask_image, negative_image_embeds, height: int = 512,
                 width: int = 512, num_inference_steps: int = 100, guidance_scale: float = 4.0,
                 num_images_per_prompt: int = 1, generator: np.random.Generator | None = None, latents=None,
                 output_type: str = "pil", callback: StepCallback | None = None):
        height, width, num_inference_steps, guidance_scale, num_images_per_prompt, output_type = \
            self._check_common(height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                               output_type)
        do_cfg = guidance_scale > 1.0
        cond, batch_size = self._embeds(image_embeds, negative_image_embeds, num_images_per_prompt, do_cfg)
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps

        keep_mask, pixels = prepare_mask_and_masked_image(image, mask_image, height, width)
        image_latents, keep_mask, extra = self._inpaint_channels(keep_mask, pixels, num_images_per_prompt, do_cfg)

        latent_h, latent_w = downscale_height_and_width(height, width, self.movq_scale_factor)
        latents = self._prepare_latents((batch_size, self.latent_channels, latent_h, latent_w), generator,
                                        latents)
        self._check_inpaint_size(latents, image_latents, height, width)
        noise = latents.copy()
        init_latents_proper, init_mask = image_latents[:1], keep_mask[:1]

        def keep_known_region(i, latents):
            # Outside the mask, put back the original image noised to the next step's level.
            proper = init_latents_proper
            if i < len(timesteps) - 1:
                proper = self.scheduler.add_noise(init_latents_proper, noise, np.array([timesteps[i + 1]]))
            return init_mask * proper + (1 - init_mask) * latents

        latents = self._denoise(latents, timesteps, cond, guidance_scale, generator, callback,
                                extra_channels=extra, after_step=keep_known_region)
        latents = init_mask * image_latents[:1] + (1 - init_mask) * latents
        return (self.decode(latents.astype(np.float32), output_type),)


def as_hint(hint, size: tuple[int, int], name: str = "hint") -> np.ndarray:
    """ControlNet hint: (B, 3, H, W) floats in [0, 1] (a depth map repeated over RGB), or a PIL image
    (resized to `size` = (H, W), bicubic)."""
    if isinstance(hint, Image.Image):
        image = inputs.to_rgb(hint, name).resize((size[1], size[0]), resample=Image.BICUBIC)
        array = np.asarray(image, np.float32) / 255.0
        return array.transpose(2, 0, 1)[None]
    array = np.asarray(inputs._to_numpy(hint), dtype=np.float32)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[1] != 3:
        raise ValueError(f"`{name}` must have shape (batch, 3, height, width); got {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"`{name}` contains NaN or infinite values")
    return array


class KandinskyV22ControlnetPipeline(_DecoderPipeline):
    """Text-to-image guided by a depth hint (kandinsky-2-2-controlnet-depth)."""

    def _hint(self, hint, batch, num_images_per_prompt, do_cfg, latent_size):
        """Hint batch for the UNet: pixel size = latent size x MoVQ factor, doubled when guiding."""
        height, width = (s * self.movq_scale_factor for s in latent_size)
        hint = as_hint(hint, (height, width))
        if hint.shape[-2:] != (height, width):
            raise ValueError(f"`hint` is {hint.shape[-1]}x{hint.shape[-2]} but the image is {width}x{height}; "
                             f"give a hint of the output size (PIL hints are resized)")
        if hint.shape[0] != batch:
            if hint.shape[0] != 1:
                raise ValueError(f"`hint` has batch {hint.shape[0]} but the embeddings have {batch}")
            hint = np.repeat(hint, batch, axis=0)
        hint = hint.repeat(num_images_per_prompt, axis=0)
        return np.concatenate([hint, hint]) if do_cfg else hint

    def __call__(self, image_embeds, negative_image_embeds, hint, height: int = 512, width: int = 512,
                 num_inference_steps: int = 100, guidance_scale: float = 4.0, num_images_per_prompt: int = 1,
                 generator: np.random.Generator | None = None, latents=None, output_type: str = "pil",
                 callback: StepCallback | None = None):
        height, width, num_inference_steps, guidance_scale, num_images_per_prompt, output_type = \
            self._check_common(height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                               output_type)
        do_cfg = guidance_scale > 1.0
        cond, batch_size = self._embeds(image_embeds, negative_image_embeds, num_images_per_prompt, do_cfg)
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        latent_h, latent_w = downscale_height_and_width(height, width, self.movq_scale_factor)
        hint = self._hint(hint, batch_size // num_images_per_prompt, num_images_per_prompt, do_cfg,
                          (latent_h, latent_w))
        latents = self._prepare_latents((batch_size, self.latent_channels, latent_h, latent_w), generator,
                                        latents)
        latents = self._denoise(latents, timesteps, cond, guidance_scale, generator, callback, hint=hint)
        return (self.decode(latents, output_type),)


class KandinskyV22ControlnetImg2ImgPipeline(KandinskyV22ControlnetPipeline, KandinskyV22Img2ImgPipeline):
    """Image-to-image guided by a depth hint."""

    def __call__(self, image_embeds, image, negative_image_embeds, hint, height: int = 512, width: int = 512,
                 num_inference_steps: int = 100, guidance_scale: float = 4.0, strength: float = 0.3,
                 num_images_per_prompt: int = 1, generator: np.random.Generator | None = None,
                 output_type: str = "pil", callback: StepCallback | None = None):
        height, width, num_inference_steps, guidance_scale, num_images_per_prompt, output_type = \
            self._check_common(height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                               output_type)
        strength = inputs.check_strength(strength)
        do_cfg = guidance_scale > 1.0
        cond, batch_size = self._embeds(image_embeds, negative_image_embeds, num_images_per_prompt, do_cfg)
        init_latents = self._init_latents(image, height, width, batch_size // num_images_per_prompt,
                                          num_images_per_prompt)
        hint = self._hint(hint, batch_size // num_images_per_prompt, num_images_per_prompt, do_cfg,
                          init_latents.shape[-2:])
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = get_timesteps(self.scheduler, num_inference_steps, strength)
        latents = self._noise_to_strength(init_latents, timesteps, generator)
        latents = self._denoise(latents, timesteps, cond, guidance_scale, generator, callback, hint=hint)
        return (self.decode(latents, output_type),)
