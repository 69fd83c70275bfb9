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
from pathlib import Path
from typing import Any

from posttrain.config import SFTConfig, dump_config
from posttrain.metrics import due

log = logging.getLogger("posttrain.sft")


def run(cfg: SFTConfig) -> Path:
    """Train as configured; return the exported `final/` folder."""
    from posttrain import runs
    from posttrain.data.processing import load_processing
    from posttrain.data.sft_dataset import build_sft_dataset
    from posttrain.evaluation import EvalSet
    from posttrain.metrics import MetricsLog

    began = time.perf_counter()
    runs.quiet_libraries()
    out = Path(cfg.output_dir).resolve()  # actors may run in another working directory
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    model_path = runs.prepare_inputs(cfg.model, [*cfg.data.train, cfg.data.eval])
    processing, is_vl = load_processing(model_path, cfg.model.trust_remote_code)
    data = build_sft_dataset(cfg.data, processing, is_vl)
    log.info("data: %s", data.stats)
    eval_set = EvalSet.build(cfg.data.eval, cfg.eval, processing, is_vl) if cfg.data.eval else None
    t = cfg.train
    total_steps = t.max_steps or data.num_steps(t.global_batch_size, t.epochs)
    learners = runs.start_learners(cfg, model_path, is_vl, total_steps)
    try:
        start = runs.resume(cfg, learners, out)
        metrics = MetricsLog(out, cfg.logging, cfg.model_dump(mode="json"), start, total_steps)
        if start == 0:
            metrics.log(0, data_metrics(data.stats))
            if eval_set:
                metrics.log(0, eval_set.evaluate(learners))
        last: dict[str, Any] = {}
        for step in range(start, total_steps):
            record = train_step(learners, data, step, cfg)
            done = step + 1
            if eval_set and due(done, total_steps, cfg.eval.every_steps):
                record |= eval_set.evaluate(learners)
            metrics.log(done, record)
            metrics.advance()
            last = record
            if due(done, total_steps, cfg.checkpoint.every_steps):
                runs.save_checkpoint(cfg, learners, out, done)
        metrics.close()
        final = runs.export(cfg, learners, processing, out / "final")
    finally:
        learners.shutdown()
    shown = {k: round(v, 4) for k, v in last.items() if k in ("loss", "eval/accuracy")}
    log.info("finished in %.1f min %s → %s", (time.perf_counter() - began) / 60, shown, final)
    return final


def train_step(learners: Any, data: Any, step: int, cfg: SFTConfig) -> dict[str, Any]:
    """One optimizer step over the global batch `step` (a pure function of seed and step)."""
    t = cfg.train
    indices = data.batches(step, t.global_batch_size, t.seed)
    per_rank, micro = t.global_batch_size // len(learners), t.micro_batch_size
    # flash-attention reads packed samples' boundaries from position ids only in a one-row batch; VL rows
    # hold one sample each and carry the attention_mask it unpads by
    flatten = cfg.model.attn_implementation == "flash_attention_2" and data.image_processor is None
    shards = [
        [
            data.collate(indices[start : start + micro], flatten)
            for start in range(rank * per_rank, (rank + 1) * per_rank, micro)
        ]
        for rank in range(len(learners))
    ]
    loss_tokens = data.loss_tokens(indices)
    real_tokens = sum(sum(data.items[i].seq_lens) for i in indices)
    began = time.perf_counter()
    stats = learners.call_each("train_step", [(shard, loss_tokens) for shard in shards])
    seconds = time.perf_counter() - began
    padded_tokens = sum(s["tokens"] for s in stats)
    return {
        "loss": sum(s["loss_sum"] for s in stats) / max(1, loss_tokens),
        "lr": stats[0]["lr"],
        "grad_norm": stats[0]["grad_norm"],
        "tokens_per_s": real_tokens / seconds,
        "loss_tokens": loss_tokens,
        "padding_fraction": 1 - real_tokens / max(1, padded_tokens),
        "step_seconds": seconds,
    }


def data_metrics(stats: Any) -> dict[str, Any]:
    """Preflight and encoding counts, logged once as `data/...` keys."""
    from dataclasses import asdict

    flat = {k: v for k, v in asdict(stats).items() if isinstance(v, int)}
    flat |= {f"samples_{mode}": n for mode, n in stats.modes.items()}
    return {f"data/{k}": v for k, v in flat.items()}
