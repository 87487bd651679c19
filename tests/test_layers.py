"""Layering: the engine never imports gradio, and importing it is cheap."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_trainer_core_never_imports_gradio():
    for path in (ROOT / "trainer_core").rglob("*.py"):
        text = path.read_text()
        assert "import gradio" not in text and "from gradio" not in text, path
    code = (
        "import sys, trainer_core.cli, trainer_core.loop, trainer_core.inference, trainer_core.adapters;"
        "assert 'gradio' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_importing_the_package_does_not_import_torch():
    code = "import sys, trainer_core, trainer_core.config, trainer_core.events; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_no_torchvision_notice_when_the_engine_builds_a_pipeline():
    """transformers' 'requires torchvision (not installed); falling back' line is filtered; others pass."""
    code = (
        "import logging, trainer_core.components as c\n"
        "parts, _ = c.load_components('tiny-sd15')\n"
        "c.assemble_pipeline(parts)\n"
        "logging.getLogger('transformers.utils.import_utils').warning('another transformers warning')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "torchvision" not in proc.stderr, proc.stderr
    assert "another transformers warning" in proc.stderr


def test_ui_imports_no_torch_and_engine_no_gradio():
    """Building the whole page (every tab, the API) loads gradio but not torch; the engine loads lazily."""
    code = (
        "import sys, tempfile\n"
        "from dreambooth_ui.layout import build_app\n"
        "from dreambooth_ui.studio import Studio\n"
        "build_app(Studio(tempfile.mkdtemp()))\n"
        "assert 'torch' not in sys.modules, 'torch imported while building the page'\n"
        "assert 'gradio' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    for path in (ROOT / "dreambooth_ui").rglob("*.py"):
        text = path.read_text()
        assert "import torch" not in text and "from torch" not in text, path


def test_no_text_encoder_lora_notice_when_an_adapter_loads(tmp_path):
    """An adapter without text-encoder LoRA loads without diffusers' "No LoRA keys ... CLIPTextModel"."""
    code = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "import trainer_core, trainer_core.components as c\n"
        "from lora_fixtures import lora_adapter\n"
        f"adapter = lora_adapter(c.tiny_model_dir('tiny-sd15'), __import__('pathlib').Path({str(tmp_path / 'a')!r}), 1)\n"
        "parts, _ = c.load_components('tiny-sd15')\n"
        "pipe = c.assemble_pipeline(parts)\n"
        "pipe.load_lora_weights(str(adapter))\n"
        "print('loaded', pipe.get_list_adapters())\n"
    )
    env = {**__import__("os").environ, "DREAMBOOTH_STUDIO_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, env=env
    )
    assert "loaded" in proc.stdout
    assert "No LoRA keys associated" not in proc.stderr, proc.stderr
