"""The torch reference environment (diffusers 0.35.2, transformers 4.57.1, torch 2.13, CPU) that the
comparison and benchmark tools start as a subprocess. Its interpreter is $KANDINSKY_TORCH_PYTHON,
by default /work/refenv/bin/python (README: "The reference environment for tools/")."""
import os

TORCH_PYTHON = os.environ.get("KANDINSKY_TORCH_PYTHON", "/work/refenv/bin/python")
