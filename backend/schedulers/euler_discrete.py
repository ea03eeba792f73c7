"""Euler sampler in numpy, ported operation for operation from diffusers 0.35.2
schedulers/scheduling_euler_discrete.py (Algorithm 2 of Karras et al. 2022,
https://huggingface.co/papers/2206.00364, in k-diffusion's form).

The sample lives in the variance exploding form x = x0 + sigma * eps: the initial noise is
scaled by init_noise_sigma and the model must see scale_model_input(x, t) = x / sqrt(sigma^2 + 1)
at every step (this port refuses a step without it). Timesteps are float32 and, with
"linspace" spacing or Karras sigmas, not integers: the UNet gets them as they are.
"""
from __future__ import annotations

import numbers

import numpy as np

from backend.random import randn
from backend.schedulers.base import F32, check_choice, step_output
from backend.schedulers.sigmas import DiscreteScheduler, check_sigma_settings, final_sigma, karras_sigmas, sigma_to_t

UNSUPPORTED = ("use_exponential_sigmas", "use_beta_sigmas")


class EulerDiscreteScheduler(DiscreteScheduler):
    def __init__(
        self,
        num_train_timesteps: int = 1000,  # diffusion steps the model was trained with
        beta_start: float = 0.0001,  # first beta of "linear" / "scaled_linear"
        beta_end: float = 0.02,  # last beta of those schedules
        beta_schedule: str = "linear",  # "linear", "scaled_linear" or "squaredcos_cap_v2" (cosine)
        trained_betas=None,  # explicit betas (num_train_timesteps values), overrides the schedule
        prediction_type: str = "epsilon",  # what the model predicts: "epsilon", "sample" or "v_prediction"
        interpolation_type: str = "linear",  # sigmas interpolated linearly at the timesteps (the only one ported)
        use_karras_sigmas: bool = False,  # Karras et al. noise levels between the first and last sigma
        use_exponential_sigmas: bool = False,  # not ported (must stay False)
        use_beta_sigmas: bool = False,  # not ported
        sigma_min: float | None = None,  # Karras range override (None: the schedule's last sigma)
        sigma_max: float | None = None,  # Karras range override (None: the schedule's first sigma)
        timestep_spacing: str = "linspace",  # "linspace", "leading" or "trailing"
        timestep_type: str = "discrete",  # "discrete" (the only one ported; "continuous" is for EDM models)
        steps_offset: int = 0,  # added to "leading" timesteps
        rescale_betas_zero_snr: bool = False,  # rescale betas to zero terminal SNR
        final_sigmas_type: str = "zero",  # sigma after the last step: "zero" or "sigma_min"
    ):
        values = dict(locals())
        check_sigma_settings(values, ("epsilon", "sample", "v_prediction"), UNSUPPORTED)
        check_choice("interpolation_type", interpolation_type, ("linear",))
        check_choice("timestep_type", timestep_type, ("discrete",))
        for name in ("sigma_min", "sigma_max"):
            value = values[name]
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real) or value <= 0):
                raise ValueError(f"{name} must be a positive number or None; got {value!r}")
        self._register_config(values)
        self._init_schedule(values)

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Choose the timesteps and sigmas of a `num_inference_steps` run. `device` is accepted for diffusers
        compatibility; numpy has none."""
        config = self._config
        timesteps, sigmas, train = self._spaced_schedule(num_inference_steps)
        if config["use_karras_sigmas"]:
            # the Karras range is that of the spaced sigmas, not the whole training range (unlike DPM-Solver++)
            sigma_min = config["sigma_min"] if config["sigma_min"] is not None else float(sigmas[-1])
            sigma_max = config["sigma_max"] if config["sigma_max"] is not None else float(sigmas[0])
            sigmas = karras_sigmas(sigma_min, sigma_max, len(timesteps))
            timesteps = sigma_to_t(sigmas, np.log(train))
        self._set_schedule(timesteps, sigmas, final_sigma(config["final_sigmas_type"], train))

    def step(
        self,
        model_output,
        timestep,
        sample,
        *,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: np.random.Generator | None = None,
        return_dict: bool = True,
    ):
        """One Euler step from sigma to the next sigma.

        model_output, sample: (B, C, ...) float32; scale_model_input must have been called at this step.
        s_churn > 0 first raises the noise level from sigma to sigma_hat = sigma * (1 + gamma) for sigmas in
        [s_tmin, s_tmax], drawing noise with `generator` (times s_noise); the default adds none.
        Returns prev_sample and pred_original_sample (x0, for previews).
        """
        model_output, sample, index = self._step_inputs(model_output, timestep, sample)
        self._check_scaled(index)

        sigma = self.sigmas[index]
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * F32(gamma + 1)
        if gamma > 0:
            eps = randn(model_output.shape, generator) * F32(s_noise)
            sample = sample + eps * np.sqrt(sigma_hat * sigma_hat - sigma * sigma)

        # 1. x0 from the sigma-scaled prediction
        if self._config["prediction_type"] == "sample":
            pred_original_sample = model_output
        elif self._config["prediction_type"] == "epsilon":
            pred_original_sample = sample - sigma_hat * model_output
        else:  # "v_prediction", at sigma (not sigma_hat), as diffusers
            pred_original_sample = self._v_prediction_x0(model_output, sample, sigma)

        # 2. the ODE derivative dx/dsigma and an Euler step to the next sigma
        derivative = (sample - pred_original_sample) / sigma_hat
        dt = self.sigmas[index + 1] - sigma_hat
        prev_sample = sample + derivative * dt
        self._step_index += 1

        return step_output(prev_sample, pred_original_sample, return_dict)
