"""Knowledge distillation: train a (smaller) student on a teacher's token distributions.

The teacher is a local Hugging Face causal-LM folder (run by transformers in ``torch.no_grad`` on every
batch, exact full-vocabulary distributions) or a GGUF (run by llama.cpp through llama-cpp-python). A GGUF
teacher is run **once** per training example before training: for every position whose next token is an
assistant-turn target, the cache keeps the teacher's ``top_k`` (default 64) logits with their token ids and
the log-sum-exp of the whole row at the training temperature. That bounds the cache to ``top_k * 8 + 4``
bytes per target token (~0.5 KB at k=64) whatever the vocabulary; the KL on such a row is taken between the
top-k tokens plus one "all the other tokens" bucket (exact when ``top_k`` covers the vocabulary, and never
more than the full KL).

The objective on the assistant-turn positions the ordinary training uses (:mod:`.loop`) is::

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * cross-entropy(data)

The student is trained from scratch with a preset (it then takes the teacher's tokenizer: distillation
needs one vocabulary) or is a given ``base`` HF folder whose vocabulary must equal the teacher's. At the
end both models are scored on the validation split: loss and top-1 accuracy on the assistant tokens, and
the student's KL to the teacher (``KL(teacher || student)`` at T=1, full vocabulary, mean per token).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ModelError, TrainingError
from .devices import Runtime, start_runtime
from .finetune import FINETUNE_DEFAULTS, _max_positions, _token_id, check_base_folder, load_base, prepare_chat
from .loop import (
    IGNORE_INDEX,
    Example,
    TrainResult,
    _to,
    check_out_dir,
    checkpoint_plan,
    collate,
    count_params,
    encode_splits,
    load_splits,
    loop_settings,
    make_batches,
    quiet_hf_progress,
    run_loop,
    save_run,
    seed_everything,
    target_logits,
    time_now,
)
from .options import TrainSettings
from .scratch import ModelPreset, build_model, get_preset
from .tokenizer import ENDOFTEXT, IM_END

log = logging.getLogger(__name__)

__all__ = ["DistillReport", "DistillResult", "DistillSettings", "distill"]


# --------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class DistillSettings:
    temperature: float = 2.0
    alpha: float = 0.5
    top_k: int = 64
    """Teacher logits kept per position for a GGUF teacher (an HF teacher's rows are used whole)."""

    def check(self) -> None:
        t, a = self.temperature, self.alpha
        if not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
            raise TrainingError(f"--distill-temperature must be a positive number, got {t}")
        if not isinstance(a, int | float) or not math.isfinite(a) or not 0 <= a <= 1:
            raise TrainingError(f"--distill-alpha must be between 0 and 1, got {a}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise TrainingError(f"distillation top_k must be at least 1, got {self.top_k}")


@dataclass
class DistillReport:
    """Student and teacher on the validation split's assistant tokens, with the kept student weights."""

    teacher: str
    teacher_kind: str  # "hf" | "gguf"
    temperature: float
    alpha: float
    top_k: int | None  # GGUF teacher: logits cached per position; None: full rows (HF teacher)
    val_tokens: int
    student_val_loss: float
    student_val_accuracy: float
    teacher_val_loss: float
    teacher_val_accuracy: float
    kl_student_to_teacher: float
    """Mean over tokens of KL(teacher || student) at T=1 over the whole vocabulary, in nats."""
    top1_agreement: float

    def to_json(self) -> dict[str, Any]:
        return {
            k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in asdict(self).items()
        }


@dataclass
class DistillResult(TrainResult):
    distill: DistillReport | None = None


# --------------------------------------------------------------------------------------------- positions


def target_rows(ex: Example) -> np.ndarray:
    """Positions whose next token is a target: the logit rows the loss is taken on, in batch order."""
    labels = np.asarray(ex.labels[1:])
    return np.nonzero(labels != IGNORE_INDEX)[0]


def _batch_rows(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (N, V) logit rows at the batch's target positions (row-major, like the examples' target rows,
    padded or packed), and their N target ids."""
    return target_logits(model, batch), batch["targets"]


# --------------------------------------------------------------------------------------------- losses


@dataclass
class TopK:
    """Teacher rows as cached for a GGUF teacher: top-k logits, their ids, log-sum-exp of row / T."""

    values: torch.Tensor  # (N, k) float32, raw logits (T=1)
    indices: torch.Tensor  # (N, k) int64
    lse: torch.Tensor  # (N,) float32, logsumexp(row / T) over the vocabulary


def kl_full(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Summed KL(softmax(teacher/T) || softmax(student/T)) over the rows (both (N, V))."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="sum")


def kl_topk(student: torch.Tensor, teacher: TopK, temperature: float) -> torch.Tensor:
    """Summed KL between the teacher's top-k tokens + one bucket for the rest and the student's same."""
    s = student.float() / temperature
    lse_s = torch.logsumexp(s, dim=-1)
    log_q_k = s.gather(1, teacher.indices) - lse_s[:, None]
    log_p_k = teacher.values / temperature - teacher.lse[:, None]
    p_k = log_p_k.exp()
    head = (p_k * (log_p_k - log_q_k)).sum()
    if teacher.indices.shape[1] >= s.shape[1]:  # the top-k is the whole vocabulary: no tail
        return head
    log_q_rest = torch.logsumexp(s.scatter(1, teacher.indices, float("-inf")), dim=-1) - lse_s
    p_rest = (1 - p_k.sum(-1)).clamp_min(0)
    tail = (torch.xlogy(p_rest, p_rest) - p_rest * log_q_rest).sum()
    return head + tail


# --------------------------------------------------------------------------------------------- teachers


def _gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


class Teacher:
    """A teacher's vocabulary, its rows at target positions, and its handle on the model."""

    kind = ""

    def __init__(self, path: Path):
        self.path = path

    def tokens(self) -> list[str]:
        raise NotImplementedError

    def max_positions(self) -> int | None:
        raise NotImplementedError

    def chat_tokenizer(self) -> Any:
        """An HF tokenizer with the teacher's vocabulary and chat template (for a from-scratch student)."""
        raise NotImplementedError

    def rows(
        self, examples: Sequence[Example], batch: list[int], collated: dict[str, torch.Tensor], vocab: int
    ) -> torch.Tensor:
        """Full (N, vocab) logits at the target positions of ``batch``, T=1."""
        raise NotImplementedError

    def prepare(self, examples: Sequence[Example], vocab: int, settings: DistillSettings) -> None:
        """Whatever must happen before training (a GGUF teacher: the top-k cache)."""

    def train_rows(
        self, examples: Sequence[Example], batch: list[int], collated: dict[str, torch.Tensor], vocab: int
    ) -> torch.Tensor | TopK:
        return self.rows(examples, batch, collated, vocab)

    def reserve(self, examples: Sequence[Example]) -> None:
        """Get ready to give the rows of ``examples`` (a GGUF teacher: a context for the longest)."""

    def close(self) -> None:
        pass


class HFTeacher(Teacher):
    kind = "hf"

    def __init__(self, path: Path):
        super().__init__(path)
        self.model, self.tokenizer = load_base(path)
        self.model.eval()
        self.model.requires_grad_(False)

    def tokens(self) -> list[str]:
        return list(self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer)))))

    def max_positions(self) -> int | None:
        return _max_positions(self.model.config)

    def chat_tokenizer(self) -> Any:
        return self.tokenizer

    def place(self, rt: Runtime) -> None:
        """On the run's device, with its precision (Accelerate; evaluation only, never wrapped in DDP)."""
        self.model = rt.accelerator.prepare_model(self.model, evaluation_mode=True)

    @torch.no_grad()
    def rows(self, examples, batch, collated, vocab):
        return _batch_rows(self.model, collated)[0][:, :vocab].float()


class GGUFTeacher(Teacher):
    kind = "gguf"

    def __init__(self, path: Path, threads: int):
        import gguf

        super().__init__(path)
        self.threads = threads
        try:
            reader = gguf.GGUFReader(path)
            fields = reader.fields
            self._tokens = [str(t) for t in fields["tokenizer.ggml.tokens"].contents()]
            arch = fields["general.architecture"].contents()
            ctx = fields.get(f"{arch}.context_length")
            self._ctx = int(ctx.contents()) if ctx is not None else None
        except (ValueError, OSError, IndexError, KeyError) as e:
            raise ModelError(f"{path} is not a readable GGUF model with a tokenizer: {e}") from None
        del reader
        self._cache: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._llm: Any = None
        self._n_ctx = 0

    def tokens(self) -> list[str]:
        return self._tokens

    def max_positions(self) -> int | None:
        return self._ctx

    def chat_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        try:  # transformers builds the HF tokenizer from the GGUF's tokenizer.* keys (through gguf-py)
            tok = AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)
        except Exception as e:  # noqa: BLE001 - any failure of the conversion means the same to the user
            raise ModelError(
                f"{self.path}: transformers cannot build a tokenizer from this GGUF ({e}); distil into a "
                "--base student with the teacher's vocabulary instead"
            ) from None
        if len(tok) < 1:
            raise ModelError(f"{self.path}: the tokenizer built from this GGUF is empty")
        return tok

    def _open(self, n_ctx: int) -> Any:
        from ..evaluate import _load_llama

        if self._llm is None or self._n_ctx < n_ctx:
            self.close()
            self._llm = _load_llama(self.path, n_ctx, self.threads)
            self._n_ctx = n_ctx
        return self._llm

    def _example_rows(self, ex: Example, vocab: int) -> np.ndarray:
        llm = self._llm
        llm.reset()
        llm.eval(ex.input_ids)
        return np.array(llm.scores[target_rows(ex), :vocab], dtype=np.float32)

    def reserve(self, examples: Sequence[Example]) -> None:
        self._open(max((len(e.input_ids) for e in examples), default=8))

    def rows(self, examples, batch, collated, vocab):
        self._open(max(len(examples[i].input_ids) for i in batch))
        return torch.from_numpy(np.concatenate([self._example_rows(examples[i], vocab) for i in batch]))

    def prepare(self, examples, vocab, settings):
        """Run llama.cpp once per training example; keep top-k logits, ids and logsumexp(row / T)."""
        k = min(settings.top_k, vocab)
        self.reserve(examples)
        cache = []
        t0 = time_now()
        for ex in examples:
            z = torch.from_numpy(self._example_rows(ex, vocab))
            values, indices = z.topk(k, dim=-1)
            lse = torch.logsumexp(z / settings.temperature, dim=-1)
            cache.append((values, indices.to(torch.int32), lse))
        self._cache = cache
        n = sum(c[0].shape[0] for c in cache)
        log.info(
            "teacher %s: cached top-%d logits of %d positions in %.1f s (%.1f MB)",
            self.path.name,
            k,
            n,
            time_now() - t0,
            n * (k * 8 + 4) / 1e6,
        )
        self.close()  # not needed again until the final report

    def train_rows(self, examples, batch, collated, vocab):
        assert self._cache is not None, "prepare() first"
        parts = [self._cache[i] for i in batch]
        return TopK(
            values=torch.cat([p[0] for p in parts]),
            indices=torch.cat([p[1] for p in parts]).long(),
            lse=torch.cat([p[2] for p in parts]),
        )

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None
            self._n_ctx = 0


def open_teacher(path: str | os.PathLike[str], threads: int) -> Teacher:
    """The teacher at ``path``: a GGUF file or a local HF model folder, else :class:`ModelError`."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"teacher not found: {p} (--distill-from takes a HF model folder or a .gguf file)")
    if p.is_dir():
        check_base_folder(p)
        return HFTeacher(p)
    if not _gguf_magic(p):
        raise ModelError(f"teacher {p} is neither a HF model folder nor a GGUF file")
    return GGUFTeacher(p, threads)


# --------------------------------------------------------------------------------------------- checks


def _check_vocab(student_tokens: list[str], teacher_tokens: list[str], student: str, teacher: str) -> None:
    """Same token at every id of the student's vocabulary (a GGUF may pad the teacher's with extra ids)."""
    n, m = len(student_tokens), len(teacher_tokens)
    diff = next((i for i in range(min(n, m)) if student_tokens[i] != teacher_tokens[i]), None)
    if diff is None and n <= m:
        return
    what = (
        f"id {diff} is {student_tokens[diff]!r} in the student, {teacher_tokens[diff]!r} in the teacher"
        if diff is not None
        else f"the student has {n} tokens, the teacher {m}"
    )
    raise TrainingError(
        f"vocabulary mismatch between student {student} and teacher {teacher}: {what}; distillation needs "
        "the teacher's tokenizer (leave out --base to train a student from scratch with it)"
    )


# --------------------------------------------------------------------------------------------- report


@torch.no_grad()
def distill_report(
    student: torch.nn.Module,
    teacher: Teacher,
    examples: Sequence[Example],
    batch_size: int,
    pad_id: int,
    vocab: int,
    settings: DistillSettings,
    runtime: Runtime | None = None,
) -> DistillReport:
    """Both models on ``examples`` (validation): loss, top-1 accuracy, KL(teacher || student) at T=1."""
    was = student.training
    student.eval()
    n = 0
    s_nll = t_nll = kl = 0.0
    s_ok = t_ok = agree = 0
    try:
        teacher.reserve(examples)
        for b in make_batches(examples, batch_size, None):
            batch = _to(collate(examples, b, pad_id), runtime)
            s_rows, target = _batch_rows(student, batch)
            s_rows = s_rows.float()
            t_rows = teacher.rows(examples, b, batch, vocab).to(s_rows.device)
            s_nll += float(F.cross_entropy(s_rows, target, reduction="sum"))
            t_nll += float(F.cross_entropy(t_rows, target, reduction="sum"))
            s_top, t_top = s_rows[:, :vocab].argmax(-1), t_rows.argmax(-1)
            s_ok += int((s_top == target).sum())
            t_ok += int((t_top == target).sum())
            agree += int((s_top == t_top).sum())
            kl += float(kl_full(s_rows[:, :vocab], t_rows, 1.0))
            n += int(target.numel())
    finally:
        teacher.close()
        student.train(was)
    nan = float("nan")
    return DistillReport(
        teacher=str(teacher.path),
        teacher_kind=teacher.kind,
        temperature=settings.temperature,
        alpha=settings.alpha,
        top_k=min(settings.top_k, vocab) if teacher.kind == "gguf" else None,
        val_tokens=n,
        student_val_loss=s_nll / n if n else nan,
        student_val_accuracy=s_ok / n if n else nan,
        teacher_val_loss=t_nll / n if n else nan,
        teacher_val_accuracy=t_ok / n if n else nan,
        kl_student_to_teacher=kl / n if n else nan,
        top1_agreement=agree / n if n else nan,
    )


# --------------------------------------------------------------------------------------------- entry


def _loss_fn(teacher: Teacher, examples: Sequence[Example], vocab: int, settings: DistillSettings):
    t, alpha = settings.temperature, settings.alpha

    def loss(
        model: torch.nn.Module, batch: dict[str, torch.Tensor], b: list[int]
    ) -> tuple[torch.Tensor, int]:
        s_rows, target = _batch_rows(model, batch)
        n = int(target.numel())
        total = s_rows.new_zeros((), dtype=torch.float32)
        if alpha < 1:
            total = total + (1 - alpha) * F.cross_entropy(s_rows.float(), target, reduction="sum")
        if alpha > 0 and n:
            rows = teacher.train_rows(examples, b, batch, vocab)
            if isinstance(rows, TopK):  # cached on the CPU
                rows = TopK(*(t.to(s_rows.device) for t in (rows.values, rows.indices, rows.lse)))
            s = s_rows[:, :vocab]
            kl = kl_topk(s, rows, t) if isinstance(rows, TopK) else kl_full(s, rows, t)
            total = total + alpha * t * t * kl
        return total, n

    return loss


@dataclass
class _Student:
    """The model distilled into, with its tokenizer (the teacher's vocabulary)."""

    model: Any
    tokenizer: Any
    name: str
    preset: ModelPreset | None
    """From scratch: the preset, at the run's ``max_seq_len``."""
    chat: dict[str, Any] | None
    """With a base: what :func:`.finetune.prepare_chat` did."""
    vocab: int
    pad_id: int
    max_seq_len: int


def _chat_tokenizer_of(t: Teacher) -> Any:
    """The teacher's tokenizer, for a student from scratch: it must have a chat template and an EOS."""
    tokenizer = t.chat_tokenizer()
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"teacher {t.path} has no chat template: distillation renders the data with the "
            "teacher's template (fine-tune the teacher first)"
        )
    if tokenizer.eos_token is None:
        raise ModelError(f"teacher {t.path}'s tokenizer has no EOS token")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _open_student(
    t: Teacher,
    base: str | os.PathLike[str] | None,
    p: ModelPreset | None,
    settings: TrainSettings,
    default_seq: int,
) -> _Student:
    """The student: ``base`` loaded and made chat-ready, or ``p`` built from scratch with the teacher's
    tokenizer (after seeding); its vocabulary must be the teacher's, and its ``max_seq_len`` fit both."""
    chat_info: dict[str, Any] | None = None
    model = None
    if base is None:
        assert p is not None
        tokenizer = _chat_tokenizer_of(t)
        student_name = f"preset {p.name!r}"
    else:
        model, tokenizer = load_base(base)
        chat_info = prepare_chat(model, tokenizer)
        student_name = str(base)
    vocab = len(tokenizer)
    _check_vocab(
        list(tokenizer.convert_ids_to_tokens(list(range(vocab)))), t.tokens(), student_name, str(t.path)
    )
    pad_id = _token_id(tokenizer, tokenizer.pad_token)
    given = settings.max_seq_len
    seq = default_seq if given is None else given
    limits = [x for x in (t.max_positions(), None if model is None else _max_positions(model.config)) if x]
    if limits and seq > min(limits):
        if given is not None:
            log.warning("max_seq_len %d is over the models' %d positions; using that", seq, min(limits))
        seq = min(limits)
    seed_everything(
        settings.seed
    )  # after loading the teacher: the student's initialisation depends on seed only
    if model is None:
        assert p is not None
        p = replace(p, max_seq_len=seq)
        ids = {ENDOFTEXT: pad_id, IM_END: _token_id(tokenizer, tokenizer.eos_token)}  # bos=pad, eos
        model = build_model(p, vocab, max_seq_len=seq, special_ids=ids)
    return _Student(model, tokenizer, student_name, p, chat_info, vocab, pad_id, seq)


def distill(
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    settings: TrainSettings,
    teacher: str | os.PathLike[str],
    preset: str | ModelPreset = "nano",
    base: str | os.PathLike[str] | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    top_k: int = 64,
) -> DistillResult:
    """Distil ``teacher`` (HF folder or GGUF) into a student written as a HF model folder at ``out_dir``.

    The student is ``preset`` trained from scratch with the teacher's tokenizer (``base=None``) or the HF
    folder ``base`` (its vocabulary must be the teacher's). Unset loop settings take the preset's
    (from scratch) or :data:`FINETUNE_DEFAULTS` (``base``). Nothing is written when a check fails. With
    several processes the main one scores student and teacher at the end (``distill`` is None elsewhere).
    """
    t0 = time_now()
    ds = DistillSettings(temperature=temperature, alpha=alpha, top_k=top_k)
    ds.check()
    p = get_preset(preset) if base is None else None
    defaults: Any = p if p is not None else FINETUNE_DEFAULTS
    loop = loop_settings(defaults, settings)
    out = check_out_dir(out_dir)
    for other, what in ((teacher, "teacher"), (base, "base model")):
        if other is not None and out.resolve() == Path(other).resolve():
            raise TrainingError(f"the output folder is the {what}: {out}")
    if base is not None:
        check_base_folder(base)
    splits = load_splits(data_dir)
    rt = start_runtime(settings.run, settings.threads)
    ckpt_dir, resume = checkpoint_plan(rt, out)

    t = open_teacher(teacher, rt.threads)
    try:
        st = _open_student(t, base, p, settings, defaults.max_seq_len)
        model, tokenizer, vocab, pad_id, seq = st.model, st.tokenizer, st.vocab, st.pad_id, st.max_seq_len
        tr, va = encode_splits(tokenizer, splits, seq)
        n_params = count_params(model)
        log.info(
            "distilling %s (%s teacher) into %s (%.2f M parameters): T=%g, alpha=%g",
            t.path,
            t.kind,
            st.name,
            n_params / 1e6,
            ds.temperature,
            ds.alpha,
        )
        if isinstance(t, HFTeacher):
            t.place(rt)
        if ds.alpha > 0:
            t.prepare(tr.examples, vocab, ds)
        loss_fn = _loss_fn(t, tr.examples, vocab, ds)

        identity = {
            "kind": "distill", "teacher": str(Path(t.path).resolve()), "student": st.name,
            "temperature": ds.temperature, "alpha": ds.alpha, "top_k": ds.top_k, "max_seq_len": seq,
        }  # fmt: skip
        outcome = run_loop(
            model, tr.examples, va.examples, loop, pad_id=pad_id, loss_fn=loss_fn, runtime=rt,
            checkpoint_dir=ckpt_dir, resume_from=resume, identity=identity,
        )  # fmt: skip
        report = None
        extra: dict[str, Any] = {}
        if rt.is_main:  # the one process that writes
            val_bs = max(1, loop.batch_size * 2)
            report = distill_report(model, t, va.examples, val_bs, pad_id, vocab, ds, runtime=rt)
            extra = {
                "preset": asdict(st.preset) if st.preset is not None else None,
                "base": None if base is None else str(Path(base).resolve()),
                **({"chat": st.chat} if st.chat is not None else {}),
                "distill": report.to_json(),
            }

        def save(folder: Path) -> None:
            with quiet_hf_progress():
                model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)

        r = save_run(
            out, rt, save, kind="distill", settings=loop, outcome=outcome, n_params=n_params,
            max_seq_len=seq, train=tr, val=va, started=t0, extra=extra,
        )  # fmt: skip
    finally:
        t.close()
    return DistillResult(**vars(r), distill=report)
