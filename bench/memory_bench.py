"""Peak memory of one forward + backward of each learner objective at Qwen3's real vocabulary
(V = 151,936), in bytes per (loss token × vocabulary entry) above the model's own memory.

    python bench/memory_bench.py [--batch 4] [--seq-len 512] [--hidden 1024] [--layers 1]
                                 [--dtype float32|bfloat16] [--device cpu|cuda] [--chunk-mib 64]
                                 [--out runs/bench]

The model is a random Qwen3 built here (nothing is downloaded): the real vocabulary, Qwen3-0.6B's widths
at the default `--hidden 1024` (head_dim 128, intermediate 3 × hidden), `--layers` decoder layers, untied
LM head. The objectives are the learner's own, called as `Learner.step` calls them (the model's forward
with the chunked loss head, `posttrain.loss_head.per_token`, at `model.logits_chunk_mib` = `--chunk-mib`):
SFT's `NLL`, RL's `RLObjective` (default GRPO config, entropy_coef 0 and 0.01; on-policy, no KL),
distillation's `DistillObjective` (top-16 forward KL with the tail bucket; the sampled reverse-KL
estimator). Every one of the B × T tokens but each row's last carries loss, so loss tokens = B × (T - 1).

Each objective runs in a fresh child process (peaks never leak from one to the next): a warm-up pass on a
short batch (kernels, allocator, and the parameters' gradient buffers), then the measured pass in three
phases, each read by posttrain.memory.PeakMemory (the reader behind `memory/learner_peak_gib`: peak RSS
through the kernel's resettable high-water mark on CPU, the allocator's peak on CUDA): the model's forward
(with the loss head: what it keeps for backward), the objective's call on the per-position values, and the
backward. The baseline is the memory in use when the forward begins: weights, gradient buffers, inputs and
the objective's batch. `model`, the model's own pass, runs first the same way with a loss that needs no
vocabulary-wide tensor (the plain forward keeping only the last position's logits): the body's
activations and backward and the weights' gradients (the LM head's and the embedding's, V × hidden each);
`above model` is each objective's peak above that one. Prints a table and writes `OUT/memory_bench.json`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import common  # bench/ is on sys.path when run

if TYPE_CHECKING:
    from torch import Tensor

    from posttrain.objectives import Objective, Tensors

VOCAB = 151_936  # Qwen3's (and Qwen3-VL's) vocabulary
HEAD_DIM = 128  # Qwen3's
WARMUP_SHAPE = (1, 16)  # B, T of the untimed first pass
ENTROPY_COEF = 0.01
TOP_K = 16
MODEL_ALONE = "model"
OBJECTIVES = ("sft", "rl", "rl_entropy", "distill_topk16", "distill_sampled")
COLUMNS = [
    "objective",
    "peak GiB",
    "B/(tok·V)",
    "above model",
    "forward",
    "loss",
    "held",
    "backward",
    "seconds",
]
FORMATS = ["<16", ">8.2f", ">9.2f", ">11.2f", ">7.2f", ">6.2f", ">6.2f", ">8.2f", ">7.1f"]


def chunk_mib_default() -> float:
    from posttrain.config import ModelConfig

    return float(ModelConfig.model_fields["logits_chunk_mib"].default)


def parse_args() -> argparse.Namespace:
    p = common.parser(__doc__)
    p.add_argument("--batch", type=int, default=4, help="sequences per forward (B)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (T)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (a multiple of 128)")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--chunk-mib", type=float, default=chunk_mib_default(), help="model.logits_chunk_mib")
    p.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    # --measure: the one objective a child process measures
    p.add_argument("--measure", choices=(MODEL_ALONE, *OBJECTIVES), help=argparse.SUPPRESS)
    return common.parse(p)


# ------------------------------------------------------------------------------------ model and batches


def build_model(args: argparse.Namespace) -> Any:
    """A random Qwen3 of the real vocabulary and `--hidden` / `--layers`, in training mode on `--device`."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    heads = args.hidden // 64  # Qwen3-0.6B: hidden 1024, 16 query heads of 128 (2 × hidden), 8 KV heads
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=HEAD_DIM,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    model: Any = Qwen3ForCausalLM(config)
    return model.to(device=args.device, dtype=getattr(torch, args.dtype)).train()


def sft_batch(ids: Tensor) -> tuple[Objective, Tensors]:
    from posttrain.objectives import NLL

    return NLL(), {"labels": ids.clone()}


def rl_batch(entropy_coef: float) -> Callable[[Tensor], tuple[Objective, Tensors]]:
    """An on-policy first update (no old logprobs: the current weights are the old policy), every response
    token counting."""

    def make(ids: Tensor) -> tuple[Objective, Tensors]:
        import torch

        from posttrain.rl.config import AlgorithmConfig
        from posttrain.rl.objective import RLObjective

        b, t = ids.shape
        batch = {
            "response_mask": torch.ones(b, t - 1, device=ids.device),
            "advantages": torch.randn(b, device=ids.device),
            "engine_logprobs": -torch.rand(b, t - 1, device=ids.device),
        }
        return RLObjective(AlgorithmConfig(entropy_coef=entropy_coef)), batch

    return make


def distill_topk_batch(ids: Tensor) -> tuple[Objective, Tensors]:
    """The teacher's top-16: distinct ids per position, log-probabilities holding most (not all) mass."""
    import torch

    from posttrain.distill.config import LossConfig
    from posttrain.distill.objective import DistillObjective

    b, t = ids.shape
    first = torch.randint(VOCAB, (b, t - 1, 1), device=ids.device)
    topk_ids = (first + torch.arange(TOP_K, device=ids.device)) % VOCAB
    topk_logp = torch.log_softmax(torch.randn(b, t - 1, TOP_K + 1, device=ids.device), dim=-1)[..., :TOP_K]
    batch = {
        "loss_mask": torch.ones(b, t - 1, device=ids.device),
        "topk_ids": topk_ids,
        "topk_logp": topk_logp,
    }
    return DistillObjective(LossConfig(type="forward_kl", top_k=TOP_K)), batch


def distill_sampled_batch(ids: Tensor) -> tuple[Objective, Tensors]:
    """On-policy distillation's one entry per position: the sampled token and the teacher's logprob of it."""
    import torch

    from posttrain.distill.config import LossConfig
    from posttrain.distill.objective import DistillObjective

    b, t = ids.shape
    batch = {
        "loss_mask": torch.ones(b, t - 1, device=ids.device),
        "topk_ids": ids[:, 1:, None].clone(),
        "topk_logp": -torch.rand(b, t - 1, 1, device=ids.device),
    }
    return DistillObjective(LossConfig(type="reverse_kl", estimator="sampled")), batch


BATCHES: dict[str, Callable[[Tensor], tuple[Objective, Tensors]]] = {
    "sft": sft_batch,
    "rl": rl_batch(0.0),
    "rl_entropy": rl_batch(ENTROPY_COEF),
    "distill_topk16": distill_topk_batch,
    "distill_sampled": distill_sampled_batch,
}


# ------------------------------------------------------------------------------------------ measurement


@dataclass
class Phase:
    """One sub-step of the measured pass: bytes in use when it began, at its peak and when it ended."""

    start: int
    peak: int
    end: int
    seconds: float


def measured(device: str, fn: Callable[[], Any]) -> tuple[Any, Phase]:
    """`fn()` and its Phase (on CUDA the clock and the reading wait for its kernels)."""
    import torch

    from posttrain.memory import PeakMemory, in_use_bytes

    began = time.perf_counter()
    with PeakMemory(device) as memory:
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
    phase = Phase(memory.start_bytes, memory.peak_bytes, in_use_bytes(device), time.perf_counter() - began)
    return out, phase


Pass = tuple[Callable[[], Any], Callable[[Any], "Tensor"]]
"""(the forward, the loss of what the forward returned)."""


def model_alone(model: Any, ids: Tensor) -> Pass:
    """The model's own pass: the plain forward keeping the last position's logits, their logsumexp."""
    return (
        lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1).logits,
        lambda logits: logits.float().logsumexp(dim=-1).sum(),
    )


def objective_pass(model: Any, name: str, ids: Tensor, chunk_mib: float) -> Pass:
    """The learner's: the forward with the loss head computing what `name`'s objective asks per position
    (Learner._backward), then the objective."""
    from posttrain.loss_head import per_token
    from posttrain.objectives import Norms

    b, t = ids.shape
    objective, batch = BATCHES[name](ids)
    norms = Norms(tokens=float(b * (t - 1)), seqs=float(b), norm_length=float(t - 1))
    request = objective.terms(ids, batch, norms)
    return (
        lambda: per_token(model, {"input_ids": ids}, request, chunk_mib),
        lambda values: objective(values, ids, batch, norms)[0],
    )


def one_pass(args: argparse.Namespace, model: Any, name: str, shape: tuple[int, int]) -> dict[str, Phase]:
    """Forward, loss and backward of `name` on a random [B, T] batch, each phase measured."""
    import torch

    ids = torch.randint(VOCAB, shape, device=args.device)
    forward_fn, loss_fn = (
        model_alone(model, ids) if name == MODEL_ALONE else objective_pass(model, name, ids, args.chunk_mib)
    )
    out, forward = measured(args.device, forward_fn)
    loss, loss_phase = measured(args.device, lambda: loss_fn(out))
    _, backward = measured(args.device, loss.backward)
    return {"forward": forward, "loss": loss_phase, "backward": backward}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """The child's one objective: a warm-up pass, then the measured one."""
    import torch

    torch.manual_seed(0)
    threads = common.use_all_cores()
    model = build_model(args)
    one_pass(args, model, args.measure, WARMUP_SHAPE)
    model.zero_grad(set_to_none=False)  # the gradient buffers stay: they are the model's own
    phases = one_pass(args, model, args.measure, (args.batch, args.seq_len))
    return {"threads": threads, "phases": {k: asdict(v) for k, v in phases.items()}}


def run_child(args: argparse.Namespace, name: str, folder: Path) -> dict[str, Any]:
    """`name` measured in a fresh process (this script with `--measure`); its result."""
    import json

    result = folder / f"{name}.json"
    cmd = [sys.executable, __file__, *sys.argv[1:], "--measure", name]
    common.run_logged(cmd, folder / f"{name}.log", f"memory bench {name}")
    data: dict[str, Any] = json.loads(result.read_text())
    return data


# ----------------------------------------------------------------------------------------------- report


def summarise(
    args: argparse.Namespace, name: str, child: dict[str, Any], model_peak: float = 0.0
) -> dict[str, Any]:
    """Figures of one objective: every phase's peak (and what the objective holds after its call) above
    the baseline, in bytes per (loss token × vocabulary entry), the whole pass's peak, and that peak above
    the model's own pass's (`model_peak`, in the same unit)."""
    phases = {k: Phase(**v) for k, v in child["phases"].items()}
    baseline = phases["forward"].start
    unit = args.batch * (args.seq_len - 1) * VOCAB
    above = {k: (p.peak - baseline) / unit for k, p in phases.items()}
    peak = max(p.peak for p in phases.values()) - baseline
    return {
        "objective": name,
        "baseline_bytes": baseline,
        "peak_above_baseline_bytes": peak,
        "bytes_per_token_vocab": peak / unit,
        "above_model_bytes_per_token_vocab": peak / unit - model_peak,
        "phase_peak_bytes_per_token_vocab": above,
        "held_after_loss_bytes_per_token_vocab": (phases["loss"].end - baseline) / unit,
        "seconds": sum(p.seconds for p in phases.values()),
        **child,
    }


def table_row(s: dict[str, Any]) -> list[Any]:
    phase = s["phase_peak_bytes_per_token_vocab"]
    held = s["held_after_loss_bytes_per_token_vocab"]
    gib = s["peak_above_baseline_bytes"] / 2**30
    bpv, own = s["bytes_per_token_vocab"], s["above_model_bytes_per_token_vocab"]
    return [
        s["objective"],
        gib,
        bpv,
        own,
        phase["forward"],
        phase["loss"],
        held,
        phase["backward"],
        s["seconds"],
    ]


def main() -> None:
    args = parse_args()
    folder = args.out / "memory_bench"
    folder.mkdir(parents=True, exist_ok=True)
    if args.measure:
        common.write_json(folder / f"{args.measure}.json", measure(args))
        return
    log = common.RunLog()
    alone = summarise(
        args, MODEL_ALONE, log.run(MODEL_ALONE, MODEL_ALONE, run_child, args, MODEL_ALONE, folder)
    )
    own = alone["bytes_per_token_vocab"]
    summaries = [alone] + [
        summarise(args, n, log.run(n, n, run_child, args, n, folder), own) for n in args.objectives
    ]
    tokens = args.batch * (args.seq_len - 1)
    print(
        f"\nMemory bench: V = {VOCAB}, hidden {args.hidden}, {args.layers} layer(s), {args.dtype} on "
        f"{args.device}, B × T = {args.batch} × {args.seq_len} ({tokens} loss tokens), logits chunks of "
        f"{args.chunk_mib:g} MiB; 1 B/(tok·V) = {tokens * VOCAB / 2**30:.2f} GiB; baseline: weights + "
        f"gradient buffers + inputs ({summaries[0]['baseline_bytes'] / 2**30:.2f} GiB)"
    )
    print("B/(tok·V): the pass's peak above the baseline; above model: above the model's own pass (`model`);")
    print("forward / loss / backward: each phase's peak; held: in use when the objective returns")
    common.print_table(COLUMNS, FORMATS, [table_row(s) for s in summaries])
    summary = {"args": common.args_json(args), "load_avg": log.load_avg, "results": summaries}
    common.write_json(args.out / "memory_bench.json", summary)


if __name__ == "__main__":
    main()
