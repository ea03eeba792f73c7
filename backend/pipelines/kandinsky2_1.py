"""Kandinsky 2.1 pipelines: prior (text/image -> CLIP ViT-L/14 image embedding) and decoders
(prompt + image embedding -> image: text-to-image, image-to-image, inpainting).

Port of diffusers 0.35.2 `pipelines/kandinsky/*.py`, same names and arguments, step for step.
Unlike 2.2, the 2.1 decoders also read the prompt: the Multilingual CLIP text encoder
(backend/models/mclip.py) gives the UNet a pooled text embedding (added to the time embedding)
and the token states (cross-attention keys after the 10 image tokens).

Differences from diffusers, each on purpose (the 2.2 ones in kandinsky2_2.py apply too: numpy
generator noise, one `callback(step, total, latents, x0)`, embeddings repeated per image when
guidance is off):
- Img2img resizes the image to (height, width); diffusers 0.35.2 passes them swapped to its image
  processor and then rejects every non-square size ("Unexpected latents shape").
- Img2img with `strength` 0 returns the image as it went in (diffusers noises it to timestep -2,
  i.e. nearly pure noise, and denoises nothing); its noise timestep int(1000 * strength) - 2 is
  clamped at 0 for strengths below 0.002.
- A single image embedding, image or mask is repeated over a batch of prompts (diffusers fails
  on the batch mismatch), and a single negative prompt over a batch of prompts.
- `truncated_text` names the part of each prompt beyond the 77 tokens the decoder reads
  (diffusers' warning slices at the tokenizer's 512-token limit instead, so it never fires).
- `interpolate` (inherited from the 2.2 prior) returns one embedding per image; diffusers 2.1 sums
  the `num_images_per_prompt` rows into one (identical for the default of one image).
- Img2img noises the image latents with the original 2.1 schedule for every scheduler, as diffusers
  does, but does not multiply them by `init_noise_sigma` first (1 for all but Euler and Euler a;
  those get the noisy latents in their own form, see the code); the scheduler is told where the
  run begins (base.get_timesteps).
"""
from __future__ import annotations

import numpy as np

from backend.pipelines import inputs
from backend.pipelines.base import StepCallback, do_classifier_free_guidance, get_timesteps
from backend.pipelines.decoder import DecoderPipeline, downscale_height_and_width, prepare_mask_and_masked_image
from backend.pipelines.prior import KandinskyV22PriorPipeline
from backend.random import randn
from backend.schedulers.base import add_noise, torch_cumprod_f32, torch_linspace_f32
from backend.schedulers.sigmas import DiscreteScheduler

# diffusers tokenizes the decoder prompt with max_length=77, whatever the tokenizer's own limit (512).
MAX_TEXT_TOKENS = 77


class KandinskyPriorPipeline(KandinskyV22PriorPipeline):
    """Text (and images, through `interpolate`) -> CLIP ViT-L/14 image embeddings for the 2.1 decoders.

    The same algorithm as the 2.2 prior (diffusers' two files differ only in `interpolate`'s
    reshaping, see the module docstring); the published 2.1 tokenizer pads with "!" (id 0), which
    the tokenizer's own config supplies.
    """


# ---------------------------------------------------------------------------------- decoders


class _KandinskyDecoder(DecoderPipeline):
    """MCLIP text encoder + UNet + scheduler + MoVQ; the shared parts of the 2.1 decoders."""

    component_names = ("text_encoder", "tokenizer", "unet", "scheduler", "movq")

    @property
    def embed_dim(self) -> int:
        # TextImageProjection / TextImageTimeEmbedding take image embeddings of cross_attention_dim
        return int(self.unet.config.cross_attention_dim)

    def unet_inputs(self, prompt: list[str], negative_prompt: list[str] | None, image_embeds,
                    negative_image_embeds, num_images_per_prompt: int, guided: bool) -> dict:
        """What the 2.1 UNet reads besides the sample: the MCLIP token states (cross-attention), and
        the pooled text and image embeddings (added to the time embedding); negative halves first
        when guiding."""
        image_embeds = self._image_embeds(image_embeds, negative_image_embeds, len(prompt), num_images_per_prompt,
                                          guided)
        text_embeds, hidden = self._encode_prompt(prompt, num_images_per_prompt, guided, negative_prompt)
        return {"encoder_hidden_states": hidden,
                "added_cond_kwargs": {"text_embeds": text_embeds, "image_embeds": image_embeds}}

    # -- text
    def _encode_prompt(self, prompt: list[str], num_images_per_prompt: int, guided: bool,
                       negative_prompt: list[str] | None):
        """MCLIP (text_embeds (B*n, D), token states (B*n, 77, H)); the negative half first when guiding."""
        text_embeds, hidden = self._encode_text(prompt)
        self.record_truncation(prompt, MAX_TEXT_TOKENS)
        text_embeds = text_embeds.repeat(num_images_per_prompt, axis=0)
        hidden = hidden.repeat(num_images_per_prompt, axis=0)
        if not guided:
            return text_embeds, hidden
        if negative_prompt is None:
            uncond_tokens = [""] * len(prompt)
        elif len(negative_prompt) == len(prompt):
            uncond_tokens = negative_prompt
        elif len(negative_prompt) == 1:
            uncond_tokens = negative_prompt * len(prompt)
        else:
            raise ValueError(f"`negative_prompt` has {len(negative_prompt)} entries but `prompt` has "
                             f"{len(prompt)}; give one negative prompt or one per prompt")
        negative_embeds, uncond_hidden = self._encode_text(uncond_tokens)
        # diffusers' repeat(1, n).view(B * n, ...) is a repeat per row, as for the prompt
        negative_embeds = negative_embeds.repeat(num_images_per_prompt, axis=0)
        uncond_hidden = uncond_hidden.repeat(num_images_per_prompt, axis=0)
        return np.concatenate([negative_embeds, text_embeds]), np.concatenate([uncond_hidden, hidden])

    def _encode_text(self, texts: list[str]):
        tokens = self.tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_TEXT_TOKENS,
                                return_attention_mask=True, add_special_tokens=True, return_tensors="np")
        text_embeds, hidden = self.text_encoder(tokens["input_ids"].astype(np.int64),
                                                tokens["attention_mask"].astype(np.int64))
        return self.to_numpy(text_embeds), self.to_numpy(hidden)

    # -- image embeddings
    def _image_embeds(self, image_embeds, negative_image_embeds, prompt_batch: int, num_images_per_prompt: int,
                      guided: bool) -> np.ndarray:
        """(B*n, D) image embeddings (negative half first when guiding), one per prompt."""
        image_embeds = inputs.as_embeds("image_embeds", image_embeds, self.embed_dim)
        negative = inputs.as_embeds("negative_image_embeds", negative_image_embeds, self.embed_dim)
        if image_embeds.shape[0] != prompt_batch:
            if image_embeds.shape[0] != 1:
                raise ValueError(f"`image_embeds` has batch {image_embeds.shape[0]} but `prompt` has "
                                 f"{prompt_batch} entries; give one embedding or one per prompt")
            image_embeds = np.repeat(image_embeds, prompt_batch, axis=0)
        if negative.shape[0] != prompt_batch:
            if negative.shape[0] != 1:
                raise ValueError(f"`negative_image_embeds` has batch {negative.shape[0]} but `prompt` has "
                                 f"{prompt_batch} entries; give one embedding or one per prompt")
            negative = np.repeat(negative, prompt_batch, axis=0)
        image_embeds = image_embeds.repeat(num_images_per_prompt, axis=0)
        negative = negative.repeat(num_images_per_prompt, axis=0)
        return np.concatenate([negative, image_embeds]) if guided else image_embeds

    @staticmethod
    def _prompts(prompt, negative_prompt):
        prompt = inputs.prompts_list("prompt", prompt)
        if negative_prompt is not None:
            negative_prompt = inputs.prompts_list("negative_prompt", negative_prompt)
        return prompt, negative_prompt


class KandinskyPipeline(_KandinskyDecoder):
    """Text-to-image decoder: prompt + image embeddings -> image."""

    def __call__(self, prompt, image_embeds, negative_image_embeds, negative_prompt=None, height: int = 512,
                 width: int = 512, num_inference_steps: int = 100, guidance_scale: float = 4.0,
                 num_images_per_prompt: int = 1, generator: np.random.Generator | None = None, latents=None,
                 output_type: str = "pil", callback: StepCallback | None = None):
        prompt, negative_prompt = self._prompts(prompt, negative_prompt)
        height, width, num_inference_steps, guidance_scale, num_images_per_prompt, output_type = \
            self.check_inputs(height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                              output_type)
        guided = do_classifier_free_guidance(guidance_scale)
        batch_size = len(prompt) * num_images_per_prompt
        # image embeddings and MCLIP text, negative halves first when guiding
        unet_kwargs = self.unet_inputs(prompt, negative_prompt, image_embeds, negative_image_embeds,
                                       num_images_per_prompt, guided)
        # timesteps and initial latents
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        latent_h, latent_w = downscale_height_and_width(height, width, self.movq_scale_factor)
        latents = self.prepare_latents((batch_size, self.unet.config.in_channels, latent_h, latent_w), generator,
                                       latents)
        # denoising loop
        latents = self.denoise(latents, timesteps, unet_kwargs, guidance_scale, generator, callback)
        # MoVQ decode
        return (self.decode(latents, output_type),)


def add_noise_linear_ddpm(original_samples: np.ndarray, noise: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """diffusers' `KandinskyImg2ImgPipeline.add_noise`: noising with the original Kandinsky 2.1
    schedule (1000 linear betas 1e-4..0.02), whatever scheduler the pipeline denoises with."""
    alphas_cumprod = torch_cumprod_f32(np.float32(1.0) - torch_linspace_f32(0.0001, 0.02, 1000))
    return add_noise(alphas_cumprod, original_samples, noise, timesteps)


class KandinskyImg2ImgPipeline(_KandinskyDecoder):
    """Image-to-image: the image is encoded, noised to `strength`, and denoised from there."""

    def __call__(self, prompt, image, image_embeds, negative_image_embeds, negative_prompt=None,
                 height: int = 512, width: int = 512, num_inference_steps: int = 100, strength: float = 0.3,
                 guidance_scale: float = 7.0, num_images_per_prompt: int = 1,
                 generator: np.random.Generator | None = None, output_type: str = "pil",
                 callback: StepCallback | None = None):
        prompt, negative_prompt = self._prompts(prompt, negative_prompt)
        height, width, num_inference_steps, guidance_scale, num_images_per_prompt, output_type = \
            self.check_inputs(height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                              output_type)
        strength = inputs.check_strength(strength)
        guided = do_classifier_free_guidance(guidance_scale)
        # image embeddings and MCLIP text, negative halves first when guiding
        unet_kwargs = self.unet_inputs(prompt, negative_prompt, image_embeds, negative_image_embeds,
                                       num_images_per_prompt, guided)

        # the image, encoded by the MoVQ, one per prompt and image
        latents = self.encode_images(inputs.images_list("image", image), height, width)
        if latents.shape[0] != len(prompt):
            if latents.shape[0] != 1:
                raise ValueError(f"`image` has {latents.shape[0]} images but `prompt` has {len(prompt)} entries; "
                                 f"give one image or one per prompt")
            latents = np.repeat(latents, len(prompt), axis=0)
        latents = latents.repeat(num_images_per_prompt, axis=0)

        # the last `strength` of the schedule, and the latents noised for it
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = get_timesteps(self.scheduler, num_inference_steps, strength)
        if len(timesteps):
            # diffusers noises to int(T * strength) - 2, not to the first timestep it denoises from
            noise_timestep = max(int(self.scheduler.config["num_train_timesteps"] * strength) - 2, 0)
            noise = randn(latents.shape, generator)
            latents = add_noise_linear_ddpm(latents, noise, np.full(latents.shape[0], noise_timestep))
            if isinstance(self.scheduler, DiscreteScheduler):
                # Euler and Euler a step x = x0 + sigma * eps: the same noisy latents over sqrt(alpha_bar) of
                # their first sigma, which their scale_model_input undoes, so the UNet sees what it sees with
                # DDIM (diffusers multiplies the clean latents by init_noise_sigma, 25, before noising them)
                sigma = self.scheduler.sigmas[self.scheduler.begin_index]
                latents = latents * np.sqrt(sigma * sigma + np.float32(1))
        # denoising loop
        latents = self.denoise(latents, timesteps, unet_kwargs, guidance_scale, generator, callback)
        # MoVQ decode
        return (self.decode(latents, output_type),)


class KandinskyInpaintPipeline(_KandinskyDecoder):
    """Inpainting (kandinsky-2-1-inpaint, a 9-channel UNet): white in `mask_image` is repainted."""

    def __call__(self, prompt, image, mask_image, image_embeds, negative_image_embeds, negative_prompt=None,
                 height: int = 512, width: int = 512, num_inference_steps: int = 100, guidance_scale: float = 4.0,
                 num_images_per_prompt: int = 1, generator: np.random.Generator | None = None, latents=None,
                 output_type: str = "pil", callback: StepCallback | None = None):
        prompt, negative_prompt = self._prompts(prompt, negative_prompt)
        height, width, num_inference_steps, guidance_scale, num_images_per_prompt, output_type = \
            self.check_inputs(height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                              output_type)
        guided = do_classifier_free_guidance(guidance_scale)
        batch_size = len(prompt) * num_images_per_prompt
        # image embeddings and MCLIP text, negative halves first when guiding
        unet_kwargs = self.unet_inputs(prompt, negative_prompt, image_embeds, negative_image_embeds,
                                       num_images_per_prompt, guided)

        # the masked image latents and the mask (1 = keep), at latent size, as extra UNet channels
        keep_mask, pixels = prepare_mask_and_masked_image(image, mask_image, height, width)
        if pixels.shape[0] != len(prompt):
            if pixels.shape[0] != 1:
                raise ValueError(f"`image` has {pixels.shape[0]} images but `prompt` has {len(prompt)} entries; "
                                 f"give one image or one per prompt")
            pixels = np.repeat(pixels, len(prompt), axis=0)
            keep_mask = np.repeat(keep_mask, len(prompt), axis=0)
        image_latents, _, extra = self.inpaint_channels(keep_mask, pixels, num_images_per_prompt, guided)

        # timesteps and initial latents
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        latent_h, latent_w = downscale_height_and_width(height, width, self.movq_scale_factor)
        latents = self.prepare_latents((batch_size, self.latent_channels, latent_h, latent_w), generator, latents)
        self.check_inpaint_size(latents, image_latents, height, width)
        if latents.shape[1] + extra.shape[1] != self.unet.config.in_channels:
            raise ValueError(f"the UNet takes {self.unet.config.in_channels} input channels but latents, masked "
                             f"image and mask make {latents.shape[1] + extra.shape[1]}; inpainting needs an "
                             f"inpainting UNet (kandinsky-2-1-inpaint)")
        # denoising loop (diffusers' 2.1 inpainting does not put the known region back)
        latents = self.denoise(latents, timesteps, unet_kwargs, guidance_scale, generator, callback,
                               extra_channels=extra)
        # MoVQ decode
        return (self.decode(latents, output_type),)
