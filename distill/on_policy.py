"""On-policy distillation (Agarwal et al. 2024 "GKD"; Thinking Machines 2025) on RL's rollout path:

    prompts → student engines (vLLM, the student's current weights; rollout.episodes.Rollouts, as RL)
            → the teacher engines score the student's own tokens (top-k, or each token's logprob for the
            sampled reverse KL) → DeepSpeed learners minimise the divergence on the response tokens
            → weight sync to the student engines (as RL) → metrics

The teacher's signal replaces RL's rewards and advantages; everything else (the prompt stream and its
checkpointed position, the engines, the proved weight sync, LoRA adapter-only syncs, evaluation on the
engines) is the RL path's own code. What it does not do: overlap generation with training, or mix in an
RL reward.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from posttrain.data.errors import DataError
from posttrain.data.rows import NO_NEEDS
from posttrain.distill.config import DistillConfig
from posttrain.distill.teacher import Student, start_teacher
from posttrain.distill.top_k import distill_update
from posttrain.distill.topk_store import TopKRow
from posttrain.groups import LearnerGroup
from posttrain.rewards.builtin import exact_match
from posttrain.rollout.engine import RolloutGroup, TokenScores
from posttrain.rollout.episodes import (
    Episode,
    OnPolicyStage,
    Rollouts,
    build_prompts,
    policy_sync,
    start_policy_engines,
)
from posttrain.rollout.evaluation import EvalSet
from posttrain.stage import StageRun

log = logging.getLogger("posttrain.distill")


def run_on_policy(run: StageRun, cfg: DistillConfig, student: Student, teacher_path: str) -> Path:
    tok = student.tokenizer
    prompts = build_prompts(  # `solution`, where present, only adds an accuracy metric
        cfg.data.train, student.processing, student.is_vl, cfg.data.max_prompt_length, NO_NEEDS
    )
    if any(p.source.images for p in prompts):
        raise DataError("on_policy prompts must be text-only: the teacher scores token ids without images")
    eval_set = (
        EvalSet.build(cfg.data.eval, cfg.eval, student.processing, student.is_vl) if cfg.data.eval else None
    )
    total = cfg.train.max_steps or 1
    teacher = run.own(start_teacher(cfg, teacher_path))
    engines = run.own(start_policy_engines(cfg, cfg.rollout, student.path, student.is_vl, "student"))
    learners = run.learners(student.path, student.is_vl, total)
    sync = policy_sync(cfg, cfg.rollout, learners, engines, tok, run.out)
    stop = [tok.convert_tokens_to_ids("<|im_end|>")]
    rollouts = Rollouts(engines, sync, prompts, cfg.rollout, cfg.train.seed, stop)
    run.train(learners, OnPolicyDistillStage(rollouts, eval_set, cfg, learners, teacher, student), total)
    return run.export(learners, student.processing)


@dataclass
class OnPolicyDistillStage(OnPolicyStage):
    cfg: DistillConfig
    learners: LearnerGroup
    teacher: RolloutGroup
    student: Student

    def step(self, step: int) -> dict[str, float]:
        """Student samples → teacher scores → one optimizer step → weight sync, each phase timed."""
        timings = {}
        t0 = time.perf_counter()
        episodes = self.rollouts.take(self.cfg.prompts_per_step)
        timings["time/generate"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        rows, scores = self.teacher_rows(episodes)
        timings["time/teacher"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        record = distill_update(self.cfg, self.learners, rows, self.student)
        timings["time/train"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        record |= self.rollouts.push_weights()
        timings["time/sync"] = time.perf_counter() - t0
        return record | rollout_metrics(self, episodes, [own for _, _, own in scores]) | timings

    def teacher_rows(self, episodes: list[Episode]) -> tuple[list[TopKRow], list[TokenScores]]:
        """Each episode as a training row: targets on the sampled (not forced) response tokens, the
        teacher's top-k of them (sampled estimator: the token itself and the teacher's logprob of it)."""
        sampled = self.cfg.loss.estimator == "sampled"
        scores = self.teacher.score_prompts([e.ids for e in episodes], 0 if sampled else self.cfg.loss.top_k)
        rows = []
        for i, (e, (ids, logp, own)) in enumerate(zip(episodes, scores, strict=True)):
            tokens = np.asarray(e.ids, dtype=np.int32)
            mask = np.zeros(len(e.ids), dtype=bool)
            mask[len(e.prompt.ids) :] = True
            mask[[len(e.prompt.ids) + j for j in e.sample.forced]] = False  # inserted, not sampled
            if sampled:
                ids, logp = tokens[:, None].copy(), own[:, None].copy()
            rows.append(TopKRow(i, tokens, mask, ids, logp, {}))
        return rows, scores


def rollout_metrics(
    stage: OnPolicyDistillStage, episodes: list[Episode], teacher_own: list[Any]
) -> dict[str, float]:
    """Response lengths, truncation, exact-match accuracy (when prompts have a `solution`) and the k1
    estimate of KL(student || teacher) per response token from the engines' and the teacher's logprobs."""
    gaps, n = 0.0, 0
    for e, own in zip(episodes, teacher_own, strict=True):
        start = len(e.prompt.ids)
        for j, lp in enumerate(e.sample.logprobs):
            if j not in e.sample.forced:
                gaps += lp - float(own[start + j])
                n += 1
    out = {
        "response/tokens": sum(len(e.response) for e in episodes) / len(episodes),
        "response/truncated": sum(e.truncated for e in episodes) / len(episodes),
        "distill/reverse_kl_k1": gaps / max(1, n),
    }
    solutions = [e.prompt.source.extra.get("solution") for e in episodes]
    if all(s is not None for s in solutions):
        stop, tok = stage.rollouts.stop_ids, stage.student.tokenizer
        texts = [tok.decode([i for i in e.response if i not in stop]) for e in episodes]
        hits = exact_match(
            texts, [str(s) for s in solutions], prompts=[e.prompt.source.prompt_text for e in episodes]
        )
        out["train/accuracy"] = sum(h == 1.0 for h in hits) / len(hits)
    return out
