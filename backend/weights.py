"""Reading diffusers/transformers checkpoints into our MindSpore models.

A model's attribute paths equal the checkpoint keys, so loading is the identity map:
`model.parameters_and_names()` gives `down_blocks.0.resnets.1.conv1.weight`, exactly the
safetensors key. Loading is strict: every checkpoint key is used, every parameter is
filled, shapes are equal, and an error names the key and the file.

Memory: safetensors files are memory-mapped (private, copy-on-write) and a float32 tensor
becomes its Parameter without a copy (`Tensor.from_numpy` shares the mapped pages), as
torch's safetensors loading does. So loading peaks near the size of the weights, the pages
are file-backed (the kernel can drop and re-read them under memory pressure), and the bytes
are read once, by the NaN/inf check. Measured on the 5 GB kandinsky-2-2-decoder UNet (see
docs/PERFORMANCE.md): the former read-into-a-fresh-array + `Tensor(array)` made two copies.
Like torch, a mapped file must not be truncated while the model is alive (deleting or
replacing it is fine).
"""
from __future__ import annotations

import json
import mmap
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import mindspore as ms
from mindspore import Tensor

from backend.nn.host import BFLOAT16

# Checkpoint keys that are not parameters of our models, dropped on purpose.
# transformers' CLIP text model keeps a `position_ids` buffer in older checkpoints.
IGNORED_KEY_SUFFIXES = ("position_ids",)

# Renames applied only when a checkpoint key is not a parameter but its renamed form is.
# Why: attention blocks saved before diffusers 0.15 (the old `AttentionBlock`, e.g. in MoVQ
# mid blocks) name their projections query/key/value/proj_attn; diffusers converts them on load
# in `ModelMixin._convert_deprecated_attention_blocks`, and so do we.
LEGACY_ATTENTION_RENAMES = ((".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."),
                            (".proj_attn.", ".to_out.0."))

_NP_DTYPES = {ms.float32: np.float32, ms.float16: np.float16}


class WeightsError(RuntimeError):
    """A checkpoint could not be read or does not fit the model; the message names the file."""


# `dtype=CHECKPOINT_PRECISION`: every tensor keeps the precision of its file (half stays half, float32
# stays float32; bfloat16 and float64 become float32). For models that compute in float32 whatever
# their weights (backend/models/t5.py), this halves the memory of half-precision checkpoints
# without changing a single weight, including the float32 tensors a half checkpoint keeps.
CHECKPOINT_PRECISION = "checkpoint"


def dtype_from_name(dtype) -> ms.dtype:
    """A MindSpore dtype from a name; CHECKPOINT_PRECISION means float32 wherever one dtype is needed."""
    if dtype is None or dtype == CHECKPOINT_PRECISION:
        return ms.float32
    if isinstance(dtype, str):
        table = {"float32": ms.float32, "fp32": ms.float32, "float16": ms.float16,
                 "fp16": ms.float16, "bfloat16": ms.bfloat16, "bf16": ms.bfloat16}
        if dtype.lower() not in table:
            raise ValueError(f"dtype must be one of {sorted(table)}; got {dtype!r}")
        return table[dtype.lower()]
    return dtype


def read_config(directory: str | os.PathLike, name: str = "config.json") -> dict:
    path = Path(directory) / name
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as error:
        raise WeightsError(f"missing config file: {path}") from error
    except json.JSONDecodeError as error:
        raise WeightsError(f"config file is not valid JSON: {path}: {error}") from error


def find_weight_files(directory: str | os.PathLike, variant: str | None = None) -> list[Path]:
    """The safetensors files of one component folder (sharded or not, fp16 variant or not)."""
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if variant:
        wanted = [f for f in files if f.name.endswith(f".{variant}.safetensors")
                  or f".{variant}-" in f.name]
        if wanted:
            return wanted
    plain = [f for f in files if not any(f.name.endswith(f".{v}.safetensors") or f".{v}-" in f.name
                                         for v in ("fp16", "bf16"))]
    if plain:
        return plain
    if files:  # only a variant is present (e.g. a repo that ships fp16 weights alone)
        return files
    raise WeightsError(f"no *.safetensors weights in {directory}")


_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64,
                       "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
                       "BF16": np.uint16}  # bf16 is read as raw 16-bit words, widened below
MAX_HEADER_BYTES = 100_000_000  # the format's own limit


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where tensor data starts."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise WeightsError(f"weights file {path} is truncated or empty ({size} bytes)")
            header_len = int.from_bytes(raw, "little")
            if header_len <= 0 or header_len > min(MAX_HEADER_BYTES, size - 8):
                raise WeightsError(f"weights file {path} is not a safetensors file (bad header length)")
            header = json.loads(f.read(header_len))
    except FileNotFoundError as error:
        raise WeightsError(f"missing weights file: {path}") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise WeightsError(f"weights file {path} has a corrupt header: {error}") from error
    data_start = 8 + header_len
    data_len = size - data_start
    # in file order: the header lists names alphabetically, the data may lie in another order
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                     key=lambda item: item[1]["data_offsets"][0])
    for key, info in entries:
        begin, end = info["data_offsets"]
        if info.get("dtype") not in _SAFETENSORS_DTYPES:
            raise WeightsError(f"{path}: tensor {key!r} has unsupported dtype {info.get('dtype')!r}")
        if not 0 <= begin <= end <= data_len:
            raise WeightsError(f"weights file {path} is truncated: tensor {key!r} needs bytes up to {end} "
                               f"but the file holds {data_len} bytes of data")
        itemsize = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).itemsize
        if (end - begin) != int(np.prod(info["shape"], dtype=np.int64)) * itemsize:
            raise WeightsError(f"{path}: tensor {key!r} byte size does not match its shape {info['shape']}")
    return header, data_start


def iter_safetensors(path: Path) -> Iterable[tuple[str, np.ndarray]]:
    """Yield (key, array) one tensor at a time.

    Arrays are views of a private copy-on-write memory map of the file (writable, and writes
    never reach the file); a tensor whose bytes are not aligned to its item size is copied.
    """
    header, data_start = read_safetensors_header(path)
    if path.stat().st_size == data_start:  # no tensor bytes at all: nothing to map
        mapped = np.zeros(0, np.uint8)
    else:
        mapped = np.memmap(path, dtype=np.uint8, mode="c", offset=data_start)
        try:  # the whole file is about to be read in order: ask for large read-ahead
            mapped._mmap.madvise(mmap.MADV_SEQUENTIAL)
            mapped._mmap.madvise(mmap.MADV_WILLNEED)
        except (AttributeError, OSError, ValueError):
            pass
    # in file order: the header lists names alphabetically, the data may lie in another order
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                     key=lambda item: item[1]["data_offsets"][0])
    for key, info in entries:
        begin, end = info["data_offsets"]
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        raw = mapped[begin:end]
        if (data_start + begin) % dtype.itemsize:
            raw = raw.copy()
        array = np.ndarray((end - begin) // dtype.itemsize, dtype=dtype, buffer=raw)
        if info["dtype"] == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        yield key, array.reshape(info["shape"])


def load_state_dict(model: ms.nn.Cell, tensors: Iterable[tuple[str, np.ndarray]],
                    dtype=ms.float32, source: str = "state dict",
                    on_tensor: Callable[[int, int], None] | None = None) -> None:
    """Fill every parameter of `model` from (key, array) pairs; strict.

    `on_tensor(bytes_done, bytes_total)` is called after each tensor (load progress).
    """
    as_stored = dtype == CHECKPOINT_PRECISION
    dtype = dtype_from_name(dtype)
    params = dict(model.parameters_and_names())
    # bfloat16: only what the model's products read (backend/nn/entry.py Model.bfloat16_parameter_names)
    rounded = model.bfloat16_parameter_names() if dtype == ms.bfloat16 and hasattr(model, "bfloat16_parameter_names") \
        else None
    filled: set[str] = set()
    unexpected: list[str] = []
    total = sum(int(np.prod(p.shape)) * (_itemsize(dtype) if rounded is None or name in rounded else 4)
                for name, p in params.items())
    done = 0
    for key, array in tensors:
        if as_stored:
            dtype = ms.float16 if array.dtype == np.float16 else ms.float32
        param = params.get(key)
        if param is None:
            key = _legacy_name(key, params)
            param = params.get(key)
        if param is None:
            if not key.endswith(IGNORED_KEY_SUFFIXES):
                unexpected.append(key)
            continue
        if rounded is not None:
            dtype = ms.bfloat16 if key in rounded else ms.float32
        if tuple(array.shape) != tuple(param.shape):
            raise WeightsError(f"{source}: tensor {key!r} has shape {tuple(array.shape)}, "
                               f"the model expects {tuple(param.shape)}")
        if array.dtype != np.float32 and array.dtype != np.float16 and array.dtype.kind == "f":
            array = array.astype(np.float32)
        if not _all_finite(array):
            raise WeightsError(f"{source}: tensor {key!r} contains NaN or infinite values")
        target = _NP_DTYPES.get(dtype, np.float32)
        if dtype == ms.bfloat16:  # rounded to nearest even by numpy, no MindSpore op
            tensor = Tensor.from_numpy(np.ascontiguousarray(array.astype(np.float32, copy=False).astype(BFLOAT16)))
        else:
            array = np.ascontiguousarray(array, dtype=target)  # a no-op for float32 files
            tensor = Tensor.from_numpy(array)  # shares the array's memory: no copy
        if param.dtype != dtype:
            param.set_dtype(dtype)
        param.set_data(tensor)
        filled.add(key)
        done += int(np.prod(param.shape)) * _itemsize(dtype)
        if on_tensor is not None:
            on_tensor(done, total)
    if as_stored and on_tensor is not None:  # the total assumed float32 for every tensor
        on_tensor(done, done)
    if unexpected:
        raise WeightsError(f"{source}: {len(unexpected)} key(s) the model does not have, "
                           f"e.g. {unexpected[:5]}")
    missing = [k for k in params if k not in filled]
    if missing:
        raise WeightsError(f"{source}: {len(missing)} parameter(s) missing from the checkpoint, "
                           f"e.g. {missing[:5]}")


FINITE_CHECK_CHUNK = 1 << 21   # elements per share of the NaN/inf check of a large tensor


def _all_finite(array: np.ndarray) -> bool:
    """No NaN or inf in `array`. A sum is one pass without a temporary (NaN and inf propagate
    through it); only when it is not finite, which finite float32 weights can reach only by
    overflow, is each element checked. Large tensors are summed in shares over the cores: this
    pass is most of a load's CPU time once the file is in the page cache."""
    if array.dtype.kind != "f" or array.size == 0:
        return True
    flat = array.reshape(-1)
    shares = -(-flat.size // FINITE_CHECK_CHUNK)
    if shares == 1:
        return _finite_share(flat)
    from backend.nn.host import host_gemm

    results = [True] * shares
    host_gemm().parallel(shares, lambda i: results.__setitem__(
        i, _finite_share(flat[i * FINITE_CHECK_CHUNK:(i + 1) * FINITE_CHECK_CHUNK])))
    return all(results)


def _finite_share(flat: np.ndarray) -> bool:
    with np.errstate(over="ignore", invalid="ignore"):
        total = flat.sum(dtype=np.float32)
    return bool(np.isfinite(total)) or bool(np.isfinite(flat).all())


def _legacy_name(key: str, params: dict) -> str:
    for old, new in LEGACY_ATTENTION_RENAMES:
        if old in key:
            renamed = key.replace(old, new)
            if renamed in params:
                return renamed
    return key


def _itemsize(dtype) -> int:
    return 2 if dtype in (ms.float16, ms.bfloat16) else 4


def load_model(model_cls, directory: str | os.PathLike, dtype=ms.float32, variant: str | None = None,
               on_tensor: Callable[[int, int], None] | None = None):
    """Build `model_cls` from `directory/config.json` and fill it from the folder's safetensors.

    `model_cls` has `from_config(dict)`; returns the model in inference mode.
    """
    directory = Path(directory)
    config = read_config(directory)
    model = model_cls.from_config(config)
    files = find_weight_files(directory, variant)
    source = ", ".join(str(f) for f in files)

    def all_tensors():
        for path in files:
            yield from iter_safetensors(path)

    load_state_dict(model, all_tensors(), dtype=dtype, source=source, on_tensor=on_tensor)
    model.set_train(False)
    return model


# --------------------------------------------------------------------------- hub resolution

# Files a pipeline folder needs besides weights: configs, tokenizer and processor files.
CONFIG_PATTERNS = ["model_index.json", "*/config.json", "*/scheduler_config.json",
                   "*/preprocessor_config.json", "*/tokenizer_config.json", "*/vocab.json",
                   "*/merges.txt", "*/special_tokens_map.json", "*/tokenizer.json",
                   "*/sentencepiece.bpe.model", "*/spiece.model", "*/added_tokens.json"]

OFFLINE_HELP = (
    "To use the weights offline, download the repository on a machine with internet access "
    "(`huggingface-cli download {repo} --include {include}`) and either copy the Hugging Face cache "
    "(~/.cache/huggingface/hub) here or pass the downloaded folder instead of the repo id."
)


def download_patterns(variant: str | None = None, subfolders: Iterable[str] | None = None):
    """(allow, ignore) file patterns of a pipeline download: configs, tokenizer files, and the
    safetensors of one variant (sharded or not), never the other formats. A subfolder "" is the repo's
    root: a transformers model repo (config.json, preprocessor_config.json and the weights at the top)."""
    folders = list(subfolders) if subfolders else ["*"]
    prefixes = [f"{sub}/" if sub else "" for sub in folders]
    weights = [f"{p}*.{variant}.safetensors" if variant else f"{p}*.safetensors" for p in prefixes]
    if variant:  # sharded variants are named model.fp16-00001-of-00005.safetensors (kandinsky-3's T5)
        weights += [f"{p}*.{variant}-*.safetensors" for p in prefixes]
    weights += [f"{p}*.safetensors.index.json" if not variant else f"{p}*.safetensors.index.{variant}.json"
                for p in prefixes]
    configs = list(CONFIG_PATTERNS)
    if "" in folders:
        configs += [pattern[2:] for pattern in CONFIG_PATTERNS if pattern.startswith("*/")]
    ignore = None if variant else ["*.fp16.safetensors", "*.bf16.safetensors", "*.fp16-*", "*.bf16-*"]
    return configs + weights, ignore


def resolve_pretrained(repo_id_or_dir: str | os.PathLike, *, variant: str | None = None,
                       subfolders: Iterable[str] | None = None, local_files_only: bool | None = None,
                       cache_dir: str | os.PathLike | None = None, revision: str | None = None,
                       on_download: Callable[[str, int, int], None] | None = None) -> Path:
    """A local folder for a pipeline: the folder itself, or a Hub snapshot in the standard cache.

    Only what a pipeline reads is fetched: configs, tokenizer files and one weights format
    (safetensors; the `variant` ones when asked). `local_files_only` defaults to HF_HUB_OFFLINE.
    `on_download(filename, bytes_done, bytes_total)` reports download progress.
    """
    path = Path(os.path.expanduser(str(repo_id_or_dir)))
    if path.is_dir():
        return path
    repo = str(repo_id_or_dir)
    if repo.count("/") != 1 or repo.startswith((".", "/")):
        raise WeightsError(f"{repo!r} is neither a local folder nor a Hugging Face repo id (owner/name)")
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    allow, ignore = download_patterns(variant, subfolders)

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        local = snapshot_download(repo, allow_patterns=allow, ignore_patterns=ignore,
                                  local_files_only=local_files_only, cache_dir=cache_dir,
                                  revision=revision, tqdm_class=_progress_class(on_download))
    except LocalEntryNotFoundError as error:
        include = "'*.json' '*.txt' '*.model' '*.safetensors'"
        raise WeightsError(f"the weights of {repo} are not in the local Hugging Face cache and the Hub "
                           f"cannot be reached (offline mode or no network). "
                           + OFFLINE_HELP.format(repo=repo, include=include)) from error
    except Exception as error:  # network errors come in many types (requests, httpx, OSError)
        include = "'*.json' '*.txt' '*.model' '*.safetensors'"
        raise WeightsError(f"could not download {repo} from the Hugging Face Hub: {error}. "
                           + OFFLINE_HELP.format(repo=repo, include=include)) from error
    return Path(local)


def _progress_class(on_download):
    """A tqdm subclass that forwards byte progress to `on_download`, or None for the default bar."""
    if on_download is None:
        return None
    from tqdm.auto import tqdm

    class _Progress(tqdm):
        def update(self, n=1):
            result = super().update(n)
            try:
                on_download(str(self.desc or ""), int(self.n), int(self.total or 0))
            except Exception:  # progress reporting must never break a download
                pass
            return result

    return _Progress
