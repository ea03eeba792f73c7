"""Shared pieces of the numpy schedulers: beta schedules, timestep spacings, thresholding,
add_noise, config handling and the step output.

Ported from diffusers 0.35.2 (schedulers/scheduling_ddpm.py, scheduling_ddim.py,
scheduling_unclip.py). diffusers computes its schedule with torch float32 tensors; the
helpers below reproduce those float32 roundings (noted where torch does something other
than the obvious float32 operation), so alphas_cumprod equals diffusers' bit for bit.

numpy 1.x promotes np.float32 scalar (op) python float to float64, torch keeps float32:
every scalar here is therefore an np.float32 and constants are written `F32(...)`.
"""
from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass

import numpy as np

F32 = np.float32

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass
class SchedulerOutput:
    """What `step` returns (diffusers' DDPMSchedulerOutput / DDIMSchedulerOutput / UnCLIPSchedulerOutput)."""

    prev_sample: np.ndarray  # x_{t-1}, float32, shape of `sample`
    pred_original_sample: np.ndarray  # predicted clean sample x0, float32, shape of `sample` (for previews)

    def to_tuple(self):
        return (self.prev_sample, self.pred_original_sample)

    def __getitem__(self, index):
        # diffusers outputs also index like a tuple: `scheduler.step(...)[0]`
        return self.to_tuple()[index]


def step_output(prev_sample, pred_original_sample, return_dict: bool = True):
    """What `step` returns: float32 arrays as a SchedulerOutput, or a tuple (diffusers' return_dict=False)."""
    prev_sample = prev_sample.astype(F32, copy=False)
    pred_original_sample = pred_original_sample.astype(F32, copy=False)
    if not return_dict:
        return (prev_sample, pred_original_sample)
    return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


# ----------------------------------------------------------------------------- beta schedules


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=torch.float32) on CPU, bit for bit.

    torch computes the step in float32, then fills the first half as start + step * i and the
    second half as end - step * (steps - 1 - i), each rounded once (a fused multiply-add); an
    exact float64 product plus one float64 add rounded to float32 gives the same bits
    (checked against torch 2.13 for the published schedules and 300 random ones).
    """
    start32, end32 = F32(start), F32(end)
    step = F32((end32 - start32) / F32(steps - 1)) if steps > 1 else F32(0)
    index = np.arange(steps)
    head = np.float64(start32) + np.float64(step) * index
    tail = np.float64(end32) - np.float64(step) * (steps - 1 - index)
    return np.where(index < steps // 2, head, tail).astype(F32)


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """The "squaredcos_cap_v2" (cosine) schedule of Nichol & Dhariwal 2021, in Python floats as diffusers."""

    def alpha_bar_fn(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar_fn(t2) / alpha_bar_fn(t1), max_beta))
    return np.array(betas, dtype=F32)


def torch_cumprod_f32(values: np.ndarray) -> np.ndarray:
    """torch.cumprod of a float32 CPU tensor: it accumulates in double and rounds each output."""
    return np.cumprod(values.astype(np.float64)).astype(F32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas to zero terminal SNR (https://huggingface.co/papers/2305.08891, Algorithm 1), float32."""
    alphas = F32(1.0) - betas
    alphas_cumprod = torch_cumprod_f32(alphas)
    alphas_bar_sqrt = np.sqrt(alphas_cumprod)
    first = alphas_bar_sqrt[0].copy()
    last = alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = alphas_bar_sqrt - last
    alphas_bar_sqrt = alphas_bar_sqrt * (first / (first - last))
    alphas_bar = alphas_bar_sqrt * alphas_bar_sqrt  # torch's x ** 2 is x * x
    alphas = np.concatenate([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (F32(1) - alphas).astype(F32)


def make_betas(
    beta_schedule: str,
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    trained_betas,
    allowed_schedules=BETA_SCHEDULES,
) -> np.ndarray:
    """The (num_train_timesteps,) float32 betas as the diffusers constructors build them."""
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=F32).reshape(-1)
        if betas.shape[0] != num_train_timesteps:
            raise ValueError(
                f"trained_betas has {betas.shape[0]} values; num_train_timesteps is {num_train_timesteps}"
            )
        return betas
    if beta_schedule not in allowed_schedules:
        raise ValueError(f"beta_schedule must be one of {list(allowed_schedules)}; got {beta_schedule!r}")
    if beta_schedule == "linear":
        return torch_linspace_f32(beta_start, beta_end, num_train_timesteps)
    if beta_schedule == "scaled_linear":
        root = torch_linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps)
        return root * root
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_train_timesteps)
    # "sigmoid": torch.sigmoid is 1 / (1 + exp(-x)) in float32 (its exp may differ from ours by 1 ulp)
    x = torch_linspace_f32(-6, 6, num_train_timesteps)
    sigmoid = F32(1) / (F32(1) + np.exp(-x.astype(np.float64)).astype(F32))
    return (sigmoid * F32(beta_end - beta_start) + F32(beta_start)).astype(F32)


# ----------------------------------------------------------------------------- timesteps


def check_num_inference_steps(num_inference_steps, num_train_timesteps: int, minimum: int = 1) -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral):
        raise ValueError(f"num_inference_steps must be an integer; got {num_inference_steps!r}")
    n = int(num_inference_steps)
    if not minimum <= n <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be between {minimum} and num_train_timesteps={num_train_timesteps}; got {n}"
        )
    return n


def spaced_timesteps(spacing: str, num_inference_steps: int, num_train_timesteps: int, steps_offset: int):
    """Descending int64 timesteps for "linspace", "leading" or "trailing" spacing (diffusers' set_timesteps;
    see Table 2 of https://huggingface.co/papers/2305.08891)."""
    n = num_inference_steps
    if spacing == "linspace":
        timesteps = np.linspace(0, num_train_timesteps - 1, n).round()[::-1].copy().astype(np.int64)
    elif spacing == "leading":
        step_ratio = num_train_timesteps // n
        timesteps = (np.arange(0, n) * step_ratio).round()[::-1].copy().astype(np.int64)
        timesteps += steps_offset
    elif spacing == "trailing":
        step_ratio = num_train_timesteps / n
        timesteps = np.round(np.arange(num_train_timesteps, 0, -step_ratio)).astype(np.int64)
        timesteps -= 1
    else:
        raise ValueError(f"timestep_spacing must be one of {list(TIMESTEP_SPACINGS)}; got {spacing!r}")
    if timesteps.size and timesteps.max() >= num_train_timesteps:
        # diffusers would fail later with an IndexError (e.g. "leading", steps_offset=1, 1000 of 1000 steps)
        raise ValueError(
            f"num_inference_steps={n} with steps_offset={steps_offset} gives timestep {int(timesteps.max())}, "
            f"beyond num_train_timesteps={num_train_timesteps}; use fewer steps"
        )
    return timesteps


def as_timestep(timestep, num_train_timesteps: int, name: str = "timestep") -> int:
    """A python int from an int, a numpy integer or a 0-d/1-element array or tensor."""
    value = np.asarray(timestep)
    if value.size != 1 or not (np.issubdtype(value.dtype, np.integer) or float(value.reshape(-1)[0]).is_integer()):
        raise ValueError(f"{name} must be one integer timestep; got {timestep!r}")
    t = int(value.reshape(-1)[0])
    if not 0 <= t < num_train_timesteps:
        raise ValueError(f"{name} must be in [0, {num_train_timesteps - 1}]; got {t}")
    return t


# ----------------------------------------------------------------------------- sample ops


def as_f32(name: str, array) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim < 2:
        raise ValueError(f"{name} must have a batch and a channel axis; got shape {array.shape}")
    return array.astype(F32, copy=False)


def torch_quantile_f32(values: np.ndarray, q: float) -> np.ndarray:
    """torch.quantile(values, q, dim=1) (linear interpolation) for a float32 (B, N) array.

    torch forms the rank as float32 q * (N - 1) and interpolates with lerp, which its CPU
    kernel evaluates as one fused multiply-add (float64 here, then rounded once).
    """
    sorted_values = np.sort(values, axis=1)
    rank = F32(q) * F32(values.shape[1] - 1)
    below = int(np.floor(rank))
    above = int(np.ceil(rank))
    weight = np.float64(F32(rank - F32(below)))
    low = sorted_values[:, below].astype(np.float64)
    high = sorted_values[:, above]
    diff = (high - sorted_values[:, below]).astype(np.float64)  # float32 subtraction, as torch
    if weight < 0.5:
        result = low + weight * diff
    else:
        result = high.astype(np.float64) - diff * np.float64(F32(F32(1) - F32(weight)))
    return result.astype(F32)


def threshold_sample(sample: np.ndarray, ratio: float, max_value) -> np.ndarray:
    """Dynamic thresholding (Imagen, https://huggingface.co/papers/2205.11487): per batch item, s = the
    `ratio` quantile of |x0| clamped to [1, max_value]; x0 is clipped to [-s, s] and divided by s."""
    batch = sample.shape[0]
    flat = sample.reshape(batch, -1)  # (B, C * H * W)
    s = torch_quantile_f32(np.abs(flat), ratio)  # (B,)
    s = np.maximum(s, F32(1))
    if max_value is not None:
        s = np.minimum(s, F32(max_value))
    s = s[:, None]  # (B, 1)
    flat = np.minimum(np.maximum(flat, -s), s) / s
    return flat.reshape(sample.shape).astype(F32, copy=False)


def clip_or_threshold(pred_original_sample: np.ndarray, config: dict) -> np.ndarray:
    """Thresholding wins over clip_sample, as in diffusers."""
    if config.get("thresholding"):
        return threshold_sample(pred_original_sample, config["dynamic_thresholding_ratio"], config["sample_max_value"])
    if config["clip_sample"]:
        limit = F32(config["clip_sample_range"])
        return np.clip(pred_original_sample, -limit, limit)
    return pred_original_sample


def add_noise(alphas_cumprod: np.ndarray, original_samples, noise, timesteps) -> np.ndarray:
    """q(x_t | x_0) = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * noise, one timestep per batch item
    (or one for all), computed in the samples' dtype as diffusers does. Samples and noise broadcast
    against each other as in diffusers (the 2.2 inpainting pipeline noises its one image with the
    noise of every image of the batch)."""
    original_samples = np.asarray(original_samples)
    noise = np.asarray(noise, dtype=original_samples.dtype)
    try:
        np.broadcast_shapes(noise.shape, original_samples.shape)
    except ValueError:
        raise ValueError(f"noise shape {noise.shape} does not broadcast with original_samples shape "
                         f"{original_samples.shape}") from None
    timesteps = np.asarray(timesteps).reshape(-1)
    if not np.issubdtype(timesteps.dtype, np.integer):
        raise ValueError(f"timesteps must be integers; got dtype {timesteps.dtype}")
    if timesteps.size and (timesteps.min() < 0 or timesteps.max() >= alphas_cumprod.shape[0]):
        raise ValueError(f"timesteps must be in [0, {alphas_cumprod.shape[0] - 1}]; got {timesteps.tolist()}")
    alphas = alphas_cumprod.astype(original_samples.dtype)[timesteps]
    one = np.ones((), original_samples.dtype)
    extra_axes = (1,) * (original_samples.ndim - 1)
    sqrt_alpha_prod = np.sqrt(alphas).reshape(-1, *extra_axes)
    sqrt_one_minus_alpha_prod = np.sqrt(one - alphas).reshape(-1, *extra_axes)
    return sqrt_alpha_prod * original_samples + sqrt_one_minus_alpha_prod * noise


def log_f32(x):
    """float32 log as torch's CPU kernels give it (correctly rounded in almost all cases)."""
    return np.log(np.asarray(x, dtype=np.float64)).astype(F32)


def exp_f32(x):
    """float32 exp as torch's CPU kernels give it (correctly rounded in almost all cases)."""
    return np.exp(np.asarray(x, dtype=np.float64)).astype(F32)


def expm1_f32(x):
    """float32 exp(x) - 1 (torch.expm1), correctly rounded in almost all cases."""
    return np.expm1(np.asarray(x, dtype=np.float64)).astype(F32)


# ----------------------------------------------------------------------------- config


class ConfigMixin:
    """`from_config(dict)` and `.config` for schedulers whose config is their constructor's arguments."""

    order = 1  # model evaluations per step (diffusers' `scheduler.order`)

    @classmethod
    def config_keys(cls):
        return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]

    @classmethod
    def from_config(cls, config: dict | None = None, **overrides):
        """Build from a published scheduler.json dict. Keys starting with "_" and keys this scheduler does
        not use are ignored (as diffusers does, e.g. DDIMScheduler.from_config(ddpm_config)); `overrides`
        replace config values (`DDIMScheduler.from_config(config, timestep_spacing="trailing")`)."""
        merged = dict(config or {})
        merged.update(overrides)
        keys = set(cls.config_keys())
        scheduler = cls(**{key: value for key, value in merged.items() if key in keys and not key.startswith("_")})
        # Like diffusers, keep the keys this class does not use in `.config`: a DDPM config carried
        # into DDIM and back keeps e.g. `set_alpha_to_one` and `variance_type`.
        scheduler._unused_config = {key: value for key, value in merged.items()
                                    if key not in keys and not key.startswith("_")}
        return scheduler

    def _register_config(self, values: dict):
        self._config = {key: values[key] for key in self.config_keys()}
        self._unused_config = {}

    @property
    def config(self) -> dict:
        """The effective settings (defaults filled in) plus unused keys it was built from, as a fresh dict."""
        return {**self._unused_config, **self._config}

    def __len__(self):
        return self._config["num_train_timesteps"]

    def __repr__(self):
        settings = ", ".join(f"{key}={value!r}" for key, value in self._config.items())
        return f"{type(self).__name__}({settings})"


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}; got {value!r}")


def is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def check_schedule_settings(values: dict, prediction_types=PREDICTION_TYPES) -> None:
    """Checks of the settings every scheduler here shares: training steps, prediction type, timestep spacing,
    steps_offset and (where the scheduler has it) dynamic thresholding."""
    n = values["num_train_timesteps"]
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"num_train_timesteps must be a positive integer; got {n!r}")
    check_choice("prediction_type", values["prediction_type"], prediction_types)
    check_choice("timestep_spacing", values["timestep_spacing"], TIMESTEP_SPACINGS)
    if values.get("thresholding"):
        ratio = values["dynamic_thresholding_ratio"]
        if not (is_number(ratio) and 0 < ratio <= 1):
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1]; got {ratio!r}")
        max_value = values["sample_max_value"]
        if max_value is not None and not (is_number(max_value) and max_value >= 1):
            raise ValueError(f"sample_max_value must be >= 1 or None; got {max_value!r}")
    offset = values["steps_offset"]
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or offset < 0:
        raise ValueError(f"steps_offset must be a non-negative integer; got {offset!r}")


def check_common(values: dict) -> None:
    """Checks of the settings DDPM and DDIM share."""
    check_schedule_settings(values)
    clip_range = values["clip_sample_range"]
    if values["clip_sample"] and not values["thresholding"] and not (is_number(clip_range) and clip_range > 0):
        raise ValueError(f"clip_sample_range must be > 0; got {clip_range!r}")
