"""Prior + decoder in one call, as diffusers' `pipelines/kandinsky2_2/pipeline_kandinsky2_2_combined.py`
(the shared part is combined.py)."""
from __future__ import annotations

import numpy as np

from backend.pipelines.combined import CombinedPipeline
from backend.pipelines.kandinsky2_2 import (
    KandinskyV22Img2ImgPipeline,
    KandinskyV22InpaintPipeline,
    KandinskyV22Pipeline,
)
from backend.pipelines.prior import KandinskyV22PriorPipeline

DEFAULT_PRIORS = {
    "kandinsky-community/kandinsky-2-2-decoder": "kandinsky-community/kandinsky-2-2-prior",
    "kandinsky-community/kandinsky-2-2-decoder-inpaint": "kandinsky-community/kandinsky-2-2-prior",
    "kandinsky-community/kandinsky-2-2-controlnet-depth": "kandinsky-community/kandinsky-2-2-prior",
}


class _Combined22(CombinedPipeline):
    prior_class = KandinskyV22PriorPipeline
    default_priors = DEFAULT_PRIORS


class KandinskyV22CombinedPipeline(_Combined22):
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


class KandinskyV22Img2ImgCombinedPipeline(_Combined22):
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


class KandinskyV22InpaintCombinedPipeline(_Combined22):
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
