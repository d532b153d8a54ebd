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


def test_chat_process_imports_only_the_runtime() -> None:
    """A process that chats (the package, its runtime, the bench child) imports no verb module, neither
    gguf-py nor pydantic nor yaml nor rich: together about 17 MB of the chat process's RSS."""
    code = (
        "import sys, gguf_factory, gguf_factory.runtime, gguf_factory.bench\n"
        "mods = set(sys.modules)\n"
        "heavy = sorted(m for m in ('gguf', 'pydantic', 'yaml', 'rich', 'gguf_factory.train', "
        "'gguf_factory.convert', 'gguf_factory.quantize', 'gguf_factory.evaluate') if m in mods)\n"
        "assert not heavy, heavy\n"
        "assert callable(gguf_factory.quantize) and 'gguf_factory.quantize' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
