"""Kandinsky 2.2 decoders: CLIP image embeddings (from the prior, prior.py) -> image: text-to-image,
image-to-image, inpainting, ControlNet depth (+ image-to-image).

Port of diffusers 0.35.2 `pipelines/kandinsky2_2/*.py`, same names and arguments, step for step;
the loop is decoder.py's. Differences, each on purpose:
- `generator` is a numpy Generator and all noise comes from backend/random.py, so a seed gives
  the same result on every device.
- One `callback(step, total, latents, x0)` per step (progress, previews, stop) replaces
  diffusers' two callback styles.
- Img2img resizes the image to (height, width); diffusers 0.35.2 passes them swapped to its image
  processor, which transposes non-square outputs.
- With guidance off and `num_images_per_prompt > 1`, embeddings are repeated per image (diffusers
  forgets to and fails on the batch mismatch).
- Every scheduler gets `scale_model_input` (decoder.py); image-to-image and inpainting tell a
  scheduler with a step counter where the run begins (base.get_timesteps). Inpainting noises the
  kept region with the unit initial noise; diffusers uses the initial latents, already multiplied
  by init_noise_sigma (the same for every scheduler but Euler and Euler a, whose kept region
  it would noise 25 times too much).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from backend.pipelines import inputs
from backend.pipelines.base import StepCallback, do_classifier_free_guidance, get_timesteps
from backend.pipelines.decoder import DecoderPipeline, downscale_height_and_width, prepare_mask_and_masked_image


def prepare_image_embeds(image_embeds, negative_image_embeds, num_images_per_prompt: int, guided: bool,
                         dim: int) -> tuple[np.ndarray, int]:
    """(B*n, D) image embeddings, the negative half first when guiding, and the batch B*n."""
    image_embeds = inputs.as_embeds("image_embeds", image_embeds, dim)
    negative = inputs.as_embeds("negative_image_embeds", negative_image_embeds, dim)
    if negative.shape[0] != image_embeds.shape[0]:
        if negative.shape[0] == 1:
            negative = np.repeat(negative, image_embeds.shape[0], axis=0)
        else:
            raise ValueError(f"`negative_image_embeds` has batch {negative.shape[0]} but `image_embeds` "
                             f"has {image_embeds.shape[0]}")
    batch_size = image_embeds.shape[0] * num_images_per_prompt
    image_embeds = image_embeds.repeat(num_images_per_prompt, axis=0)
    negative = negative.repeat(num_images_per_prompt, axis=0)
    return (np.concatenate([negative, image_embeds]) if guided else image_embeds), batch_size


class KandinskyV22Pipeline(DecoderPipeline):
    """Text-to-image decoder: image embeddings -> image."""

    def __call__(self, image_embeds, negative_image_embeds, height: int = 512, width: int = 512,
                 num_inference_steps: int = 100, guidance_scale: float = 4.0, num_images_per_prompt: int = 1,
                 generator: np.random.Generator | None = None, latents=None, output_type: str = "pil",
                 callback: StepCallback | None = None):
        height, width, num_inference_steps, guidance_scale, num_images_per_prompt, output_type = \
            self.check_inputs(height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                              output_type)
        guided = do_classifier_free_guidance(guidance_scale)
        # image embeddings, negative half first when guiding
        image_embeds, batch_size = prepare_image_embeds(image_embeds, negative_image_embeds, num_images_per_prompt,
                                                        guided, self.embed_dim)
        # timesteps and initial latents
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        latent_h, latent_w = downscale_height_and_width(height, width, self.movq_scale_factor)
        latents = self.prepare_latents((batch_size, self.unet.config.in_channels, latent_h, latent_w),
                                       generator, latents)
        # denoising loop
        unet_kwargs = {"encoder_hidden_states": None, "added_cond_kwargs": {"image_embeds": image_embeds}}
        latents = self.denoise(latents, timesteps, unet_kwargs, guidance_scale, generator, callback)
        # MoVQ decode
        return (self.decode(latents, output_type),)


class KandinskyV22Img2ImgPipeline(DecoderPipeline):
    """Image-to-image: the image is encoded, noised to `strength`, and denoised from there."""

    def __call__(self, image_embeds, image, negative_image_embeds, height: int = 512, width: int = 512,
                 num_inference_steps: int = 100, guidance_scale: float = 4.0, strength: float = 0.3,
                 num_images_per_prompt: int = 1, generator: np.random.Generator | None = None,
                 output_type: str = "pil", callback: StepCallback | None = None):
        height, width, num_inference_steps, guidance_scale, num_images_per_prompt, output_type = \
            self.check_inputs(height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                              output_type)
        strength = inputs.check_strength(strength)
        guided = do_classifier_free_guidance(guidance_scale)
        # image embeddings, negative half first when guiding
        image_embeds, batch_size = prepare_image_embeds(image_embeds, negative_image_embeds, num_images_per_prompt,
                                                        guided, self.embed_dim)
        # the image's MoVQ latents, one per embedding and image
        init_latents = self.image_latents(image, height, width, batch_size // num_images_per_prompt,
                                          num_images_per_prompt)
        # the last `strength` of the schedule, and the latents noised to its first step
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = get_timesteps(self.scheduler, num_inference_steps, strength)
        latents = self.noise_to_strength(init_latents, timesteps, generator)
        # denoising loop
        unet_kwargs = {"encoder_hidden_states": None, "added_cond_kwargs": {"image_embeds": image_embeds}}
        latents = self.denoise(latents, timesteps, unet_kwargs, guidance_scale, generator, callback)
        # MoVQ decode
        return (self.decode(latents, output_type),)

    def image_latents(self, image, height: int, width: int, batch_size: int, num_images_per_prompt: int):
        """`image` (one, or one per embedding) -> MoVQ latents (batch_size * num_images_per_prompt, C, h, w)."""
        latents = self.encode_images(inputs.images_list("image", image), height, width)
        if latents.shape[0] != batch_size:
            if latents.shape[0] == 1:
                latents = np.repeat(latents, batch_size, axis=0)
            else:
                raise ValueError(f"`image` has {latents.shape[0]} images but the embeddings have batch {batch_size}")
        return latents.repeat(num_images_per_prompt, axis=0)


class KandinskyV22InpaintPipeline(DecoderPipeline):
    """Inpainting: white in `mask_image` is repainted, black is kept."""

    def __call__(self, image_embeds, image, mask_image, negative_image_embeds, height: int = 512,
                 width: int = 512, num_inference_steps: int = 100, guidance_scale: float = 4.0,
                 num_images_per_prompt: int = 1, generator: np.random.Generator | None = None, latents=None,
                 output_type: str = "pil", callback: StepCallback | None = None):
        height, width, num_inference_steps, guidance_scale, num_images_per_prompt, output_type = \
            self.check_inputs(height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                              output_type)
        guided = do_classifier_free_guidance(guidance_scale)
        # image embeddings, negative half first when guiding
        image_embeds, batch_size = prepare_image_embeds(image_embeds, negative_image_embeds, num_images_per_prompt,
                                                        guided, self.embed_dim)
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        if hasattr(self.scheduler, "set_begin_index"):  # add_noise at the step counter's sigma (base.get_timesteps)
            self.scheduler.set_begin_index(0)

        # the image's latents, and the masked image latents + mask (1 = keep) as extra UNet channels
        keep_mask, pixels = prepare_mask_and_masked_image(image, mask_image, height, width)
        image_latents, keep_mask, extra = self.inpaint_channels(keep_mask, pixels, num_images_per_prompt, guided)

        # initial latents; their unit noise also noises the kept region at every step
        latent_h, latent_w = downscale_height_and_width(height, width, self.movq_scale_factor)
        noise = self.initial_noise((batch_size, self.latent_channels, latent_h, latent_w), generator, latents)
        latents = noise * np.float32(self.scheduler.init_noise_sigma)
        self.check_inpaint_size(latents, image_latents, height, width)
        init_latents_proper, init_mask = image_latents[:1], keep_mask[:1]

        def keep_known_region(i, latents):
            # Outside the mask, put back the first image noised to the next step's level (diffusers
            # broadcasts that one image over the batch).
            proper = init_latents_proper
            if i < len(timesteps) - 1:
                proper = self.scheduler.add_noise(init_latents_proper, noise, np.array([timesteps[i + 1]]))
            return init_mask * proper + (1 - init_mask) * latents

        # denoising loop
        unet_kwargs = {"encoder_hidden_states": None, "added_cond_kwargs": {"image_embeds": image_embeds}}
        latents = self.denoise(latents, timesteps, unet_kwargs, guidance_scale, generator, callback,
                               extra_channels=extra, after_step=keep_known_region)
        # the known region exactly, then MoVQ decode
        latents = init_mask * image_latents[:1] + (1 - init_mask) * latents
        return (self.decode(latents.astype(np.float32), output_type),)


def as_hint(hint, size: tuple[int, int], name: str = "hint") -> np.ndarray:
    """ControlNet hint: (B, 3, H, W) floats in [0, 1] (a depth map repeated over RGB), or a PIL image
    (resized to `size` = (H, W), bicubic)."""
    if isinstance(hint, Image.Image):
        image = inputs.to_rgb(hint, name).resize((size[1], size[0]), resample=Image.BICUBIC)
        array = np.asarray(image, np.float32) / 255.0
        return array.transpose(2, 0, 1)[None]
    array = np.asarray(inputs.as_numpy(hint), dtype=np.float32)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[1] != 3:
        raise ValueError(f"`{name}` must have shape (batch, 3, height, width); got {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"`{name}` contains NaN or infinite values")
    return array


class KandinskyV22ControlnetPipeline(DecoderPipeline):
    """Text-to-image guided by a depth hint (kandinsky-2-2-controlnet-depth)."""

    def prepare_hint(self, hint, batch: int, num_images_per_prompt: int, guided: bool, latent_size):
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
        return np.concatenate([hint, hint]) if guided else hint

    def __call__(self, image_embeds, negative_image_embeds, hint, height: int = 512, width: int = 512,
                 num_inference_steps: int = 100, guidance_scale: float = 4.0, num_images_per_prompt: int = 1,
                 generator: np.random.Generator | None = None, latents=None, output_type: str = "pil",
                 callback: StepCallback | None = None):
        height, width, num_inference_steps, guidance_scale, num_images_per_prompt, output_type = \
            self.check_inputs(height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                              output_type)
        guided = do_classifier_free_guidance(guidance_scale)
        # image embeddings, negative half first when guiding
        image_embeds, batch_size = prepare_image_embeds(image_embeds, negative_image_embeds, num_images_per_prompt,
                                                        guided, self.embed_dim)
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        # the depth hint at the output size, and the initial latents
        latent_h, latent_w = downscale_height_and_width(height, width, self.movq_scale_factor)
        hint = self.prepare_hint(hint, batch_size // num_images_per_prompt, num_images_per_prompt, guided,
                                 (latent_h, latent_w))
        latents = self.prepare_latents((batch_size, self.latent_channels, latent_h, latent_w), generator,
                                       latents)
        # denoising loop
        unet_kwargs = {"encoder_hidden_states": None, "added_cond_kwargs": {"image_embeds": image_embeds,
                                                                           "hint": hint}}
        latents = self.denoise(latents, timesteps, unet_kwargs, guidance_scale, generator, callback)
        # MoVQ decode
        return (self.decode(latents, output_type),)


class KandinskyV22ControlnetImg2ImgPipeline(KandinskyV22ControlnetPipeline, KandinskyV22Img2ImgPipeline):
    """Image-to-image guided by a depth hint."""

    def __call__(self, image_embeds, image, negative_image_embeds, hint, height: int = 512, width: int = 512,
                 num_inference_steps: int = 100, guidance_scale: float = 4.0, strength: float = 0.3,
                 num_images_per_prompt: int = 1, generator: np.random.Generator | None = None,
                 output_type: str = "pil", callback: StepCallback | None = None):
        height, width, num_inference_steps, guidance_scale, num_images_per_prompt, output_type = \
            self.check_inputs(height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                              output_type)
        strength = inputs.check_strength(strength)
        guided = do_classifier_free_guidance(guidance_scale)
        # image embeddings, negative half first when guiding
        image_embeds, batch_size = prepare_image_embeds(image_embeds, negative_image_embeds, num_images_per_prompt,
                                                        guided, self.embed_dim)
        # the image's MoVQ latents, and the depth hint at their size
        init_latents = self.image_latents(image, height, width, batch_size // num_images_per_prompt,
                                          num_images_per_prompt)
        hint = self.prepare_hint(hint, batch_size // num_images_per_prompt, num_images_per_prompt, guided,
                                 init_latents.shape[-2:])
        # the last `strength` of the schedule, and the latents noised to its first step
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = get_timesteps(self.scheduler, num_inference_steps, strength)
        latents = self.noise_to_strength(init_latents, timesteps, generator)
        # denoising loop
        unet_kwargs = {"encoder_hidden_states": None, "added_cond_kwargs": {"image_embeds": image_embeds,
                                                                           "hint": hint}}
        latents = self.denoise(latents, timesteps, unet_kwargs, guidance_scale, generator, callback)
        # MoVQ decode
        return (self.decode(latents, output_type),)
