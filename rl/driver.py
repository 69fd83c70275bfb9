"""`posttrain rl`: reinforcement learning with verifiable rewards, one step as a chain of typed values.

    prompts → vLLM engines (n samples each): Episodes → rewards (process pool): Scored
            → reference / old logprobs, group advantages: Experience → DeepSpeed learners (mini-batches ×
            epochs) → weight sync → metrics

Each step's prompts and sampling seeds are pure functions of (seed, position in the prompt stream), and
the stream position is checkpointed, so a resumed run repeats the uninterrupted one. With
`train.async_rollout` the engines generate step k+1 (with the weights of step k) while step k trains.
Algorithms are pure functions (rl/advantages.py, rl/losses.py, rl/objective.py) chosen by name.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posttrain.data.processing import load_processing, pad_id, tokenizer_of
from posttrain.groups import LearnerGroup, LogprobSource, ReferenceGroup, shard_batches
from posttrain.objectives import Norms, StepStats, merge_stats
from posttrain.rewards.builtin import overlong_penalty
from posttrain.rewards.registry import required_columns
from posttrain.rewards.runtime import RewardRuntime
from posttrain.rewards.tools import load_tools
from posttrain.rl.advantages import group_advantages, keep_informative_groups
from posttrain.rl.batch import Experience, Scored, collate, loss_positions, model_inputs, response_logprobs
from posttrain.rl.config import RLConfig
from posttrain.rl.objective import RLObjective
from posttrain.rollout.colocate import Colocation, start_colocated
from posttrain.rollout.episodes import (
    Episode,
    OnPolicyStage,
    Rollouts,
    build_prompts,
    placeholder_ids,
    policy_sync,
    start_policy_engines,
)
from posttrain.rollout.evaluation import EvalSet
from posttrain.rollout.multiturn import episode_metrics
from posttrain.stage import StageRun, prepare_inputs

log = logging.getLogger("posttrain.rl")


def run(cfg: RLConfig) -> Path:
    """Train as configured; return the exported `final/` folder."""
    with StageRun(cfg) as run:
        model_path = prepare_inputs(cfg.model, [*cfg.data.prompts, cfg.data.eval])
        processing, is_vl = load_processing(model_path, cfg.model.trust_remote_code)
        tok = tokenizer_of(processing)
        needs = required_columns(cfg.rewards.rewards)
        schemas = load_tools(cfg.tools.names).schemas if cfg.tools else None  # a bad tool fails here
        prompts = build_prompts(
            cfg.data.prompts, processing, is_vl, cfg.data.max_prompt_length, needs, tools=schemas
        )
        eval_set = (
            EvalSet.build(cfg.data.eval, cfg.eval, processing, is_vl, tools=schemas)
            if cfg.data.eval
            else None
        )
        log.info(
            "%d prompts; %s", len(prompts), f"{len(eval_set.prompts)} eval prompts" if eval_set else "no eval"
        )
        run.start_ray(cpus_needed(cfg))
        colocation = None
        if cfg.rollout.colocate:
            colocation = start_colocated(
                cfg, cfg.rollout, run, model_path, is_vl, cfg.optimizer_steps, "rollout"
            )
            learners, engines = colocation.learners, colocation.engines
        else:
            learners = run.learners(model_path, is_vl, cfg.optimizer_steps)
            engines = run.own(start_policy_engines(cfg, cfg.rollout, model_path, is_vl, "rollout"))
        rewards = run.enter(RewardRuntime.from_config(cfg.rewards))
        reference = start_reference(cfg, run, model_path, is_vl, learners)
        sync = policy_sync(cfg, cfg.rollout, learners, engines, tok, run.out)
        stop_ids = [tok.convert_tokens_to_ids("<|im_end|>")]
        rollouts = Rollouts(
            engines,
            sync,
            prompts,
            cfg.rollout,
            cfg.train.seed,
            stop_ids,
            placeholder_ids(tok, is_vl),
            cfg.tools,
            processing if is_vl else None,
        )
        stage = RLStage(rollouts, eval_set, cfg, learners, rewards, reference, tok, colocation)
        run.train(learners, stage, cfg.train.max_steps)
        final = run.export(learners, processing)
    return run.finished(final)


def cpus_needed(cfg: RLConfig) -> float:
    """Learners, engines and (when separate) the reference run at the same time."""
    ref = cfg.reference
    return (
        cfg.learners.num_learners * cfg.learners.cpus_per_learner
        + cfg.rollout.num_engines * cfg.rollout.cpus_per_engine
        + (ref.num_workers * ref.cpus_per_worker if separate_reference(cfg) else 0)
    )


def separate_reference(cfg: RLConfig) -> bool:
    return cfg.algorithm.kl_coef > 0 and cfg.model.lora is None


def start_reference(
    cfg: RLConfig, run: StageRun, model_path: str, is_vl: bool, learners: LearnerGroup
) -> LogprobSource | None:
    """The KL reference: its own actor group, or for LoRA the learners with the adapter disabled."""
    if cfg.algorithm.kl_coef == 0:
        return None
    if cfg.model.lora is not None:
        return learners
    ref = cfg.reference
    group = ReferenceGroup(cfg, model_path, is_vl, ref.num_workers, ref.cpus_per_worker, ref.gpus_per_worker)
    return run.own(group)


# ------------------------------------------------------------------------------------------------ one step


@dataclass
class RLStage(OnPolicyStage):
    cfg: RLConfig
    learners: LearnerGroup
    rewards: RewardRuntime
    reference: LogprobSource | None
    tokenizer: Any
    colocation: Colocation | None = None  # learners and engines take turns on one device each

    def step(self, step: int) -> dict[str, float]:
        """Rollouts → rewards → logprobs and advantages → updates → weight sync, each phase timed.
        Colocated, the engines hand the device to the learners after the rollouts and get it back for
        the sync (rollout/colocate.py)."""
        cfg, timings = self.cfg, Timings()
        scored, gen = self.collect_batch(timings)
        turns = self.colocation.to_train() if self.colocation else {}
        if cfg.train.async_rollout and step + 1 < cfg.train.max_steps:
            self.rollouts.prefetch(cfg.train.prompts_per_step)  # overlaps the rest of this step
        with timings("reference"):
            experience = self.experience(scored)
        with timings("train"):
            stats = self.update(experience, step)
        if self.rollouts.pending is not None:
            with timings("generate_wait"):
                self.rollouts.finish_prefetch()
        with timings("sync"):
            push = self.rollouts.push_weights
            sync = self.colocation.to_generate(push) if self.colocation else push()
        record = {**gen, **stats, **sync, **turns, **batch_metrics(self, experience), **timings.metrics()}
        oldest = min(x.episode.weight_version for x in experience)
        record["rollout/staleness"] = float(self.rollouts.version - 1 - oldest)
        return record

    # ------------------------------------------------------------------------------------------ phases

    def collect_batch(self, timings: Timings) -> tuple[list[Scored], dict[str, float]]:
        """`train.prompts_per_step` scored groups. With dynamic sampling, groups whose rewards are all
        equal are dropped and more prompts sampled, for at most `max_sampling_rounds` rounds; the batch
        is then completed with dropped groups (zero advantage: they add nothing to the policy gradient)."""
        cfg = self.cfg
        want, n = cfg.train.prompts_per_step, cfg.rollout.samples_per_prompt
        kept: list[list[Scored]] = []
        dropped: list[list[Scored]] = []
        failures: dict[str, float] = {}
        generated = rounds = 0
        gen_seconds = 0.0
        while len(kept) < want and rounds < cfg.algorithm.max_sampling_rounds:
            with timings("generate") as t_gen:
                episodes = self.rollouts.take(want - len(kept))
            gen_seconds += t_gen.seconds
            generated += sum(len(e.response) for e in episodes)
            with timings("reward"):
                scored, failed = self.score(episodes)
            merge_stats(failures, failed)
            rounds += 1
            groups = [scored[i : i + n] for i in range(0, len(scored), n)]
            if not cfg.algorithm.dynamic_sampling:
                kept += groups
                break
            totals = torch.tensor([[s.reward for s in g] for g in groups])
            valid = torch.tensor([[s.valid for s in g] for g in groups])
            informative = keep_informative_groups(totals, valid).tolist()
            kept += [g for g, keep in zip(groups, informative, strict=True) if keep]
            dropped += [g for g, keep in zip(groups, informative, strict=True) if not keep]
        filled = kept[:want] + dropped[: max(0, want - len(kept))]
        batch = [
            Scored(s.episode, g, s.rewards, s.reward, s.valid)
            for g, group in enumerate(filled)
            for s in group
        ]
        info = {
            "rollout/rounds": float(rounds),
            "rollout/filtered_groups": float(len(dropped)),
            "rollout/tokens_per_s": generated / max(gen_seconds, 1e-9),
            **failures,
        }
        return batch, info

    def score(self, episodes: list[Episode]) -> tuple[list[Scored], dict[str, float]]:
        """Rewards of every episode (the pool scores while this thread computes the overlong penalty)
        and the failure counts."""
        cfg, tok = self.cfg, self.tokenizer
        stop = set(self.rollouts.stop_ids)
        ids = [[i for i in e.final_response if i not in stop] for e in episodes]
        texts = [tok.decode(x, skip_special_tokens=False) for x in ids]
        sources = [e.prompt.source for e in episodes]
        columns = {key: [s.extra.get(key) for s in sources] for key in sources[0].extra}
        future = self.rewards.score_async(texts, [s.prompt_text for s in sources], ids, columns)
        algo = cfg.algorithm
        penalties = [
            algo.overlong_penalty
            * overlong_penalty(len(e.response), cfg.response_limit, algo.overlong_buffer)
            if algo.overlong_buffer
            else 0.0
            for e in episodes
        ]
        result = future.result()
        scored = [
            Scored(
                e,
                group=i // cfg.rollout.samples_per_prompt,
                rewards={name: values[i] for name, values in result.values.items()},
                reward=result.total[i] + penalties[i],
                valid=result.valid[i],
            )
            for i, e in enumerate(episodes)
        ]
        failures = {k: v for k, v in result.metrics.items() if not k.endswith("/mean") and "/total/" not in k}
        return scored, failures

    def experience(self, scored: list[Scored]) -> list[Experience]:
        """Reference logprobs when the KL term is on and old-policy logprobs when an update will not be
        the first on this batch (several mini-batches or epochs), both before any update; then the
        group advantages of the rewards (minus the KL penalty with `kl_in_reward`)."""
        cfg, algo = self.cfg, self.cfg.algorithm
        episodes = [s.episode for s in scored]
        none: list[list[float] | None] = [None] * len(scored)
        ref = list(self.logprobs(self.reference, episodes, True)) if self.reference else none
        several = cfg.train.mini_batches > 1 or cfg.train.epochs_per_batch > 1
        old = list(self.logprobs(self.learners, episodes, False)) if several else none
        totals = [s.reward for s in scored]
        if algo.kl_coef > 0 and algo.kl_in_reward:
            totals = [
                t - algo.kl_coef * sum(_k1(s.episode, r)) for t, s, r in zip(totals, scored, ref, strict=True)
            ]
        n = cfg.rollout.samples_per_prompt
        valid = torch.tensor([s.valid for s in scored]).view(-1, n)
        advantages = group_advantages(torch.tensor(totals).view(-1, n), valid, algo.advantage).view(-1)
        return [
            Experience(s, t, a, o, r)
            for s, t, a, o, r in zip(scored, totals, advantages.tolist(), old, ref, strict=True)
        ]

    def logprobs(self, source: LogprobSource, episodes: list[Episode], base_model: bool) -> list[list[float]]:
        """Response-token logprobs under `source` (learners or reference), sequences split evenly over
        its ranks."""
        pad = pad_id(self.tokenizer)
        micro = self.cfg.train.micro_batch_size
        shards = shard_batches(episodes, len(source), micro, lambda es: model_inputs(es, pad))
        rows = source.logprobs(shards, base_model, self.cfg.rollout.temperature)
        return [response_logprobs(e, row) for e, row in zip(episodes, rows, strict=True)]

    def update(self, experience: list[Experience], step: int) -> dict[str, float]:
        """`mini_batches` optimizer steps per epoch over the batch; statistics over every update."""
        cfg = self.cfg
        order = torch.randperm(
            len(experience), generator=torch.Generator().manual_seed(cfg.train.seed + step)
        ).tolist()
        per_update = len(experience) // cfg.train.mini_batches
        pad, mask_truncated = pad_id(self.tokenizer), cfg.algorithm.mask_truncated
        objective = RLObjective(cfg.algorithm)
        updates: list[StepStats] = []
        for _ in range(cfg.train.epochs_per_batch):
            for m in range(cfg.train.mini_batches):
                chosen = [experience[i] for i in order[m * per_update : (m + 1) * per_update]]
                positions = [loss_positions(x, mask_truncated) for x in chosen]
                norms = Norms(
                    tokens=float(max(1, sum(len(p) for p in positions))),
                    seqs=float(max(1, sum(bool(p) for p in positions))),
                    norm_length=float(cfg.response_limit),
                    temperature=cfg.rollout.temperature,
                )
                shards = shard_batches(
                    chosen,
                    len(self.learners),
                    cfg.train.micro_batch_size,
                    lambda xs: collate(xs, pad, mask_truncated),
                    sort_key=lambda x: len(x.episode.ids),
                )
                updates.append(self.learners.step(shards, norms, objective))
        return update_metrics(updates)


def update_metrics(updates: list[StepStats]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for u in updates:
        merge_stats(totals, u.sums)
    n = len(updates)
    tokens = max(1.0, totals.get("tokens", 0.0))
    out = {
        "loss": totals["loss"] / n,
        "grad_norm": sum(u.grad_norm for u in updates) / n,
        "lr": sum(u.lr for u in updates) / n,
        "actor/clip_low_fraction": totals.get("clip_low_count", 0.0) / tokens,
        "actor/clip_high_fraction": totals.get("clip_high_count", 0.0) / tokens,
        "actor/ratio_mean": totals.get("ratio_sum", 0.0) / tokens,
        "actor/ratio_max": totals.get("ratio_max", 0.0),
        "actor/entropy": totals.get("entropy_sum", 0.0) / tokens,
        "actor/tokens": tokens / n,
        "mismatch/mean_abs": totals.get("mismatch_sum", 0.0) / tokens,
        "mismatch/max_abs": totals.get("mismatch_max", 0.0),
        "memory/learner_peak_gib": max(u.peak_gib for u in updates),
    }
    if "kl_sum" in totals:
        out["actor/kl"] = totals["kl_sum"] / tokens
    if "tis_clipped_count" in totals:
        out["actor/is_clipped_fraction"] = totals["tis_clipped_count"] / tokens
        out["actor/is_ratio_mean"] = totals["tis_ratio_sum"] / tokens
    return out


def batch_metrics(stage: RLStage, experience: list[Experience]) -> dict[str, float]:
    """Rewards, accuracy, lengths and truncation, overall and per chat mode; advantage statistics."""
    cfg = stage.cfg
    names = [s.key for s in cfg.rewards.rewards]
    accuracy = cfg.train.accuracy_reward or names[0]
    think_end = stage.tokenizer.convert_tokens_to_ids("</think>")
    out: dict[str, float] = {}
    modes = sorted({x.episode.prompt.source.mode for x in experience})
    for mode in [None, *modes]:
        group = [x for x in experience if mode is None or x.episode.prompt.source.mode == mode]
        suffix = "" if mode is None else f"_{mode}"
        valid = [x for x in group if x.scored.valid]
        out[f"reward/total/mean{suffix}"] = _mean([x.reward for x in valid])
        for name in names:
            values = [x.scored.rewards.get(name) for x in valid]
            out[f"reward/{name}/mean{suffix}"] = _mean([v for v in values if v is not None])
        acc = [x.scored.rewards.get(accuracy) for x in valid]
        out[f"train/accuracy{suffix}"] = _mean([v for v in acc if v is not None])
        out[f"response/tokens{suffix}"] = _mean([len(x.episode.response) for x in group])
        out[f"response/truncated{suffix}"] = _mean([x.episode.truncated for x in group])
        out[f"response/think_tokens{suffix}"] = _mean([_think_tokens(x.episode, think_end) for x in group])
    out["response/tokens_max"] = float(max(len(x.episode.response) for x in experience))
    out["reward/valid"] = _mean([x.scored.valid for x in experience])
    out["response/placeholder_cut"] = _mean([x.episode.placeholder for x in experience])
    if cfg.tools is not None:
        episodes = [x.episode for x in experience]
        out |= episode_metrics([e.sample for e in episodes], [e.prompt.source.mode for e in episodes])
    valid_adv = [x.advantage for x in experience if x.scored.valid]
    out["advantage/mean"] = _mean(valid_adv)
    out["advantage/abs_max"] = max((abs(a) for a in valid_adv), default=0.0)
    out["advantage/zero_fraction"] = _mean([a == 0.0 for a in valid_adv])
    return out


# ------------------------------------------------------------------------------------------------ helpers


class Timings:
    """`with timings("phase"):` accumulates seconds per phase; `metrics()` gives `time/<phase>`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.began = time.perf_counter()

    def __call__(self, phase: str) -> _Timer:
        return _Timer(self, phase)

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()} | {
            "time/step": time.perf_counter() - self.began
        }


@dataclass
class _Timer:
    owner: Timings
    phase: str
    seconds: float = 0.0
    _t0: float = field(default=0.0, repr=False)

    def __enter__(self) -> _Timer:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        self.owner.seconds[self.phase] = self.owner.seconds.get(self.phase, 0.0) + self.seconds


def _k1(e: Episode, ref_logprobs: list[float] | None) -> list[float]:
    """Per-token k1 KL of a response (policy at sampling time vs reference)."""
    return [a - b for a, b in zip(e.sample.logprobs, ref_logprobs or [], strict=False)]


def _think_tokens(e: Episode, think_end: int) -> int:
    if e.sample.thinking_tokens is not None:
        return int(e.sample.thinking_tokens)
    return e.response.index(think_end) + 1 if think_end in e.response else 0


def _mean(values: list[Any]) -> float:
    return float(sum(values) / len(values)) if values else 0.0
