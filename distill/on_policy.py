"""On-policy distillation, one linear loop (Agarwal et al. 2024 "GKD"; Thinking Machines 2025):

    prompts → student engines (vLLM, the student's current weights) → the teacher engines score the
    student's own tokens (top-k, or each token's logprob for the sampled reverse KL) → DeepSpeed learners
    minimise the divergence on the response tokens → weight sync to the student engines → metrics

Prompts and sampling seeds are pure functions of (seed, position in the prompt stream) as in RL
(rl/batch.py), and the stream position and weight version are checkpointed, so a run resumes where it
stopped. LoRA students sync only the adapter. What it does not do: overlap generation with training, or
mix in an RL reward.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.data.errors import DataError
from posttrain.data.rows import NO_NEEDS
from posttrain.distill.config import DistillConfig
from posttrain.metrics import due

log = logging.getLogger("posttrain.distill")


@dataclass
class OnPolicyRun:
    cfg: DistillConfig
    out: Path
    student: Any  # driver.Student
    prompts: list[Any]  # rl.batch.Prompt
    stop_ids: list[int]
    probe_ids: list[int]
    learners: Any
    engines: Any  # the student's
    teacher: Any
    cursor: int = 0
    version: int = 0
    probe_atol: float = 0.0  # set by calibrate_probe_atol before any update


def run_on_policy(cfg: DistillConfig, out: Path, student: Any, teacher_path: str) -> Path:
    from posttrain import runs
    from posttrain.distill.driver import start_teacher
    from posttrain.evaluation import EvalSet
    from posttrain.rl.batch import build_prompts
    from posttrain.rl.driver import calibrate_probe_atol, probe_ids

    tok = student.tokenizer
    prompts = build_prompts(  # `solution`, where present, only adds an accuracy metric
        cfg.data.train, student.processing, student.is_vl, cfg.data.max_prompt_length, NO_NEEDS
    )
    if any(p.source.images for p in prompts):
        raise DataError("on_policy prompts must be text-only: the teacher scores token ids without images")
    eval_set = (
        EvalSet.build(cfg.data.eval, cfg.eval, student.processing, student.is_vl) if cfg.data.eval else None
    )
    groups: list[Any] = []
    try:
        teacher = start_teacher(cfg, teacher_path)
        groups.append(teacher)
        engines = start_student_engines(cfg, student)
        groups.append(engines)
        learners = runs.start_learners(cfg, student.path, student.is_vl, cfg.train.max_steps or 1)
        groups.append(learners)
        stop = [tok.convert_tokens_to_ids("<|im_end|>")]
        ctx = OnPolicyRun(cfg, out, student, prompts, stop, probe_ids(tok), learners, engines, teacher)
        ctx.probe_atol = calibrate_probe_atol(cfg, learners, engines, ctx.probe_ids)
        start = resume(ctx)
        train(ctx, start, eval_set)
        return runs.export(cfg, learners, student.processing, out / "final")
    finally:
        for group in reversed(groups):
            group.shutdown()


def train(ctx: OnPolicyRun, start: int, eval_set: Any) -> None:
    from posttrain.metrics import MetricsLog

    cfg = ctx.cfg
    total = cfg.train.max_steps or 1
    metrics = MetricsLog(ctx.out, cfg.logging, cfg.model_dump(mode="json"), start, total)
    if start == 0 and eval_set:
        metrics.log(0, eval_set.evaluate_on_engines(ctx.engines))
    for step in range(start, total):
        record = on_policy_step(ctx)
        done = step + 1
        if eval_set and due(done, total, cfg.eval.every_steps):
            record |= eval_set.evaluate_on_engines(ctx.engines)
        metrics.log(done, record)
        metrics.advance()
        if due(done, total, cfg.checkpoint.every_steps):
            save_checkpoint(ctx, done)
    metrics.close()


def on_policy_step(ctx: OnPolicyRun) -> dict[str, float]:
    """Student samples → teacher scores → one optimizer step → weight sync, each phase timed."""
    import numpy as np

    from posttrain.distill.batch import Sequence, score_tokens
    from posttrain.distill.driver import distill_update
    from posttrain.distill.topk_store import TopKRow
    from posttrain.rl.batch import requests_for, trajectories

    cfg, timings = ctx.cfg, {}
    t0 = time.perf_counter()
    positions = range(ctx.cursor, ctx.cursor + cfg.prompts_per_step)
    ctx.cursor += cfg.prompts_per_step
    chosen, requests = requests_for(ctx.prompts, positions, cfg.train.seed, cfg.rollout, ctx.stop_ids)
    trajs = trajectories(chosen, ctx.engines.generate(requests), 0)
    timings["time/generate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    seqs = []
    for t in trajs:
        mask = np.zeros(len(t.ids), dtype=bool)
        mask[len(t.prompt.ids) :] = True
        mask[[len(t.prompt.ids) + j for j in t.sample.forced]] = False  # inserted, not sampled
        seqs.append(Sequence(t.ids, mask, {}))
    sampled = cfg.loss.estimator == "sampled"
    k = 0 if sampled else cfg.loss.top_k
    scored = score_tokens(ctx.teacher, [s.token_ids for s in seqs], k)
    rows = []
    for i, (s, (ids, logp, own)) in enumerate(zip(seqs, scored, strict=True)):
        tokens = np.asarray(s.token_ids, dtype=np.int32)
        if sampled:
            ids, logp = tokens[:, None].copy(), own[:, None].copy()
        rows.append(TopKRow(i, tokens, s.loss_mask, ids, logp, {}))
    timings["time/teacher"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    record = distill_update(cfg, ctx.learners, rows, ctx.student)
    timings["time/train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    record |= sync_weights(ctx, ctx.version + 1)
    timings["time/sync"] = time.perf_counter() - t0
    return record | rollout_metrics(ctx, trajs, [o for _, _, o in scored]) | timings


def rollout_metrics(ctx: OnPolicyRun, trajs: list[Any], teacher_own: list[Any]) -> dict[str, float]:
    """Response lengths, truncation, exact-match accuracy (when prompts have a `solution`) and the k1
    estimate of KL(student || teacher) per response token from the engines' and the teacher's logprobs."""
    from posttrain.rewards.builtin import exact_match

    tok = ctx.student.tokenizer
    gaps, n = 0.0, 0
    for t, own in zip(trajs, teacher_own, strict=True):
        start = len(t.prompt.ids)
        for j, lp in enumerate(t.sample.logprobs):
            if j not in t.sample.forced:
                gaps += lp - float(own[start + j])
                n += 1
    out = {
        "response/tokens": sum(len(t.response) for t in trajs) / len(trajs),
        "response/truncated": sum(t.truncated for t in trajs) / len(trajs),
        "distill/reverse_kl_k1": gaps / max(1, n),
    }
    solutions = [t.prompt.source.extra.get("solution") for t in trajs]
    if all(s is not None for s in solutions):
        texts = [tok.decode([i for i in t.response if i not in ctx.stop_ids]) for t in trajs]
        hits = exact_match(
            texts, [str(s) for s in solutions], prompts=[t.prompt.source.prompt_text for t in trajs]
        )
        out["train/accuracy"] = sum(h == 1.0 for h in hits) / len(hits)
    return out


# ---------------------------------------------------------------------------------- engines and weights


def start_student_engines(cfg: DistillConfig, student: Any) -> Any:
    from posttrain.rl.driver import start_engines

    return start_engines(cfg, student.path, student.is_vl, name="student")


def sync_weights(ctx: OnPolicyRun, version: int) -> dict[str, float]:
    """The learners' weights (LoRA: the adapter) to the student engines as `version`, proved by checksums
    and a logprob probe (WeightSyncError otherwise), as in RL."""
    from posttrain.rollout import stream_sync_from_learners, sync_lora_from_learners

    r = ctx.cfg.rollout
    if ctx.cfg.model.lora:
        root = ctx.out / "adapters"
        reports = sync_lora_from_learners(
            ctx.learners, ctx.engines, version, str(root), probe_ids=ctx.probe_ids, atol=ctx.probe_atol
        )
        _prune_adapters(root, version)
    else:
        reports = stream_sync_from_learners(
            ctx.learners, ctx.engines, version, r.bucket_mb, probe_ids=ctx.probe_ids, atol=ctx.probe_atol
        )
    ctx.version = version
    return {"sync/probe_max_abs": max(float(x.get("probe_max_abs") or 0.0) for x in reports)}


def _prune_adapters(root: Path, version: int) -> None:
    import shutil

    for folder in root.glob("v*"):
        if folder.name[1:].isdigit() and int(folder.name[1:]) < version - 1:
            shutil.rmtree(folder, ignore_errors=True)


def save_checkpoint(ctx: OnPolicyRun, step: int) -> None:
    from posttrain import runs

    runs.save_checkpoint(ctx.cfg, ctx.learners, ctx.out, step, {"cursor": ctx.cursor, "version": ctx.version})


def resume(ctx: OnPolicyRun) -> int:
    """Learner state, prompt-stream position and weight version of the latest checkpoint; the engines
    get the restored weights before the first step."""
    from posttrain import runs

    meta, _ = runs.resume_meta(ctx.cfg, ctx.learners, ctx.out)
    if meta is None:
        return 0
    ctx.cursor = int(meta["cursor"])
    sync_weights(ctx, int(meta["version"]))
    return int(meta["step"])
