"""Models on demand: load on first use, keep while memory allows, evict least recently used.

The unit of loading is one pipeline folder (a Hub repo or a local diffusers-layout folder), or a
declared part of one (Kandinsky 3, below): the prior, the decoder, the inpainting decoder, the
ControlNet decoder. Pipelines that share a
folder share its components (text-to-image and image-to-image are the same UNet + MoVQ), so a
pipeline object is cheap and built per request; the scheduler is the only part that is swapped.

Memory accounting counts parameter bytes (what dominates): before a folder is loaded its size is
read from the safetensors headers, folders not in use are evicted least recently used first
until it fits the budget (ComfyUI's model_management does the same), and a folder larger than
the whole budget still loads, alone, with a warning in the status.

Everything that builds or frees MindSpore objects runs on the JobRunner's engine thread;
`status()` reads plain Python data and may be called from any thread.

Folders share identical components: the published decoder, inpainting and ControlNet repos ship
the same MoVQ (and 2.1's decoder and inpainting repos may share their 2.2 GB MultilingualCLIP).
Before a component loads, its config and file sizes are compared with what is loaded; where they
match, so is the files' content (the Hub cache names each blob by its SHA-256; other files are
hashed once), and an identical component is reused, not loaded again; memory in use counts it once.

The three model families split their work differently:
- 2.1 and 2.2: a prior folder (text -> CLIP image embedding) and decoder folders (embedding ->
  image); 2.1's decoders also read the prompt through their own MultilingualCLIP.
- 3: one folder, loaded as two units: the T5 text encoder (8.7B parameters) and the UNet + MoVQ.
  The text encoder encodes the prompt first; when the budget cannot hold both, loading the UNet
  evicts the encoder (least recently used), so the peak is the larger of the two, not their sum.
"""
from __future__ import annotations

import gc
import hashlib
import logging
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from backend import previews

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """How one kind of work is loaded: the pipeline class, the ModelSpec role (folder) it reads,
    and, where one folder is loaded as several units, the components this unit holds."""

    pipeline: str
    role: str
    part: str = ""                  # "" = the whole folder; else the unit's name
    components: tuple = ()          # the components of that unit (others are left unloaded)
    # True: with a float32 app, the unit keeps its checkpoint's precision (weights.CHECKPOINT_PRECISION),
    # for models that compute in float32 whatever their weights' dtype: nothing changes but memory.
    checkpoint_precision: bool = False


_K3_ENCODER = ("tokenizer", "text_encoder")
_K3_DECODER = ("unet", "scheduler", "movq")

# family -> kind -> Stage. "prior" turns text into what the decoder kinds consume: CLIP image
# embeddings (2.x) or T5 prompt states (3).
STAGES = {
    "2.2": {
        "prior": Stage("KandinskyV22PriorPipeline", "prior"),
        "text2img": Stage("KandinskyV22Pipeline", "decoder"),
        "img2img": Stage("KandinskyV22Img2ImgPipeline", "decoder"),
        "inpaint": Stage("KandinskyV22InpaintPipeline", "inpaint"),
        "controlnet": Stage("KandinskyV22ControlnetPipeline", "controlnet"),
        "controlnet_img2img": Stage("KandinskyV22ControlnetImg2ImgPipeline", "controlnet"),
    },
    "2.1": {
        "prior": Stage("KandinskyPriorPipeline", "prior"),
        "text2img": Stage("KandinskyPipeline", "decoder"),
        "img2img": Stage("KandinskyImg2ImgPipeline", "decoder"),
        "inpaint": Stage("KandinskyInpaintPipeline", "inpaint"),
    },
    "3": {
        # T5 runs once per job and computes in float32 from half weights (backend/models/t5.py): the
        # published fp16 shards stay half (17.4 GB + 4.3 GB of float32 `wo`) instead of 34.9 GB.
        "prior": Stage("Kandinsky3Pipeline", "decoder", "text encoder", _K3_ENCODER, checkpoint_precision=True),
        "text2img": Stage("Kandinsky3Pipeline", "decoder", "unet and movq", _K3_DECODER),
        "img2img": Stage("Kandinsky3Img2ImgPipeline", "decoder", "unet and movq", _K3_DECODER),
    },
}
# The 2.2 table under its old name (the kinds every family draws from).
PIPELINE_KINDS = {kind: (stage.pipeline, stage.role) for kind, stage in STAGES["2.2"].items()}
KINDS = tuple(PIPELINE_KINDS)

# App tasks -> the decoder kinds they need (a task is offered when its model has them all).
TASK_KINDS = {"text2img": ("text2img",), "img2img": ("img2img",), "inpaint": ("inpaint",),
              "interpolate": ("text2img",), "controlnet": ("controlnet", "controlnet_img2img")}
# Interpolation mixes CLIP image embeddings: only the families with an image prior have them.
INTERPOLATING_FAMILIES = ("2.1", "2.2")
TASK_LABELS = {"text2img": "text to image", "img2img": "image to image", "inpaint": "inpainting",
               "interpolate": "interpolation", "controlnet": "ControlNet depth"}

# Decoder schedulers a request may ask for ("default" keeps the folder's own).
SCHEDULERS = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler"}

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1}


@dataclass(frozen=True)
class ModelSpec:
    """One selectable model: a label, its family and the folder (repo id or path) of each role."""

    key: str
    label: str
    repos: dict          # role -> "owner/name" or a local folder: prior, decoder, inpaint, controlnet
    demo: bool = False   # tiny random weights (backend/demo.py)
    family: str = "2.2"  # "2.1" | "2.2" | "3": which pipelines read the folders
    variant: str | None = None  # weights file variant to fetch and read ("fp16": kandinsky-3 ships only those)

    def stage(self, kind: str) -> Stage:
        stages = STAGES.get(self.family)
        if stages is None:
            raise ValueError(f"{self.label}: family must be one of {sorted(STAGES)}; got {self.family!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}; got {kind!r}")
        if kind not in stages or stages[kind].role not in self.repos:
            raise ValueError(f"{self.label} cannot do {kind}: {self.unsupported_reason(kind)}")
        return stages[kind]

    def supports(self, task: str) -> bool:
        """Whether the app task (text2img, img2img, inpaint, interpolate, controlnet) runs on this model."""
        stages = STAGES.get(self.family, {})
        if task == "interpolate" and self.family not in INTERPOLATING_FAMILIES:
            return False
        kinds = ("prior", *TASK_KINDS.get(task, (task,)))
        return all(k in stages and stages[k].role in self.repos for k in kinds)

    @property
    def tasks(self) -> tuple:
        return tuple(task for task in TASK_KINDS if self.supports(task))

    def unsupported_reason(self, task: str) -> str:
        """Why `task` is not offered, for people (empty when it is)."""
        if self.supports(task):
            return ""
        if task in ("controlnet", "controlnet_img2img"):
            return "ControlNet depth exists for Kandinsky 2.2 only (kandinsky-2-2-controlnet-depth)"
        if self.family == "3" and task == "inpaint":
            return ("there is no published Kandinsky 3 inpainting checkpoint in diffusers format (diffusers "
                    "0.35 has no Kandinsky 3 inpainting pipeline); use Kandinsky 2.2 or 2.1 to inpaint")
        if self.family == "3" and task == "interpolate":
            return ("Kandinsky 3 has no image-embedding prior to mix texts and images; use Kandinsky 2.2 "
                    "or 2.1 to interpolate")
        offered = ", ".join(TASK_LABELS[t] for t in self.tasks) or "nothing"
        return f"this model has no folder for it (it offers {offered})"


KANDINSKY_2_2 = ModelSpec(
    key="kandinsky-2-2",
    label="Kandinsky 2.2",
    repos={
        "prior": "kandinsky-community/kandinsky-2-2-prior",
        "decoder": "kandinsky-community/kandinsky-2-2-decoder",
        "inpaint": "kandinsky-community/kandinsky-2-2-decoder-inpaint",
        "controlnet": "kandinsky-community/kandinsky-2-2-controlnet-depth",
    },
)
KANDINSKY_2_1 = ModelSpec(
    key="kandinsky-2-1",
    label="Kandinsky 2.1",
    repos={
        "prior": "kandinsky-community/kandinsky-2-1-prior",
        "decoder": "kandinsky-community/kandinsky-2-1",
        "inpaint": "kandinsky-community/kandinsky-2-1-inpaint",
    },
    family="2.1",
)
KANDINSKY_3 = ModelSpec(
    key="kandinsky-3",
    label="Kandinsky 3",
    repos={"decoder": "kandinsky-community/kandinsky-3"},
    family="3",
    # The repo ships fp16 files only (unet/diffusion_pytorch_model.fp16.safetensors, text_encoder/
    # model.fp16-0000N-of-00005.safetensors); they load into the app's dtype (float32 by default).
    variant="fp16",
)
# The published models, in the order the model selector lists them.
CATALOGUE = {spec.key: spec for spec in (KANDINSKY_2_2, KANDINSKY_2_1, KANDINSKY_3)}

# The scheduler each family's decoder folder ships (what "repository default" means).
FAMILY_SCHEDULERS = {"2.2": "DDPM", "2.1": "DDIM", "3": "DDPM"}
# The settings each family's docs use (diffusers' pipeline defaults and model cards).
FAMILY_DEFAULTS = {
    "2.2": {"num_inference_steps": 50, "guidance_scale": 4.0, "width": 768, "height": 768},
    "2.1": {"num_inference_steps": 100, "guidance_scale": 4.0, "width": 768, "height": 768},
    "3": {"num_inference_steps": 25, "guidance_scale": 3.0, "width": 1024, "height": 1024},
}


def parse_memory(text: str | int | float | None) -> int | None:
    """"12GB", "1.5 GiB", "800MB", "auto" or a byte count -> bytes; "auto"/None -> None."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        if text <= 0:
            raise ValueError(f"memory budget must be positive; got {text}")
        return int(text)
    value = str(text).strip().lower().replace(" ", "")
    if value in ("", "auto"):
        return None
    units = {"tib": 2**40, "tb": 10**12, "gib": 2**30, "gb": 10**9, "g": 10**9, "mib": 2**20, "mb": 10**6,
             "m": 10**6, "kib": 2**10, "kb": 10**3, "k": 10**3, "b": 1}
    for unit, scale in units.items():
        if value.endswith(unit):
            number = value[: -len(unit)]
            break
    else:
        number, scale = value, 1
    try:
        result = float(number) * scale
    except ValueError:
        raise ValueError(f"memory budget must look like 12GB, 800MB, auto or a byte count; got {text!r}") from None
    if result <= 0:
        raise ValueError(f"memory budget must be positive; got {text!r}")
    return int(result)


def default_memory_budget() -> int:
    """70% of the machine's RAM: the weights live in host memory on CPU, and in pinned copies otherwise."""
    try:
        import psutil
        return int(psutil.virtual_memory().total * 0.7)
    except Exception:  # psutil missing or unsupported platform
        return 16 * 10**9


def format_bytes(count: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def safetensors_bytes(path: Path, target_itemsize: int | None = None) -> int:
    """Bytes the tensors of one safetensors file take in memory, read from its header only.

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
        elif entry["dtype"] in ("F64", "BF16"):  # kept as stored: these two load as float32
            itemsize = 4
        total += count * itemsize
    return total


def estimate_folder_bytes(folder: Path, itemsize: int | None, components: tuple | None = None,
                          variant: str | None = None) -> int:
    """Parameter bytes of a pipeline folder (or of the named `components` of it) once loaded at
    `itemsize` bytes per float (None: as the files store them)."""
    from backend import weights

    total = 0
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if components is not None and sub.name not in components:
            continue
        if not any(sub.glob("*.safetensors")):
            continue
        for path in weights.find_weight_files(sub, variant):
            total += safetensors_bytes(path, itemsize)
    return total


def unit_key(source: str, stage: Stage) -> str:
    """What `ModelManager` loads and evicts as one: a folder, or one part of it."""
    return f"{source}#{stage.part}" if stage.part else source


_SHA256_NAME = re.compile(r"^[0-9a-f]{64}$")
_file_digests: dict = {}          # (real path, size, mtime) -> sha256 of a file that is not a Hub blob


def _file_identity(path: Path) -> str:
    """The SHA-256 of a file's content: the Hub cache's blob name when it is one, else computed
    (once per file version)."""
    real = Path(os.path.realpath(path))
    if _SHA256_NAME.match(real.name):
        return real.name
    stat = real.stat()
    key = (str(real), stat.st_size, stat.st_mtime_ns)
    if key not in _file_digests:
        digest = hashlib.sha256()
        with open(real, "rb") as f:
            for block in iter(lambda: f.read(2**24), b""):
                digest.update(block)
        _file_digests[key] = digest.hexdigest()
    return _file_digests[key]


def component_signature(subfolder: Path, variant: str | None, dtype: str) -> str | None:
    """A cheap fingerprint: load dtype, config, weight file names and sizes. Components with equal
    signatures are compared by content (`component_content`). None for a subfolder without
    weights (tokenizers, schedulers: cheap, never shared)."""
    from backend import weights

    if not any(subfolder.glob("*.safetensors")):
        return None
    digest = hashlib.sha256(dtype.encode())
    config = subfolder / "config.json"
    digest.update(config.read_bytes() if config.is_file() else b"")
    for path in weights.find_weight_files(subfolder, variant):
        digest.update(f"{path.name}:{path.stat().st_size};".encode())
    return digest.hexdigest()


def component_content(subfolder: Path, variant: str | None) -> str:
    """The content of a component's weight files (read only when a signature matches)."""
    from backend import weights

    return ";".join(_file_identity(path) for path in weights.find_weight_files(subfolder, variant))


@dataclass
class LoadedFolder:
    source: str                      # repo id or folder as named in the ModelSpec
    role: str
    key: str                         # unit_key: the source, or source#part for a part of a folder
    part: str                        # "" for a whole folder, else e.g. "text encoder"
    folder: Path
    components: dict                 # name -> model / scheduler / tokenizer / processor
    sizes: dict                      # model component name -> parameter bytes
    loaded_at: float
    last_used: float
    pins: int = 0                    # > 0 while a job uses it: never evicted then
    factors: object = None           # preview factors, once fitted
    signatures: dict = field(default_factory=dict)   # model component name -> component_signature
    variant: str | None = None

    def content(self, name: str) -> str:
        """component_content of one component (computed once, when first compared)."""
        if name not in self._contents:
            self._contents[name] = component_content(self.folder / name, self.variant)
        return self._contents[name]

    _contents: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.sizes.values())


@dataclass
class LoadReport:
    """What `ModelManager` tells its caller while loading (a Loading event each)."""

    component: str
    done: int
    total: int


class ModelManager:
    def __init__(self, catalogue: dict[str, ModelSpec], *, dtype: str = "float32",
                 memory_budget: int | None = None, cache_dir: str | os.PathLike | None = None,
                 offline: bool = False, device: str = "CPU", factors_dir: str | os.PathLike | None = None):
        if not catalogue:
            raise ValueError("the model catalogue is empty")
        self.catalogue = dict(catalogue)
        self.dtype = dtype
        self.memory_budget = memory_budget or default_memory_budget()
        self.cache_dir = str(cache_dir) if cache_dir else None
        self.offline = offline
        self.device = device
        self._loaded: dict[str, LoadedFolder] = {}    # unit_key -> loaded unit
        self._lock = threading.Lock()                 # guards _loaded for status() readers
        self._factors = previews.PreviewFactorCache(factors_dir)
        self.last_evicted: list[str] = []

    @property
    def default_model(self) -> str:
        return next(iter(self.catalogue))

    def spec(self, model: str) -> ModelSpec:
        if model not in self.catalogue:
            raise ValueError(f"model must be one of {sorted(self.catalogue)}; got {model!r}")
        return self.catalogue[model]

    def check_task(self, model: str, task: str) -> ModelSpec:
        """The model's spec, or ValueError (naming the `model` field) when it cannot do the app task."""
        spec = self.spec(model)
        if not spec.supports(task):
            raise ValueError(f"model: {spec.label} cannot do {TASK_LABELS.get(task, task)}: "
                             f"{spec.unsupported_reason(task)}")
        return spec

    # ------------------------------------------------------------------ engine thread
    def pipeline(self, kind: str, model: str, scheduler: str = "default",
                 on_progress: Callable[[LoadReport], None] | None = None):
        """A ready pipeline of `kind` for `model`, loading its folder if needed (engine thread)."""
        entry = self._ensure(kind, model, on_progress)
        return self._build(kind, self.spec(model), entry, scheduler)

    @contextmanager
    def use(self, kind: str, model: str, scheduler: str = "default",
            on_progress: Callable[[LoadReport], None] | None = None):
        """Like `pipeline`, and the folder cannot be evicted until the block ends."""
        entry = self._ensure(kind, model, on_progress)
        entry.pins += 1
        try:
            yield self._build(kind, self.spec(model), entry, scheduler)
        finally:
            entry.pins -= 1
            entry.last_used = time.monotonic()

    def preview_factors(self, kind: str, model: str, pipe) -> previews.LatentRGBFactors:
        """Latent -> RGB factors for the MoVQ of `pipe` (fitted once per checkpoint; engine thread)."""
        entry = self._ensure(kind, model, None)
        if entry.factors is None:
            key = previews.checkpoint_key(entry.folder / "movq")
            entry.factors = self._factors.get(key, lambda: previews.fit_factors_from_pipeline(pipe))
        return entry.factors

    def has_preview_factors(self, kind: str, model: str) -> bool:
        spec = self.spec(model)
        stage = spec.stage(kind)
        entry = self._loaded.get(unit_key(str(spec.repos[stage.role]), stage))
        return entry is not None and entry.factors is not None

    def unload(self, source: str | None = None) -> list[str]:
        """Free one folder (by source: all of its parts) or every folder not in use; returns what was
        freed (unit keys)."""
        with self._lock:
            names = [k for k, e in self._loaded.items() if e.pins == 0 and (source is None or e.source == source)]
            for name in names:
                del self._loaded[name]
        if source is not None and not names and any(e.source == source for e in self._loaded.values()):
            raise RuntimeError(f"{source} is in use by a running job; stop it first")
        gc.collect()
        return names

    def set_memory_budget(self, budget: int) -> list[str]:
        """Change the budget and evict what no longer fits; returns what was evicted."""
        if budget <= 0:
            raise ValueError(f"memory budget must be positive; got {budget}")
        self.memory_budget = int(budget)
        return self._evict_for(0)

    def _ensure(self, kind: str, model: str, on_progress) -> LoadedFolder:
        spec = self.spec(model)
        stage = spec.stage(kind)
        source = str(spec.repos[stage.role])
        entry = self._loaded.get(unit_key(source, stage))
        if entry is None:
            entry = self._load(source, stage, on_progress, spec.variant)
        entry.last_used = time.monotonic()
        return entry

    def _load(self, source: str, stage: Stage, on_progress, variant: str | None = None) -> LoadedFolder:
        from backend import pipelines, weights

        label = f"{stage.role} {stage.part}" if stage.part else stage.role

        def report(component: str, done: int, total: int) -> None:
            if on_progress is not None:
                on_progress(LoadReport(f"{label} / {component}", int(done), int(total)))

        folder = weights.resolve_pretrained(source, variant=variant, local_files_only=self.offline or None,
                                            cache_dir=self.cache_dir,
                                            on_download=lambda name, d, t: report(f"download {name}", d, t))
        load_dtype = self.dtype
        itemsize = 2 if self.dtype in ("float16", "bfloat16") else 4
        if stage.checkpoint_precision and self.dtype == "float32":
            load_dtype, itemsize = weights.CHECKPOINT_PRECISION, None
        cls = getattr(pipelines, stage.pipeline)
        # a part of a folder: the pipeline's other components are not loaded (None)
        skipped = {name: None for name in cls.component_names if stage.components and name not in stage.components}
        signatures = {}
        for name in cls.component_names:
            if name not in skipped and (folder / name).is_dir():
                signature = component_signature(folder / name, variant, str(load_dtype))
                if signature is not None:
                    signatures[name] = signature
        reused = self._loaded_components(folder, variant, signatures)   # identical ones already in memory
        needed = estimate_folder_bytes(folder, itemsize, tuple(n for n in (stage.components or cls.component_names)
                                                               if n not in reused), variant)
        self._evict_for(needed, keep=list(reused.values()))   # reused ones live on in this unit
        started = time.monotonic()
        pipe = cls.from_pretrained(str(folder), dtype=load_dtype, variant=variant, on_progress=report,
                                   **skipped, **reused)
        if reused:
            logger.info("%s reuses the loaded %s", unit_key(source, stage), ", ".join(sorted(reused)))
        components = {name: value for name, value in pipe.components.items() if name not in skipped}
        sizes = {name: _parameter_bytes(value) for name, value in components.items()
                 if hasattr(value, "parameters_and_names")}
        now = time.monotonic()
        entry = LoadedFolder(source, stage.role, unit_key(source, stage), stage.part, folder, components, sizes,
                             loaded_at=now, last_used=now, signatures=signatures, variant=variant)
        with self._lock:
            self._loaded[entry.key] = entry
        logger.info("loaded %s (%s) in %.1f s", entry.key, format_bytes(entry.total), now - started)
        return entry

    def _loaded_components(self, folder: Path, variant: str | None, signatures: dict) -> dict:
        """name -> an already loaded component with the same signature and the same file content."""
        with self._lock:
            entries = list(self._loaded.values())
        found = {}
        for name, signature in signatures.items():
            for entry in entries:
                match = next((n for n, s in entry.signatures.items() if s == signature), None)
                if match is not None and entry.content(match) == component_content(folder / name, variant):
                    found[name] = entry.components[match]
                    break
        return found

    def _evict_for(self, needed: int, keep: list = ()) -> list[str]:
        """Evict unpinned folders, least recently used first, until `needed` more bytes fit
        (`keep`: components that stay in memory whatever is evicted)."""
        evicted = []
        while self._used_with(keep) + needed > self.memory_budget:
            with self._lock:
                candidates = [e for e in self._loaded.values() if e.pins == 0]
                if not candidates:
                    break
                victim = min(candidates, key=lambda e: e.last_used)
                del self._loaded[victim.key]
            evicted.append(victim.key)
            logger.info("evicted %s (%s) to stay within the memory budget of %s", victim.key,
                        format_bytes(victim.total), format_bytes(self.memory_budget))
            del victim
            gc.collect()
        if evicted:
            self.last_evicted = evicted
        return evicted

    def _build(self, kind: str, spec: ModelSpec, entry: LoadedFolder, scheduler: str):
        from backend import pipelines
        from backend.pipelines.loading import load_subfolder
        from backend.schedulers import scheduler_from_config

        cls = getattr(pipelines, spec.stage(kind).pipeline)
        components = {name: entry.components.get(name) for name in cls.component_names}
        scheduler = (scheduler or "default").lower()
        if kind != "prior" and scheduler != "default":
            if scheduler not in SCHEDULERS:
                raise ValueError(f"scheduler must be one of {['default', *SCHEDULERS]}; got {scheduler!r}")
            shipped = entry.folder / f"{scheduler}_scheduler"
            if shipped.is_dir():
                # the repo's own alternative (kandinsky-2-1/ddpm_scheduler: learned-range variance,
                # thresholding), as `from_pretrained(repo, scheduler="ddpm_scheduler")` loads it
                components["scheduler"] = load_subfolder(shipped, self.dtype)
            else:
                components["scheduler"] = scheduler_from_config(SCHEDULERS[scheduler],
                                                                dict(components["scheduler"].config))
        return cls(dtype=self.dtype, **components)

    # ------------------------------------------------------------------ any thread
    def used_bytes(self) -> int:
        """Parameter bytes in memory: a component shared by several folders counts once."""
        with self._lock:
            return self._used_locked()

    def _used_with(self, keep: list) -> int:
        """used_bytes, plus the components in `keep` that no loaded folder holds any more."""
        with self._lock:
            held = {id(e.components[n]) for e in self._loaded.values() for n in e.sizes}
            return self._used_locked() + sum(_parameter_bytes(c) for c in keep if id(c) not in held)

    def _used_locked(self) -> int:
        seen, total = set(), 0
        for entry in self._loaded.values():
            for name, size in entry.sizes.items():
                if id(entry.components[name]) not in seen:
                    seen.add(id(entry.components[name]))
                    total += size
        return total

    def is_loaded(self, model: str, role: str) -> bool:
        source = str(self.spec(model).repos.get(role))
        with self._lock:
            return any(e.source == source for e in self._loaded.values())

    def status(self) -> dict:
        """Loaded folders with their components' sizes, device, dtype and budget (plain data)."""
        with self._lock:
            entries = sorted(self._loaded.values(), key=lambda e: e.last_used, reverse=True)
            holders: dict = {}
            for e in entries:
                for name in e.sizes:
                    holders.setdefault(id(e.components[name]), []).append(e.key)
            folders = [{"source": e.source, "role": e.role, "part": e.part, "bytes": e.total, "in_use": e.pins > 0,
                        "components": dict(sorted(e.sizes.items())),
                        "shared": sorted(n for n in e.sizes if len(holders[id(e.components[n])]) > 1),
                        "idle_s": round(time.monotonic() - e.last_used, 1)} for e in entries]
            used = self._used_locked()
        return {"device": self.device, "dtype": self.dtype, "budget": self.memory_budget, "used": used,
                "over_budget": used > self.memory_budget, "folders": folders,
                "models": {key: spec.label for key, spec in self.catalogue.items()}}


def _parameter_bytes(model) -> int:
    total = 0
    for _, param in model.parameters_and_names():
        count = 1
        for dim in param.shape:
            count *= int(dim)
        total += count * param.itemsize
    return total
