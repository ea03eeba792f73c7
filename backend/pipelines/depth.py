"""Depth from a photo, for the ControlNet pipelines' `hint`.

`DepthEstimationPipeline` is transformers 4.57.1's `pipeline("depth-estimation")`
(transformers/pipelines/depth_estimation.py) on our DepthAnythingForDepthEstimation
(backend/models/depth_anything.py), for the transformers-format Depth Anything repos such as
`depth-anything/Depth-Anything-V2-Small-hf` (config.json, preprocessor_config.json and
model.safetensors at the top of the repo):

    image  -> EXIF orientation applied, RGB (transformers' load_image)
           -> transformers' own DPTImageProcessorPil from the repo's preprocessor_config.json (resize
              keeping the aspect ratio to multiples of 14 around 518, bicubic; ImageNet mean/std)
           -> the model: predicted depth (1, h, w), larger = nearer
           -> bicubic resize to the image's size (DPTImageProcessor.post_process_depth_estimation,
              which needs torch: done here by backend/nn/interpolate.py, torch's arithmetic)
           -> {"predicted_depth": (H, W) float32, "depth": the depth scaled to 0-255 by its own
              min and max, an "L" image, white = near}

`make_hint(depth)` turns the depth image into the ControlNet pipelines' `hint` as the Kandinsky 2.2
ControlNet docs do: the grey levels repeated over RGB, / 255, (1, 3, H, W).

    from backend.pipelines import DepthEstimationPipeline, KandinskyV22ControlnetPipeline, make_hint

    depth_estimator = DepthEstimationPipeline.from_pretrained("depth-anything/Depth-Anything-V2-Small-hf")
    hint = make_hint(depth_estimator(photo)["depth"])   # then pipe(..., hint=hint)
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from transformers import DPTImageProcessorPil
from transformers.models.dpt.image_processing_pil_dpt import get_resize_output_image_size

from backend import weights
from backend.limits import MAX_INPUT_PIXELS
from backend.models.depth_anything import DepthAnythingForDepthEstimation
from backend.nn import interpolate_bicubic
from backend.pipelines import inputs
from backend.pipelines.loading import ProgressCallback

# PIL filters by the integer transformers stores in `resample`
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def load_image_processor(folder: str | os.PathLike) -> DPTImageProcessorPil:
    """transformers' DPTImageProcessorPil from `folder/preprocessor_config.json` (it runs without torch)."""
    config = weights.read_config(folder, "preprocessor_config.json")
    if config.get("resample", DPTImageProcessorPil.resample) not in _RESAMPLE:
        raise weights.WeightsError(f"{Path(folder) / 'preprocessor_config.json'}: resample must be one of "
                                   f"{sorted(_RESAMPLE)} (PIL filter numbers); got {config.get('resample')!r}")
    std = config.get("image_std", DPTImageProcessorPil.image_std)
    if 0 in (std if isinstance(std, (list, tuple)) else [std]):
        raise weights.WeightsError(f"{Path(folder) / 'preprocessor_config.json'}: image_std must not contain 0")
    return DPTImageProcessorPil.from_dict(config)


class DepthEstimationPipeline:
    """transformers' depth-estimation pipeline on our Depth Anything port: `pipe(image)` ->
    {"predicted_depth": (H, W) float32, "depth": PIL "L" image}, both at the image's size."""

    # What the model manager (backend/manager.py) loads: a transformers model repo, no model_index.json;
    # its files sit at the top of the repo (subfolder "").
    component_names = ("model", "image_processor")
    subfolders = ("",)
    derived_values: dict = {}   # no on-demand components

    def __init__(self, model: DepthAnythingForDepthEstimation, image_processor: DPTImageProcessorPil,
                 dtype: str | None = None):
        """`dtype` is the model's own (the manager passes every pipeline the app's dtype)."""
        self.model = model
        self.image_processor = image_processor

    @staticmethod
    def load_components(folder: str | os.PathLike, dtype="float32", on_tensor=None) -> dict:
        """The components of a local repo folder, by `component_names`, loaded strictly."""
        return {"model": weights.load_model(DepthAnythingForDepthEstimation, folder, dtype=dtype, on_tensor=on_tensor),
                "image_processor": load_image_processor(folder)}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, dtype="float32",
                        on_progress: ProgressCallback | None = None, local_files_only: bool | None = None,
                        cache_dir=None, revision=None) -> "DepthEstimationPipeline":
        """From a local folder or a Hub repo id (a transformers model repo: config.json,
        preprocessor_config.json and model.safetensors at its top). Loading is strict; offline, a repo
        missing from the cache gets the same help as the other models (backend/weights.py)."""
        download = None
        if on_progress is not None:
            download = lambda filename, done, total: on_progress(f"download {filename}", done, total)  # noqa: E731
        folder = weights.resolve_pretrained(pretrained_model_name_or_path, subfolders=cls.subfolders,
                                            local_files_only=local_files_only, cache_dir=cache_dir,
                                            revision=revision, on_download=download)
        report = None
        if on_progress is not None:
            report = lambda done, total: on_progress("depth_estimator", done, total)  # noqa: E731
        return cls(**cls.load_components(folder, dtype, report))

    @property
    def patch_size(self) -> int:
        return self.model.config.patch_size

    def __call__(self, image, *, name: str = "image"):
        """One image (a PIL image or a path to an image file) -> {"predicted_depth", "depth"}; a list of
        them -> a list of such dicts, as transformers' pipeline returns."""
        if isinstance(image, (list, tuple)):
            if not image:
                raise ValueError(f"`{name}` is an empty list")
            return [self(item, name=f"{name}[{i}]") for i, item in enumerate(image)]
        image = self.load_image(image, name)
        pixel_values = self.image_processor(np.asarray(image), return_tensors="np",
                                            input_data_format="channels_last").pixel_values
        predicted = self.model(pixel_values.astype(np.float32, copy=False))  # (1, h, w)
        predicted = predicted if isinstance(predicted, np.ndarray) else predicted.asnumpy()
        return self.postprocess(predicted.astype(np.float32, copy=False), (image.height, image.width))

    def load_image(self, image, name: str = "image") -> Image.Image:
        """transformers' load_image (EXIF orientation, then RGB; a file path is opened), with the checks
        every input image gets: the size from the header before anything is decoded, and enough pixels
        for the model to see one patch."""
        if isinstance(image, (str, os.PathLike)):
            try:
                image = Image.open(image)  # lazy: the header only
            except (OSError, Image.DecompressionBombError) as error:
                raise ValueError(f"`{name}` cannot be read as an image: {error}") from None
        if not isinstance(image, Image.Image):
            raise ValueError(f"`{name}` must be a PIL image or the path of an image file; got {type(image).__name__}")
        if image.width * image.height > MAX_INPUT_PIXELS:
            raise ValueError(f"`{name}` is {image.width}x{image.height} pixels; at most {MAX_INPUT_PIXELS:,} pixels "
                             f"(8192x8192) are allowed (refused before decoding)")
        patch = self.patch_size
        if image.width < patch or image.height < patch:
            raise ValueError(f"`{name}` is {image.width}x{image.height} pixels, too small to estimate depth: at least "
                             f"{patch}x{patch} (one patch of the model)")
        image = inputs.to_rgb(ImageOps.exif_transpose(image), name)
        height, width = self.model_input_size(image.height, image.width)
        if height < patch or width < patch:
            raise ValueError(f"`{name}` is {image.width}x{image.height} pixels: resized for the model it would be "
                             f"{width}x{height}, less than one {patch}x{patch} patch; the sides may differ by a "
                             f"factor of about {self.max_aspect_ratio():.0f} at most")
        return image

    def model_input_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the model's input for an image of this size, by the processor's own rule."""
        processor = self.image_processor
        if not processor.do_resize:
            return height, width
        size = get_resize_output_image_size(np.broadcast_to(np.uint8(0), (1, height, width)),
                                            (processor.size.height, processor.size.width),
                                            processor.keep_aspect_ratio, processor.ensure_multiple_of)
        return size.height, size.width

    def max_aspect_ratio(self) -> float:
        """About how elongated an image may be before its short side resizes to less than one patch."""
        processor = self.image_processor
        long_side = max(processor.size.height, processor.size.width) if processor.do_resize else MAX_INPUT_PIXELS
        return long_side / (self.patch_size / 2)

    @staticmethod
    def postprocess(predicted: np.ndarray, size: tuple[int, int]) -> dict:
        """(1, h, w) model output -> the pipeline's dict at `size` = (H, W): transformers 4.57.1's
        post_process_depth_estimation (bicubic, align_corners=False) and its 0-255 normalisation."""
        depth = interpolate_bicubic(predicted[:, None], size)[0, 0]  # (H, W)
        low, high = depth.min(), depth.max()
        # transformers divides by high - low whatever it is (a flat map gives NaNs, cast to 0); here 0 directly
        scaled = (depth - low) / (high - low) if high > low else np.zeros_like(depth)
        return {"predicted_depth": depth, "depth": Image.fromarray((scaled * 255).astype("uint8"))}


def make_hint(depth) -> np.ndarray:
    """The ControlNet pipelines' `hint` from a depth image, as the Kandinsky 2.2 ControlNet docs make it:
    its grey levels repeated over RGB, divided by 255 -> (1, 3, H, W) float32 in [0, 1].

    `depth`: a PIL image (the pipeline's "depth"; a colour image is taken channel by channel) or an
    (H, W) array of 0-255 grey levels."""
    if isinstance(depth, Image.Image):
        array = np.asarray(depth if depth.mode == "L" else inputs.to_rgb(depth, "depth"))
    else:
        array = np.asarray(inputs.as_numpy(depth))
        if array.ndim != 2:
            raise ValueError(f"`depth` must be a PIL image or an (H, W) array; got shape {tuple(array.shape)}")
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
            raise ValueError("`depth` array values must be grey levels in [0, 255]")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)  # np.concatenate([image, image, image], axis=2)
    return (array.astype(np.float32) / np.float32(255.0)).transpose(2, 0, 1)[None]
