"""Gradio front end of Kandinsky Studio. Never imports MindSpore: all compute goes through the
JobRunner (backend/jobs.py) that app.py hands to `build_ui`."""
from kandinsky_ui.handlers import Studio, UIConfig
from kandinsky_ui.layout import CSS, build_ui

__all__ = ["CSS", "Studio", "UIConfig", "build_ui"]
