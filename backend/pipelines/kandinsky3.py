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

from backend.pipelines import inputs
from backend.pipelines.base import StepCallback, do_classifier_free_guidance, get_timesteps
from backend.pipelines.decoder import DecoderPipeline, downscale_height_and_width

MAX_LENGTH = 128  # diffusers' Kandinsky 3 tokenizes every prompt to 128 tokens


class Kandinsky3Pipeline(DecoderPipeline):
    """Text-to-image: prompt -> T5 states -> Kandinsky3UNet denoising -> MoVQ decode."""

    component_names = ("tokenizer", "text_encoder", "unet", "scheduler", "movq")
    # A model manager may load the 8.7B-parameter text encoder and the UNet + MoVQ as separate
    # units: the encoder alone runs `encode_prompt`, the rest runs from `prompt_embeds`.
    optional_components = component_names
    # Called as on_text_encoded(pipeline) after the prompt is encoded, before the first UNet call.
    on_text_encoded: Callable | None = None

    def _encode(self, prompts: list[str]):
        """T5 states (B, 128, D) and attention mask (B, 128) of `prompts`."""
        self._require("tokenizer", "text_encoder", why="to encode a prompt (or pass `prompt_embeds`)")
        tokens = self.tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                                return_tensors="np")
        ids, mask = tokens["input_ids"], tokens["attention_mask"].astype(np.int64)
        states = self.to_numpy(self.text_encoder(ids, mask)[0])  # (B, 128, D)
        return states, mask

    def encode_prompt(self, prompt, do_classifier_free_guidance=True, num_images_per_prompt=1,
                      negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
                      attention_mask=None, negative_attention_mask=None, _cut_context=True):
        """(prompt_embeds, negative_prompt_embeds, attention_mask, negative_attention_mask) as numpy;
        the negative pair is None without guidance."""
        self.truncated_text = []  # this call's notes: none when given `prompt_embeds`
        if prompt_embeds is None:
            prompt_embeds, attention_mask = self._encode(prompt)
            self.record_truncation(prompt, MAX_LENGTH)
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
        """Checked text arguments -> (the UNet's T5 states and mask, negative half first when guiding; batch)."""
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
            prompt_embeds = inputs.as_array("prompt_embeds", prompt_embeds, 3).astype(np.float32)
            if attention_mask is None:
                raise ValueError("Give `attention_mask` along with `prompt_embeds`")
            attention_mask = inputs.as_array("attention_mask", attention_mask, 2).astype(np.int64)
            if prompt_embeds.shape[:2] != attention_mask.shape:
                raise ValueError(f"`prompt_embeds` {prompt_embeds.shape[:2]} and `attention_mask` "
                                 f"{attention_mask.shape} must have the same batch size and token length")
            if prompt_embeds.shape[2] != self.embed_dim:
                raise ValueError(f"`prompt_embeds` must have {self.embed_dim} features; got {prompt_embeds.shape[2]}")
            if not np.isfinite(prompt_embeds).all():
                raise ValueError("`prompt_embeds` contains NaN or infinite values")
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = inputs.as_array("negative_prompt_embeds", negative_prompt_embeds,
                                                     3).astype(np.float32)
            if negative_attention_mask is None:
                raise ValueError("Give `negative_attention_mask` along with `negative_prompt_embeds`")
            negative_attention_mask = inputs.as_array("negative_attention_mask", negative_attention_mask,
                                                      2).astype(np.int64)
            if negative_prompt_embeds.shape[:2] != negative_attention_mask.shape:
                raise ValueError("`negative_prompt_embeds` and `negative_attention_mask` must have the same batch "
                                 "size and token length")
            if prompt_embeds is not None and prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(f"`prompt_embeds` {prompt_embeds.shape} and `negative_prompt_embeds` "
                                 f"{negative_prompt_embeds.shape} must have the same shape")
        guided = do_classifier_free_guidance(guidance_scale)
        embeds, negative, mask, negative_mask = self.encode_prompt(
            prompt, guided, num_images_per_prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
            attention_mask, negative_attention_mask)
        if self.on_text_encoded is not None:
            self.on_text_encoded(self)
        batch_size = embeds.shape[0]
        if guided:
            embeds = np.concatenate([negative, embeds])
            mask = np.concatenate([negative_mask, mask]).astype(bool)  # as diffusers
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask.astype(np.float32)}, batch_size

    def _require(self, *names: str, why: str) -> None:
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            raise ValueError(f"{type(self).__name__} was built without {', '.join(missing)}, needed {why}")

    def guide(self, noise_pred: np.ndarray, guidance_scale: float) -> np.ndarray:
        """diffusers' Kandinsky 3 form of classifier-free guidance (its UNet predicts no variance)."""
        uncond, text = np.split(noise_pred, 2)
        g = np.float32(guidance_scale)
        return (g + np.float32(1.0)) * text - g * uncond

    def __call__(self, prompt=None, num_inference_steps: int = 25, guidance_scale: float = 3.0,
                 negative_prompt=None, num_images_per_prompt: int = 1, height: int = 1024, width: int = 1024,
                 generator: np.random.Generator | None = None, prompt_embeds=None, negative_prompt_embeds=None,
                 attention_mask=None, negative_attention_mask=None, output_type: str = "pil", latents=None,
                 callback: StepCallback | None = None):
        height, width, num_inference_steps, guidance_scale, num_images_per_prompt, output_type = \
            self.check_inputs(height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                              output_type)
        # T5 states and mask, negative half first when guiding
        unet_kwargs, batch_size = self._text_conditioning(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, attention_mask,
            negative_attention_mask, guidance_scale, num_images_per_prompt)
        # timesteps and initial latents
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        latent_h, latent_w = downscale_height_and_width(height, width, 8)
        latents = self.prepare_latents((batch_size, 4, latent_h, latent_w), generator, latents)
        # denoising loop
        latents = self.denoise(latents, timesteps, unet_kwargs, guidance_scale, generator, callback)
        # MoVQ decode
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
        # T5 states and mask, negative half first when guiding
        unet_kwargs, batch_size = self._text_conditioning(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, attention_mask,
            negative_attention_mask, guidance_scale, num_images_per_prompt)
        # the images' MoVQ latents, one per prompt and image
        latents = self.encode_images(images, height, width)  # (N, 4, h, w)
        latents = np.repeat(latents, num_images_per_prompt, axis=0)
        if latents.shape[0] != batch_size:
            raise ValueError(f"`image` has {len(images)} images but there are {batch_size // num_images_per_prompt} "
                             "prompts; give one image per prompt")
        # the last `strength` of the schedule, and the latents noised to its first step
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = get_timesteps(self.scheduler, num_inference_steps, strength)
        latents = self.noise_to_strength(latents, timesteps, generator)
        # denoising loop
        latents = self.denoise(latents, timesteps, unet_kwargs, guidance_scale, generator, callback)
        # MoVQ decode
        return (self.decode(latents, output_type),)
