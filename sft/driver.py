"""`posttrain sft`: supervised fine-tuning, one linear loop.

    rows → chat template (thinking / non-thinking) → tokens + assistant-only labels (+ images)
         → DeepSpeed learners on Ray → metrics.jsonl, checkpoints/, final/

What it does: validates every row before the first step, trains with any ZeRO stage on 1..N learners,
evaluates exact-match accuracy by greedy generation on a held-out split, checkpoints atomically and resumes
exactly (same data order, optimizer, schedule and RNG). What it does not do: generation with vLLM (RL and
distillation use the rollout engines), multi-node checkpoints without a shared file system.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from posttrain.config import SFTConfig
from posttrain.data.processing import load_processing
from posttrain.data.sft_dataset import SFTData, build_sft_dataset
from posttrain.groups import LearnerGroup, shard_batches
from posttrain.objectives import NLL, Norms
from posttrain.rollout.evaluation import EvalSet, declared_schemas
from posttrain.stage import StageRun, prepare_inputs

log = logging.getLogger("posttrain.sft")


def run(cfg: SFTConfig) -> Path:
    """Train as configured; return the exported `final/` folder."""
    with StageRun(cfg) as run:
        model_path = prepare_inputs(cfg.model, [*cfg.data.train, cfg.data.eval])
        processing, is_vl = load_processing(model_path, cfg.model.trust_remote_code)
        data = build_sft_dataset(cfg.data, processing, is_vl, declared_schemas)
        log.info("data: %s", data.stats)
        eval_set = None
        if cfg.data.eval:
            tools = declared_schemas(cfg.data.eval)
            eval_set = EvalSet.build(cfg.data.eval, cfg.eval, processing, is_vl, tools)
        t = cfg.train
        total_steps = t.max_steps or data.num_steps(t.global_batch_size, t.epochs)
        run.start_ray(cfg.learners.num_learners * cfg.learners.cpus_per_learner)
        learners = run.learners(model_path, is_vl, total_steps)
        stage = SFTStage(cfg, learners, data, eval_set)
        run.train(learners, stage, total_steps, first=data_metrics(data.stats))
        final = run.export(learners, processing)
    shown = {k: round(v, 4) for k, v in stage.last.items() if k in ("loss", "eval/accuracy")}
    return run.finished(final, shown)


@dataclass
class SFTStage:
    """SFT's state: the encoded dataset (whose batch order is a pure function of seed and step)."""

    cfg: SFTConfig
    learners: LearnerGroup
    data: SFTData
    eval_set: EvalSet | None
    last: dict[str, float] = field(default_factory=dict)

    def step(self, step: int) -> dict[str, float]:
        self.last = train_step(self.learners, self.data, step, self.cfg)
        return self.last

    def evaluate(self) -> dict[str, float]:
        return self.eval_set.evaluate(self.learners) if self.eval_set else {}

    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, str]]:
        return {}, {}

    def restore(self, meta: dict[str, Any], path: Path) -> None:
        pass  # the batch of step N is a function of (seed, N): the step counter is the whole state


def train_step(learners: LearnerGroup, data: SFTData, step: int, cfg: SFTConfig) -> dict[str, float]:
    """One optimizer step over the global batch `step` (a pure function of seed and step)."""
    t = cfg.train
    indices = data.batches(step, t.global_batch_size, t.seed)
    # flash-attention reads packed samples' boundaries from position ids only in a one-row batch; VL rows
    # hold one sample each and carry the attention_mask it unpads by
    flatten = cfg.model.attn_implementation == "flash_attention_2" and data.image_processor is None
    shards = shard_batches(indices, len(learners), t.micro_batch_size, lambda ix: data.collate(ix, flatten))
    loss_tokens = data.loss_tokens(indices)
    real_tokens = sum(sum(data.items[i].seq_lens) for i in indices)
    began = time.perf_counter()
    stats = learners.step(shards, Norms(tokens=max(1, loss_tokens)), NLL())
    seconds = time.perf_counter() - began
    return {
        "loss": stats.sums["nll_sum"] / max(1, loss_tokens),
        "lr": stats.lr,
        "grad_norm": stats.grad_norm,
        "tokens_per_s": real_tokens / seconds,
        "loss_tokens": loss_tokens,
        "padding_fraction": 1 - real_tokens / max(1, stats.sums["input_tokens"]),
        "step_seconds": seconds,
        "memory/learner_peak_gib": stats.peak_gib,
    }


def data_metrics(stats: Any) -> dict[str, Any]:
    """Preflight and encoding counts, logged once as `data/...` keys."""
    flat = {k: v for k, v in asdict(stats).items() if isinstance(v, int)}
    flat |= {f"samples_{mode}": n for mode, n in stats.modes.items()}
    return {f"data/{k}": v for k, v in flat.items()}
