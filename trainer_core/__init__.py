"""DreamBooth Studio's training engine: config, data, class images, the LoRA loop, adapters, inference.

Never imports gradio. Submodules are imported lazily by callers; importing this package is cheap.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
