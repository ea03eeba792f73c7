"""Euler ancestral sampler ("Euler a") in numpy, ported operation for operation from diffusers 0.35.2
schedulers/scheduling_euler_ancestral_discrete.py (k-diffusion's sample_euler_ancestral).

Each step goes down to sigma_down with an Euler step, then adds fresh noise of standard deviation
sigma_up, so that sigma_down^2 + sigma_up^2 = sigma_next^2: it draws noise at every step. As with
Euler, the model must see scale_model_input(x, t) = x / sqrt(sigma^2 + 1) at every step.
diffusers 0.35.2's Euler ancestral has no Karras sigmas.
"""
from __future__ import annotations

import numpy as np

from backend.random import randn
from backend.schedulers.base import step_output
from backend.schedulers.sigmas import DiscreteScheduler, check_sigma_settings


class EulerAncestralDiscreteScheduler(DiscreteScheduler):
    def __init__(
        self,
        num_train_timesteps: int = 1000,  # diffusion steps the model was trained with
        beta_start: float = 0.0001,  # first beta of "linear" / "scaled_linear"
        beta_end: float = 0.02,  # last beta of those schedules
        beta_schedule: str = "linear",  # "linear", "scaled_linear" or "squaredcos_cap_v2" (cosine)
        trained_betas=None,  # explicit betas (num_train_timesteps values), overrides the schedule
        prediction_type: str = "epsilon",  # what the model predicts: "epsilon" or "v_prediction"
        timestep_spacing: str = "linspace",  # "linspace", "leading" or "trailing"
        steps_offset: int = 0,  # added to "leading" timesteps
        rescale_betas_zero_snr: bool = False,  # rescale betas to zero terminal SNR
    ):
        values = dict(locals())
        # diffusers raises NotImplementedError for "sample" at the first step; refused here at once
        check_sigma_settings(values, ("epsilon", "v_prediction"))
        self._register_config(values)
        self._init_schedule(values)

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Choose the timesteps and sigmas of a `num_inference_steps` run. `device` is accepted for diffusers
        compatibility; numpy has none."""
        timesteps, sigmas, _ = self._spaced_schedule(num_inference_steps)
        self._set_schedule(timesteps, sigmas, 0.0)

    def step(self, model_output, timestep, sample, *, generator: np.random.Generator | None = None,
             return_dict: bool = True):
        """One ancestral step from sigma to the next sigma; draws noise of the sample's shape with `generator`
        at every step (the last one too, with weight 0, as diffusers).

        model_output, sample: (B, C, ...) float32; scale_model_input must have been called at this step.
        Returns prev_sample and pred_original_sample (x0, for previews).
        """
        model_output, sample, index = self._step_inputs(model_output, timestep, sample)
        self._check_scaled(index)
        sigma = self.sigmas[index]

        # 1. x0 from the sigma-scaled prediction
        if self._config["prediction_type"] == "epsilon":
            pred_original_sample = sample - sigma * model_output
        else:  # "v_prediction"
            pred_original_sample = self._v_prediction_x0(model_output, sample, sigma)

        # 2. split the next noise level into a deterministic part (down) and fresh noise (up)
        sigma_from, sigma_to = self.sigmas[index], self.sigmas[index + 1]
        sigma_up = np.sqrt(sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
                           / (sigma_from * sigma_from))
        sigma_down = np.sqrt(sigma_to * sigma_to - sigma_up * sigma_up)

        # 3. Euler step to sigma_down, then the noise
        derivative = (sample - pred_original_sample) / sigma
        dt = sigma_down - sigma
        prev_sample = sample + derivative * dt
        noise = randn(model_output.shape, generator)
        prev_sample = prev_sample + noise * sigma_up
        self._step_index += 1

        return step_output(prev_sample, pred_original_sample, return_dict)
