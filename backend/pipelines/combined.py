"""Prior + decoder in one call: the base of diffusers' combined Kandinsky 2.1 and 2.2 pipelines.

`from_pretrained(decoder_repo)` also loads the prior: diffusers finds it through the decoder
repo's model card (`prior: kandinsky-community/kandinsky-2-2-prior`); each combined pipeline keeps
that mapping in `default_priors` and accepts `prior_pretrained_model_name_or_path` for anything else.
"""
from __future__ import annotations


class CombinedPipeline:
    """A prior pipeline and a decoder pipeline called one after the other."""

    # Set by each combined pipeline: its two classes, and decoder repo id -> prior repo id.
    prior_class: type
    decoder_class: type
    default_priors: dict[str, str] = {}
    # from_pretrained keyword arguments that belong to the decoder only: `scheduler=` (a scheduler swapped in
    # as the docs do, or a subfolder such as kandinsky-2-1's "ddpm_scheduler") is the decoder's, as in
    # diffusers' combined pipelines (the prior's is `prior_scheduler`); other kwargs go to both loads.
    decoder_only_kwargs: tuple[str, ...] = ("scheduler",)

    def __init__(self, prior_pipe, decoder_pipe):
        self.prior_pipe = prior_pipe
        self.decoder_pipe = decoder_pipe

    @property
    def components(self) -> dict:
        parts = {f"prior_{k}": v for k, v in self.prior_pipe.components.items()}
        parts.update(self.decoder_pipe.components)
        return parts

    @property
    def truncated_text(self) -> list[str]:
        """What the last call dropped from the prompt: beyond CLIP's 77 tokens (prior), then, for 2.1,
        beyond the multilingual encoder's 77 tokens (decoder)."""
        return self.prior_pipe.truncated_text + self.decoder_pipe.truncated_text

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
