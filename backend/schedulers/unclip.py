"""UnCLIP sampler in numpy, ported operation for operation from diffusers 0.35.2
schedulers/scheduling_unclip.py (the karlo unCLIP variant of DDPM).

It samples the Kandinsky 2.1 / 2.2 prior: cosine betas, x0 predicted directly
(prediction_type "sample", clipped to +-10), and betas recomputed for the skipped timesteps
from the `prev_timestep` the pipeline passes. Arithmetic stays float32 as in diffusers.
"""
from __future__ import annotations

import numbers

import numpy as np

from backend.random import randn
from backend.schedulers.base import (
    F32,
    ConfigMixin,
    SchedulerOutput,
    add_noise,
    as_f32,
    as_timestep,
    betas_for_alpha_bar,
    check_choice,
    check_num_inference_steps,
    exp_f32,
    is_number,
    log_f32,
)


class UnCLIPScheduler(ConfigMixin):
    def __init__(
        self,
        num_train_timesteps: int = 1000,  # diffusion steps the model was trained with
        variance_type: str = "fixed_small_log",  # "fixed_small_log" or "learned_range"
        clip_sample: bool = True,  # clip x0 to [-clip_sample_range, clip_sample_range]
        clip_sample_range: float = 1.0,  # bound of clip_sample (10.0 for the Kandinsky priors)
        prediction_type: str = "epsilon",  # "epsilon" or "sample" (the Kandinsky priors predict x0)
        beta_schedule: str = "squaredcos_cap_v2",  # only the cosine schedule exists for unCLIP
    ):
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, numbers.Integral) or (
            num_train_timesteps < 2
        ):
            raise ValueError(f"num_train_timesteps must be an integer >= 2; got {num_train_timesteps!r}")
        check_choice("variance_type", variance_type, ("fixed_small_log", "learned_range"))
        check_choice("prediction_type", prediction_type, ("epsilon", "sample"))
        check_choice("beta_schedule", beta_schedule, ("squaredcos_cap_v2",))
        if clip_sample and not (is_number(clip_sample_range) and clip_sample_range > 0):
            raise ValueError(f"clip_sample_range must be > 0; got {clip_sample_range!r}")
        self._register_config(dict(locals()))

        self.betas = betas_for_alpha_bar(num_train_timesteps)  # (T,) float32
        self.alphas = F32(1.0) - self.betas  # (T,) float32
        self.alphas_cumprod = np.cumprod(self.alphas.astype(np.float64)).astype(F32)  # torch accumulates in double
        self.one = F32(1.0)

        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64)
        self.variance_type = variance_type

    def scale_model_input(self, sample, timestep=None):
        """UnCLIP does not scale the model input."""
        return sample

    def set_timesteps(self, num_inference_steps: int, device=None):
        """`num_inference_steps` timesteps from T - 1 down to 0 (karlo's step ratio (T - 1) / (n - 1), so
        at least 2 steps). `device` is accepted for diffusers compatibility; numpy has none."""
        T = self._config["num_train_timesteps"]
        # diffusers divides by num_inference_steps - 1: one step is a ZeroDivisionError there
        n = check_num_inference_steps(num_inference_steps, T, minimum=2)
        self.num_inference_steps = n
        step_ratio = (T - 1) / (n - 1)
        self.timesteps = (np.arange(0, n) * step_ratio).round()[::-1].copy().astype(np.int64)

    def _get_variance(self, t: int, prev_timestep: int | None = None, predicted_variance=None, variance_type=None):
        if prev_timestep is None:
            prev_timestep = t - 1
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.one
        beta_prod_t = F32(1) - alpha_prod_t
        beta_prod_t_prev = F32(1) - alpha_prod_t_prev
        if prev_timestep == t - 1:
            beta = self.betas[t]
        else:
            beta = F32(1) - alpha_prod_t / alpha_prod_t_prev  # beta of the skipped stretch

        # the posterior variance of eq. (7) of the DDPM paper
        variance = beta_prod_t_prev / beta_prod_t * beta

        variance_type = variance_type or self._config["variance_type"]
        if variance_type == "fixed_small_log":
            return exp_f32(F32(0.5) * log_f32(max(variance, F32(1e-20))))  # a standard deviation
        # "learned_range": the model interpolates, in log space, between the small and the large variance
        min_log = log_f32(variance)
        max_log = log_f32(beta)
        frac = (predicted_variance + F32(1)) / F32(2)
        return frac * max_log + (F32(1) - frac) * min_log  # a log variance

    def step(
        self,
        model_output,
        timestep,
        sample,
        *,
        generator: np.random.Generator | None = None,
        prev_timestep=None,
        return_dict: bool = True,
    ):
        """One reverse step x_t -> x_{prev_timestep}.

        model_output, sample: (B, D) or (B, C, ...) float32; with variance_type "learned_range" the model
            output may carry the predicted variance appended on axis 1.
        prev_timestep: the next timestep of the loop (None for the last step: t - 1), as the prior pipeline passes.
        Draws noise with `generator` (backend.random.randn) only when timestep > 0, as diffusers.
        """
        sample = as_f32("sample", sample)
        model_output = as_f32("model_output", model_output)
        T = self._config["num_train_timesteps"]
        t = as_timestep(timestep, T)

        channels = sample.shape[1]
        if model_output.shape[1] == channels * 2 and self.variance_type == "learned_range":
            model_output, predicted_variance = model_output[:, :channels], model_output[:, channels:]
        else:
            predicted_variance = None
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {model_output.shape} does not fit sample shape {sample.shape}")

        # 1. alphas, betas (recomputed over the skipped stretch when prev_timestep is not t - 1)
        if prev_timestep is None:
            prev_timestep = t - 1
        else:
            prev_timestep = int(np.asarray(prev_timestep).reshape(-1)[0])
            if not -1 <= prev_timestep < t:
                raise ValueError(f"prev_timestep must be in [-1, {t - 1}] for timestep {t}; got {prev_timestep}")
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.one
        beta_prod_t = F32(1) - alpha_prod_t
        beta_prod_t_prev = F32(1) - alpha_prod_t_prev
        if prev_timestep == t - 1:
            beta = self.betas[t]
            alpha = self.alphas[t]
        else:
            beta = F32(1) - alpha_prod_t / alpha_prod_t_prev
            alpha = F32(1) - beta

        # 2. predicted x0, eq. (15) of the DDPM paper
        if self._config["prediction_type"] == "epsilon":
            pred_original_sample = (sample - np.sqrt(beta_prod_t) * model_output) / np.sqrt(alpha_prod_t)
        else:  # "sample"
            pred_original_sample = model_output

        # 3. clip x0
        if self._config["clip_sample"]:
            limit = F32(self._config["clip_sample_range"])
            pred_original_sample = np.clip(pred_original_sample, -limit, limit)

        # 4-5. mean of the posterior q(x_{t-1} | x_t, x0), eq. (7)
        pred_original_sample_coeff = (np.sqrt(alpha_prod_t_prev) * beta) / beta_prod_t
        current_sample_coeff = np.sqrt(alpha) * beta_prod_t_prev / beta_prod_t
        pred_prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample

        # 6. add noise
        if t > 0:
            if self.variance_type == "learned_range" and predicted_variance is None:
                raise ValueError(
                    f'variance_type "learned_range" needs model_output with the predicted variance appended on '
                    f"axis 1 ({2 * channels} channels); got {model_output.shape[1]}"
                )
            variance_noise = randn(model_output.shape, generator)
            variance = self._get_variance(t, predicted_variance=predicted_variance, prev_timestep=prev_timestep)
            if self.variance_type == "learned_range":
                variance = exp_f32(F32(0.5) * variance)
            pred_prev_sample = pred_prev_sample + variance * variance_noise

        pred_prev_sample = pred_prev_sample.astype(F32, copy=False)
        pred_original_sample = pred_original_sample.astype(F32, copy=False)
        if not return_dict:
            return (pred_prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample=pred_prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(self, original_samples, noise, timesteps):
        """Noise clean samples to `timesteps`."""
        return add_noise(self.alphas_cumprod, original_samples, noise, timesteps)
