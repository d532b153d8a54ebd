"""The model families `convert` supports and what is verified for each (``gguf-factory convert --list``).

Every family here has a tiny random-weight checkpoint built from transformers' own config class with a
tokenizer.json in the layout its real checkpoints ship (tests/model_builders.py), converted and run in
llama.cpp (tests/test_convert_families.py). A check listed in ``verified`` is asserted by that test for the
family, so the table cannot claim more than the suite proves:

* ``tokenizer``: 0 id mismatches between transformers and llama.cpp on edge cases, English and 8 other
  languages, plain and rendered through the chat template (``note`` names any documented exception);
* ``greedy``: identical greedy continuations on the F32 GGUF;
* ``top1-f32``: top-1 agreement >= 99.9 % at every prompt position (F32); for a family whose note is
  ``GELU_NOTE``, against transformers computing GELU as ggml's CPU backend does (the note says why);
* ``top1-f16``: top-1 agreement >= 99 % on the F16 GGUF (half-precision rounding flips near ties).
"""

from __future__ import annotations

from dataclasses import dataclass

CHECKS = ("tokenizer", "greedy", "top1-f32", "top1-f16")


@dataclass(frozen=True)
class Family:
    key: str  # the test fixture's name (tests/model_builders.py)
    name: str
    hf_architectures: tuple[str, ...]
    llama_cpp_arch: str
    tokenizer: str  # the tokenizer.json form: llama.cpp tokenizer model and pre-tokenizer
    verified: tuple[str, ...] = CHECKS
    note: str = ""
    # A documented tokenizer exception the test asserts exactly (tests/test_convert_families.py):
    # "llama-tokenizer-class": transformers loads these checkpoints with its LlamaTokenizer class, whose
    # Metaspace pipeline (legacy=false) differs from the tokenizer.json they ship; llama.cpp must then match
    # the tokenizer.json's own pipeline on every text.
    tokenizer_exception: str | None = None

    @property
    def tokenizer_model(self) -> str:
        """llama.cpp's ``tokenizer.ggml.model``."""
        return "llama" if self.tokenizer.startswith("SentencePiece") else "gpt2"

    @property
    def pre(self) -> str | None:
        """llama.cpp's ``tokenizer.ggml.pre`` (byte-level BPE only)."""
        if self.tokenizer_model != "gpt2":
            return None
        return self.tokenizer.split(", ")[1].split(" ")[0]


_SPM = "SentencePiece BPE (llama)"
# Gemma and Phi-2 on their random-weight fixtures: ggml's CPU backend computes GELU through an fp16 lookup
# table, which moves a few near-tied top-1 picks; against transformers with that same GELU the F32 file agrees
# at every position (tests/model_builders.py: Parity.top1_f32_ggml_gelu, asserted by the family test)
GELU_NOTE = (
    "top-1 (F32) just under 99.9 % against transformers as is, every flip at a margin below llama.cpp's own "
    "logit error there; ≥ 99.9 % (100 % measured) against transformers computing GELU as ggml's CPU backend "
    "does (an fp16 table): the flips are llama.cpp's GELU arithmetic, not the conversion"
)

FAMILIES: tuple[Family, ...] = (
    Family(
        "llama2",
        "Llama 1 / Llama 2",
        ("LlamaForCausalLM",),
        "llama",
        f"{_SPM}, legacy Prepend+Replace normalizer",
        note="ids = the shipped tokenizer.json's; transformers' LlamaTokenizer(legacy=false) class differs "
        "from it (and from SentencePiece) after special tokens inside the text and on a leading space",
        tokenizer_exception="llama-tokenizer-class",
    ),
    Family(
        "llama2-rope-linear",
        "Llama 2, linear rope scaling",
        ("LlamaForCausalLM",),
        "llama",
        f"{_SPM}, legacy Prepend+Replace normalizer",
        note="as Llama 2",
        tokenizer_exception="llama-tokenizer-class",
    ),
    Family(
        "llama3",
        "Llama 3.x (llama3 rope scaling)",
        ("LlamaForCausalLM",),
        "llama",
        "byte-level BPE, llama-bpe",
    ),
    Family(
        "llama3-rope-yarn",
        "Llama 3, YaRN rope scaling",
        ("LlamaForCausalLM",),
        "llama",
        "byte-level BPE, llama-bpe",
    ),
    Family(
        "mistral",
        "Mistral 7B",
        ("MistralForCausalLM",),
        "llama",
        f"{_SPM}, legacy Prepend+Replace normalizer",
    ),
    Family(
        "mixtral",
        "Mixtral (MoE)",
        ("MixtralForCausalLM",),
        "llama",
        f"{_SPM}, legacy Prepend+Replace normalizer",
    ),
    Family("qwen2", "Qwen2 / Qwen2.5", ("Qwen2ForCausalLM",), "qwen2", "byte-level BPE, qwen2 (NFC)"),
    Family("qwen2moe", "Qwen2-MoE", ("Qwen2MoeForCausalLM",), "qwen2moe", "byte-level BPE, qwen2 (NFC)"),
    Family("qwen3", "Qwen3", ("Qwen3ForCausalLM",), "qwen3", "byte-level BPE, qwen2 (NFC)"),
    Family("qwen3moe", "Qwen3-MoE", ("Qwen3MoeForCausalLM",), "qwen3moe", "byte-level BPE, qwen2 (NFC)"),
    Family(
        "gemma",
        "Gemma",
        ("GemmaForCausalLM",),
        "gemma",
        f"{_SPM}, Replace normalizer, no prefix",
        note=GELU_NOTE,
    ),
    Family("gemma2", "Gemma 2", ("Gemma2ForCausalLM",), "gemma2", f"{_SPM}, Replace normalizer, no prefix"),
    Family("gemma3", "Gemma 3", ("Gemma3ForCausalLM",), "gemma3", f"{_SPM}, Replace + Split(' ') (a no-op)"),
    Family(
        "phi2",
        "Phi-1 / Phi-2",
        ("PhiForCausalLM",),
        "phi2",
        "byte-level BPE, gpt-2",
        note=GELU_NOTE,
    ),
    Family(
        "phi3", "Phi-3 / Phi-3.5", ("Phi3ForCausalLM",), "phi3", f"{_SPM}, legacy Prepend+Replace normalizer"
    ),
    Family("gpt2", "GPT-2", ("GPT2LMHeadModel",), "gpt2", "byte-level BPE, gpt-2"),
    Family("distilgpt2", "DistilGPT-2", ("GPT2LMHeadModel",), "gpt2", "byte-level BPE, gpt-2"),
    Family("dialogpt", "DialoGPT", ("GPT2LMHeadModel",), "gpt2", "byte-level BPE, gpt-2"),
    Family("gptneox", "GPT-NeoX / Pythia", ("GPTNeoXForCausalLM",), "gptneox", "byte-level BPE, gpt-2 (NFC)"),
    Family(
        "stablelm", "StableLM / StableLM 2", ("StableLmForCausalLM",), "stablelm", "byte-level BPE, stablelm2"
    ),
    Family("falcon", "Falcon", ("FalconForCausalLM", "RWForCausalLM"), "falcon", "byte-level BPE, falcon"),
    Family("olmo2", "OLMo 2", ("Olmo2ForCausalLM",), "olmo2", "byte-level BPE, dbrx"),
    Family("granite", "Granite 3.x", ("GraniteForCausalLM",), "granite", "byte-level BPE, starcoder"),
    Family("starcoder2", "StarCoder2", ("Starcoder2ForCausalLM",), "starcoder2", "byte-level BPE, starcoder"),
    Family("smollm3", "SmolLM3", ("SmolLM3ForCausalLM",), "smollm3", "byte-level BPE, llama-bpe"),
)


def family_table() -> list[dict[str, str]]:
    """One row per family for display: name, HF architectures, llama.cpp arch, vocab (the tokenizer.json
    form), whether ``convert model.gguf -o hf-dir`` rebuilds it (``gguf→hf``: round trips asserted by
    tests/test_from_gguf.py for every family), one column per check (✓ verified, — not), note."""
    from .from_gguf import supported_architectures

    rebuilt = set(supported_architectures())
    return [
        {
            "family": f.name,
            "architectures": ", ".join(f.hf_architectures),
            "llama.cpp": f.llama_cpp_arch,
            "vocab": f.tokenizer,
            "gguf→hf": "✓" if f.llama_cpp_arch in rebuilt else "—",
            **{check: "✓" if check in f.verified else "—" for check in CHECKS},
            "note": f.note,
        }
        for f in FAMILIES
    ]
