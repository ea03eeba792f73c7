"""Models on demand: a cache of loaded components, kept while memory allows, least recently used out.

What loads and unloads as one is a unit: a family stage at a model's folder (backend/families.py
ModelStage): a whole pipeline folder (a prior, a decoder, the inpainting or ControlNet decoder),
or a declared part of one (Kandinsky 3's text encoder; its UNet + MoVQ). Its components load
directly from the folder (backend/pipelines/loading.py), and the folder is resolved once.

    with manager.use(spec.stage("text2img"), on_progress) as unit:   # loads if needed; pinned
        pipe = unit.pipeline(scheduler)    # a pipeline object over the unit's components
        factors = unit.preview_factors()   # latent -> RGB map of its MoVQ (backend/previews.py)

Pipelines are cheap objects built per use (the stages of one folder share its components:
text-to-image and image-to-image are the same UNet + MoVQ); only the scheduler is swapped.

A stage's on-demand components (Stage.on_demand: the 2.x prior's image encoder) are units of their
own, loaded only for a job that names them (`use(stage, needs=...)`: interpolation with an image).
Any other job gets what the pipeline takes in their place (its `derived_values`: the zero-image
embedding) from backend/derived.py, keyed by the component's fingerprint, the dtype and the device;
the first job of a checkpoint loads the component, computes the value with the pipeline class's
method, stores it (on disk with the preview factors) and frees the component before the rest of
the unit loads, so it never holds both.

Memory counts parameter bytes: before a unit loads, its size is read from the safetensors headers,
units not in use are evicted least recently used first until it fits the budget (ComfyUI's
model_management does the same), and a unit larger than the whole budget still loads, alone, with
a warning in the status. A component identical in several folders (backend/fingerprints.py) is
loaded once, shared, and counted once; it lives as long as a unit holding it.

Everything that builds or frees MindSpore objects runs on the JobRunner's engine thread;
`status()` reads plain Python data and may be called from any thread.
"""
from __future__ import annotations

import gc
import logging
import os
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from backend import derived, fingerprints, previews
from backend.events import Loading
from backend.families import ModelStage
from backend.memory import component_bytes, default_memory_budget, format_bytes, parameter_bytes
from backend.fields import check_choice
from backend.requests import SCHEDULERS

logger = logging.getLogger(__name__)

# Load progress, as the job's Loading events.
ProgressCallback = Callable[[Loading], None]


@dataclass
class LoadedUnit:
    """One loaded unit: its components, what they take, and whether a job holds it."""

    stage: ModelStage                # the stage it was loaded for (others of the same folder part share it)
    folder: Path                     # the resolved folder
    dtype: str                       # the app's compute dtype (the pipelines')
    load_dtype: str                  # what the weights were loaded as (the dtype, or "checkpoint")
    components: dict                 # name -> model / scheduler / tokenizer / processor
    sizes: dict                      # model component name -> parameter bytes
    configs: dict                    # model component name -> its config.json as loaded
    cache: derived.DerivedValueCache  # the manager's values derived from checkpoints (preview factors, ...)
    last_used: float = field(default_factory=time.monotonic)
    pins: int = 0                    # > 0 while a job uses it: never evicted then
    _fingerprints: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.stage.key

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def fingerprint(self, name: str) -> str:
        """backend/fingerprints.py of one component of the folder, loaded or not (computed when first
        asked; from the files, never from the model)."""
        if name not in self._fingerprints:
            self._fingerprints[name] = fingerprints.fingerprint(self.folder / name, self.stage.variant)
        return self._fingerprints[name]


@dataclass(frozen=True)
class UnitInUse:
    """What `ModelManager.use(stage)` hands out: the loaded unit, as that stage uses it."""

    unit: LoadedUnit
    stage: ModelStage
    on_demand: dict = field(default_factory=dict)   # on-demand components this use holds: name -> model
    values: dict = field(default_factory=dict)      # the pipeline's derived values: keyword -> value

    def pipeline(self, scheduler: str = "default"):
        """The stage's pipeline over the unit's components, with the decoder scheduler asked for
        (backend.requests.SCHEDULERS; "default": the folder's own)."""
        from backend import pipelines
        from backend.pipelines.loading import load_subfolder
        from backend.schedulers import scheduler_from_config

        unit = self.unit
        cls = getattr(pipelines, self.stage.stage.pipeline)
        components = {name: self.on_demand[name] if name in self.on_demand else unit.components.get(name)
                      for name in cls.component_names}
        if check_choice("scheduler", scheduler, SCHEDULERS) != "default":
            shipped = unit.folder / f"{scheduler}_scheduler"
            if shipped.is_dir():
                # the repo's own alternative (kandinsky-2-1/ddpm_scheduler: learned-range variance,
                # thresholding), as `from_pretrained(repo, scheduler="ddpm_scheduler")` loads it
                components["scheduler"] = load_subfolder(shipped, unit.dtype)
            else:
                components["scheduler"] = scheduler_from_config(SCHEDULERS[scheduler],
                                                                dict(components["scheduler"].config))
        return cls(dtype=unit.dtype, **components, **self.values)

    def preview_factors(self, on_fit: Callable[[], None] | None = None) -> previews.LatentRGBFactors:
        """Latent -> RGB factors of the unit's MoVQ, fitted once per checkpoint (`on_fit` is called
        before a fit). Runs the MoVQ: engine thread only."""
        def fit():
            if on_fit is not None:
                on_fit()
            return previews.fit_factors_from_pipeline(self.pipeline())
        return self.unit.cache.get(previews.PREVIEW_FACTORS, self.unit.fingerprint("movq"), fit)


class ModelManager:
    def __init__(self, *, dtype: str = "float32", memory_budget: int | None = None,
                 cache_dir: str | os.PathLike | None = None, offline: bool = False, device: str = "CPU",
                 factors_dir: str | os.PathLike | None = None):
        """`factors_dir`: where the values derived from checkpoints are kept (backend/derived.py: the
        preview factors and the zero-image embeddings; None: in memory only)."""
        self.dtype = dtype
        self.memory_budget = memory_budget or default_memory_budget()
        self.cache_dir = str(cache_dir) if cache_dir else None
        self.offline = offline
        self.device = device
        self._units: dict[str, LoadedUnit] = {}       # ModelStage.key -> loaded unit
        self._folders: dict[str, Path] = {}           # source -> resolved folder
        self._fingerprints: dict = {}                 # (component folder, variant) -> its fingerprint
        self._lock = threading.Lock()                 # guards _units for status() readers
        self._derived = derived.DerivedValueCache(factors_dir)

    # ------------------------------------------------------------------ engine thread
    @contextmanager
    def use(self, stage: ModelStage, on_progress: ProgressCallback | None = None, needs: tuple = ()):
        """The loaded unit of `stage` (loaded now if needed), with the on-demand components in `needs`
        (each its own unit); none of them can be evicted until the block ends. The stage's other
        on-demand components stay unloaded: their derived values come from the cache."""
        with ExitStack() as held:
            on_demand = {}
            for name in needs:
                part = held.enter_context(self._pinned(stage.on_demand_part(name), on_progress))
                on_demand[name] = part.components[name]
            # before the unit loads: a first job never holds the image encoder and the rest of the prior at once
            values = self._derived_values(stage, on_demand, on_progress)
            unit = held.enter_context(self._pinned(stage, on_progress))
            yield UnitInUse(unit, stage, on_demand, values)

    @contextmanager
    def _pinned(self, stage: ModelStage, on_progress: ProgressCallback | None):
        unit = self._units.get(stage.key) or self._load(stage, on_progress)
        unit.pins += 1
        unit.last_used = time.monotonic()
        try:
            yield unit
        finally:
            unit.pins -= 1
            unit.last_used = time.monotonic()

    def _derived_values(self, stage: ModelStage, on_demand: dict, on_progress: ProgressCallback | None) -> dict:
        """The values the stage's pipeline takes in place of its on-demand components (the class's
        `derived_values`): cached, or computed by the class from the component, the one this use holds
        or one loaded for the moment and freed after (unless a job had loaded it before)."""
        from backend import pipelines

        cls = getattr(pipelines, stage.stage.pipeline)
        values = {}
        for keyword, (component, method) in cls.derived_values.items():
            if component not in stage.stage.on_demand:
                continue
            kind = derived.array_kind(keyword)
            # exact for the weights, the dtype and the kernels it was computed with (the stages' own
            # precision rule makes the app's dtype decide the one the component loads in)
            key = f"{self._fingerprint(stage, component, on_progress)}.{self.dtype}.{self.device.lower()}"
            value = self._derived.peek(kind, key)
            if value is None:
                if on_progress is not None:
                    on_progress(Loading(f"{stage.label} / {keyword}: computed once for this checkpoint", 0, 0))
                if component in on_demand:
                    value = getattr(cls, method)(on_demand[component])
                else:
                    part = stage.on_demand_part(component)
                    loaded_before = part.key in self._units
                    with self._pinned(part, on_progress) as holder:
                        value = getattr(cls, method)(holder.components[component])
                    if not loaded_before:
                        self._release(part.key)
                self._derived.put(kind, key, value)
                logger.info("computed %s of %s (%s)", keyword, stage.key, key)
            values[keyword] = value
        return values

    def _fingerprint(self, stage: ModelStage, component: str, on_progress: ProgressCallback | None) -> str:
        """backend/fingerprints.py of one component of the stage's folder, from its files (never loaded)."""
        path = self._resolve(stage, self._reporter(stage, on_progress)) / component
        if (path, stage.variant) not in self._fingerprints:
            self._fingerprints[(path, stage.variant)] = fingerprints.fingerprint(path, stage.variant)
        return self._fingerprints[(path, stage.variant)]

    def _release(self, key: str) -> None:
        """Free one unit now, if no job holds it."""
        with self._lock:
            unit = self._units.get(key)
            if unit is None or unit.pins:
                return
            del self._units[key]
        logger.info("released %s (%s): no job needs it now", key, format_bytes(unit.total))
        del unit
        gc.collect()

    def unload(self, source: str | None = None) -> list[str]:
        """Free one folder (by source: all of its units) or every unit not in use; returns what was
        freed (unit keys)."""
        with self._lock:
            names = [k for k, u in self._units.items() if u.pins == 0 and (source is None or u.stage.source == source)]
            for name in names:
                del self._units[name]
        if source is not None and not names and any(u.stage.source == source for u in self._units.values()):
            raise RuntimeError(f"{source} is in use by a running job; stop it first")
        gc.collect()
        return names

    def set_memory_budget(self, budget: int) -> list[str]:
        """Change the budget and evict what no longer fits; returns what was evicted."""
        if budget <= 0:
            raise ValueError(f"memory budget must be positive; got {budget}")
        self.memory_budget = int(budget)
        return self._evict_for(0)

    @staticmethod
    def _reporter(stage: ModelStage, on_progress: ProgressCallback | None):
        """(component, bytes done, total) -> the stage's Loading events."""
        def report(component: str, done: int, total: int) -> None:
            if on_progress is not None:
                on_progress(Loading(f"{stage.label} / {component}", int(done), int(total)))
        return report

    def _resolve(self, stage: ModelStage, report) -> Path:
        """The local folder of a source: a folder as it is, a Hub repo from the cache or downloaded."""
        from backend import pipelines, weights

        if stage.source not in self._folders:
            # a transformers model repo's pipeline names its files' place ("": the top of the repo)
            subfolders = getattr(getattr(pipelines, stage.stage.pipeline), "subfolders", None)
            self._folders[stage.source] = weights.resolve_pretrained(
                stage.source, variant=stage.variant, subfolders=subfolders, local_files_only=self.offline or None,
                cache_dir=self.cache_dir,
                on_download=lambda name, done, total: report(f"download {name}", done, total))
        return self._folders[stage.source]

    def _load(self, stage: ModelStage, on_progress: ProgressCallback | None) -> LoadedUnit:
        from backend import pipelines, weights
        from backend.pipelines.loading import load_component

        report = self._reporter(stage, on_progress)
        folder = self._resolve(stage, report)
        cls = getattr(pipelines, stage.stage.pipeline)
        if hasattr(cls, "load_components"):
            return self._load_model_repo(stage, cls, folder, report)
        index = weights.read_config(folder, "model_index.json")
        names = [n for n in stage.stage.components or cls.component_names if n not in stage.stage.on_demand]
        for name in names:
            if not isinstance(index.get(name), list) or len(index[name]) != 2:
                raise weights.WeightsError(f"{folder / 'model_index.json'} has no component {name!r} "
                                           f"needed by {cls.__name__}")
        load_dtype, itemsize = self.dtype, (2 if self.dtype in ("float16", "bfloat16") else 4)
        if stage.stage.keeps_checkpoint_precision and self.dtype == "float32":
            load_dtype, itemsize = weights.CHECKPOINT_PRECISION, None
        shared = {}                   # identical components already in memory
        for name in names:
            found = self._loaded_twin(folder / name, stage.variant, load_dtype)
            if found is not None:
                shared[name] = found
        needed = sum(component_bytes(folder / name, itemsize, stage.variant) for name in names if name not in shared)
        self._evict_for(needed, keep=list(shared.values()))
        started = time.monotonic()
        components = dict(shared)
        for name in names:
            if name not in shared:
                library, class_name = index[name]
                components[name] = load_component(folder / name, library, class_name, load_dtype, stage.variant,
                                                  report, name)
        if shared:
            logger.info("%s reuses the loaded %s", stage.key, ", ".join(sorted(shared)))
        sizes = {name: parameter_bytes(value) for name, value in components.items()
                 if hasattr(value, "parameters_and_names")}
        configs = {name: (folder / name / "config.json").read_bytes() for name in sizes}
        unit = LoadedUnit(stage, folder, self.dtype, str(load_dtype), components, sizes, configs, self._derived)
        with self._lock:
            self._units[unit.key] = unit
        logger.info("loaded %s (%s) in %.1f s", unit.key, format_bytes(unit.total), time.monotonic() - started)
        return unit

    def _load_model_repo(self, stage: ModelStage, cls, folder: Path, report) -> LoadedUnit:
        """A transformers model repo (no model_index.json: config.json and the weights at its top, e.g.
        the depth estimator) as one unit, by the pipeline class's `load_components`; never shared."""
        itemsize = 2 if self.dtype in ("float16", "bfloat16") else 4
        self._evict_for(component_bytes(folder, itemsize, stage.variant))
        started = time.monotonic()
        components = cls.load_components(folder, self.dtype, lambda done, total: report("model", done, total))
        sizes = {name: parameter_bytes(value) for name, value in components.items()
                 if hasattr(value, "parameters_and_names")}
        configs = {name: (folder / "config.json").read_bytes() for name in sizes}
        unit = LoadedUnit(stage, folder, self.dtype, self.dtype, components, sizes, configs, self._derived)
        with self._lock:
            self._units[unit.key] = unit
        logger.info("loaded %s (%s) in %.1f s", unit.key, format_bytes(unit.total), time.monotonic() - started)
        return unit

    def _loaded_twin(self, component_dir: Path, variant: str | None, load_dtype) -> object | None:
        """A loaded component equal to the one in `component_dir` (same config and weight files, loaded
        as the same dtype), or None. Fingerprints are taken only where the configs already match."""
        config = component_dir / "config.json"
        if not config.is_file() or not any(component_dir.glob("*.safetensors")):
            return None           # tokenizers, schedulers, processors: cheap, never shared
        wanted, config = None, config.read_bytes()
        with self._lock:
            units = list(self._units.values())
        for unit in units:
            if unit.load_dtype != str(load_dtype):
                continue
            for name in unit.sizes:
                if unit.configs[name] != config:
                    continue
                wanted = wanted or fingerprints.fingerprint(component_dir, variant)
                if unit.fingerprint(name) == wanted:
                    return unit.components[name]
        return None

    def _evict_for(self, needed: int, keep: list = ()) -> list[str]:
        """Evict unpinned units, least recently used first, until `needed` more bytes fit
        (`keep`: components that stay in memory whatever is evicted)."""
        evicted = []
        while self._used_with(keep) + needed > self.memory_budget:
            with self._lock:
                candidates = [u for u in self._units.values() if u.pins == 0]
                if not candidates:
                    break
                victim = min(candidates, key=lambda u: u.last_used)
                del self._units[victim.key]
            evicted.append(victim.key)
            logger.info("evicted %s (%s) to stay within the memory budget of %s", victim.key,
                        format_bytes(victim.total), format_bytes(self.memory_budget))
            del victim
            gc.collect()
        return evicted

    # ------------------------------------------------------------------ any thread
    def _used_with(self, keep: list) -> int:
        """Bytes in use, plus the components in `keep` that no loaded unit holds any more."""
        with self._lock:
            held = {id(u.components[n]) for u in self._units.values() for n in u.sizes}
            return self._used_locked() + sum(parameter_bytes(c) for c in keep if id(c) not in held)

    def _used_locked(self) -> int:
        """Parameter bytes in memory: a component shared by several units counts once."""
        seen, total = set(), 0
        for unit in self._units.values():
            for name, size in unit.sizes.items():
                if id(unit.components[name]) not in seen:
                    seen.add(id(unit.components[name]))
                    total += size
        return total

    def status(self) -> dict:
        """Loaded units with their components' sizes, device, dtype and budget (plain data)."""
        with self._lock:
            units = sorted(self._units.values(), key=lambda u: u.last_used, reverse=True)
            holders: dict = {}
            for u in units:
                for name in u.sizes:
                    holders.setdefault(id(u.components[name]), []).append(u.key)
            listed = [{"source": u.stage.source, "role": u.stage.stage.role, "part": u.stage.stage.part,
                       "bytes": u.total, "in_use": u.pins > 0, "components": dict(sorted(u.sizes.items())),
                       "shared": sorted(n for n in u.sizes if len(holders[id(u.components[n])]) > 1),
                       "idle_s": round(time.monotonic() - u.last_used, 1)} for u in units]
            used = self._used_locked()
        return {"device": self.device, "dtype": self.dtype, "budget": self.memory_budget, "used": used,
                "over_budget": used > self.memory_budget, "units": listed}
