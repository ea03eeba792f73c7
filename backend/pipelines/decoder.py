"""What the Kandinsky 2.1, 2.2 and 3 decoders share: UNet + scheduler + MoVQ, the denoising loop,
the MoVQ encode (image-to-image) and decode, and the inpainting mask preparation of 2.1 and 2.2.

The loop is the one of diffusers' Kandinsky decoder pipelines (0.35.2): expand the latents for
classifier-free guidance, add the inpainting channels, call the UNet, guide, step the scheduler.
Each family only says what its UNet reads (`unet_kwargs`) and, for Kandinsky 3, how it guides.

Any scheduler of backend/schedulers runs in it, as in diffusers' Stable Diffusion pipelines: the
UNet sees `scheduler.scale_model_input(latents, t)` (the identity but for Euler and Euler a, which
divide by sqrt(sigma^2 + 1); diffusers' Kandinsky pipelines skip it, hence their grey Euler
images) at the scheduler's own timestep (Euler's are fractional); only DDPM with a learned
variance type reads the UNet's variance channels, every other scheduler gets the noise half.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

from backend.pipelines import inputs
from backend.pipelines.base import DiffusionPipeline, StepCallback, apply_guidance, do_classifier_free_guidance
from backend.random import randn

# after_step(step index, latents) -> latents: a change to the latents after each scheduler step
# (the 2.2 inpainting pipeline puts the known region back there).
AfterStep = Callable[[int, np.ndarray], np.ndarray]


def downscale_height_and_width(height: int, width: int, scale_factor: int = 8) -> tuple[int, int]:
    """Pixel size -> latent size, rounding up to a multiple of scale_factor**2 pixels (as diffusers)."""
    new_height = height // scale_factor**2 + (height % scale_factor**2 != 0)
    new_width = width // scale_factor**2 + (width % scale_factor**2 != 0)
    return new_height * scale_factor, new_width * scale_factor


class DecoderPipeline(DiffusionPipeline):
    """UNet + scheduler + MoVQ: latents -> image."""

    component_names = ("unet", "scheduler", "movq")

    @property
    def movq_scale_factor(self) -> int:
        return 2 ** (len(self.movq.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.movq.config.latent_channels)

    @property
    def embed_dim(self) -> int:
        """Width of the embeddings the UNet is conditioned on (2.2: CLIP image embeddings; 3: T5 states)."""
        return int(self.unet.config.encoder_hid_dim)

    def check_inputs(self, height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                     output_type):
        """The checked numbers every decoder call takes, in this order."""
        return (inputs.check_size("height", height), inputs.check_size("width", width),
                inputs.check_steps("num_inference_steps", num_inference_steps),
                inputs.check_guidance("guidance_scale", guidance_scale),
                inputs.check_batch("num_images_per_prompt", num_images_per_prompt),
                inputs.check_output_type(output_type))

    def prepare_latents(self, shape, generator, latents=None) -> np.ndarray:
        """Initial noise (or the given latents) scaled by the scheduler's initial sigma."""
        return self.initial_noise(shape, generator, latents) * np.float32(self.scheduler.init_noise_sigma)

    @staticmethod
    def initial_noise(shape, generator, latents=None) -> np.ndarray:
        """Unit-variance initial noise (or the given latents), before the scheduler scales it."""
        if latents is None:
            return randn(shape, generator)
        return inputs.as_latents("latents", latents, shape)

    def noise_to_strength(self, latents: np.ndarray, timesteps, generator) -> np.ndarray:
        """Image-to-image: the image latents noised to the first timestep that will be denoised."""
        if not len(timesteps):  # strength 0: nothing to denoise, the image comes back as it went in
            return latents
        noise = randn(latents.shape, generator)
        return self.scheduler.add_noise(latents, noise, np.repeat(timesteps[:1], latents.shape[0]))

    def guide(self, noise_pred: np.ndarray, guidance_scale: float) -> np.ndarray:
        """Classifier-free guidance of the UNet output (Kandinsky 3 writes it its own way). The 2.x UNets
        predict [noise; variance] (out_channels = 2 x latent channels)."""
        learned_variance = noise_pred.shape[1] == 2 * self.latent_channels
        return apply_guidance(noise_pred, guidance_scale, learned_variance)

    def denoise(self, latents: np.ndarray, timesteps, unet_kwargs: dict, guidance_scale: float,
                generator: np.random.Generator | None, callback: StepCallback | None,
                extra_channels: np.ndarray | None = None, after_step: AfterStep | None = None) -> np.ndarray:
        """The denoising loop: latents (B, C, h, w) -> denoised latents.

        `unet_kwargs`: what the UNet reads besides the sample and the timestep, the negative half
        first when guiding; `extra_channels`: inputs appended to the (expanded) latents along the
        channels (inpainting: masked image latents and mask).
        """
        guided = do_classifier_free_guidance(guidance_scale)
        sample_with_variance = steps_with_predicted_variance(self.scheduler)
        channels = latents.shape[1]
        total = len(timesteps)
        for i, t in enumerate(timesteps):
            # expand the latents if we are doing classifier-free guidance, scaled as the scheduler needs
            model_input = np.concatenate([latents] * 2) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            if extra_channels is not None:
                model_input = np.concatenate([model_input, extra_channels], axis=1)
            noise_pred = self.to_numpy(self.unet(model_input, t, **unet_kwargs))
            if guided:
                noise_pred = self.guide(noise_pred, guidance_scale)
            if not sample_with_variance:  # the scheduler uses its own variance, not the predicted one
                noise_pred = noise_pred[:, :channels]
            # compute the previous noisy sample x_t -> x_t-1
            out = self.scheduler.step(noise_pred, t, latents, generator=generator)
            latents = out.prev_sample
            if after_step is not None:
                latents = after_step(i, latents)
            if callback is not None:
                callback(i, total, latents, out.pred_original_sample)
        return latents

    def decode(self, latents: np.ndarray, output_type: str = "pil"):
        """MoVQ decode to (B, H, W, 3) in [0, 1] (np) or PIL images; "latent" returns the latents."""
        if output_type == "latent":
            return latents
        image = self.to_numpy(self.movq.decode(latents, force_not_quantize=True)["sample"])
        image = np.clip(image * 0.5 + 0.5, 0, 1).transpose(0, 2, 3, 1)
        if output_type == "pil":
            return inputs.numpy_to_pil(image)
        return image

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
        return self.to_numpy(self.movq.encode(pixels)["latents"])

    # -- inpainting (2.1 and 2.2)
    def inpaint_channels(self, keep_mask: np.ndarray, pixels: np.ndarray, num_images_per_prompt: int,
                         guided: bool):
        """The image's MoVQ latents, and the inpainting UNet's extra input channels: masked image
        latents and the keep mask (1 = keep) at latent size, repeated per image and for both
        guidance halves. Returns (image_latents, keep_mask, extra)."""
        image_latents = self.to_numpy(self.movq.encode(pixels)["latents"])
        keep_mask = prepare_mask(nearest_resize(keep_mask, image_latents.shape[-2:]))
        masked_image = image_latents * keep_mask
        keep_mask = keep_mask.repeat(num_images_per_prompt, axis=0)
        masked_image = masked_image.repeat(num_images_per_prompt, axis=0)
        if guided:
            keep_mask = np.concatenate([keep_mask] * 2)
            masked_image = np.concatenate([masked_image] * 2)
        return image_latents, keep_mask, np.concatenate([masked_image, keep_mask], axis=1)

    def check_inpaint_size(self, latents: np.ndarray, image_latents: np.ndarray, height: int, width: int):
        if latents.shape[-2:] != image_latents.shape[-2:]:
            raise ValueError(f"`height`/`width` {height}x{width} give latents of {latents.shape[-2:]} but the "
                             f"image encodes to {image_latents.shape[-2:]}; use multiples of "
                             f"{self.movq_scale_factor ** 2} pixels")


def steps_with_predicted_variance(scheduler) -> bool:
    """Whether `scheduler.step` reads the UNet's predicted variance channels: DDPM (and UnCLIP) with a
    learned variance type (Kandinsky 2.1's ddpm_scheduler). diffusers' pipelines ask the scheduler's
    config instead, but a scheduler built from such a config keeps the key unused in its config (UniPC
    from kandinsky-2-1/ddpm_scheduler still says "learned_range" and would get both halves)."""
    return getattr(scheduler, "variance_type", None) in ("learned", "learned_range")


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
