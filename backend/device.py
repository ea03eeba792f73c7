"""Device selection: CPU, NVIDIA GPU or Ascend, whichever MindSpore can use.

Nothing is probed at import time; `select_device` is called once by app.py or by the
first pipeline that is built.
"""
from __future__ import annotations

import mindspore as ms

_SELECTED: str | None = None
_TARGETS = {"cpu": "CPU", "gpu": "GPU", "ascend": "Ascend"}


def select_device(name: str = "auto") -> str:
    """Set MindSpore's device target. `name` is cpu | gpu | ascend | auto; returns the target."""
    global _SELECTED
    name = (name or "auto").lower()
    if name not in ("auto", *_TARGETS):
        raise ValueError(f"device must be one of auto, cpu, gpu, ascend; got {name!r}")
    if name == "auto":
        candidates = ["Ascend", "GPU", "CPU"]
    else:
        candidates = [_TARGETS[name]]
    last_error = None
    for target in candidates:
        try:
            ms.set_context(mode=ms.PYNATIVE_MODE, device_target=target)
            if target != "CPU":
                # Fails fast when the backend plugin or the device is missing.
                ms.ops.ones((1,), ms.float32).asnumpy()
            _SELECTED = target
            return target
        except Exception as error:  # the next candidate is tried; the last error is reported
            last_error = error
    raise RuntimeError(f"device {name!r} is not available to MindSpore: {last_error}")


def device_target() -> str:
    if _SELECTED is None:
        return ms.get_context("device_target")
    return _SELECTED


def on_cpu() -> bool:
    return device_target() == "CPU"


DTYPES = ("auto", "float32", "float16", "bfloat16")
def resolve_dtype(name: str, target: str) -> tuple[str, str]:
    """The compute dtype for `name` (auto | float32 | float16 | bfloat16) on device `target`, and a
    sentence for people saying what it means there.

    auto: bfloat16 on a CPU with native bfloat16 products (its products run at about twice the
    float32 rate, backend/nn/host.py), float16 on GPU and Ascend (as the Kandinsky docs load every
    pipeline), float32 otherwise.
    """
    from backend.nn.host import cpu_bf16_flags  # backend.nn imports this module

    name = (name or "auto").lower()
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {name!r}")
    flags = cpu_bf16_flags() if target == "CPU" else []
    if name == "auto":
        name = ("bfloat16" if flags else "float32") if target == "CPU" else "float16"
    if target != "CPU":
        return name, f"{name} on {target}"
    if name == "bfloat16":
        if flags:
            return name, f"bfloat16 weights and products, float32 accumulation (native: {', '.join(flags)})"
        return name, ("bfloat16 emulated: this CPU has no native bfloat16 products (avx512_bf16 or AMX), so "
                      "every product converts its weights to float32 and runs slower than float32; only the "
                      "memory is halved")
    if name == "float16":
        return name, "float16 weights, float32 products (the CPU has no float16 products)"
    return name, "float32"
