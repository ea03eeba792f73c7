"""Gradio front end of Kandinsky Studio. Never imports MindSpore: everything that computes goes
through the Engine (backend/engine.py) that app.py hands to `build_ui`."""
from kandinsky_ui.config import UIConfig, page_config
from kandinsky_ui.layout import CSS, build_ui

__all__ = ["CSS", "UIConfig", "build_ui", "page_config"]
