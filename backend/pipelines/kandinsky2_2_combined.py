"""Prior + decoder in one call, as diffusers' `pipelines/kandinsky2_2/pipeline_kandinsky2_2_combined.py`.

`from_pretrained(decoder_repo)` also loads the prior: diffusers finds it through the decoder
repo's model card (`prior: kandinsky-community/kandinsky-2-2-prior`); we keep that mapping in
`DEFAULT_PRIORS` and accept `prior_pretrained_model_name_or_path` for anything else.
"""
from __future__ import annotations

import numpy as np

from backend.pipelines.kandinsky2_2 import (
    KandinskyV22Img2ImgPipeline,
    KandinskyV22InpaintPipeline,
    KandinskyV22Pipeline,
    KandinskyV22PriorPipeline,
)

DEFAULT_PRIORS = {
    "kandinsky-community/kandinsky-2-2-decoder": "kandinsky-community/kandinsky-2-2-prior",
    "kandinsky-community/kandinsky-2-2-decoder-inpaint": "kandinsky-community/kandinsky-2-2-prior",
    "kandinsky-community/kandinsky-2-2-controlnet-depth": "kandinsky-community/kandinsky-2-2-prior",
}


class _Combined:
    prior_class = KandinskyV22PriorPipeline
    decoder_class = KandinskyV22Pipeline
    default_priors = DEFAULT_PRIORS
    # from_pretrained keyword arguments that belong to the decoder only (e.g. a scheduler subfolder)
    decoder_only_kwargs: tuple[str, ...] = ()

    def __init__(self, prior_pipe: KandinskyV22PriorPipeline, decoder_pipe):
        self.prior_pipe = prior_pipe
        self.decoder_pipe = decoder_pipe

    @property
    def components(self) -> dict:
        parts = {f"prior_{k}": v for k, v in self.prior_pipe.components.items()}
        parts.update(self.decoder_pipe.components)
        return parts

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, prior_pretrained_model_name_or_path=None, **kwargs):
        prior_path = (prior_pretrained_model_name_or_path
                      or cls.default_priors.get(str(pretrained_model_name_or_path)))
        if prior_path is None:
            raise ValueError("`prior_pretrained_model_name_or_path` is required for a decoder that is not one of "
                             f"{sorted(cls.default_priors)}")
        decoder_only = {k: kwargs.pop(k) for k in cls.decoder_only_kwargs if k in kwargs}
        prior = cls.prior_class.from_pretrained(prior_path, **kwargs)
        decoder = cls.decoder_class.from_pretrained(pretrained_model_name_or_path, **kwargs, **decoder_only)
        return cls(prior, decoder)

    def _prior(self, prompt, negative_prompt, num_images_per_prompt, prior_num_inference_steps, generator,
               latents, prior_guidance_scale, prior_callback):
        return self.prior_pipe(prompt=prompt, negative_prompt=negative_prompt,
                               num_images_per_prompt=num_images_per_prompt,
                               num_inference_steps=prior_num_inference_steps, generator=generator,
                               latents=latents, guidance_scale=prior_guidance_scale, callback=prior_callback)

    @staticmethod
    def _repeat_to(items, count: int):
        """One image per embedding: a shorter list is repeated, as diffusers does."""
        items = items if isinstance(items, (list, tuple)) else [items]
        if len(items) < count and count % len(items) == 0:
            items = list(items) * (count // len(items))
        return items


class KandinskyV22CombinedPipeline(_Combined):
    decoder_class = KandinskyV22Pipeline

    def __call__(self, prompt, negative_prompt=None, num_inference_steps: int = 100, guidance_scale: float = 4.0,
                 num_images_per_prompt: int = 1, height: int = 512, width: int = 512,
                 prior_guidance_scale: float = 4.0, prior_num_inference_steps: int = 25,
                 generator: np.random.Generator | None = None, latents=None, output_type: str = "pil",
                 callback=None, prior_callback=None):
        image_embeds, negative_image_embeds = self._prior(prompt, negative_prompt, num_images_per_prompt,
                                                          prior_num_inference_steps, generator, latents,
                                                          prior_guidance_scale, prior_callback)
        return self.decoder_pipe(image_embeds=image_embeds, negative_image_embeds=negative_image_embeds,
                                 width=width, height=height, num_inference_steps=num_inference_steps,
                                 generator=generator, guidance_scale=guidance_scale, output_type=output_type,
                                 callback=callback)


class KandinskyV22Img2ImgCombinedPipeline(_Combined):
    decoder_class = KandinskyV22Img2ImgPipeline

    def __call__(self, prompt, image, negative_prompt=None, num_inference_steps: int = 100,
                 guidance_scale: float = 4.0, strength: float = 0.3, num_images_per_prompt: int = 1,
                 height: int = 512, width: int = 512, prior_guidance_scale: float = 4.0,
                 prior_num_inference_steps: int = 25, generator: np.random.Generator | None = None,
                 latents=None, output_type: str = "pil", callback=None, prior_callback=None):
        image_embeds, negative_image_embeds = self._prior(prompt, negative_prompt, num_images_per_prompt,
                                                          prior_num_inference_steps, generator, latents,
                                                          prior_guidance_scale, prior_callback)
        image = self._repeat_to(image, image_embeds.shape[0])
        return self.decoder_pipe(image=image, image_embeds=image_embeds,
                                 negative_image_embeds=negative_image_embeds, width=width, height=height,
                                 strength=strength, num_inference_steps=num_inference_steps,
                                 generator=generator, guidance_scale=guidance_scale, output_type=output_type,
                                 callback=callback)


class KandinskyV22InpaintCombinedPipeline(_Combined):
    decoder_class = KandinskyV22InpaintPipeline

    def __call__(self, prompt, image, mask_image, negative_prompt=None, num_inference_steps: int = 100,
                 guidance_scale: float = 4.0, num_images_per_prompt: int = 1, height: int = 512,
                 width: int = 512, prior_guidance_scale: float = 4.0, prior_num_inference_steps: int = 25,
                 generator: np.random.Generator | None = None, latents=None, output_type: str = "pil",
                 callback=None, prior_callback=None):
        image_embeds, negative_image_embeds = self._prior(prompt, negative_prompt, num_images_per_prompt,
                                                          prior_num_inference_steps, generator, latents,
                                                          prior_guidance_scale, prior_callback)
        image = self._repeat_to(image, image_embeds.shape[0])
        mask_image = self._repeat_to(mask_image, image_embeds.shape[0])
        return self.decoder_pipe(image=image, mask_image=mask_image, image_embeds=image_embeds,
                                 negative_image_embeds=negative_image_embeds, width=width, height=height,
                                 num_inference_steps=num_inference_steps, generator=generator,
                                 guidance_scale=guidance_scale, output_type=output_type, callback=callback)
