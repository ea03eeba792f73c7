"""Prior + decoder in one call, as diffusers' `pipelines/kandinsky/pipeline_kandinsky_combined.py`.

`from_pretrained(decoder_repo)` also loads the prior: diffusers finds it through the decoder
repo's model card (`prior: kandinsky-community/kandinsky-2-1-prior`); we keep that mapping in
`DEFAULT_PRIORS` and accept `prior_pretrained_model_name_or_path` for anything else. As in
diffusers, the decoder gets the prompt repeated to one per image embedding and no negative
prompt (its unconditional text is ""); `negative_prompt` steers the prior only.
"""
from __future__ import annotations

import numpy as np

from backend.pipelines.kandinsky2_1 import (
    KandinskyImg2ImgPipeline,
    KandinskyInpaintPipeline,
    KandinskyPipeline,
    KandinskyPriorPipeline,
)
from backend.pipelines.kandinsky2_2_combined import _Combined

DEFAULT_PRIORS = {
    "kandinsky-community/kandinsky-2-1": "kandinsky-community/kandinsky-2-1-prior",
    "kandinsky-community/kandinsky-2-1-inpaint": "kandinsky-community/kandinsky-2-1-prior",
}


class _Combined21(_Combined):
    decoder_class = KandinskyPipeline

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, prior_pretrained_model_name_or_path=None, **kwargs):
        """kwargs go to both loads, except `scheduler=` (e.g. "ddpm_scheduler"), which is the decoder's."""
        prior_path = prior_pretrained_model_name_or_path or DEFAULT_PRIORS.get(str(pretrained_model_name_or_path))
        if prior_path is None:
            raise ValueError("`prior_pretrained_model_name_or_path` is required for a decoder that is not one of "
                             f"{sorted(DEFAULT_PRIORS)}")
        decoder_only = {k: kwargs.pop(k) for k in ("scheduler",) if k in kwargs}
        prior = KandinskyPriorPipeline.from_pretrained(prior_path, **kwargs)
        decoder = cls.decoder_class.from_pretrained(pretrained_model_name_or_path, **kwargs, **decoder_only)
        return cls(prior, decoder)

    @property
    def truncated_text(self) -> list[str]:
        """What the last call dropped from the prompt: beyond CLIP's 77 tokens (prior), then beyond
        the multilingual encoder's 77 tokens (decoder)."""
        return list(getattr(self.prior_pipe, "truncated_text", [])) + \
            list(getattr(self.decoder_pipe, "truncated_text", []))

    @staticmethod
    def _decoder_prompt(prompt, count: int) -> list:
        prompt = [prompt] if not isinstance(prompt, (list, tuple)) else list(prompt)
        if len(prompt) < count and count % len(prompt) == 0:
            prompt = (count // len(prompt)) * prompt
        return prompt


class KandinskyCombinedPipeline(_Combined21):
    decoder_class = KandinskyPipeline

    def __call__(self, prompt, negative_prompt=None, num_inference_steps: int = 100, guidance_scale: float = 4.0,
                 num_images_per_prompt: int = 1, height: int = 512, width: int = 512,
                 prior_guidance_scale: float = 4.0, prior_num_inference_steps: int = 25,
                 generator: np.random.Generator | None = None, latents=None, output_type: str = "pil",
                 callback=None, prior_callback=None):
        image_embeds, negative_image_embeds = self._prior(prompt, negative_prompt, num_images_per_prompt,
                                                          prior_num_inference_steps, generator, latents,
                                                          prior_guidance_scale, prior_callback)
        prompt = self._decoder_prompt(prompt, image_embeds.shape[0])
        return self.decoder_pipe(prompt=prompt, image_embeds=image_embeds,
                                 negative_image_embeds=negative_image_embeds, width=width, height=height,
                                 num_inference_steps=num_inference_steps, generator=generator,
                                 guidance_scale=guidance_scale, output_type=output_type, callback=callback)


class KandinskyImg2ImgCombinedPipeline(_Combined21):
    decoder_class = KandinskyImg2ImgPipeline

    def __call__(self, prompt, image, negative_prompt=None, num_inference_steps: int = 100,
                 guidance_scale: float = 4.0, num_images_per_prompt: int = 1, strength: float = 0.3,
                 height: int = 512, width: int = 512, prior_guidance_scale: float = 4.0,
                 prior_num_inference_steps: int = 25, generator: np.random.Generator | None = None,
                 latents=None, output_type: str = "pil", callback=None, prior_callback=None):
        image_embeds, negative_image_embeds = self._prior(prompt, negative_prompt, num_images_per_prompt,
                                                          prior_num_inference_steps, generator, latents,
                                                          prior_guidance_scale, prior_callback)
        prompt = self._decoder_prompt(prompt, image_embeds.shape[0])
        image = self._repeat_to(image, image_embeds.shape[0])
        return self.decoder_pipe(prompt=prompt, image=image, image_embeds=image_embeds,
                                 negative_image_embeds=negative_image_embeds, strength=strength, width=width,
                                 height=height, num_inference_steps=num_inference_steps, generator=generator,
                                 guidance_scale=guidance_scale, output_type=output_type, callback=callback)


class KandinskyInpaintCombinedPipeline(_Combined21):
    decoder_class = KandinskyInpaintPipeline

    def __call__(self, prompt, image, mask_image, negative_prompt=None, num_inference_steps: int = 100,
                 guidance_scale: float = 4.0, num_images_per_prompt: int = 1, height: int = 512,
                 width: int = 512, prior_guidance_scale: float = 4.0, prior_num_inference_steps: int = 25,
                 generator: np.random.Generator | None = None, latents=None, output_type: str = "pil",
                 callback=None, prior_callback=None):
        image_embeds, negative_image_embeds = self._prior(prompt, negative_prompt, num_images_per_prompt,
                                                          prior_num_inference_steps, generator, latents,
                                                          prior_guidance_scale, prior_callback)
        prompt = self._decoder_prompt(prompt, image_embeds.shape[0])
        image = self._repeat_to(image, image_embeds.shape[0])
        mask_image = self._repeat_to(mask_image, image_embeds.shape[0])
        return self.decoder_pipe(prompt=prompt, image=image, mask_image=mask_image, image_embeds=image_embeds,
                                 negative_image_embeds=negative_image_embeds, width=width, height=height,
                                 num_inference_steps=num_inference_steps, generator=generator,
                                 guidance_scale=guidance_scale, output_type=output_type, callback=callback)
