"""DDIM sampler in numpy, ported operation for operation from diffusers 0.35.2
schedulers/scheduling_ddim.py (Song et al. 2020, https://huggingface.co/papers/2010.02502).

The Kandinsky 2.1 checkpoints ship it; the Kandinsky 2.2 docs swap it in with
`DDIMScheduler.from_config(pipe.scheduler.config)` (DDPM-only keys are ignored).
Arithmetic stays float32 as in diffusers (see base.py).
"""
from __future__ import annotations

import numpy as np

from backend.random import randn
from backend.schedulers.base import (
    BETA_SCHEDULES,
    F32,
    ConfigMixin,
    SchedulerOutput,
    add_noise,
    as_f32,
    as_timestep,
    check_common,
    check_num_inference_steps,
    clip_or_threshold,
    make_betas,
    rescale_zero_terminal_snr,
    spaced_timesteps,
)


class DDIMScheduler(ConfigMixin):
    def __init__(
        self,
        num_train_timesteps: int = 1000,  # diffusion steps the model was trained with
        beta_start: float = 0.0001,  # first beta of "linear" / "scaled_linear"
        beta_end: float = 0.02,  # last beta of those schedules
        beta_schedule: str = "linear",  # "linear", "scaled_linear" or "squaredcos_cap_v2" (cosine)
        trained_betas=None,  # explicit betas (num_train_timesteps values), overrides the schedule
        clip_sample: bool = True,  # clip x0 to [-clip_sample_range, clip_sample_range]
        set_alpha_to_one: bool = True,  # alpha_bar before the first training step: 1, or alpha_bar_0 if False
        steps_offset: int = 0,  # added to "leading" timesteps (1 for the Kandinsky checkpoints)
        prediction_type: str = "epsilon",  # what the model predicts: "epsilon", "sample" or "v_prediction"
        thresholding: bool = False,  # Imagen dynamic thresholding of x0 (takes precedence over clip_sample)
        dynamic_thresholding_ratio: float = 0.995,  # quantile of |x0| used by thresholding
        clip_sample_range: float = 1.0,  # bound of clip_sample
        sample_max_value: float = 1.0,  # upper bound of the thresholding quantile (None: unbounded)
        timestep_spacing: str = "leading",  # "leading", "trailing" or "linspace"
        rescale_betas_zero_snr: bool = False,  # rescale betas to zero terminal SNR
    ):
        values = dict(locals())
        check_common(values)
        self._register_config(values)

        schedules = tuple(name for name in BETA_SCHEDULES if name != "sigmoid")  # diffusers' DDIM has no sigmoid
        betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end, trained_betas, schedules)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas  # (T,) float32
        self.alphas = F32(1.0) - betas  # (T,) float32
        self.alphas_cumprod = np.cumprod(self.alphas.astype(np.float64)).astype(F32)  # torch accumulates in double
        # the alpha_bar "before" timestep 0, used by the last step
        self.final_alpha_cumprod = F32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64)

    def scale_model_input(self, sample, timestep=None):
        """DDIM does not scale the model input."""
        return sample

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Choose `num_inference_steps` timesteps spaced by `timestep_spacing`. `device` is accepted for
        diffusers compatibility; numpy has none."""
        T = self._config["num_train_timesteps"]
        n = check_num_inference_steps(num_inference_steps, T)
        self.timesteps = spaced_timesteps(self._config["timestep_spacing"], n, T, self._config["steps_offset"])
        self.num_inference_steps = n

    def _get_variance(self, timestep: int, prev_timestep: int):
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = F32(1) - alpha_prod_t
        beta_prod_t_prev = F32(1) - alpha_prod_t_prev
        # sigma_t^2 of eq. (16) of the DDIM paper, before eta
        return (beta_prod_t_prev / beta_prod_t) * (F32(1) - alpha_prod_t / alpha_prod_t_prev)

    def step(
        self,
        model_output,
        timestep,
        sample,
        *,
        generator: np.random.Generator | None = None,
        prev_timestep=None,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        variance_noise=None,
        return_dict: bool = True,
    ):
        """One DDIM step x_t -> x_{t-1}, eq. (12) of the DDIM paper.

        model_output, sample: (B, C, ...) float32. eta: weight of the added noise (0 = deterministic DDIM,
        1 = DDPM-like); noise is drawn with `generator` only when eta > 0, or given as `variance_noise`.
        use_clipped_model_output: recompute epsilon from the clipped x0.
        prev_timestep: optional; DDIM derives it as t - T // num_inference_steps, a different value is an error.
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        sample = as_f32("sample", sample)
        model_output = as_f32("model_output", model_output)
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {model_output.shape} must equal sample shape {sample.shape}")
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0; got {eta!r}")
        T = self._config["num_train_timesteps"]
        timestep = as_timestep(timestep, T)

        # 1. previous step value (=t-1); diffusers uses the "leading" step ratio for every spacing
        prev_t = timestep - T // self.num_inference_steps
        if prev_timestep is not None and int(np.asarray(prev_timestep).reshape(-1)[0]) != prev_t:
            raise ValueError(f"prev_timestep {prev_timestep!r} differs from the scheduler's next timestep {prev_t}")

        # 2. alphas, betas
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod_t = F32(1) - alpha_prod_t

        # 3. predicted x0 and epsilon, "predicted x_0" of eq. (12)
        prediction_type = self._config["prediction_type"]
        if prediction_type == "epsilon":
            pred_original_sample = (sample - np.sqrt(beta_prod_t) * model_output) / np.sqrt(alpha_prod_t)
            pred_epsilon = model_output
        elif prediction_type == "sample":
            pred_original_sample = model_output
            pred_epsilon = (sample - np.sqrt(alpha_prod_t) * pred_original_sample) / np.sqrt(beta_prod_t)
        else:  # "v_prediction"
            pred_original_sample = np.sqrt(alpha_prod_t) * sample - np.sqrt(beta_prod_t) * model_output
            pred_epsilon = np.sqrt(alpha_prod_t) * model_output + np.sqrt(beta_prod_t) * sample

        # 4. clip or threshold x0
        pred_original_sample = clip_or_threshold(pred_original_sample, self._config)

        # 5. sigma_t(eta), eq. (16)
        variance = self._get_variance(timestep, prev_t)
        std_dev_t = F32(eta) * np.sqrt(variance)

        if use_clipped_model_output:
            # epsilon consistent with the clipped x0 (Glide)
            pred_epsilon = (sample - np.sqrt(alpha_prod_t) * pred_original_sample) / np.sqrt(beta_prod_t)

        # 6. "direction pointing to x_t" of eq. (12)
        pred_sample_direction = np.sqrt(F32(1) - alpha_prod_t_prev - std_dev_t * std_dev_t) * pred_epsilon

        # 7. x_{t-1} without the random noise of eq. (12)
        prev_sample = np.sqrt(alpha_prod_t_prev) * pred_original_sample + pred_sample_direction

        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise, not both")
            if variance_noise is None:
                variance_noise = randn(model_output.shape, generator)
            else:
                variance_noise = np.asarray(variance_noise, dtype=F32)
            prev_sample = prev_sample + std_dev_t * variance_noise

        prev_sample = prev_sample.astype(F32, copy=False)
        pred_original_sample = pred_original_sample.astype(F32, copy=False)
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(self, original_samples, noise, timesteps):
        """Noise clean samples to `timesteps` (img2img strength, inpainting's kept region)."""
        return add_noise(self.alphas_cumprod, original_samples, noise, timesteps)
