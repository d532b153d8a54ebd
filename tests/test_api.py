"""The public API: verbs importable from the package, and the chat path free of the training stack."""

from __future__ import annotations

import subprocess
import sys


def test_verbs_are_functions_even_after_their_subpackages_load() -> None:
    code = (
        "import gguf_factory as g, gguf_factory.train.scratch, gguf_factory.convert.archs.llama\n"
        "import gguf_factory.evaluate, gguf_factory.ladder, gguf_factory.quantize, gguf_factory.verify\n"
        "from gguf_factory import convert, convert_lora, evaluate, ladder, load, prepare, quantize\n"
        "from gguf_factory import train, verify\n"
        "import inspect\n"
        "verbs = (convert, convert_lora, evaluate, ladder, load, prepare, quantize, train, verify, g.train)\n"
        "for f in verbs:\n"
        "    assert inspect.isfunction(f), f\n"
        "from gguf_factory.train import PRESETS, ModelPreset\n"
        "assert isinstance(PRESETS['nano'], ModelPreset)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_runtime_does_not_import_torch_or_transformers() -> None:
    code = (
        "import sys, gguf_factory, gguf_factory.runtime, gguf_factory.bench, gguf_factory.chat\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
