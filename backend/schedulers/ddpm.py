"""DDPM sampler in numpy, ported operation for operation from diffusers 0.35.2
schedulers/scheduling_ddpm.py (Ho et al. 2020, https://huggingface.co/papers/2006.11239).

Used by Kandinsky 2.2 (decoder, inpaint, ControlNet: linear betas, clip_sample), Kandinsky 3
(cosine betas) and Kandinsky 2.1's alternative ddpm_scheduler.json (learned_range variance,
dynamic thresholding). Arithmetic stays float32 as in diffusers (see base.py).
"""
from __future__ import annotations

import numpy as np

from backend.random import randn
from backend.schedulers.base import (
    F32,
    ConfigMixin,
    SchedulerOutput,
    add_noise,
    as_f32,
    as_timestep,
    check_choice,
    check_common,
    check_num_inference_steps,
    clip_or_threshold,
    exp_f32,
    log_f32,
    make_betas,
    rescale_zero_terminal_snr,
    spaced_timesteps,
)

# "fixed_large_log" is left out: diffusers' step takes the square root of its log variance (NaN).
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")


class DDPMScheduler(ConfigMixin):
    def __init__(
        self,
        num_train_timesteps: int = 1000,  # diffusion steps the model was trained with
        beta_start: float = 0.0001,  # first beta of "linear" / "scaled_linear" / "sigmoid"
        beta_end: float = 0.02,  # last beta of those schedules
        beta_schedule: str = "linear",  # "linear", "scaled_linear", "squaredcos_cap_v2" (cosine) or "sigmoid"
        trained_betas=None,  # explicit betas (num_train_timesteps values), overrides the schedule
        variance_type: str = "fixed_small",  # noise added per step; one of VARIANCE_TYPES
        clip_sample: bool = True,  # clip x0 to [-clip_sample_range, clip_sample_range]
        prediction_type: str = "epsilon",  # what the model predicts: "epsilon", "sample" or "v_prediction"
        thresholding: bool = False,  # Imagen dynamic thresholding of x0 (takes precedence over clip_sample)
        dynamic_thresholding_ratio: float = 0.995,  # quantile of |x0| used by thresholding
        clip_sample_range: float = 1.0,  # bound of clip_sample
        sample_max_value: float = 1.0,  # upper bound of the thresholding quantile (None: unbounded)
        timestep_spacing: str = "leading",  # "leading", "trailing" or "linspace"
        steps_offset: int = 0,  # added to "leading" timesteps (1 for the Kandinsky checkpoints)
        rescale_betas_zero_snr: bool = False,  # rescale betas to zero terminal SNR
    ):
        values = dict(locals())
        check_common(values)
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        self._register_config(values)

        betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end, trained_betas)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas  # (T,) float32
        self.alphas = F32(1.0) - betas  # (T,) float32
        self.alphas_cumprod = np.cumprod(self.alphas.astype(np.float64)).astype(F32)  # torch accumulates in double
        self.one = F32(1.0)

        self.init_noise_sigma = 1.0
        self.custom_timesteps = False
        self.num_inference_steps = None
        self.timesteps = np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64)
        self.variance_type = variance_type

    def scale_model_input(self, sample, timestep=None):
        """DDPM does not scale the model input."""
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None):
        """Choose the inference timesteps: `num_inference_steps` spaced by `timestep_spacing`, or explicit
        descending `timesteps`. `device` is accepted for diffusers compatibility; numpy has none."""
        T = self._config["num_train_timesteps"]
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("pass only one of num_inference_steps or timesteps")
        if timesteps is not None:
            timesteps = np.asarray(timesteps, dtype=np.int64).reshape(-1)
            if timesteps.size == 0 or np.any(timesteps[1:] >= timesteps[:-1]):
                raise ValueError("timesteps must be a non-empty, strictly descending sequence")
            if timesteps[0] >= T or timesteps[-1] < 0:
                raise ValueError(f"timesteps must lie in [0, {T - 1}]; got {timesteps.tolist()}")
            self.num_inference_steps = None
            self.custom_timesteps = True
            self.timesteps = timesteps.copy()
            return
        if num_inference_steps is None:
            raise ValueError("num_inference_steps is required when timesteps is not given")
        n = check_num_inference_steps(num_inference_steps, T)
        self.timesteps = spaced_timesteps(self._config["timestep_spacing"], n, T, self._config["steps_offset"])
        self.num_inference_steps = n
        self.custom_timesteps = False

    def previous_timestep(self, timestep: int) -> int:
        """The timestep after `timestep` in self.timesteps (-1 after the last; t - 1 before set_timesteps)."""
        if self.custom_timesteps or self.num_inference_steps:
            positions = np.nonzero(self.timesteps == timestep)[0]
            if positions.size == 0:
                raise ValueError(f"timestep {timestep} is not one of the scheduler's timesteps")
            index = int(positions[0])
            return -1 if index == self.timesteps.shape[0] - 1 else int(self.timesteps[index + 1])
        return timestep - 1

    def _get_variance(self, t: int, predicted_variance=None, variance_type=None):
        prev_t = self.previous_timestep(t)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        current_beta_t = F32(1) - alpha_prod_t / alpha_prod_t_prev

        # the posterior variance of eq. (7) of the DDPM paper
        variance = (F32(1) - alpha_prod_t_prev) / (F32(1) - alpha_prod_t) * current_beta_t
        variance = max(variance, F32(1e-20))  # keep log() finite

        variance_type = variance_type or self._config["variance_type"]
        if variance_type == "fixed_small":
            return variance
        if variance_type == "fixed_small_log":
            return exp_f32(F32(0.5) * log_f32(variance))  # a standard deviation
        if variance_type == "fixed_large":
            return current_beta_t
        if variance_type == "learned":
            return predicted_variance
        # "learned_range": the model interpolates, in log space, between the small and the large variance
        min_log = log_f32(variance)
        max_log = log_f32(current_beta_t)
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
        """One reverse step x_t -> x_{t-1}.

        model_output: (B, C, ...) float32, or (B, 2C, ...) with the predicted variance appended on axis 1
            when variance_type is "learned"/"learned_range" (otherwise the caller splits it off).
        prev_timestep: optional; DDPM derives it from its timesteps, a different value is an error.
        Draws noise with `generator` (backend.random.randn) only when timestep > 0, as diffusers.
        """
        sample = as_f32("sample", sample)
        model_output = as_f32("model_output", model_output)
        t = as_timestep(timestep, self._config["num_train_timesteps"])
        prev_t = self.previous_timestep(t)
        if prev_timestep is not None and int(np.asarray(prev_timestep).reshape(-1)[0]) != prev_t:
            raise ValueError(f"prev_timestep {prev_timestep!r} differs from the scheduler's next timestep {prev_t}")

        channels = sample.shape[1]
        if model_output.shape[1] == channels * 2 and self.variance_type in ("learned", "learned_range"):
            model_output, predicted_variance = model_output[:, :channels], model_output[:, channels:]
        else:
            predicted_variance = None
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output shape {model_output.shape} does not fit sample shape {sample.shape} "
                f"(variance_type={self.variance_type!r})"
            )

        # 1. alphas, betas
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_prod_t = F32(1) - alpha_prod_t
        beta_prod_t_prev = F32(1) - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = F32(1) - current_alpha_t

        # 2. predicted clean sample x0, eq. (15) of the DDPM paper
        prediction_type = self._config["prediction_type"]
        if prediction_type == "epsilon":
            pred_original_sample = (sample - np.sqrt(beta_prod_t) * model_output) / np.sqrt(alpha_prod_t)
        elif prediction_type == "sample":
            pred_original_sample = model_output
        else:  # "v_prediction"
            pred_original_sample = np.sqrt(alpha_prod_t) * sample - np.sqrt(beta_prod_t) * model_output

        # 3. clip or threshold x0
        pred_original_sample = clip_or_threshold(pred_original_sample, self._config)

        # 4-5. mean of the posterior q(x_{t-1} | x_t, x0), eq. (7)
        pred_original_sample_coeff = (np.sqrt(alpha_prod_t_prev) * current_beta_t) / beta_prod_t
        current_sample_coeff = np.sqrt(current_alpha_t) * beta_prod_t_prev / beta_prod_t
        pred_prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample

        # 6. add noise
        if t > 0:
            if self.variance_type in ("learned", "learned_range") and predicted_variance is None:
                raise ValueError(
                    f"variance_type {self.variance_type!r} needs model_output with the predicted variance "
                    f"appended on axis 1 ({2 * channels} channels); got {model_output.shape[1]}"
                )
            variance_noise = randn(model_output.shape, generator)
            variance = self._get_variance(t, predicted_variance=predicted_variance)
            if self.variance_type == "fixed_small_log":
                variance = variance * variance_noise
            elif self.variance_type == "learned_range":
                variance = exp_f32(F32(0.5) * variance) * variance_noise
            else:
                variance = np.sqrt(variance) * variance_noise
            pred_prev_sample = pred_prev_sample + variance

        pred_prev_sample = pred_prev_sample.astype(F32, copy=False)
        pred_original_sample = pred_original_sample.astype(F32, copy=False)
        if not return_dict:
            return (pred_prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample=pred_prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(self, original_samples, noise, timesteps):
        """Noise clean samples to `timesteps` (img2img strength, inpainting's kept region)."""
        return add_noise(self.alphas_cumprod, original_samples, noise, timesteps)
