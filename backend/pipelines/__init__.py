"""Pipelines with diffusers' names and arguments (numpy generator, numpy/PIL outputs)."""
from backend.pipelines.kandinsky2_2 import (
    KandinskyV22ControlnetImg2ImgPipeline,
    KandinskyV22ControlnetPipeline,
    KandinskyV22Img2ImgPipeline,
    KandinskyV22InpaintPipeline,
    KandinskyV22Pipeline,
)
from backend.pipelines.prior import KandinskyV22PriorEmb2EmbPipeline, KandinskyV22PriorPipeline
from backend.pipelines.kandinsky2_2_combined import (
    KandinskyV22CombinedPipeline,
    KandinskyV22Img2ImgCombinedPipeline,
    KandinskyV22InpaintCombinedPipeline,
)
from backend.pipelines.kandinsky2_1 import (
    KandinskyImg2ImgPipeline,
    KandinskyInpaintPipeline,
    KandinskyPipeline,
    KandinskyPriorPipeline,
)
from backend.pipelines.kandinsky2_1_combined import (
    KandinskyCombinedPipeline,
    KandinskyImg2ImgCombinedPipeline,
    KandinskyInpaintCombinedPipeline,
)
from backend.pipelines.kandinsky3 import Kandinsky3Img2ImgPipeline, Kandinsky3Pipeline
from backend.pipelines.depth import DepthEstimationPipeline, make_hint
