"""`posttrain rl`: reinforcement learning with verifiable rewards, one linear loop.

    prompts → vLLM engines (n samples each) → rewards (process pool) → group advantages
            → reference logprobs (KL) → DeepSpeed learners (mini-batches × epochs) → weight sync → metrics

Each step's prompts and sampling seeds are pure functions of (seed, position in the prompt stream), and
the stream position is checkpointed, so a resumed run repeats the uninterrupted one. With
`train.async_rollout` the engines generate step k+1 (with the weights of step k) while step k trains.
Algorithms are pure functions (rl/advantages.py, rl/losses.py, rl/objective.py) chosen by name.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from posttrain.config import dump_config
from posttrain.metrics import due
from posttrain.rl.config import RLConfig

log = logging.getLogger("posttrain.rl")

PENDING_FILE = "pending_rollouts.json"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The `max_lora_rank` values vLLM accepts; engines take the smallest that fits `model.lora.r`."""


class RolloutError(RuntimeError):
    """An engine died or stopped answering during generation."""


@dataclass
class Run:
    """What the loop works with; built once by `run`."""

    cfg: RLConfig
    out: Path
    prompts: list[Any]  # batch.Prompt
    tokenizer: Any
    stop_ids: list[int]
    probe_ids: list[int]
    placeholders: set[int]
    learners: Any
    engines: Any
    rewards: Any
    reference: Any = None  # a WorkerGroup, the learners (LoRA: adapter off) or None (no KL)
    cursor: int = 0  # position in the prompt stream
    version: int = 0  # weight version the engines serve
    probe_atol: float = 0.0  # set by calibrate_probe_atol before any update
    pending: Any = None  # async: (prompts, positions, ObjectRefs or results) of the next step


def run(cfg: RLConfig) -> Path:
    """Train as configured; return the exported `final/` folder."""
    from posttrain import runs
    from posttrain.data.processing import load_processing, tokenizer_of
    from posttrain.evaluation import EvalSet
    from posttrain.rewards.registry import required_columns
    from posttrain.rewards.runtime import RewardRuntime
    from posttrain.rl.batch import build_prompts, placeholder_ids

    began = time.perf_counter()
    runs.quiet_libraries()
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    model_path = prepare_policy(cfg)
    processing, is_vl = load_processing(model_path, cfg.model.trust_remote_code)
    tok = tokenizer_of(processing)
    needs = required_columns(cfg.rewards.rewards)
    prompts = build_prompts(cfg.data.prompts, processing, is_vl, cfg.data.max_prompt_length, needs)
    eval_set = EvalSet.build(cfg.data.eval, cfg.eval, processing, is_vl) if cfg.data.eval else None
    log.info(
        "%d prompts; %s", len(prompts), f"{len(eval_set.prompts)} eval prompts" if eval_set else "no eval"
    )
    stop_ids = [tok.convert_tokens_to_ids("<|im_end|>")]
    learners = engines = None
    try:
        learners = start_learners(cfg, model_path, is_vl)
        engines = start_engines(cfg, model_path, is_vl)
        with RewardRuntime.from_config(cfg.rewards) as rewards:
            marks = placeholder_ids(tok, is_vl)
            ctx = Run(cfg, out, prompts, tok, stop_ids, probe_ids(tok), marks, learners, engines, rewards)
            ctx.reference = start_reference(cfg, model_path, is_vl, learners)
            ctx.probe_atol = calibrate_probe_atol(cfg, learners, engines, ctx.probe_ids)
            start = resume(ctx)
            train(ctx, start, eval_set)
        final = runs.export(cfg, learners, processing, out / "final")
    finally:
        for group in (engines, learners):
            if group is not None:
                group.shutdown()
    log.info("finished in %.1f min → %s", (time.perf_counter() - began) / 60, final)
    return final


def train(ctx: Run, start: int, eval_set: Any) -> None:
    from posttrain.metrics import MetricsLog

    cfg = ctx.cfg
    total = cfg.train.max_steps
    metrics = MetricsLog(ctx.out, cfg.logging, cfg.model_dump(mode="json"), start, total)
    if start == 0 and eval_set:
        metrics.log(0, eval_set.evaluate_on_engines(ctx.engines))
    for step in range(start, total):
        record = rl_step(ctx, step)
        done = step + 1
        if eval_set and due(done, total, cfg.eval.every_steps):
            record |= eval_set.evaluate_on_engines(ctx.engines)
        metrics.log(done, record)
        metrics.advance()
        if due(done, total, cfg.checkpoint.every_steps):
            save_checkpoint(ctx, done)
    metrics.close()


# ------------------------------------------------------------------------------------------------ one step


def rl_step(ctx: Run, step: int) -> dict[str, float]:
    """Rollouts → rewards → advantages → (reference) → updates → weight sync, with each phase timed."""
    from posttrain.rl.advantages import group_advantages

    cfg, timings = ctx.cfg, Timings()
    trajs, gen = collect_batch(ctx, step, timings)
    if cfg.train.async_rollout and step + 1 < cfg.train.max_steps:
        ctx.pending = submit(ctx, cfg.train.prompts_per_step)  # overlaps the rest of this step
    with timings("reference"):
        add_logprobs(ctx, trajs)
    if cfg.algorithm.kl_coef > 0 and cfg.algorithm.kl_in_reward:
        for t in trajs:
            t.reward -= cfg.algorithm.kl_coef * sum(_k1(t))
    import torch

    n = cfg.rollout.samples_per_prompt
    totals = torch.tensor([t.reward for t in trajs]).view(-1, n)
    valid = torch.tensor([t.valid for t in trajs]).view(-1, n)
    advantages = group_advantages(totals, valid, cfg.algorithm.model_dump()["advantage"]).view(-1)
    for t, a in zip(trajs, advantages.tolist(), strict=True):
        t.advantage = a
    with timings("train"):
        stats = update(ctx, trajs, step)
    if ctx.pending is not None:
        with timings("generate_wait"):
            ctx.pending = (*ctx.pending[:2], collect(ctx, ctx.pending[2]))
    with timings("sync"):
        sync = sync_weights(ctx, ctx.version + 1)
    record = {**gen, **stats, **sync, **batch_metrics(ctx, trajs, advantages), **timings.metrics()}
    record["rollout/staleness"] = float(ctx.version - 1 - min(t.weight_version for t in trajs))
    return record


def collect_batch(ctx: Run, step: int, timings: Timings) -> tuple[list[Any], dict[str, float]]:
    """`train.prompts_per_step` scored groups. With dynamic sampling, groups whose rewards are all equal
    are dropped and more prompts sampled, for at most `max_sampling_rounds` rounds; the batch is then
    completed with dropped groups (zero advantage: they add nothing to the policy gradient)."""
    from posttrain.rl.advantages import keep_informative_groups

    cfg = ctx.cfg
    want, n = cfg.train.prompts_per_step, cfg.rollout.samples_per_prompt
    kept: list[list[Any]] = []
    dropped: list[list[Any]] = []
    failures: dict[str, float] = {}
    generated = rounds = 0
    gen_seconds = 0.0
    while len(kept) < want and rounds < cfg.algorithm.max_sampling_rounds:
        pending = ctx.pending or submit(ctx, want - len(kept))
        ctx.pending = None
        with timings("generate") as t_gen:
            trajs = rollout_trajectories(ctx, pending)
        gen_seconds += t_gen.seconds
        generated += sum(len(t.response) for t in trajs)
        with timings("reward"):
            for key, value in score(ctx, trajs).items():
                failures[key] = failures.get(key, 0.0) + value
        rounds += 1
        groups = [trajs[i : i + n] for i in range(0, len(trajs), n)]
        if not cfg.algorithm.dynamic_sampling:
            kept += groups
            break
        import torch

        totals = torch.tensor([[t.reward for t in g] for g in groups])
        valid = torch.tensor([[t.valid for t in g] for g in groups])
        informative = keep_informative_groups(totals, valid).tolist()
        kept += [g for g, keep in zip(groups, informative, strict=True) if keep]
        dropped += [g for g, keep in zip(groups, informative, strict=True) if not keep]
    filled = kept[:want] + dropped[: max(0, want - len(kept))]
    batch = [t for g in filled for t in g]
    for g, group in enumerate(filled):
        for t in group:
            t.group = g
    info = {
        "rollout/rounds": float(rounds),
        "rollout/filtered_groups": float(len(dropped)),
        "rollout/tokens_per_s": generated / max(gen_seconds, 1e-9),
        **failures,
    }
    return batch, info


def submit(ctx: Run, num_prompts: int) -> tuple[list[Any], range, Any]:
    """Start generation for the next `num_prompts` prompts of the stream (returns at once)."""
    from posttrain.rl.batch import requests_for

    positions = range(ctx.cursor, ctx.cursor + num_prompts)
    ctx.cursor += num_prompts
    prompts, requests = requests_for(
        ctx.prompts, positions, ctx.cfg.train.seed, ctx.cfg.rollout, ctx.stop_ids
    )
    return prompts, positions, ctx.engines.submit(requests)


def collect(ctx: Run, refs: Any) -> list[Any]:
    """Results of `submit`; an engine that died or hangs becomes a RolloutError naming it."""
    import ray

    if refs and not isinstance(refs[0], ray.ObjectRef):
        return list(refs)  # already collected (async) or restored from a checkpoint
    try:
        return list(ctx.engines.collect(refs))
    except ray.exceptions.RayActorError as e:
        raise RolloutError(f"a rollout engine died during generation: {e}") from None
    except TimeoutError as e:
        raise RolloutError(f"rollout engines did not answer: {e}") from None


def rollout_trajectories(ctx: Run, pending: tuple[list[Any], range, Any]) -> list[Any]:
    from posttrain.rl.batch import trajectories

    prompts, _, refs = pending
    return trajectories(prompts, collect(ctx, refs), 0, ctx.placeholders)


def score(ctx: Run, trajs: list[Any]) -> dict[str, float]:
    """Rewards of every trajectory (the pool scores while this thread adds the overlong penalty's
    inputs); returns the failure counts. Sets reward, rewards and valid on each trajectory."""
    from posttrain.rewards.builtin import overlong_penalty

    cfg, tok = ctx.cfg, ctx.tokenizer
    stop = set(ctx.stop_ids)
    ids = [[i for i in t.response if i not in stop] for t in trajs]
    texts = [tok.decode(x, skip_special_tokens=False) for x in ids]
    columns: dict[str, list[Any]] = {}
    for key in trajs[0].prompt.source.extra:
        columns[key] = [t.prompt.source.extra.get(key) for t in trajs]
    future = ctx.rewards.score_async(texts, [t.prompt.source.prompt_text for t in trajs], ids, columns)
    algo = cfg.algorithm
    penalties = [
        algo.overlong_penalty
        * overlong_penalty(len(t.response), cfg.rollout.max_tokens, algo.overlong_buffer)
        if algo.overlong_buffer
        else 0.0
        for t in trajs
    ]
    result = future.result()
    for i, t in enumerate(trajs):
        t.rewards = {name: values[i] for name, values in result.values.items()}
        t.reward = result.total[i] + penalties[i]
        t.valid = result.valid[i]
    return {k: v for k, v in result.metrics.items() if not k.endswith("/mean") and "/total/" not in k}


def add_logprobs(ctx: Run, trajs: list[Any]) -> None:
    """Reference logprobs when the KL term is on; old-policy logprobs when an update will not be the
    first on this batch (several mini-batches or epochs), both computed before any update."""
    cfg = ctx.cfg
    if ctx.reference is not None:
        for t, lp in zip(trajs, logprobs_of(ctx, ctx.reference, trajs, base_model=True), strict=True):
            t.ref_logprobs = lp
    if cfg.train.mini_batches > 1 or cfg.train.epochs_per_batch > 1:
        for t, lp in zip(trajs, logprobs_of(ctx, ctx.learners, trajs, base_model=False), strict=True):
            t.old_logprobs = lp


def logprobs_of(ctx: Run, group: Any, trajs: list[Any], base_model: bool) -> list[list[float]]:
    """Response-token logprobs under `group` (learners or reference), sequences split evenly over ranks."""
    from posttrain.rl.batch import collate, response_logprobs

    micro = ctx.cfg.train.micro_batch_size
    shards = _shards(list(range(len(trajs))), len(group))
    pad = _pad_id(ctx.tokenizer)
    args = [
        (
            [collate([trajs[i] for i in s[k : k + micro]], pad, False) for k in range(0, len(s), micro)],
            base_model,
            ctx.cfg.rollout.temperature,
        )
        for s in shards
    ]
    rows = [row for rank_out in group.call_each("logprobs", args) for part in rank_out for row in part]
    order = [i for s in shards for i in s]
    out: list[list[float]] = [[] for _ in trajs]
    for i, row in zip(order, rows, strict=True):
        out[i] = response_logprobs(trajs[i], row)
    return out


def update(ctx: Run, trajs: list[Any], step: int) -> dict[str, float]:
    """`mini_batches` optimizer steps per epoch over the batch; statistics over every update."""
    import torch

    from posttrain.rl.batch import collate, loss_positions

    cfg = ctx.cfg
    order = torch.randperm(
        len(trajs), generator=torch.Generator().manual_seed(cfg.train.seed + step)
    ).tolist()
    per_update = len(trajs) // cfg.train.mini_batches
    micro, pad = cfg.train.micro_batch_size, _pad_id(ctx.tokenizer)
    totals: dict[str, float] = {}
    updates = 0
    for _ in range(cfg.train.epochs_per_batch):
        for m in range(cfg.train.mini_batches):
            chosen = [trajs[i] for i in order[m * per_update : (m + 1) * per_update]]
            positions = [loss_positions(t, cfg.algorithm.mask_truncated) for t in chosen]
            norms = {
                "tokens": float(max(1, sum(len(p) for p in positions))),
                "seqs": float(max(1, sum(bool(p) for p in positions))),
                "norm_length": float(cfg.rollout.max_tokens),
                "temperature": cfg.rollout.temperature,
            }
            args = []
            for shard in _shards(chosen, len(ctx.learners)):
                shard = sorted(shard, key=lambda t: len(t.ids))  # less padding per micro-batch
                batches = [
                    collate(shard[k : k + micro], pad, cfg.algorithm.mask_truncated)
                    for k in range(0, len(shard), micro)
                ]
                args.append((batches, norms, cfg.algorithm.model_dump(mode="json")))
            for stats in ctx.learners.call_each("policy_step", args):
                for key, value in stats.items():
                    merge = max if key.endswith("_max") else float.__add__
                    totals[key] = merge(totals[key], value) if key in totals else value
            updates += 1
    return update_metrics(totals, updates, len(ctx.learners))


def update_metrics(totals: dict[str, float], updates: int, ranks: int) -> dict[str, float]:
    tokens = max(1.0, totals.get("tokens", 0.0))
    out = {
        "loss": totals["loss"] / updates,
        "grad_norm": totals["grad_norm"] / (updates * ranks),
        "lr": totals["lr"] / (updates * ranks),
        "actor/clip_low_fraction": totals.get("clip_low_count", 0.0) / tokens,
        "actor/clip_high_fraction": totals.get("clip_high_count", 0.0) / tokens,
        "actor/ratio_mean": totals.get("ratio_sum", 0.0) / tokens,
        "actor/ratio_max": totals.get("ratio_max", 0.0),
        "actor/entropy": totals.get("entropy_sum", 0.0) / tokens,
        "actor/tokens": tokens / updates,
        "mismatch/mean_abs": totals.get("mismatch_sum", 0.0) / tokens,
        "mismatch/max_abs": totals.get("mismatch_max", 0.0),
    }
    if "kl_sum" in totals:
        out["actor/kl"] = totals["kl_sum"] / tokens
    if "tis_clipped_count" in totals:
        out["actor/is_clipped_fraction"] = totals["tis_clipped_count"] / tokens
        out["actor/is_ratio_mean"] = totals["tis_ratio_sum"] / tokens
    return out


def batch_metrics(ctx: Run, trajs: list[Any], advantages: Any) -> dict[str, float]:
    """Rewards, accuracy, lengths and truncation, overall and per chat mode; advantage statistics."""
    cfg = ctx.cfg
    names = [s.key for s in cfg.rewards.rewards]
    accuracy = cfg.train.accuracy_reward or names[0]
    think_end = ctx.tokenizer.convert_tokens_to_ids("</think>")
    out: dict[str, float] = {}
    modes = sorted({t.prompt.source.mode for t in trajs})
    for mode in [None, *modes]:
        group = [t for t in trajs if mode is None or t.prompt.source.mode == mode]
        suffix = "" if mode is None else f"_{mode}"
        valid = [t for t in group if t.valid]
        out[f"reward/total/mean{suffix}"] = _mean([t.reward for t in valid])
        for name in names:
            values = [t.rewards.get(name) for t in valid]
            out[f"reward/{name}/mean{suffix}"] = _mean([v for v in values if v is not None])
        acc = [t.rewards.get(accuracy) for t in valid]
        out[f"train/accuracy{suffix}"] = _mean([v for v in acc if v is not None])
        out[f"response/tokens{suffix}"] = _mean([len(t.response) for t in group])
        out[f"response/truncated{suffix}"] = _mean([t.truncated for t in group])
        out[f"response/think_tokens{suffix}"] = _mean([_think_tokens(t, think_end) for t in group])
    out["response/tokens_max"] = float(max(len(t.response) for t in trajs))
    out["reward/valid"] = _mean([t.valid for t in trajs])
    out["response/placeholder_cut"] = _mean([t.placeholder for t in trajs])
    valid_adv = [a for t, a in zip(trajs, advantages.tolist(), strict=True) if t.valid]
    out["advantage/mean"] = _mean(valid_adv)
    out["advantage/abs_max"] = max((abs(a) for a in valid_adv), default=0.0)
    out["advantage/zero_fraction"] = _mean([a == 0.0 for a in valid_adv])
    return out


# ---------------------------------------------------------------------------------- weights and groups


def sync_weights(ctx: Run, version: int) -> dict[str, float]:
    """Push the learners' weights to the engines as `version`; every engine proves it (checksums and a
    logprob probe) or the run stops with WeightSyncError."""
    from posttrain.rollout import stream_sync_from_learners, sync_from_learners, sync_lora_from_learners

    cfg = ctx.cfg
    t0 = time.perf_counter()
    args = (ctx.learners, ctx.engines, version)
    if cfg.model.lora:
        root = ctx.out / "adapters"
        reports = sync_lora_from_learners(*args, str(root), ctx.probe_ids, ctx.probe_atol)
        _prune_adapters(root, version)
    elif cfg.rollout.sync == "stream":
        reports = stream_sync_from_learners(
            *args, cfg.rollout.bucket_mb, probe_ids=ctx.probe_ids, atol=ctx.probe_atol
        )
    else:
        reports = sync_from_learners(*args, cfg.rollout.bucket_mb, ctx.probe_ids, ctx.probe_atol)
    ctx.version = version
    return {
        "sync/seconds": time.perf_counter() - t0,
        "sync/version": float(version),
        "sync/probe_max_abs": max(float(r.get("probe_max_abs") or 0.0) for r in reports),
    }


def _prune_adapters(root: Path, version: int) -> None:
    """Engines serve the newest adapter; older folders (but the previous, in case of a retry) go."""
    import shutil

    for folder in root.glob("v*"):
        if folder.name[1:].isdigit() and int(folder.name[1:]) < version - 1:
            shutil.rmtree(folder, ignore_errors=True)


def calibrate_probe_atol(cfg: Any, learners: Any, engines: Any, ids: list[int]) -> float:
    """The probe tolerance of this run (RL, on-policy distillation): `rollout.probe_atol` (default by
    `model.dtype`) on top of the learner-vs-engine difference on the starting weights."""
    from posttrain.rollout.weight_sync import PROBE_ATOL, calibrate_probe

    atol = cfg.rollout.probe_atol or PROBE_ATOL[cfg.model.dtype]
    baseline, tolerance = calibrate_probe(learners, engines, ids, atol)
    log.info("weight-sync probe: %.3g on the starting weights, tolerance %.3g", baseline, tolerance)
    return tolerance


def probe_ids(tokenizer: Any) -> list[int]:
    """A fixed text sequence whose logprobs engines and learners must agree on after every sync."""
    ids: list[int] = tokenizer("The weights changed: 12+34=46, 7+8=15.", add_special_tokens=False)[
        "input_ids"
    ]
    return ids


def prepare_policy(cfg: RLConfig) -> str:
    """The starting model: `model.path`, built by `init_from_sft` first when missing; the prompt and eval
    datasets are generated when they are synthetic and missing."""
    from posttrain import runs

    if cfg.init_from_sft and not Path(cfg.model.path).exists():
        from posttrain.config import load_config
        from posttrain.sft.driver import run as run_sft

        init = cfg.init_from_sft
        output_dir = str(Path(cfg.model.path).parent)
        log.info(
            "%s is missing: running SFT %s %s first", cfg.model.path, init.config, " ".join(init.overrides)
        )
        run_sft(load_config("sft", init.config, [*init.overrides, f"output_dir={output_dir}"]))
    return runs.prepare_inputs(cfg.model, [*cfg.data.prompts, cfg.data.eval])


def start_learners(cfg: RLConfig, model_path: str, is_vl: bool) -> Any:
    from posttrain import runs
    from posttrain.workers import init_ray

    ref_cpus = cfg.reference.num_workers * cfg.reference.cpus_per_worker if _separate_reference(cfg) else 0
    needed = (
        cfg.learners.num_learners * cfg.learners.cpus_per_learner
        + cfg.rollout.num_engines * cfg.rollout.cpus_per_engine
        + ref_cpus
    )
    init_ray(cfg.ray.address, cfg.ray.num_cpus or int(needed + 0.999))
    return runs.start_learners(cfg, model_path, is_vl, cfg.optimizer_steps)


def start_engines(cfg: Any, model_path: str, is_vl: bool, name: str = "rollout") -> Any:
    """The engine group of a stage config with `rollout`, `model`, `train.seed` and `ray` (RL, distill)."""
    from posttrain.rollout import RolloutGroup
    from posttrain.workers import resolve_device

    r, lora = cfg.rollout, cfg.model.lora
    return RolloutGroup(
        model_path,
        r.num_engines,
        num_cpus=r.cpus_per_engine,
        device=resolve_device(cfg.device),
        name=name,
        sync_timeout_s=r.sync_timeout_s,
        ray_address=cfg.ray.address,
        max_model_len=r.max_model_len,
        **r.group_kwargs(),
        dtype=cfg.model.dtype,
        seed=cfg.train.seed,
        enable_lora=lora is not None,
        max_lora_rank=min((x for x in VLLM_LORA_RANKS if x >= lora.r), default=lora.r) if lora else 16,
        limit_images=4 if is_vl else None,
    )


def _separate_reference(cfg: RLConfig) -> bool:
    return cfg.algorithm.kl_coef > 0 and cfg.model.lora is None


def start_reference(cfg: RLConfig, model_path: str, is_vl: bool, learners: Any) -> Any:
    """The KL reference: its own actor group, or for LoRA the learners with the adapter disabled."""
    if cfg.algorithm.kl_coef == 0:
        return None
    if cfg.model.lora is not None:
        return learners
    from posttrain.learner import Reference
    from posttrain.workers import WorkerGroup, resolve_device

    ref = cfg.reference
    return WorkerGroup(
        Reference,
        ref.num_workers,
        num_cpus=ref.cpus_per_worker,
        num_gpus=ref.gpus_per_worker,
        device=resolve_device(cfg.device),
        name="reference",
        init_args=(cfg.stage, cfg.model_dump(mode="json"), model_path, is_vl),
        config_key="reference",
    )


# ------------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(ctx: Run, step: int) -> None:
    """Learner state plus the loop's: stream position, weight version and (async) the next step's
    already generated rollouts, so a resumed run trains on exactly the same samples."""
    from posttrain import runs

    files = {}
    if ctx.pending is not None:
        prompts_, positions, results = ctx.pending
        files[PENDING_FILE] = json.dumps(
            {"positions": [positions.start, positions.stop], "results": [asdict(r) for r in results]}
        )
    runs.save_checkpoint(
        ctx.cfg, ctx.learners, ctx.out, step, {"cursor": ctx.cursor, "version": ctx.version}, files
    )


def resume(ctx: Run) -> int:
    from posttrain import runs
    from posttrain.rl.batch import prompt_order
    from posttrain.rollout.engine import RolloutResult, RolloutSample

    meta, path = runs.resume_meta(ctx.cfg, ctx.learners, ctx.out)
    if meta is None or path is None:
        return 0
    ctx.cursor = int(meta["cursor"])
    pending_file = Path(path) / PENDING_FILE
    if pending_file.is_file():
        saved = json.loads(pending_file.read_text())
        positions = range(*saved["positions"])
        results = [
            RolloutResult(**{**r, "samples": [RolloutSample(**s) for s in r["samples"]]})
            for r in saved["results"]
        ]
        prompts = [ctx.prompts[prompt_order(len(ctx.prompts), ctx.cfg.train.seed, p)] for p in positions]
        ctx.pending = (prompts, positions, results)
    sync_weights(ctx, int(meta["version"]))
    return int(meta["step"])


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


def _k1(t: Any) -> list[float]:
    """Per-token k1 KL of a trajectory's response (policy at sampling time vs reference)."""
    return [a - b for a, b in zip(t.sample.logprobs, t.ref_logprobs or [], strict=False)]


def _think_tokens(t: Any, think_end: int) -> int:
    if t.sample.thinking_tokens is not None:
        return int(t.sample.thinking_tokens)
    return t.response.index(think_end) + 1 if think_end in t.response else 0


def _shards(items: list[Any], parts: int) -> list[list[Any]]:
    """Contiguous, even shards (equal when `parts` divides the count, as ZeRO-3 lockstep needs)."""
    from posttrain.rollout import split_evenly

    return split_evenly(items, parts)


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id)


def _mean(values: list[Any]) -> float:
    return float(sum(values) / len(values)) if values else 0.0
