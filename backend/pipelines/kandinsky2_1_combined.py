"""Prior + decoder in one call, as diffusers' `pipelines/kandinsky/pipeline_kandinsky_combined.py`.

The shared part is combined.py. As in diffusers, the decoder gets the prompt repeated to one per image embedding and no negative
prompt (its unconditional text is ""); `negative_prompt` steers the prior only.
"""
from __future__ import annotations

import numpy as np

from backend.pipelines.combined import CombinedPipeline
from backend.pipelines.kandinsky2_1 import (
    KandinskyImg2ImgPipeline,
    KandinskyInpaintPipeline,
    KandinskyPipeline,
    KandinskyPriorPipeline,
)

DEFAULT_PRIORS = {
    "kandinsky-community/kandinsky-2-1": "kandinsky-community/kandinsky-2-1-prior",
    "kandinsky-community/kandinsky-2-1-inpaint": "kandinsky-community/kandinsky-2-1-prior",
}


class _Combined21(CombinedPipeline):
    prior_class = KandinskyPriorPipeline
    default_priors = DEFAULT_PRIORS


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
        prompt = self._repeat_to(prompt, image_embeds.shape[0])
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
        prompt = self._repeat_to(prompt, image_embeds.shape[0])
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
        prompt = self._repeat_to(prompt, image_embeds.shape[0])
        image = self._repeat_to(image, image_embeds.shape[0])
        mask_image = self._repeat_to(mask_image, image_embeds.shape[0])
        return self.decoder_pipe(prompt=prompt, image=image, mask_image=mask_image, image_embeds=image_embeds,
                                 negative_image_embeds=negative_image_embeds, width=width, height=height,
                                 num_inference_steps=num_inference_steps, generator=generator,
                                 guidance_scale=guidance_scale, output_type=output_type, callback=callback)
