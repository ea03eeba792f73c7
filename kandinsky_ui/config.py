"""What the page starts with: the models the Engine offers, the settings shown first, size presets."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from backend.requests import GenerationRequest

SIZE_PRESETS = [("768x768 (square)", (768, 768)), ("512x512", (512, 512)), ("1024x1024", (1024, 1024)),
                ("1024x576 (16:9)", (1024, 576)), ("576x1024 (9:16)", (576, 1024)), ("768x512 (3:2)", (768, 512)),
                ("512x768 (2:3)", (512, 768))]
# The tiny demo models: small images and few steps keep a run to seconds on a CPU.
DEMO_SIZE_PRESETS = [("64x64", (64, 64)), ("128x128", (128, 128)), ("256x256", (256, 256)), ("128x64", (128, 64))]
DEMO_SETTINGS = {"width": 128, "height": 128, "num_inference_steps": 20, "prior_num_inference_steps": 10}


@dataclass
class UIConfig:
    models: dict                                   # key -> backend.families.ModelSpec, in selector order
    defaults: dict                                 # shared request field -> the value shown first
    size_presets: list                             # (label, (width, height))
    title: str = "Kandinsky Studio"
    gallery_limit: int = 100
    notes: list = field(default_factory=list)      # lines for the header
    browser_secret: str | None = None              # key of the owner id in localStorage (None: per start)
    logins: bool = False                           # --auth: owners are the users (kandinsky_ui/sessions.py)
    admins: tuple = ()                             # --admin: users who may unload models or set the budget
    local_admin: bool = True                       # without logins: a client on this machine may (serving only here)
    engine_capacity: int = 257                     # jobs the Engine holds at once (EngineConfig.max_waiting + 1 running)

    @property
    def demo(self) -> bool:
        return all(spec.demo for spec in self.models.values())

    @property
    def choices(self) -> list[tuple[str, str]]:
        """The model selector's (label, key) pairs."""
        return [(spec.label, key) for key, spec in self.models.items()]

    def model_defaults(self, spec) -> dict:
        """The settings a model's family docs use; demo models keep their small sizes and steps."""
        if spec.demo:
            return {"guidance_scale": spec.family.defaults["guidance_scale"]}
        return dict(spec.family.defaults)


def page_config(models: dict, browser_secret: str | None = None, **access) -> UIConfig:
    """The page for the Engine's `models`: the request defaults, with the first model's family settings;
    `access`: logins, admins, local_admin (UIConfig)."""
    defaults = {f.name: getattr(GenerationRequest(), f.name) for f in fields(GenerationRequest)}
    config = UIConfig(models=dict(models), defaults=defaults, size_presets=list(SIZE_PRESETS),
                      browser_secret=browser_secret, **access)
    config.defaults["model"] = next(iter(models))
    if config.demo:
        config.defaults.update(DEMO_SETTINGS)
        config.size_presets = DEMO_SIZE_PRESETS + config.size_presets
    config.defaults.update(config.model_defaults(models[config.defaults["model"]]))
    return config
