"""The transformers backend: a local Hugging Face model folder behind the ChatModel interface (CPU, float32).

Imported only when such a model is loaded, so a process that chats with GGUFs never imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from queue import Queue
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)
from transformers.generation.streamers import BaseStreamer

from ..errors import InputError, ModelError
from .base import DEFAULT_CTX, ChatModel, GenerationSettings, Messages, check_messages

log = logging.getLogger(__name__)

# Special tokens that end a turn in common chat formats: llama.cpp's vocabulary marks the same texts as
# end-of-generation, so both backends stop on the same tokens.
END_OF_TURN_TEXTS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<|end_of_text|>", "<EOT>", "<|return|>", "<|call|>", "<｜end▁of▁sentence｜>",
)  # fmt: skip
REPEAT_LAST_N = 64  # llama-cpp-python's window for the repeat penalty


class _RecentRepeatPenalty(RepetitionPenaltyLogitsProcessor):
    """The repeat penalty as llama.cpp applies it: to the last ``last_n`` *generated* tokens only."""

    def __init__(self, penalty: float, prompt_len: int, last_n: int = REPEAT_LAST_N):
        super().__init__(penalty)
        self.prompt_len = prompt_len
        self.last_n = last_n

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        start = max(self.prompt_len, input_ids.shape[1] - self.last_n)
        if start >= input_ids.shape[1]:
            return scores
        return super().__call__(input_ids[:, start:], scores)


class _StopFlag(StoppingCriteria):
    """Ends a background generation whose consumer has gone away."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


class _IdStreamer(BaseStreamer):
    """Hands each new token id to the consumer the moment ``generate`` picks it."""

    def __init__(self) -> None:
        self.queue: Queue[int | None | BaseException] = Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first passes the prompt
            self._prompt_seen = True
            return
        for tok in value.reshape(-1).tolist():
            self.queue.put(int(tok))

    def end(self) -> None:
        self.queue.put(None)


class TransformersChatModel(ChatModel):
    """A Hugging Face causal LM run by transformers on the CPU."""

    backend = "transformers"

    def __init__(self, path: Path, model: Any, tokenizer: Any, n_ctx: int, seed: int):
        self.path = path
        self.model = model
        self.tokenizer = tokenizer
        self.n_ctx = n_ctx
        self.seed = seed
        self.metadata = {"general.name": path.name, "general.architecture": str(model.config.model_type)}
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, str) and template:
            self.metadata["tokenizer.chat_template"] = template
        self.n_vocab = int(model.get_output_embeddings().weight.shape[0])
        self._eog = _end_of_generation_ids(model, tokenizer)
        if not self._eog:
            log.warning("%s: no EOS or end-of-turn token; replies stop at max_tokens only", path)

    # --- token level ------------------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool = False, add_bos: bool = False) -> list[int]:
        enc = self.tokenizer(text, add_special_tokens=add_bos, split_special_tokens=not special)
        return list(enc["input_ids"])

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def is_end_of_generation(self, token: int) -> bool:
        return int(token) in self._eog

    def logits(self, text_or_ids: str | Sequence[int], *, add_bos: bool = False) -> np.ndarray:
        ids = self._ids_for_logits(text_or_ids, add_bos)
        if max(ids) >= self.n_vocab or min(ids) < 0:
            raise InputError(f"logits: token ids must be in [0, {self.n_vocab})")
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
        return out.float().numpy().astype(np.float32, copy=False)

    # --- generation -------------------------------------------------------------------------------
    def prompt_ids(self, messages: Messages) -> list[int]:
        check_messages(messages)
        if not self.chat_template:
            raise ModelError(f"{self.path} has no chat template (tokenizer_config.json chat_template)")
        text = self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], add_generation_prompt=True, tokenize=False
        )
        return self.tokenize(text, special=True, add_bos=False)

    def _generate_kwargs(self, ids: Sequence[int], s: GenerationSettings) -> dict[str, Any] | None:
        """``model.generate`` arguments for ``settings`` (None: no room left in the context)."""
        ids = list(ids)
        if not ids:
            raise InputError("nothing to continue: the prompt has no tokens")
        if len(ids) >= self.n_ctx:
            raise InputError(f"prompt of {len(ids)} tokens does not fit the context of {self.n_ctx}")
        budget = min(s.max_tokens, self.n_ctx - len(ids))
        if budget <= 0:
            return None
        sampling = s.temperature > 0
        eog = sorted(self._eog)
        pad = self.tokenizer.pad_token_id
        config = GenerationConfig(
            max_new_tokens=budget,
            do_sample=sampling,
            eos_token_id=eog or None,
            pad_token_id=pad if pad is not None else (eog[0] if eog else 0),
            **(
                {
                    "temperature": s.temperature,
                    "top_k": max(s.top_k, 0),
                    "top_p": s.top_p,
                    "min_p": s.min_p or None,
                }
                if sampling
                else {}
            ),
        )
        processors = LogitsProcessorList()
        if s.repeat_penalty != 1.0:
            processors.append(_RecentRepeatPenalty(s.repeat_penalty, len(ids)))
        if sampling:
            torch.manual_seed(s.seed if s.seed is not None else self.seed)
        return {
            "input_ids": torch.tensor([ids]),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "generation_config": config,
            "logits_processor": processors,
        }

    def _new_tokens(self, ids: Sequence[int], s: GenerationSettings) -> list[int]:
        kwargs = self._generate_kwargs(ids, s)
        if kwargs is None:
            return []
        with torch.inference_mode():
            out = self.model.generate(**kwargs)[0, len(ids) :].tolist()
        while out and self.is_end_of_generation(out[-1]):
            out.pop()
        return [int(t) for t in out]

    def _in_background(self, kwargs: dict[str, Any], streamer: Any, stop: _StopFlag) -> threading.Thread:
        def run() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(
                        **kwargs, streamer=streamer, stopping_criteria=StoppingCriteriaList([stop])
                    )
            except BaseException as e:  # handed to the consumer, which re-raises it
                errors.append(e)
                streamer.end()

        errors: list[BaseException] = []
        thread = threading.Thread(target=run, name="gguf-factory-generate", daemon=True)
        thread.errors = errors  # type: ignore[attr-defined]
        thread.start()
        return thread

    def generate_tokens(self, ids: Sequence[int], **settings: Any) -> Iterator[int]:
        s = GenerationSettings(**settings)
        kwargs = self._generate_kwargs(ids, s)
        if kwargs is None:
            return iter(())
        return self._token_stream(kwargs)

    def _token_stream(self, kwargs: dict[str, Any]) -> Iterator[int]:
        streamer, stop = _IdStreamer(), _StopFlag()
        thread = self._in_background(kwargs, streamer, stop)
        try:
            while (tok := streamer.queue.get()) is not None:
                if self.is_end_of_generation(tok):
                    break
                yield tok
        finally:
            stop.event.set()
            thread.join()
        if thread.errors:  # type: ignore[attr-defined]
            raise thread.errors[0]  # type: ignore[attr-defined]

    def _text_stream(self, kwargs: dict[str, Any]) -> Iterator[str]:
        streamer = TextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        stop = _StopFlag()
        thread = self._in_background(kwargs, streamer, stop)
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            stop.event.set()
            thread.join()
        if thread.errors:  # type: ignore[attr-defined]
            raise thread.errors[0]  # type: ignore[attr-defined]

    def chat(self, messages: Messages, *, stream: bool = False, **settings: Any) -> str | Iterator[str]:
        s = GenerationSettings(**settings)
        ids = self.prompt_ids(messages)
        if stream:
            kwargs = self._generate_kwargs(ids, s)
            return iter(()) if kwargs is None else self._text_stream(kwargs)
        return self.detokenize(self._new_tokens(ids, s)).strip()

    def generate(self, prompt: str, *, stream: bool = False, **settings: Any) -> str | Iterator[str]:
        s = GenerationSettings(**settings)
        ids = self.tokenize(prompt, special=True, add_bos=True)  # as llama-cpp-python's create_completion
        if not ids and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id]
        if stream:
            kwargs = self._generate_kwargs(ids, s)
            return iter(()) if kwargs is None else self._text_stream(kwargs)
        return self.detokenize(self._new_tokens(ids, s))

    def close(self) -> None:
        self.model = None
        self.tokenizer = None


def _end_of_generation_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list | tuple):
            ids.update(int(t) for t in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for tok_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False) and str(added) in END_OF_TURN_TEXTS:
            ids.add(int(tok_id))
    return ids


def load_hf(
    path: Path, *, n_ctx: int | None = None, threads: int | None = None, seed: int = 1234
) -> TransformersChatModel:
    """Load a local Hugging Face model folder (safetensors weights only: nothing is unpickled)."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{path} is not a Hugging Face model folder: no config.json")
    try:
        json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{config_path}: unreadable model config ({e})") from None
    if not any(path.glob("*.safetensors")):
        raise ModelError(f"{path} has no .safetensors weights (pickled weights are not loaded)")
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"transformers could not load the tokenizer of {path}: {e}") from e
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, use_safetensors=True, dtype=torch.float32, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ModelError(f"transformers could not load {path}: {e}") from e
    model.eval()
    trained = getattr(model.config, "max_position_embeddings", None)
    if n_ctx is None:
        n_ctx = min(trained, DEFAULT_CTX) if trained else DEFAULT_CTX
    elif trained and n_ctx > trained:
        log.warning(
            "%s: context %d is longer than the %d tokens the model was trained on", path, n_ctx, trained
        )
    if n_ctx <= 0:
        raise InputError(f"context length must be positive, got {n_ctx}")
    return TransformersChatModel(path, model, tokenizer, n_ctx, seed)
