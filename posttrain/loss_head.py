"""The loss path's LM head: per-position values of the next-token distribution, computed a chunk of rows at
a time, so the [tokens, vocabulary] logits never exist in full.

An objective says what it needs with a `TokenTerms`: the positions that carry loss, what each of them
reads (its next token, a teacher's top-k) and a row function from one chunk's logits [c, V] to named values
per row: `terms`, which the loss is made of, and `stats`, which are only reported. `per_token` runs the
model's forward with its LM head computing those rows instead of logits. The head's autograd function
computes each chunk's logits, their row values, and drops the logits; its backward recomputes one chunk's
logits at a time, lets autograd differentiate the row function on that chunk, and adds the chunk's share to
the gradients of the hidden states and of the head's weight. The loss path then holds a few chunks' logits
however many tokens there are, and statistics (RL's entropy when it is not in the loss) have no graph.

Why the head runs inside the model's forward (its `forward` replaced while the call lasts) rather than on
hidden states afterwards: DeepSpeed starts its backward (ZeRO's gradient bookkeeping, the accumulation
boundary) from hooks on the forward's outputs, which must fire before any parameter's gradient arrives,
and ZeRO-3 gathers the head's partitioned weight around the head module's own forward and backward. With
the terms as the forward's `logits` output, both work as for an ordinary forward. Qwen3 and Qwen3-VL
compute `lm_head(hidden_states)` and use the logits as they are, so the terms equal what the logits gave.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import Tensor

Tensors = dict[str, "Tensor"]
LOGIT_BYTES = 4
"""A chunk's logits are promoted to fp32 for the log-softmax: what `logits_chunk_mib` counts."""


class RowFn(Protocol):
    def __call__(self, logits: Tensor, inputs: Tensors, stats: bool) -> tuple[Tensors, Tensors]:
        """(terms, statistics), name -> [c] each, of a chunk's `logits` [c, V] (the head's dtype) given
        `inputs` at the same c positions. Statistics only when `stats`: the backward recomputes terms."""
        ...


@dataclass(frozen=True)
class TokenTerms:
    """What an objective needs of the LM head in one micro-batch: `positions` [B, T-1] (bool, position t
    predicting token t + 1) where it needs anything, `inputs` name -> [B, T-1, ...] that `rows` reads per
    position, and the row function `rows`."""

    positions: Tensor
    inputs: Tensors
    rows: RowFn


def per_token(model: Any, inputs: Tensors, request: TokenTerms, chunk_mib: float) -> Tensors:
    """`request`'s terms and statistics, name -> [B, T-1] (0 off its positions), from one forward of
    `model` on `inputs`: an HF Qwen3 / Qwen3-VL, PEFT-wrapped or not, or a DeepSpeed engine around one.
    Logits are computed `chunk_mib` MiB (as fp32) at a time."""
    module = getattr(model, "module", model)  # a DeepSpeed engine's model
    lm_head = module.get_output_embeddings()
    vocab = _linear(lm_head).out_features  # not the weight's shape: ZeRO-3 partitions it outside forward
    head = ChunkedHead(lm_head, request, rows_per_chunk(chunk_mib, vocab))
    with _forward_replaced(lm_head, head):
        # No KV cache: with one, transformers stops reading packed rows' position ids as sample
        # boundaries and samples would attend to each other.
        terms = model(**inputs, use_cache=False).logits
    return head.unpack(terms)


def rows_per_chunk(chunk_mib: float, vocab: int) -> int:
    return max(1, int(chunk_mib * 2**20) // (vocab * LOGIT_BYTES))


class ChunkedHead:
    """A bias-free linear LM head computing `request` `chunk_rows` positions at a time; called with the
    model's last hidden states [B, T, H] in place of the head's forward."""

    def __init__(self, head: torch.nn.Module, request: TokenTerms, chunk_rows: int) -> None:
        self.weight: Tensor = _linear(head).weight
        self.request = request
        self.chunk_rows = chunk_rows
        self.rows: _Rows | None = None

    def __call__(self, hidden_states: Tensor) -> Tensor:
        """[B, T-1, k]: the k terms at the requested positions, 0 elsewhere."""
        positions = self.request.positions
        inputs = {k: v[positions] for k, v in self.request.inputs.items()}
        self.rows = _Rows(self.request.rows, inputs, self.chunk_rows)
        terms = _chunked_rows().apply(hidden_states[:, :-1][positions], self.weight, self.rows)
        return _scatter(terms, positions)

    def unpack(self, terms: Tensor) -> Tensors:
        """The forward's output, name -> [B, T-1], with the statistics."""
        assert self.rows is not None, "the model's forward did not call its LM head"
        positions = self.request.positions
        named = {name: terms[..., i] for i, name in enumerate(self.rows.names)}
        stats = {name: _scatter(v[:, None], positions)[..., 0] for name, v in self.rows.stats.items()}
        return named | stats


def _linear(head: torch.nn.Module) -> torch.nn.Linear:
    import torch

    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise TypeError(
            f"the loss path computes logits as hidden @ lm_head.weight.T, but the LM head is a "
            f"{type(head).__name__}; keep it out of model.lora.target_modules"
        )
    return head


@dataclass
class _Rows:
    """One call's row function and its inputs at the selected positions, the chunking, and what the
    forward leaves for the caller: the terms' names in column order and the statistics, [n] each."""

    fn: RowFn
    inputs: Tensors
    chunk_rows: int
    names: list[str] = field(default_factory=list)
    stats: Tensors = field(default_factory=dict)

    def chunks(self, n: int) -> list[slice]:
        """At least one, so that no positions at all still gives (empty) columns."""
        return [slice(i, i + self.chunk_rows) for i in range(0, max(n, 1), self.chunk_rows)]

    def at(self, chunk: slice) -> Tensors:
        return {k: v[chunk] for k, v in self.inputs.items()}


def _scatter(values: Tensor, positions: Tensor) -> Tensor:
    """[n, k] values of the true `positions` [B, T-1] as [B, T-1, k], 0 elsewhere."""
    return values.new_zeros((*positions.shape, values.shape[-1])).index_put((positions,), values)


@functools.cache
def _chunked_rows() -> Any:
    """The autograd function (built on first use: torch is imported lazily)."""
    import torch
    import torch.nn.functional as F

    class ChunkedRows(torch.autograd.Function):
        """terms [n, k] of `rows` from hidden states [n, H] and the head's weight [V, H]."""

        @staticmethod
        def forward(ctx: Any, hidden: Tensor, weight: Tensor, rows: _Rows) -> Tensor:
            ctx.save_for_backward(hidden, weight)
            ctx.rows = rows
            terms, stats = [], []
            for chunk in rows.chunks(len(hidden)):
                t, s = rows.fn(F.linear(hidden[chunk], weight), rows.at(chunk), stats=True)
                terms.append(t)
                stats.append(s)
            rows.names = list(terms[0])
            rows.stats = {k: torch.cat([s[k] for s in stats]) for k in stats[0]}
            return torch.stack([torch.cat([t[k] for t in terms]) for k in rows.names], dim=-1)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx: Any, grad_terms: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
            hidden, weight = ctx.saved_tensors
            rows: _Rows = ctx.rows
            want_hidden, want_weight = ctx.needs_input_grad[:2]
            grad_hidden = torch.empty_like(hidden) if want_hidden else None
            # One GEMM over all tokens rounds its sum once; chunks' shares are summed in fp32 at least.
            acc = torch.promote_types(weight.dtype, torch.float32)
            grad_weight = torch.zeros_like(weight, dtype=acc) if want_weight else None
            for chunk in rows.chunks(len(hidden)):
                h = hidden[chunk]
                logits = F.linear(h, weight).requires_grad_()
                with torch.enable_grad():
                    terms, _ = rows.fn(logits, rows.at(chunk), stats=False)
                    packed = torch.stack([terms[k] for k in rows.names], dim=-1)
                (grad_logits,) = torch.autograd.grad(packed, logits, grad_terms[chunk])
                if grad_hidden is not None:
                    grad_hidden[chunk] = grad_logits @ weight
                if grad_weight is not None:
                    _add_outer(grad_weight, grad_logits, h)
            return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None

    return ChunkedRows


WEIGHT_BLOCK_ROWS = 4096
"""Vocabulary rows per low-precision GEMM of the weight's gradient (a bf16 block of 4096 × hidden)."""


def _add_outer(acc: Tensor, grad_logits: Tensor, hidden: Tensor) -> None:
    """acc += grad_logitsᵀ · hidden. For low-precision inputs into an fp32 `acc`: the GEMM in their dtype
    (bf16 kernels are many times faster than fp32 ones), a block of vocabulary rows at a time, each block
    added to `acc` in fp32, so no [V, H] temporary is made."""
    if grad_logits.dtype == acc.dtype:
        acc.addmm_(grad_logits.T, hidden)
        return
    for start in range(0, acc.shape[0], WEIGHT_BLOCK_ROWS):
        rows = slice(start, start + WEIGHT_BLOCK_ROWS)
        acc[rows] += grad_logits[:, rows].T @ hidden


@contextlib.contextmanager
def _forward_replaced(module: torch.nn.Module, forward: Any) -> Iterator[None]:
    """`module`'s forward is `forward` inside the block (an instance attribute shadowing the class's)."""
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous
