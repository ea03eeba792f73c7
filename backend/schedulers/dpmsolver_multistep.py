"""DPM-Solver++ multistep sampler in numpy, ported operation for operation from diffusers 0.35.2
schedulers/scheduling_dpmsolver_multistep.py (Lu et al. 2022, DPM-Solver++,
https://huggingface.co/papers/2211.01095; the SDE variant from the same code base).

"DPM++ 2M" is algorithm_type "dpmsolver++", solver_order 2; "Karras" adds use_karras_sigmas=True;
"DPM++ 2M SDE" is algorithm_type "sde-dpmsolver++" (it draws noise at every step).
Each step solves for the model's clean-sample prediction x0 and combines it with the previous
steps' (multistep): the first step and, with lower_order_final, the last ones use lower orders.
"""
from __future__ import annotations

import numbers

import numpy as np

from backend.random import randn
from backend.schedulers.base import F32, exp_f32, step_output
from backend.schedulers.sigmas import (
    MultistepScheduler,
    check_choice,
    check_sigma_settings,
    check_solver_order,
    data_prediction,
    final_sigma,
)

# diffusers' deprecated "dpmsolver" / "sde-dpmsolver" (and "deis", which it maps to "dpmsolver++") are not ported
ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")
UNSUPPORTED = ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting")


class DPMSolverMultistepScheduler(MultistepScheduler):
    def __init__(
        self,
        num_train_timesteps: int = 1000,  # diffusion steps the model was trained with
        beta_start: float = 0.0001,  # first beta of "linear" / "scaled_linear"
        beta_end: float = 0.02,  # last beta of those schedules
        beta_schedule: str = "linear",  # "linear", "scaled_linear" or "squaredcos_cap_v2" (cosine)
        trained_betas=None,  # explicit betas (num_train_timesteps values), overrides the schedule
        solver_order: int = 2,  # 1, 2 or 3 model outputs combined per step (2 for guided sampling)
        prediction_type: str = "epsilon",  # what the model predicts: "epsilon", "sample" or "v_prediction"
        thresholding: bool = False,  # Imagen dynamic thresholding of x0
        dynamic_thresholding_ratio: float = 0.995,  # quantile of |x0| used by thresholding
        sample_max_value: float = 1.0,  # upper bound of the thresholding quantile (None: unbounded)
        algorithm_type: str = "dpmsolver++",  # "dpmsolver++" (ODE) or "sde-dpmsolver++" (noise at every step)
        solver_type: str = "midpoint",  # second-order formula: "midpoint" or "heun"
        lower_order_final: bool = True,  # lower orders for the last steps when fewer than 15 steps
        euler_at_final: bool = False,  # first order (Euler) for the very last step
        use_karras_sigmas: bool = False,  # Karras et al. noise levels instead of the spaced timesteps
        use_exponential_sigmas: bool = False,  # not ported (must stay False)
        use_beta_sigmas: bool = False,  # not ported
        use_lu_lambdas: bool = False,  # not ported
        use_flow_sigmas: bool = False,  # not ported (flow matching models)
        flow_shift: float = 1.0,  # read only with flow sigmas
        final_sigmas_type: str = "zero",  # sigma after the last step: "zero" or "sigma_min"
        lambda_min_clipped: float = -float("inf"),  # drop the timesteps whose log-SNR is below this
        variance_type: str | None = None,  # "learned" / "learned_range": the model appends its variance channels
        timestep_spacing: str = "linspace",  # "linspace", "leading" or "trailing"
        steps_offset: int = 0,  # added to "leading" timesteps
        rescale_betas_zero_snr: bool = False,  # rescale betas to zero terminal SNR
        use_dynamic_shifting: bool = False,  # not ported
        time_shift_type: str = "exponential",  # read only with dynamic shifting
    ):
        values = dict(locals())
        check_sigma_settings(values, ("epsilon", "sample", "v_prediction"), UNSUPPORTED)
        check_solver_order(values)
        check_choice("algorithm_type", algorithm_type, ALGORITHM_TYPES)
        check_choice("solver_type", solver_type, SOLVER_TYPES)
        if not isinstance(lambda_min_clipped, numbers.Real) or isinstance(lambda_min_clipped, bool):
            raise ValueError(f"lambda_min_clipped must be a number; got {lambda_min_clipped!r}")
        if variance_type is not None and not isinstance(variance_type, str):
            raise ValueError(f"variance_type must be a string or None; got {variance_type!r}")
        self._register_config(values)
        self._init_schedule(values)

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Choose the timesteps and sigmas of a `num_inference_steps` run and reset the solver's history.
        `device` is accepted for diffusers compatibility; numpy has none."""
        config = self._config
        T = config["num_train_timesteps"]
        # the timesteps whose log-SNR is below lambda_min_clipped are left out (it matters for cosine schedules)
        clipped_idx = int(np.searchsorted(self.lambda_t[::-1], F32(config["lambda_min_clipped"]), side="left"))
        # diffusers does not round the Karras timesteps of the cosine schedule (they truncate to int64)
        timesteps, sigmas, train = self._spaced_schedule(num_inference_steps, T - clipped_idx,
                                                          round_karras=config["beta_schedule"] != "squaredcos_cap_v2")
        self._set_schedule(timesteps, sigmas, final_sigma(config["final_sigmas_type"], train))

    def convert_model_output(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """The model output as the clean-sample prediction x0 at the current step (DPM-Solver++ solves for it)."""
        return data_prediction(model_output, sample, self.sigmas[self._step_index], self._config)

    def _model_mean(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """Drop the variance channels a learned-variance model appends (diffusers keeps the first 3, which fits
        only 3-channel samples; Kandinsky 2.1's latents have 4, so the split is at the sample's channels)."""
        channels = sample.shape[1]
        learned = self._config["variance_type"] in ("learned", "learned_range")
        if learned and self._config["prediction_type"] == "epsilon" and model_output.shape[1] == 2 * channels:
            model_output = model_output[:, :channels]
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {model_output.shape} does not fit sample shape {sample.shape} "
                             f"(variance_type={self._config['variance_type']!r})")
        return model_output

    def step(
        self,
        model_output,
        timestep,
        sample,
        *,
        generator: np.random.Generator | None = None,
        variance_noise=None,
        return_dict: bool = True,
    ):
        """One solver step from timestep to the next one in `timesteps`.

        model_output: (B, C, ...) float32 (or (B, 2C, ...) with learned variance). Draws noise of the
        sample's shape with `generator` at every step for "sde-dpmsolver++" (or takes `variance_noise`).
        Returns prev_sample and pred_original_sample (the x0 this step solved with, for previews).
        """
        model_output, sample, index = self._step_inputs(model_output, timestep, sample)
        config = self._config
        count = len(self.timesteps)
        # lower orders at the end stabilise runs of few steps; a zero final sigma needs a first-order last step
        lower_order_final = index == count - 1 and (
            config["euler_at_final"] or (config["lower_order_final"] and count < 15)
            or config["final_sigmas_type"] == "zero"
        )
        lower_order_second = index == count - 2 and config["lower_order_final"] and count < 15

        x0 = self.convert_model_output(model_output, sample)
        self._push_model_output(x0)

        noise = None
        if config["algorithm_type"] == "sde-dpmsolver++":
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise, not both")
            noise = randn(x0.shape, generator) if variance_noise is None else np.asarray(variance_noise, dtype=F32)

        order = config["solver_order"]
        if order == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev_sample = self._first_order_update(x0, sample, noise, index)
        elif order == 2 or self.lower_order_nums < 2 or lower_order_second:
            prev_sample = self._second_order_update(sample, noise, index)
        else:
            prev_sample = self._third_order_update(sample, noise, index)
        if self.lower_order_nums < order:
            self.lower_order_nums += 1
        self._step_index += 1

        return step_output(prev_sample, x0, return_dict)

    def _first_order_update(self, x0, sample, noise, index):
        """DPM-Solver++(1), i.e. DDIM in log-SNR time (its SDE form adds fresh noise)."""
        alpha_t, sigma_t, lambda_t = self._lambda(index + 1)
        _, sigma_s, lambda_s = self._lambda(index)
        h = lambda_t - lambda_s
        if noise is None:
            return (sigma_t / sigma_s) * sample - (alpha_t * (exp_f32(-h) - F32(1))) * x0
        return ((sigma_t / sigma_s * exp_f32(-h)) * sample
                + (alpha_t * (F32(1) - exp_f32(F32(-2) * h))) * x0
                + sigma_t * np.sqrt(F32(1) - exp_f32(F32(-2) * h)) * noise)

    def _second_order_update(self, sample, noise, index):
        """DPM-Solver++(2M): x0 of this and the previous step, eq. (5)-(6) of the paper."""
        alpha_t, sigma_t, lambda_t = self._lambda(index + 1)
        _, sigma_s0, lambda_s0 = self._lambda(index)
        _, _, lambda_s1 = self._lambda(index - 1)
        m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        D0, D1 = m0, (F32(1) / r0) * (m0 - m1)
        midpoint = self._config["solver_type"] == "midpoint"
        if noise is None:
            x_t = (sigma_t / sigma_s0) * sample - (alpha_t * (exp_f32(-h) - F32(1))) * D0
            if midpoint:
                return x_t - F32(0.5) * (alpha_t * (exp_f32(-h) - F32(1))) * D1
            return x_t + (alpha_t * ((exp_f32(-h) - F32(1)) / h + F32(1))) * D1
        decay = F32(1) - exp_f32(F32(-2) * h)
        x_t = (sigma_t / sigma_s0 * exp_f32(-h)) * sample + (alpha_t * decay) * D0
        if midpoint:
            x_t = x_t + F32(0.5) * (alpha_t * decay) * D1
        else:
            x_t = x_t + (alpha_t * (decay / (F32(-2) * h) + F32(1))) * D1
        return x_t + sigma_t * np.sqrt(decay) * noise

    def _third_order_update(self, sample, noise, index):
        """DPM-Solver++(3M): x0 of this and the two previous steps."""
        alpha_t, sigma_t, lambda_t = self._lambda(index + 1)
        _, sigma_s0, lambda_s0 = self._lambda(index)
        _, _, lambda_s1 = self._lambda(index - 1)
        _, _, lambda_s2 = self._lambda(index - 2)
        m0, m1, m2 = self.model_outputs[-1], self.model_outputs[-2], self.model_outputs[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        D0 = m0
        D1_0, D1_1 = (F32(1) / r0) * (m0 - m1), (F32(1) / r1) * (m1 - m2)
        D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
        D2 = (F32(1) / (r0 + r1)) * (D1_0 - D1_1)
        if noise is None:
            return ((sigma_t / sigma_s0) * sample
                    - (alpha_t * (exp_f32(-h) - F32(1))) * D0
                    + (alpha_t * ((exp_f32(-h) - F32(1)) / h + F32(1))) * D1
                    - (alpha_t * ((exp_f32(-h) - F32(1) + h) / (h * h) - F32(0.5))) * D2)
        decay = F32(1) - exp_f32(F32(-2) * h)
        two_h = F32(2) * h
        return ((sigma_t / sigma_s0 * exp_f32(-h)) * sample
                + (alpha_t * decay) * D0
                + (alpha_t * (decay / (F32(-2) * h) + F32(1))) * D1
                + (alpha_t * ((decay - two_h) / (two_h * two_h) - F32(0.5))) * D2
                + sigma_t * np.sqrt(decay) * noise)
