"""Kandinsky 3 pipelines: text-to-image and image-to-image.

Port of diffusers 0.35.2 `pipelines/kandinsky3/pipeline_kandinsky3.py` and
`pipeline_kandinsky3_img2img.py`, same names and arguments, step for step: T5 encodes the prompt
(128 tokens, padded positions zeroed, the batch cut to the longest prompt + 1), the
Kandinsky3UNet denoises with guidance `(g + 1) * text - g * uncond`, the MoVQ decodes.
Differences, each on purpose (as in kandinsky2_2.py):
- `generator` is a numpy Generator and all noise comes from backend/random.py.
- One `callback(step, total, latents, x0)` per step replaces diffusers' two callback styles.
- With `num_images_per_prompt > 1` and several prompts, the attention mask is repeated per image
  like the embeddings (diffusers tiles the mask but repeats the embeddings per prompt, so prompt
  and mask rows no longer match).
- `on_text_encoded` (optional hook, called once the prompt is encoded and before the UNet runs)
  lets a model manager free the 8.7B-parameter text encoder when memory requires it.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from mindspore import Tensor

from backend.pipelines import inputs
from backend.pipelines.kandinsky2_2 import _DecoderPipeline, downscale_height_and_width, get_timesteps
from backend.pipelines.base import StepCallback

MAX_LENGTH = 128  # diffusers' Kandinsky 3 tokenizes every prompt to 128 tokens


def _array(name: str, value, ndim: int) -> np.ndarray:
    array = np.asarray(value.asnumpy() if hasattr(value, "asnumpy") else value)
    if array.ndim != ndim:
        raise ValueError(f"`{name}` must have {ndim} dimensions; got shape {tuple(array.shape)}")
    return array


class Kandinsky3Pipeline(_DecoderPipeline):
    """Text-to-image: prompt -> T5 states -> Kandinsky3UNet denoising -> MoVQ decode."""

    component_names = ("tokenizer", "text_encoder", "unet", "scheduler", "movq")
    # A model manager may load the 8.7B-parameter text encoder and the UNet + MoVQ as separate
    # units: the encoder alone runs `encode_prompt`, the rest runs from `prompt_embeds`.
    optional_components = component_names
    # Called as on_text_encoded(pipeline) after the prompt is encoded, before the first UNet call.
    on_text_encoded: Callable | None = None

    @property
    def embed_dim(self) -> int:
        return int(self.unet.config.encoder_hid_dim)

    # The part of each prompt beyond the 128 tokens T5 reads, from the last encode (the UI shows it).
    truncated_text: list = []

    def _encode(self, prompts: list[str], record_truncation: bool = False):
        self._require("tokenizer", "text_encoder", why="to encode a prompt (or pass `prompt_embeds`)")
        if record_truncation:
            self._record_truncation(prompts)
        tokens = self.tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                                return_tensors="np")
        ids, mask = tokens["input_ids"], tokens["attention_mask"].astype(np.int64)
        states = self.to_numpy(self.text_encoder(Tensor(ids.astype(np.int32)), mask)[0])  # (B, 128, D)
        return states, mask

    def _record_truncation(self, prompts: list[str]) -> None:
        untruncated = self.tokenizer(prompts, padding="longest", return_tensors="np")["input_ids"]
        self.truncated_text = []
        if untruncated.shape[-1] > MAX_LENGTH:
            removed = self.tokenizer.batch_decode(untruncated[:, MAX_LENGTH - 1:], skip_special_tokens=True)
            self.truncated_text = [r for r in removed if r.strip()]

    def encode_prompt(self, prompt, do_classifier_free_guidance=True, num_images_per_prompt=1,
                      negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
                      attention_mask=None, negative_attention_mask=None, _cut_context=True):
        """(prompt_embeds, negative_prompt_embeds, attention_mask, negative_attention_mask) as numpy;
        the negative pair is None without guidance."""
        if prompt_embeds is None:
            prompt_embeds, attention_mask = self._encode(prompt, record_truncation=True)
            if _cut_context:
                prompt_embeds[attention_mask == 0] = 0
                keep = int(attention_mask.sum(-1).max()) + 1
                prompt_embeds, attention_mask = prompt_embeds[:, :keep], attention_mask[:, :keep]
            prompt_embeds = prompt_embeds * attention_mask[:, :, None].astype(np.float32)
        batch_size = prompt_embeds.shape[0]
        prompt_embeds = np.repeat(prompt_embeds, num_images_per_prompt, axis=0)
        attention_mask = np.repeat(attention_mask, num_images_per_prompt, axis=0)
        if not do_classifier_free_guidance:
            return prompt_embeds, None, attention_mask, None
        if negative_prompt_embeds is None:
            if negative_prompt is None:
                return (prompt_embeds, np.zeros_like(prompt_embeds), attention_mask,
                        np.zeros_like(attention_mask))
            if len(negative_prompt) == 1 and batch_size > 1:
                raise ValueError(f"`negative_prompt` has 1 entry but `prompt` has {batch_size}; give one "
                                 "negative prompt per prompt")
            if len(negative_prompt) != batch_size:
                raise ValueError(f"`negative_prompt` has {len(negative_prompt)} entries but `prompt` has "
                                 f"{batch_size}")
            negative_prompt_embeds, negative_attention_mask = self._encode(negative_prompt)
            length = prompt_embeds.shape[1]
            negative_prompt_embeds = negative_prompt_embeds[:, :length]
            negative_attention_mask = negative_attention_mask[:, :length]
            negative_prompt_embeds = negative_prompt_embeds * negative_attention_mask[:, :, None].astype(np.float32)
        if negative_prompt_embeds.shape != prompt_embeds.shape:
            negative_prompt_embeds = np.repeat(negative_prompt_embeds, num_images_per_prompt, axis=0)
            negative_attention_mask = np.repeat(negative_attention_mask, num_images_per_prompt, axis=0)
        return prompt_embeds, negative_prompt_embeds, attention_mask, negative_attention_mask

    def _text_conditioning(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, attention_mask,
                           negative_attention_mask, guidance_scale, num_images_per_prompt):
        """Checked text arguments -> (states, mask) for the UNet (negative half first when guiding), batch."""
        self._require("unet", "scheduler", "movq", why="to generate images")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Give either `prompt` or `prompt_embeds`, not both")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Give `prompt` or `prompt_embeds` (with `attention_mask`)")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Give either `negative_prompt` or `negative_prompt_embeds`, not both")
        if prompt is not None:
            prompt = inputs.prompts_list("prompt", prompt)
        if negative_prompt is not None:
            negative_prompt = inputs.prompts_list("negative_prompt", negative_prompt)
        if prompt_embeds is not None:
            prompt_embeds = _array("prompt_embeds", prompt_embeds, 3).astype(np.float32)
            if attention_mask is None:
                raise ValueError("Give `attention_mask` along with `prompt_embeds`")
            attention_mask = _array("attention_mask", attention_mask, 2).astype(np.int64)
            if prompt_embeds.shape[:2] != attention_mask.shape:
                raise ValueError(f"`prompt_embeds` {prompt_embeds.shape[:2]} and `attention_mask` "
                                 f"{attention_mask.shape} must have the same batch size and token length")
            if prompt_embeds.shape[2] != self.embed_dim:
                raise ValueError(f"`prompt_embeds` must have {self.embed_dim} features; got {prompt_embeds.shape[2]}")
            if not np.isfinite(prompt_embeds).all():
                raise ValueError("`prompt_embeds` contains NaN or infinite values")
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = _array("negative_prompt_embeds", negative_prompt_embeds, 3).astype(np.float32)
            if negative_attention_mask is None:
                raise ValueError("Give `negative_attention_mask` along with `negative_prompt_embeds`")
            negative_attention_mask = _array("negative_attention_mask", negative_attention_mask, 2).astype(np.int64)
            if negative_prompt_embeds.shape[:2] != negative_attention_mask.shape:
                raise ValueError("`negative_prompt_embeds` and `negative_attention_mask` must have the same batch "
                                 "size and token length")
            if prompt_embeds is not None and prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(f"`prompt_embeds` {prompt_embeds.shape} and `negative_prompt_embeds` "
                                 f"{negative_prompt_embeds.shape} must have the same shape")
        do_cfg = guidance_scale > 1.0
        embeds, negative, mask, negative_mask = self.encode_prompt(
            prompt, do_cfg, num_images_per_prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
            attention_mask, negative_attention_mask)
        if self.on_text_encoded is not None:
            self.on_text_encoded(self)
        batch_size = embeds.shape[0]
        if do_cfg:
            embeds = np.concatenate([negative, embeds])
            mask = np.concatenate([negative_mask, mask]).astype(bool)
        return embeds, mask, batch_size

    def _require(self, *names: str, why: str) -> None:
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            raise ValueError(f"{type(self).__name__} was built without {', '.join(missing)}, needed {why}")

    def _denoise_text(self, latents, timesteps, embeds, mask, guidance_scale, generator, callback):
        do_cfg = guidance_scale > 1.0
        embeds_t = self.to_tensor(embeds)
        mask = mask.astype(np.float32)
        total = len(timesteps)
        for i, t in enumerate(timesteps):
            model_input = np.concatenate([latents] * 2) if do_cfg else latents
            noise_pred = self.to_numpy(self.unet(self.to_tensor(model_input), int(t), embeds_t, mask))
            if do_cfg:
                uncond, text = np.split(noise_pred, 2)
                g = np.float32(guidance_scale)
                noise_pred = (g + np.float32(1.0)) * text - g * uncond
            out = self.scheduler.step(noise_pred, t, latents, generator=generator)
            latents = out.prev_sample
            if callback is not None:
                callback(i, total, latents, out.pred_original_sample)
        return latents

    def __call__(self, prompt=None, num_inference_steps: int = 25, guidance_scale: float = 3.0,
                 negative_prompt=None, num_images_per_prompt: int = 1, height: int = 1024, width: int = 1024,
                 generator: np.random.Generator | None = None, prompt_embeds=None, negative_prompt_embeds=None,
                 attention_mask=None, negative_attention_mask=None, output_type: str = "pil", latents=None,
                 callback: StepCallback | None = None):
        height, width, num_inference_steps, guidance_scale, num_images_per_prompt, output_type = \
            self._check_common(height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                               output_type)
        embeds, mask, batch_size = self._text_conditioning(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, attention_mask,
            negative_attention_mask, guidance_scale, num_images_per_prompt)
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        latent_h, latent_w = downscale_height_and_width(height, width, 8)
        latents = self._prepare_latents((batch_size, 4, latent_h, latent_w), generator, latents)
        latents = self._denoise_text(latents, timesteps, embeds, mask, guidance_scale, generator, callback)
        return (self.decode(latents, output_type),)


class Kandinsky3Img2ImgPipeline(Kandinsky3Pipeline):
    """Image-to-image: the image is MoVQ-encoded at its own size (rounded down to the MoVQ factor),
    noised to `strength`, and denoised from there."""

    def __call__(self, prompt=None, image=None, strength: float = 0.3, num_inference_steps: int = 25,
                 guidance_scale: float = 3.0, negative_prompt=None, num_images_per_prompt: int = 1,
                 generator: np.random.Generator | None = None, prompt_embeds=None, negative_prompt_embeds=None,
                 attention_mask=None, negative_attention_mask=None, output_type: str = "pil",
                 callback: StepCallback | None = None):
        num_inference_steps = inputs.check_steps("num_inference_steps", num_inference_steps)
        guidance_scale = inputs.check_guidance("guidance_scale", guidance_scale)
        num_images_per_prompt = inputs.check_batch("num_images_per_prompt", num_images_per_prompt)
        output_type = inputs.check_output_type(output_type)
        strength = inputs.check_strength(strength)
        images = inputs.images_list("image", image)
        sizes = set()
        for index, item in enumerate(images):
            if isinstance(item, np.ndarray) and item.ndim == 3:
                sizes.add(item.shape[:2])
            elif hasattr(item, "size") and not isinstance(item, np.ndarray):
                sizes.add((item.size[1], item.size[0]))
            else:
                raise ValueError(f"`image[{index}]` must be a PIL image or a (H, W, 3) array in [0, 1]")
        if len(sizes) != 1:
            raise ValueError(f"all images in `image` must have the same size; got {sorted(sizes)}")
        height, width = sizes.pop()
        factor = self.movq_scale_factor
        unet_factor = factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if (height - height % factor) % unet_factor or (width - width % factor) % unet_factor:
            raise ValueError(f"`image` is {width}x{height}; Kandinsky 3 needs each side (rounded down to a "
                             f"multiple of {factor}) to be a multiple of {unet_factor} pixels")
        embeds, mask, batch_size = self._text_conditioning(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, attention_mask,
            negative_attention_mask, guidance_scale, num_images_per_prompt)
        latents = self.encode_images(images, height, width)  # (N, 4, h, w)
        latents = np.repeat(latents, num_images_per_prompt, axis=0)
        if latents.shape[0] != batch_size:
            raise ValueError(f"`image` has {len(images)} images but there are {batch_size // num_images_per_prompt} "
                             "prompts; give one image per prompt")
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = get_timesteps(self.scheduler, num_inference_steps, strength)
        if len(timesteps):
            from backend.random import randn
            noise = randn(latents.shape, generator)
            latents = self.scheduler.add_noise(latents, noise, np.repeat(timesteps[:1], batch_size))
        latents = self._denoise_text(latents, timesteps, embeds, mask, guidance_scale, generator, callback)
        return (self.decode(latents, output_type),)
