"""Memory figures for the model manager: budgets as people write them, and parameter bytes, both of
a checkpoint before it loads (read from the safetensors headers) and of a loaded model.

Parameter bytes are what dominates: the manager budgets them (docs/MEMORY.md measures the rest).
No MindSpore at import: the page formats byte counts with `format_bytes` too.
"""
from __future__ import annotations

import math
from pathlib import Path

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1}
_UNITS = {"tib": 2**40, "tb": 10**12, "gib": 2**30, "gb": 10**9, "g": 10**9, "mib": 2**20, "mb": 10**6,
          "m": 10**6, "kib": 2**10, "kb": 10**3, "k": 10**3, "b": 1}
_FORMS = "12GB, 1.5GiB, 800MB, auto or a byte count"
DEFAULT_BUDGET_SHARE = 0.7   # of the machine's RAM: weights live in host memory on CPU, pinned copies otherwise


def parse_memory(text: str | int | float | None) -> int | None:
    """"12GB", "1.5 GiB", "800MB", "auto" or a byte count -> bytes; "auto"/None -> None."""
    if text is None:
        return None
    if isinstance(text, bool):
        raise ValueError(f"memory budget must look like {_FORMS}; got {text!r}")
    if isinstance(text, (int, float)):
        if not math.isfinite(text):  # int(inf) would be an OverflowError, int(nan) a bare ValueError
            raise ValueError(f"memory budget must be a finite size like {_FORMS}; got {text}")
        if text <= 0:
            raise ValueError(f"memory budget must be positive; got {text}")
        return int(text)
    value = str(text).strip().lower().replace(" ", "")
    if value in ("", "auto"):
        return None
    for unit, scale in _UNITS.items():
        if value.endswith(unit):
            number = value[: -len(unit)]
            break
    else:
        number, scale = value, 1
    try:
        result = float(number) * scale
    except ValueError:
        raise ValueError(f"memory budget must look like {_FORMS}; got {text!r}") from None
    if not math.isfinite(result):  # "infGB", "nanGB", "1e999"
        raise ValueError(f"memory budget must be a finite size like {_FORMS}; got {text!r}")
    if result <= 0:
        raise ValueError(f"memory budget must be positive; got {text!r}")
    return int(result)


def default_memory_budget() -> int:
    try:
        import psutil
        return int(psutil.virtual_memory().total * DEFAULT_BUDGET_SHARE)
    except Exception:  # psutil missing or unsupported platform
        return 16 * 10**9


def format_bytes(count: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def safetensors_bytes(path: Path, target_itemsize: int | None = None) -> int:
    """Bytes the tensors of one safetensors file take once loaded, read from its header only:
    floats at `target_itemsize` bytes each (None: as stored; F64 and BF16 load as float32).

    The header is read by backend/weights.py, which checks it: a damaged file fails here already
    with a WeightsError naming it, not with a bare struct or JSON error."""
    from backend import weights

    header, _ = weights.read_safetensors_header(Path(path))
    total = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        count = 1
        for dim in entry["shape"]:
            count *= int(dim)
        itemsize = _DTYPE_BYTES.get(entry["dtype"], 4)
        if target_itemsize is not None and entry["dtype"] in ("F64", "F32", "F16", "BF16"):
            itemsize = target_itemsize
        elif entry["dtype"] in ("F64", "BF16"):
            itemsize = 4
        total += count * itemsize
    return total


def component_bytes(component_dir: Path, itemsize: int | None, variant: str | None = None) -> int:
    """Parameter bytes of one component folder once loaded (0 for one without weights: a tokenizer,
    a scheduler)."""
    from backend import weights

    if not any(Path(component_dir).glob("*.safetensors")):
        return 0
    return sum(safetensors_bytes(path, itemsize) for path in weights.find_weight_files(component_dir, variant))


def parameter_bytes(model) -> int:
    """Bytes of a loaded model's parameters."""
    total = 0
    for _, param in model.parameters_and_names():
        count = 1
        for dim in param.shape:
            count *= int(dim)
        total += count * param.itemsize
    return total
