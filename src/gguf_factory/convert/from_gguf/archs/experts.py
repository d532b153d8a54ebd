"""Mixtures of experts: what the MoE rebuilds (:mod:`.mixtral`, :mod:`.qwen2moe`, :mod:`.qwen3moe`) share.

Weights. llama.cpp stores a layer's experts merged, one 3-D tensor per projection: ``blk.N.ffn_gate_exps`` and
``blk.N.ffn_up_exps`` of numpy shape [n_expert, ff, embd], ``blk.N.ffn_down_exps`` of [n_expert, embd, ff]
(expert i at index i), next to the router ``blk.N.ffn_gate_inp`` [n_expert, embd]. transformers 5 fuses the
experts in memory too (``mlp.experts.gate_up_proj`` [n_expert, 2 ff, embd]: gate rows, then up rows;
``mlp.experts.down_proj`` [n_expert, embd, ff]), but saves and loads the published per-expert layout
(``mlp.experts.<i>.gate_proj.weight``, Mixtral's ``block_sparse_moe.experts.<i>.w1.weight``...) through its
weight-conversion table. The rebuild writes that checkpoint layout, with nothing written by hand: names and
shapes are the meta model's parameters put through transformers' own ``revert_weight_conversion`` (what
``save_pretrained`` writes), and ``<head>.experts.<i>.<tail>.weight`` is slice ``i`` of the GGUF tensor
gguf-py's ``TensorNameMap`` gives for ``<head>.experts.<tail>.weight`` (the table the forward converter stacks
the experts with). So a rebuilt folder is what ``save_pretrained`` would have written, and converting it again
gives the same GGUF.

:meth:`ExpertsReverse.plan` replaces the base class's one-parameter-one-tensor plan for these architectures
only, and is as strict: a GGUF tensor feeds one parameter or one whole set of experts (every expert
0 .. n_expert - 1 once, each slice of the shape transformers expects), and every GGUF tensor is used. A merged
tensor is dequantized once and handed out one expert at a time.

Routing. llama.cpp's graphs for these architectures fix it: softmax over the router logits, the
``{arch}.expert_used_count`` best experts, their weights renormalized (llama, qwen3moe) or not (qwen2moe), not
scaled. Keys that say otherwise (``{arch}.expert_weights_norm``, ``expert_gating_func``,
``expert_weights_scale``) are not read by those graphs, so a file that sets them differently contradicts what
llama.cpp computes and is refused; ``{arch}.expert_group_count`` > 1 is read (llama.cpp then picks experts
from the best groups only), which transformers' classes cannot express (:meth:`ExpertsReverse.check_routing`).
The expert counts and widths come from the keys and are checked against every layer's tensor shapes
(:meth:`ExpertsReverse.check_experts`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import gguf
import numpy as np

from ....errors import ModelError
from ..base import KL, PlannedWeight, ReverseArch

# A per-expert parameter of the checkpoint layout (the forward converter's pattern too).
EXPERT_NAME = re.compile(r"^(?P<head>.+\.experts)\.(?P<xid>\d+)\.(?P<tail>.+)\.weight$")
SOFTMAX = int(gguf.ExpertGatingFuncType.SOFTMAX)


def checkpoint_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """The model's parameters as ``save_pretrained`` writes them (name -> shape): transformers 5 splits fused
    expert tensors back into the per-expert checkpoint layout; transformers 4 already holds that layout."""
    params = dict(model.named_parameters())
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # pragma: no cover - transformers 4: the modules hold the checkpoint layout
        return {name: tuple(p.shape) for name, p in params.items()}
    return {name: tuple(t.shape) for name, t in revert_weight_conversion(model, params).items()}


class _ExpertSlices:
    """One merged GGUF expert tensor: dequantized on the first request, one expert's matrix per request, and
    released once every expert has been handed out."""

    def __init__(self, rev: ReverseArch, gguf_name: str, n_expert: int):
        self.rev = rev
        self.gguf_name = gguf_name
        self.waiting = set(range(n_expert))
        self.data: np.ndarray | None = None

    def take(self, i: int) -> np.ndarray:
        if self.data is None:
            self.data = self.rev.src.load(self.gguf_name)
        out = self.data[i].copy()  # its own memory: safetensors refuses tensors that share storage
        self.waiting.discard(i)
        if not self.waiting:
            self.data = None
        return out


class ExpertsReverse(ReverseArch):
    """Mixin of the MoE plug-ins (listed before the dense plug-in they extend): key checks and the plan."""

    # ---- hyper-parameters -----------------------------------------------------------------------

    def expert_counts(self) -> tuple[int, int]:
        """(``{arch}.expert_count``, ``{arch}.expert_used_count``): both required, as llama.cpp does."""
        n_expert = self.integer(KL.EXPERT_COUNT)
        n_used = self.uniform(KL.EXPERT_USED_COUNT)
        if n_expert <= 0:
            raise ModelError(f"{self.where}: {self.key(KL.EXPERT_COUNT)} is {n_expert}, expected at least 1")
        if not 0 < n_used <= n_expert:
            raise ModelError(
                f"{self.where}: {self.key(KL.EXPERT_USED_COUNT)} is {n_used}, expected 1 to "
                f"{self.key(KL.EXPERT_COUNT)} ({n_expert})"
            )
        return n_expert, n_used

    def expert_width(self, n_ff: int, n_used: int) -> tuple[int, str]:
        """Each expert's width: ``{arch}.expert_feed_forward_length`` (one value for all layers), absent
        llama.cpp's default ``feed_forward_length / expert_used_count``; and where it came from (messages)."""
        key = self.key(KL.EXPERT_FEED_FORWARD_LENGTH)
        n_ff_exp = self.uniform(KL.EXPERT_FEED_FORWARD_LENGTH, None)
        if n_ff_exp is None:
            n_ff_exp = n_ff // n_used
            return n_ff_exp, f"no {key} (feed_forward_length / expert_used_count = {n_ff_exp})"
        return n_ff_exp, f"{key} = {n_ff_exp}"

    def check_routing(self, *, renormalized: bool) -> None:
        """Refuse routing keys that contradict llama.cpp's graph for this architecture (which renormalizes the
        chosen experts' weights or not, as ``renormalized`` says)."""
        graph = f"llama.cpp's {self.src.arch} graph"
        norm = self.src.boolean(self.key(KL.EXPERT_WEIGHTS_NORM), None)
        if norm is not None and norm != renormalized:
            does = "always renormalizes" if renormalized else "never renormalizes"
            raise ModelError(
                f"{self.where}: {self.key(KL.EXPERT_WEIGHTS_NORM)} is {str(norm).lower()}, but {graph} does "
                f"not read it and {does} the chosen experts' weights; refusing to guess which was meant"
            )
        gating = self.integer(KL.EXPERT_GATING_FUNC, None)
        if gating not in (None, 0, SOFTMAX):  # 0: unset
            raise ModelError(
                f"{self.where}: {self.key(KL.EXPERT_GATING_FUNC)} is {gating}, but {graph} does not read it "
                "and always routes by softmax; refusing to guess which was meant"
            )
        scale = self.number(KL.EXPERT_WEIGHTS_SCALE, None)
        if scale not in (None, 0.0, 1.0):
            raise ModelError(
                f"{self.where}: {self.key(KL.EXPERT_WEIGHTS_SCALE)} is {scale}, but {graph} does not read it "
                "and never scales the experts' weights; refusing to guess which was meant"
            )
        groups = self.integer(KL.EXPERT_GROUP_COUNT, 0)
        if groups > 1:
            raise self.refuse(
                f"expert groups ({self.key(KL.EXPERT_GROUP_COUNT)} = {groups}: llama.cpp picks the experts "
                "from the best groups only)"
            )

    def check_experts(self, n_expert: int, n_ff: int, ff_from: str) -> None:
        """Every layer's router and merged experts have the shapes the keys give (``ff_from`` says where the
        experts' width ``n_ff`` came from). Absent tensors are left to :meth:`plan`, which names them."""
        n_embd = self.n_embd_rows
        count = f"{self.key(KL.EXPERT_COUNT)} = {n_expert}"
        self.check_layer_shapes({"ffn_gate_inp.weight": (n_expert, n_embd)}, count)
        self.check_layer_shapes(
            {
                "ffn_gate_exps.weight": (n_expert, n_ff, n_embd),
                "ffn_up_exps.weight": (n_expert, n_ff, n_embd),
                "ffn_down_exps.weight": (n_expert, n_embd, n_ff),
            },
            f"{count} and {ff_from}",
        )

    def check_layer_shapes(self, expected: dict[str, tuple[int, ...]], because: str) -> None:
        """``blk.N.<suffix>`` of shape ``expected[suffix]`` in every layer that has it."""
        for il in range(self.n_layer):
            for suffix, shape in expected.items():
                name = f"blk.{il}.{suffix}"
                if name in self.src.tensors and self.src.shape(name) != shape:
                    raise ModelError(
                        f"{self.where}: {name} has shape {list(self.src.shape(name))}, but {because} "
                        f"(embedding width {self.n_embd_rows}) give {list(shape)}"
                    )

    # ---- plan -----------------------------------------------------------------------------------

    def plan(self, config: Any) -> list[PlannedWeight]:
        """One entry per checkpoint parameter; a per-expert parameter is one slice of a merged GGUF tensor."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        buffers = {n for n, _ in model.named_buffers() if n in model.state_dict()}
        if buffers:
            raise ModelError(
                f"{self.hf_architecture} has persistent buffers {sorted(buffers)[:3]}: not supported"
            )
        shapes = checkpoint_shapes(model)
        experts: dict[str, dict[int, str]] = {}  # "<head>.experts.<tail>.weight" -> expert id -> parameter
        for hf_name in shapes:
            m = EXPERT_NAME.match(hf_name)
            if m:
                experts.setdefault(f"{m['head']}.{m['tail']}.weight", {})[int(m["xid"])] = hf_name
        planned: list[PlannedWeight] = []
        used: dict[str, str] = {}
        done: set[str] = set()
        for hf_name, shape in shapes.items():
            m = EXPERT_NAME.match(hf_name)
            if m is None:
                planned.append(self._plan_one(hf_name, shape, used))
                continue
            merged = f"{m['head']}.{m['tail']}.weight"
            if merged not in done:  # the whole set at once: each merged tensor is read once
                done.add(merged)
                planned.extend(self._plan_experts(merged, experts[merged], shapes, used))
        self._check_all_used(used)
        return planned

    def _plan_experts(
        self,
        merged: str,
        by_id: dict[int, str],
        shapes: dict[str, tuple[int, ...]],
        used: dict[str, str],
    ) -> list[PlannedWeight]:
        """Every expert's matrix of one projection in one layer: slices of one merged GGUF tensor."""
        pattern = EXPERT_NAME.sub(r"\g<head>.<i>.\g<tail>.weight", by_id[min(by_id)])
        gguf_name = self._gguf_tensor_for(merged, pattern, used)
        stacked = self.src.shape(gguf_name)
        n_expert = len(by_id)
        if sorted(by_id) != list(range(n_expert)) or len(stacked) < 2 or stacked[0] != n_expert:
            raise ModelError(
                f"{self.where}: tensor {gguf_name} has shape {list(stacked)}, but {self.hf_architecture}'s "
                f"{pattern} needs {n_expert} experts stacked on its first axis"
            )
        slices = _ExpertSlices(self, gguf_name, n_expert)
        planned: list[PlannedWeight] = []
        for i in range(n_expert):
            hf_name = by_id[i]
            shape = shapes[hf_name]
            got = self.hf_shape(gguf_name, hf_name, tuple(stacked[1:]))
            if got != shape:
                raise ModelError(
                    f"{self.where}: tensor {gguf_name} has shape {list(stacked)}, but "
                    f"{self.hf_architecture}'s {pattern} needs {n_expert} experts of {list(shape)} with "
                    "these hyper-parameters"
                )
            planned.append(
                PlannedWeight(hf_name, gguf_name, shape, self._slice_producer(slices, i, hf_name, shape))
            )
        return planned

    def _slice_producer(
        self, slices: _ExpertSlices, i: int, hf_name: str, shape: tuple[int, ...]
    ) -> Callable[[], np.ndarray]:
        def produce() -> np.ndarray:
            data = self.to_hf(slices.gguf_name, hf_name, slices.take(i))
            if tuple(data.shape) != shape:  # a plug-in bug, not a file problem
                raise ModelError(
                    f"{slices.gguf_name}[{i}]: shape {data.shape} after conversion, expected {shape}"
                )
            return data

        return produce
