"""DreamBooth Studio's training engine: config, data, class images, the LoRA loop, adapters, inference.

Never imports gradio. Submodules are imported lazily by callers; importing this package is cheap.
"""

import logging

__all__ = ["__version__"]
__version__ = "0.1.0"


class _NoTorchvisionFallbackNotice(logging.Filter):
    """Drop transformers' notice that torchvision is missing and its PIL image processors are used.

    diffusers' SD pipeline module touches `CLIPImageProcessor`; without torchvision (there is no
    CPU build of it, and this project uses PIL on purpose) transformers then logs that it falls back
    to the PIL processor. That is the intended set-up, so the line is noise for every user of the
    engine (CLI, app, tests). Every other transformers message passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back" not in record.getMessage()


# The logger transformers creates under this name later is this same object.
logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionFallbackNotice())


class _NoTextEncoderLoraNotice(logging.Filter):
    """Drop diffusers' "No LoRA keys associated to CLIPTextModel" warning.

    It is logged for every adapter without a text-encoder LoRA (the default here) each time one is
    loaded, and says itself that it is safe to ignore then; the app's log filled up with it.
    Adapter files that should carry text-encoder keys are checked when imported (`import-adapter`).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No LoRA keys associated to CLIPTextModel")


for _name in ("diffusers.loaders.lora_base", "diffusers.loaders.peft"):
    logging.getLogger(_name).addFilter(_NoTextEncoderLoraNotice())
