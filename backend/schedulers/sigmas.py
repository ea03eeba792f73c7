"""Shared pieces of the schedulers that walk a sigma schedule: DPM-Solver++ and UniPC (multistep,
variance preserving: x_t = alpha_t x0 + sigma_t eps) and Euler / Euler ancestral (k-diffusion's
variance exploding form: x = x0 + sigma eps, model input divided by sqrt(sigma^2 + 1)).

Ported from diffusers 0.35.2 (scheduling_dpmsolver_multistep.py, scheduling_unipc_multistep.py,
scheduling_euler_discrete.py, scheduling_euler_ancestral_discrete.py), which share these pieces by
copying them. Where diffusers computes in numpy float64 (the schedule: np.interp, the Karras ramp,
_sigma_to_t) this does too, with explicit dtypes so numpy 1 and 2 agree (numpy 1 would compute
`np.float64 scalar - float32 array` in float32); the per-step arithmetic is torch float32 on 0-d
tensors in diffusers and np.float32 scalars here (see base.py).

The step counter follows diffusers: the first `step` (or Euler's `scale_model_input`) finds its
index from the timestep, or starts at `begin_index` when the pipeline set one (image-to-image:
`set_begin_index(t_start * order)`), then counts up; `add_noise` reads the same index.
"""
from __future__ import annotations

import numbers

import numpy as np

from backend.schedulers.base import (
    F32,
    ConfigMixin,
    TIMESTEP_SPACINGS,
    as_f32,
    check_choice,
    check_num_inference_steps,
    check_schedule_settings,
    log_f32,
    make_betas,
    rescale_zero_terminal_snr,
    spaced_timesteps,
    threshold_sample,
    torch_cumprod_f32,
)

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # diffusers' four have no "sigmoid"
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


# ----------------------------------------------------------------------------- settings


def check_sigma_settings(values: dict, prediction_types, unsupported=()) -> None:
    """The shared settings checks plus the diffusers options this port leaves out (each must keep its default)."""
    check_schedule_settings(values, prediction_types)
    check_choice("beta_schedule", values["beta_schedule"], BETA_SCHEDULES)
    if "final_sigmas_type" in values:
        check_choice("final_sigmas_type", values["final_sigmas_type"], FINAL_SIGMAS_TYPES)
    for name in unsupported:
        if values[name]:
            raise ValueError(f"{name}=True is not supported by this port (a diffusers option not ported); "
                             f"got {values[name]!r}")


def check_solver_order(values: dict) -> None:
    order = values["solver_order"]
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"solver_order must be 1, 2 or 3; got {order!r}")


def make_alphas_cumprod(values: dict):
    """betas, alphas and alphas_cumprod (float32, (T,)) as the four diffusers constructors build them."""
    betas = make_betas(values["beta_schedule"], values["num_train_timesteps"], values["beta_start"],
                       values["beta_end"], values["trained_betas"], BETA_SCHEDULES)
    if values["rescale_betas_zero_snr"]:
        betas = rescale_zero_terminal_snr(betas)
    alphas = F32(1.0) - betas
    alphas_cumprod = torch_cumprod_f32(alphas)
    if values["rescale_betas_zero_snr"]:
        alphas_cumprod[-1] = F32(2**-24)  # diffusers: close to 0 so the first sigma is finite
    return betas, alphas, alphas_cumprod


# ----------------------------------------------------------------------------- sigma schedules


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for every training timestep, float32 as torch."""
    return np.sqrt((F32(1) - alphas_cumprod) / alphas_cumprod)


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int) -> np.ndarray:
    """The noise levels of Karras et al. 2022 (https://huggingface.co/papers/2206.00364, eq. 5, rho = 7),
    descending from sigma_max to sigma_min, float64."""
    rho = 7.0
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep of each sigma: linear interpolation in log sigma between the two
    training sigmas around it (diffusers' _sigma_to_t, one sigma at a time there), float64.

    log_sigmas: (T,) float32, ascending."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))  # (N,)
    dists = log_sigma[None, :] - log_sigmas.astype(np.float64)[:, None]  # (T, N)
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigmas[low_idx]  # float32
    high = log_sigmas[high_idx]
    w = (low.astype(np.float64) - log_sigma) / (low - high).astype(np.float64)  # low - high in float32, as diffusers
    w = np.clip(w, 0, 1)
    return (1 - w) * low_idx + w * high_idx


def final_sigma(final_sigmas_type: str, sigmas: np.ndarray) -> float:
    """The sigma after the last step: 0, or the smallest training sigma ("sigma_min")."""
    return 0.0 if final_sigmas_type == "zero" else sigmas[0]


def alpha_sigma_t(sigma):
    """(alpha_t, sigma_t) of the variance preserving process at noise level sigma (float32)."""
    alpha_t = F32(1) / np.sqrt(sigma * sigma + F32(1))
    return alpha_t, sigma * alpha_t


def log_snr(alpha_t, sigma_t):
    """lambda_t = log(alpha_t) - log(sigma_t) (float32); +inf at the final sigma 0."""
    with np.errstate(divide="ignore"):
        return log_f32(alpha_t) - log_f32(sigma_t)


def data_prediction(model_output: np.ndarray, sample: np.ndarray, sigma, config: dict) -> np.ndarray:
    """The model's prediction of the clean sample x0 at noise level sigma (DPM-Solver++ and UniPC solve for it),
    thresholded when the config asks."""
    prediction_type = config["prediction_type"]
    alpha_t, sigma_t = alpha_sigma_t(sigma)
    if prediction_type == "epsilon":
        x0 = (sample - sigma_t * model_output) / alpha_t
    elif prediction_type == "sample":
        x0 = model_output
    else:  # "v_prediction"
        x0 = alpha_t * sample - sigma_t * model_output
    if config["thresholding"]:
        x0 = threshold_sample(x0, config["dynamic_thresholding_ratio"], config["sample_max_value"])
    return x0


def multistep_timesteps(spacing: str, num_inference_steps: int, last_timestep: int, num_train_timesteps: int,
                        steps_offset: int) -> np.ndarray:
    """Descending int64 timesteps of DPM-Solver++ and UniPC: num_inference_steps + 1 points of which the last
    (0) is dropped, so the final step lands on the sigma after them."""
    n = num_inference_steps
    if spacing == "linspace":
        timesteps = np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif spacing == "leading":
        step_ratio = last_timestep // (n + 1)
        timesteps = (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64)
        timesteps += steps_offset
    elif spacing == "trailing":
        step_ratio = num_train_timesteps / n
        timesteps = np.arange(last_timestep, 0, -step_ratio).round().copy().astype(np.int64)
        timesteps -= 1
    else:
        raise ValueError(f"timestep_spacing must be one of {list(TIMESTEP_SPACINGS)}; got {spacing!r}")
    if timesteps.max() >= num_train_timesteps or np.any(timesteps[1:] >= timesteps[:-1]):
        # diffusers would divide by a zero step (NaN) or index past the schedule
        raise ValueError(
            f"num_inference_steps={n} with timestep_spacing={spacing!r} and steps_offset={steps_offset} gives "
            f"repeated or out-of-range timesteps ({timesteps[:3].tolist()}...); use fewer steps"
        )
    return timesteps


def discrete_timesteps(spacing: str, num_inference_steps: int, num_train_timesteps: int,
                       steps_offset: int) -> np.ndarray:
    """Descending float32 timesteps of the Euler schedulers ("linspace" is not rounded there)."""
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_inference_steps, dtype=np.float32)[::-1].copy()
    return spaced_timesteps(spacing, num_inference_steps, num_train_timesteps, steps_offset).astype(np.float32)


# ----------------------------------------------------------------------------- step counter


def timestep_value(timestep) -> float:
    value = np.asarray(timestep)
    if value.size != 1 or not (np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.floating)):
        raise ValueError(f"timestep must be one number (one of the scheduler's timesteps); got {timestep!r}")
    return float(value.reshape(-1)[0])


class SigmaScheduler(ConfigMixin):
    """The step counter, begin index and add_noise index logic the four schedulers share."""

    def _reset_step_index(self):
        self._step_index = None
        self._begin_index = None

    @property
    def step_index(self):
        """Index of the next step in `timesteps` (None until the first step); +1 after each step."""
        return self._step_index

    @property
    def begin_index(self):
        """Index of the first step, when the pipeline set it with `set_begin_index` (else None)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Start at timesteps[begin_index] (image-to-image: t_start * order). Call after set_timesteps."""
        self._check_timesteps_set()
        count = len(self.timesteps)
        if isinstance(begin_index, bool) or not isinstance(begin_index, numbers.Integral) \
                or not 0 <= begin_index < count:
            raise ValueError(f"begin_index must be an integer in [0, {count - 1}]; got {begin_index!r}")
        self._begin_index = int(begin_index)

    def _step_inputs(self, model_output, timestep, sample):
        """(model_output, sample) as float32 and this step's index, checked."""
        sample = as_f32("sample", sample)
        model_output = self._model_mean(as_f32("model_output", model_output), sample)
        return model_output, sample, self._current_index(timestep)

    def _model_mean(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """The model output the step uses (DPM-Solver++ drops learned variance channels here)."""
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {model_output.shape} must equal sample shape {sample.shape}")
        return model_output

    def _check_timesteps_set(self):
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) first")

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """Position of `timestep` in the schedule. A repeated timestep gives its second position, as in
        diffusers (so image-to-image starting inside a run of equal timesteps does not skip a sigma), except
        the schedule's own first timestep, which gives 0: diffusers' rule there starts the counter one step
        late and the last step reads past the sigmas (IndexError with Karras sigmas on Kandinsky 3's cosine
        schedule, whose first nine timesteps of 20 are all 998)."""
        schedule = self.timesteps if schedule_timesteps is None else np.asarray(schedule_timesteps)
        value = timestep_value(timestep)
        positions = np.nonzero(schedule == value)[0]
        if positions.size == 0:
            raise ValueError(f"timestep {value:g} is not one of the scheduler's timesteps")
        if positions.size > 1 and positions[0] != 0:
            return int(positions[1])
        return int(positions[0])

    def _init_step_index(self, timestep):
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    def _current_index(self, timestep) -> int:
        """The step index for this call (set on the first call), checked against `timestep`."""
        self._check_timesteps_set()
        if self._step_index is None:
            self._init_step_index(timestep)
        index = self._step_index
        if index >= len(self.timesteps):
            raise ValueError(f"all {len(self.timesteps)} steps are done; call set_timesteps again for a new run")
        expected = self.timesteps[index]
        if timestep_value(timestep) != expected:
            raise ValueError(f"timestep {timestep_value(timestep):g} is not the scheduler's next timestep "
                             f"{float(expected):g} (step index {index})")
        return index

    def _noise_sigmas(self, timesteps, sample_ndim: int) -> np.ndarray:
        """The sigma add_noise uses for each batch item, shaped (B, 1, ...) to broadcast: found from the
        timestep, or the current step (inpainting, after the first step) or the begin index (image-to-image,
        before it) when the pipeline set a begin index."""
        self._check_timesteps_set()
        timesteps = np.asarray(timesteps).reshape(-1)
        if self._begin_index is None:
            indices = [self.index_for_timestep(t) for t in timesteps]
        elif self._step_index is not None:
            indices = [self._step_index] * timesteps.shape[0]
        else:
            indices = [self._begin_index] * timesteps.shape[0]
        return self.sigmas[indices].reshape(-1, *(1,) * (sample_ndim - 1))

    @staticmethod
    def _noise_inputs(original_samples, noise):
        original_samples = as_f32("original_samples", original_samples)
        noise = np.asarray(noise, dtype=F32)
        try:
            np.broadcast_shapes(noise.shape, original_samples.shape)
        except ValueError:
            raise ValueError(f"noise shape {noise.shape} does not broadcast with original_samples shape "
                             f"{original_samples.shape}") from None
        return original_samples, noise


class MultistepScheduler(SigmaScheduler):
    """What DPM-Solver++ and UniPC share: the variance preserving schedule, the model output history, an
    identity input scaling and add_noise = alpha_t x0 + sigma_t noise."""

    def _init_schedule(self, values: dict):
        self.betas, self.alphas, self.alphas_cumprod = make_alphas_cumprod(values)
        self.alpha_t = np.sqrt(self.alphas_cumprod)
        self.sigma_t = np.sqrt(F32(1) - self.alphas_cumprod)
        self.lambda_t = log_snr(self.alpha_t, self.sigma_t)
        self.sigmas = train_sigmas(self.alphas_cumprod)  # ascending in t until set_timesteps
        self.init_noise_sigma = 1.0
        T = values["num_train_timesteps"]
        self.num_inference_steps = None
        self.timesteps = np.linspace(0, T - 1, T, dtype=np.float32)[::-1].copy()
        self._reset_history()

    def _reset_history(self):
        self.model_outputs = [None] * self._config["solver_order"]  # converted outputs (x0) of the last steps
        self.lower_order_nums = 0  # steps done so far, up to solver_order (the warm-up uses lower orders)
        self._reset_step_index()

    def _spaced_schedule(self, num_inference_steps, last_timestep: int, round_karras: bool):
        """(timesteps, sigmas at them, training sigmas) of a run: Karras sigmas over the whole training range
        (their timesteps rounded if `round_karras`) or `timestep_spacing` up to `last_timestep` (float64)."""
        config = self._config
        T = config["num_train_timesteps"]
        n = check_num_inference_steps(num_inference_steps, T)
        train = train_sigmas(self.alphas_cumprod)
        if config["use_karras_sigmas"]:
            sigmas = karras_sigmas(float(train[0]), float(train[-1]), n)
            timesteps = sigma_to_t(sigmas, np.log(train))
            return (timesteps.round() if round_karras else timesteps), sigmas, train
        timesteps = multistep_timesteps(config["timestep_spacing"], n, last_timestep, T, config["steps_offset"])
        return timesteps, np.interp(timesteps, np.arange(0, len(train)), train), train

    def _set_schedule(self, timesteps: np.ndarray, sigmas: np.ndarray, sigma_last):
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(F32)  # (n + 1,)
        self.timesteps = timesteps.astype(np.int64)  # float timesteps truncate, as torch's .to(int64)
        self.num_inference_steps = len(timesteps)
        self._reset_history()

    def _push_model_output(self, x0: np.ndarray):
        self.model_outputs = self.model_outputs[1:] + [x0]

    def _lambda(self, index: int):
        """(alpha, sigma, lambda) at self.sigmas[index]."""
        alpha, sigma = alpha_sigma_t(self.sigmas[index])
        return alpha, sigma, log_snr(alpha, sigma)

    def scale_model_input(self, sample, timestep=None):
        """DPM-Solver++ and UniPC do not scale the model input."""
        return sample

    def add_noise(self, original_samples, noise, timesteps):
        """alpha_t x0 + sigma_t noise at the sigma of `timesteps` (or of the begin/current index, see
        SigmaScheduler._noise_sigmas): image-to-image strength, inpainting's kept region."""
        original_samples, noise = self._noise_inputs(original_samples, noise)
        alpha_t, sigma_t = alpha_sigma_t(self._noise_sigmas(timesteps, original_samples.ndim))
        return alpha_t * original_samples + sigma_t * noise


class DiscreteScheduler(SigmaScheduler):
    """What Euler and Euler ancestral share: sigmas of the variance exploding form x = x0 + sigma noise,
    the model input divided by sqrt(sigma^2 + 1), float32 timesteps."""

    def _init_schedule(self, values: dict):
        self.betas, self.alphas, self.alphas_cumprod = make_alphas_cumprod(values)
        T = values["num_train_timesteps"]
        self.sigmas = np.concatenate([train_sigmas(self.alphas_cumprod)[::-1], [F32(0)]]).astype(F32)
        self.num_inference_steps = None
        self.timesteps = np.linspace(0, T - 1, T, dtype=np.float64)[::-1].astype(np.float32)
        self._scaled_index = None
        self._reset_step_index()

    def _spaced_schedule(self, num_inference_steps: int):
        """(float32 timesteps, float64 sigmas at them, float32 training sigmas) for `num_inference_steps`."""
        config = self._config
        n = check_num_inference_steps(num_inference_steps, config["num_train_timesteps"])
        timesteps = discrete_timesteps(config["timestep_spacing"], n, config["num_train_timesteps"],
                                       config["steps_offset"])
        sigmas = train_sigmas(self.alphas_cumprod)
        return timesteps, np.interp(timesteps, np.arange(0, len(sigmas)), sigmas), sigmas

    def _set_schedule(self, timesteps: np.ndarray, sigmas: np.ndarray, sigma_last):
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(F32)  # (n + 1,)
        self.timesteps = timesteps.astype(F32)
        self.num_inference_steps = len(timesteps)
        self._scaled_index = None
        self._reset_step_index()

    @property
    def init_noise_sigma(self):
        """Standard deviation of the initial noise: the largest sigma (sqrt(sigma^2 + 1) for "leading")."""
        max_sigma = self.sigmas.max()
        if self._config["timestep_spacing"] in ("linspace", "trailing"):
            return max_sigma
        return np.sqrt(max_sigma * max_sigma + F32(1))

    def scale_model_input(self, sample, timestep):
        """The model input x / sqrt(sigma^2 + 1) at this step; call it before `step` at every step (diffusers'
        Kandinsky pipelines do not, which is why Euler gives grey images there)."""
        index = self._current_index(timestep)
        sigma = self.sigmas[index]
        self._scaled_index = index
        return as_f32("sample", sample) / np.sqrt(sigma * sigma + F32(1))

    def _check_scaled(self, index: int):
        if self._scaled_index != index:
            raise ValueError("call scale_model_input(sample, timestep) before step() at every step: the model "
                             "must see the sample divided by sqrt(sigma^2 + 1)")

    @staticmethod
    def _v_prediction_x0(model_output, sample, sigma):
        """x0 from a v prediction at noise level sigma (k-diffusion's c_out and c_skip)."""
        return model_output * (-sigma / np.sqrt(sigma * sigma + F32(1))) + sample / (sigma * sigma + F32(1))

    def add_noise(self, original_samples, noise, timesteps):
        """x0 + sigma noise at the sigma of `timesteps` (or of the begin/current index, see
        SigmaScheduler._noise_sigmas): image-to-image strength, inpainting's kept region."""
        original_samples, noise = self._noise_inputs(original_samples, noise)
        return original_samples + noise * self._noise_sigmas(timesteps, original_samples.ndim)
