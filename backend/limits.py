"""Every limit on what a request or a pipeline call may ask for, in one place.

No MindSpore here: the page's controls (kandinsky_ui), the app's requests (backend/requests.py)
and the pipelines' argument checks (backend/pipelines/inputs.py) all read these.

Two audiences, two sets where they differ:
- the library (the diffusers-named pipelines): what the models can take at all;
- the app (a shared server: one engine thread serves every browser, and a job holds it until it
  ends): less, so that one request cannot take the machine's memory or the queue for hours.
  Kandinsky 3 at 1024x1024 already peaks at 13.6 GB on CPU (docs/MEMORY.md); 2048x2048 is four
  times the pixels and the library's 4096x4096 sixteen times, where one UNet block alone needs
  about 1 GB of activations.
"""
from __future__ import annotations

# --------------------------------------------------------------------- the library's pipelines
MAX_SIDE = 4096          # pixels per side a pipeline accepts
MAX_STEPS = 1000         # the schedulers' num_train_timesteps
MAX_BATCH = 64           # images per prompt in one pipeline call

# --------------------------------------------------------------------- the app's requests and page
SIZE_MULTIPLE = 64       # the MoVQ works on multiples of 8 latent pixels of 8 pixels each
APP_MAX_SIDE = 2048      # see the module docstring
APP_MAX_STEPS = 200      # decoder and prior steps of one run (the docs use 25 to 100)
MIN_PRIOR_STEPS = 2      # the UnCLIP scheduler spaces its timesteps over n - 1 intervals (as diffusers)
MAX_GUIDANCE = 20.0      # decoder and prior classifier-free guidance (the docs use 1 to 4)
APP_MAX_BATCH_SIZE = 8   # images per run
MAX_BATCH_COUNT = 16     # runs one after another
MAX_SEED = 2**32 - 1
MAX_PREVIEW_EVERY = 20   # a preview every n-th step
MAX_TEXT_CHARS = 10_000  # CLIP reads 77 tokens, T5 128; the rest is only stored in the PNG and reported
MAX_INPUT_PIXELS = 8192 * 8192   # an input image beyond this is refused before it is decoded
MAX_MASK_EDIT = 64       # pixels a mask may be grown by, or its edge blurred over
MIN_MIX_INPUTS, MAX_MIX_INPUTS = 2, 6   # texts and images one interpolation mixes
MAX_MIX_WEIGHT = 1.0     # interpolation weights are relative: each in [0, 1], normalised to sum 1
MAX_WALK_STEPS = 8       # extra images of an interpolation walk
MAX_HIRES_SCALE = 2      # the hi-res pass's size is the base size times at most this (A1111's hires fix offers 1 to 4;
                         # each doubling quadruples the pass's UNet steps and decode: 2x of a 768x768 base is 1536x1536)
MAX_OUTPAINT_BLEND = 128  # pixels of the old image an outpainting mask feathers into
