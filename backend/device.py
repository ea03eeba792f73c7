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
