"""UniPC multistep sampler in numpy, ported operation for operation from diffusers 0.35.2
schedulers/scheduling_unipc_multistep.py (Zhao et al. 2023, UniPC, https://huggingface.co/papers/2302.04867).

Each step first corrects the sample the previous step predicted, using the new model output
(UniC), then predicts the next sample (UniP) from the clean-sample predictions x0 of the last
solver_order steps. "bh1" and "bh2" are the paper's two choices of B(h). Only the data-prediction
form (predict_x0=True, diffusers' default) is ported.
"""
from __future__ import annotations

import numpy as np

from backend.schedulers.base import F32, expm1_f32, step_output
from backend.schedulers.sigmas import (
    MultistepScheduler,
    check_choice,
    check_sigma_settings,
    check_solver_order,
    data_prediction,
    final_sigma,
)

SOLVER_TYPES = ("bh1", "bh2")
UNSUPPORTED = ("use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas", "use_dynamic_shifting")


class UniPCMultistepScheduler(MultistepScheduler):
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
        predict_x0: bool = True,  # solve for x0 (the only form ported)
        solver_type: str = "bh2",  # B(h) of the paper: "bh1" or "bh2" (bh2 for guided sampling)
        lower_order_final: bool = True,  # lower orders for the last steps
        disable_corrector: list = (),  # step indices whose sample is not corrected
        solver_p=None,  # another scheduler as predictor (not ported: must stay None)
        use_karras_sigmas: bool = False,  # Karras et al. noise levels instead of the spaced timesteps
        use_exponential_sigmas: bool = False,  # not ported (must stay False)
        use_beta_sigmas: bool = False,  # not ported
        use_flow_sigmas: bool = False,  # not ported (flow matching models)
        flow_shift: float = 1.0,  # read only with flow sigmas
        timestep_spacing: str = "linspace",  # "linspace", "leading" or "trailing"
        steps_offset: int = 0,  # added to "leading" timesteps
        final_sigmas_type: str = "zero",  # sigma after the last step: "zero" or "sigma_min"
        rescale_betas_zero_snr: bool = False,  # rescale betas to zero terminal SNR
        use_dynamic_shifting: bool = False,  # not ported
        time_shift_type: str = "exponential",  # read only with dynamic shifting
    ):
        values = dict(locals())
        values["disable_corrector"] = list(disable_corrector)
        check_sigma_settings(values, ("epsilon", "sample", "v_prediction"), UNSUPPORTED)
        check_solver_order(values)
        check_choice("solver_type", solver_type, SOLVER_TYPES)
        if predict_x0 is not True:
            raise ValueError(f"predict_x0 must be True (only the data-prediction UniPC is ported); got {predict_x0!r}")
        if solver_p is not None:
            raise ValueError("solver_p is not supported by this port; leave it None")
        if not lower_order_final and solver_order > 1 and final_sigmas_type == "zero":
            # the last step would be of order >= 2 towards sigma 0, an infinite log-SNR step: diffusers
            # 0.35.2 returns NaN there (or raises LinAlgError for order 3)
            raise ValueError("lower_order_final=False needs final_sigmas_type='sigma_min' when solver_order > 1 "
                             "(a higher-order last step to sigma 0 divides by zero)")
        self._register_config(values)
        self._init_schedule(values)
        self.last_sample = None
        self.this_order = None

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Choose the timesteps and sigmas of a `num_inference_steps` run and reset the solver's history.
        `device` is accepted for diffusers compatibility; numpy has none."""
        config = self._config
        timesteps, sigmas, train = self._spaced_schedule(num_inference_steps, config["num_train_timesteps"],
                                                          round_karras=True)
        sigma_last = final_sigma(config["final_sigmas_type"], train)
        if config["use_karras_sigmas"] and config["final_sigmas_type"] == "sigma_min":
            sigma_last = sigmas[-1]  # diffusers' UniPC ends a Karras schedule on its own last sigma (float64)
        self._set_schedule(timesteps, sigmas, sigma_last)
        self.last_sample = None

    def convert_model_output(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """The model output as the clean-sample prediction x0 at the current step."""
        return data_prediction(model_output, sample, self.sigmas[self._step_index], self._config)

    def step(self, model_output, timestep, sample, *, generator=None, return_dict: bool = True):
        """One UniPC step: correct `sample` with this model output, then predict the next sample.

        model_output, sample: (B, C, ...) float32. `generator` is accepted so pipelines can call every
        scheduler alike; UniPC is deterministic (diffusers' UniPC step has no generator argument).
        Returns prev_sample and pred_original_sample (this step's x0, for previews).
        """
        model_output, sample, index = self._step_inputs(model_output, timestep, sample)
        config = self._config
        use_corrector = index > 0 and index - 1 not in config["disable_corrector"] and self.last_sample is not None

        x0 = self.convert_model_output(model_output, sample)
        if use_corrector:
            sample = self._corrector_update(x0, self.last_sample, sample, self.this_order, index)
        self._push_model_output(x0)

        order = config["solver_order"]
        if config["lower_order_final"]:
            order = min(order, len(self.timesteps) - index)
        self.this_order = min(order, self.lower_order_nums + 1)  # warm-up for multistep
        self.last_sample = sample
        prev_sample = self._predictor_update(sample, self.this_order, index)
        if self.lower_order_nums < config["solver_order"]:
            self.lower_order_nums += 1
        self._step_index += 1

        return step_output(prev_sample, x0, return_dict)

    def _coefficients(self, h, order: int, rks: np.ndarray):
        """h * phi_1(h), B(h) and the order conditions R rho = b of the paper's Theorem 3 (float32)."""
        hh = -h  # data prediction
        h_phi_1 = expm1_f32(hh)  # e^hh - 1
        B_h = hh if self._config["solver_type"] == "bh1" else expm1_f32(hh)
        factorial_i = 1
        R, b = [], []
        # b is NaN when h = 0 (Karras with final_sigmas_type "sigma_min" ends on its own last sigma); only a
        # first-order step takes it, which does not read b
        with np.errstate(invalid="ignore", divide="ignore"):
            h_phi_k = h_phi_1 / hh - F32(1)
            for i in range(1, order + 1):
                R.append(np.prod([rks] * (i - 1), axis=0) if i > 1 else np.ones_like(rks))  # rks ** (i - 1)
                b.append(h_phi_k * F32(factorial_i) / B_h)
                factorial_i *= i + 1
                h_phi_k = h_phi_k / hh - F32(1 / factorial_i)
        return h_phi_1, B_h, np.stack(R), np.array(b, dtype=F32)

    def _differences(self, m0, lambda_s0, h, order: int, first: int):
        """rks (ratios of the earlier steps' log-SNR offsets to h, then 1) and the scaled differences D1s of
        their x0 from m0, stacked on axis 1 ((B, order - 1, C, ...), None for order 1)."""
        rks, D1s = [], []
        for i in range(1, order):
            _, _, lambda_si = self._lambda(first - i)
            rk = (lambda_si - lambda_s0) / h
            rks.append(rk)
            D1s.append((self.model_outputs[-(i + 1)] - m0) / rk)
        rks.append(F32(1))
        return np.array(rks, dtype=F32), (np.stack(D1s, axis=1) if D1s else None)

    def _predictor_update(self, x, order: int, index: int):
        """UniP-order: the next sample from x and the history of x0 predictions."""
        m0 = self.model_outputs[-1]
        alpha_t, sigma_t, lambda_t = self._lambda(index + 1)
        _, sigma_s0, lambda_s0 = self._lambda(index)
        h = lambda_t - lambda_s0
        rks, D1s = self._differences(m0, lambda_s0, h, order, index)
        h_phi_1, B_h, R, b = self._coefficients(h, order, rks)
        x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        if D1s is None:
            # diffusers subtracts alpha_t * B_h * 0, which is NaN when B_h is infinite (bh1 at sigma 0)
            return x_t
        rhos_p = np.array([0.5], dtype=F32) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).astype(F32)
        pred_res = np.einsum("k,bk...->b...", rhos_p, D1s)
        return x_t - alpha_t * B_h * pred_res

    def _corrector_update(self, model_t, last_sample, this_sample, order: int, index: int):
        """UniC-order: this step's sample corrected with its new x0 (model_t); order + 1 accurate."""
        m0 = self.model_outputs[-1]
        alpha_t, sigma_t, lambda_t = self._lambda(index)
        _, sigma_s0, lambda_s0 = self._lambda(index - 1)
        h = lambda_t - lambda_s0
        rks, D1s = self._differences(m0, lambda_s0, h, order, index - 1)
        h_phi_1, B_h, R, b = self._coefficients(h, order, rks)
        rhos_c = np.array([0.5], dtype=F32) if order == 1 else np.linalg.solve(R, b).astype(F32)
        x_t = sigma_t / sigma_s0 * last_sample - alpha_t * h_phi_1 * m0
        D1_t = model_t - m0
        if D1s is None:
            return x_t - alpha_t * B_h * (rhos_c[-1] * D1_t)
        corr_res = np.einsum("k,bk...->b...", rhos_c[:-1], D1s)
        return x_t - alpha_t * B_h * (corr_res + rhos_c[-1] * D1_t)
