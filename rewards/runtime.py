"""Reward runtime: reward functions run in the killable worker pool (`posttrain.rewards.pool`), so no
plugin can hang or kill a run. Each worker loads every reward once and warms the built-ins up.

Failure policy, per `score` call:
- one call is one reward on one chunk; each reward's batch is split into `pool_size` chunks and calls
  are queued reward by reward, at most `pool_size` at a time, so one reward's chunks run side by side;
- `timeout`: a call past `timeout_s` has its worker SIGKILLed and replaced; its chunk's samples fail.
  Never retried: the time is spent, and so a hung plugin adds at most one timeout plus a kill;
- `crash`: the worker died (segfault, abort, `os._exit`); its chunk's samples fail, the worker is replaced;
- `exception`: the call raised; the worker re-runs that chunk's samples one by one inside the same time
  limit, so only samples that raise on their own fail;
- `invalid`: output not a list of the chunk's length (whole chunk), or an item that is not None or a finite
  number (that sample).
Failed samples are scored None and marked not valid (`on_failure: exclude`) or scored `failure_value`.
A reward that fails on every sample of `max_consecutive_failures` consecutive batches raises
`RewardPluginError` naming it.
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from posttrain.rewards.config import RewardsConfig, RewardSpec
from posttrain.rewards.pool import EXCEPTION, FAILURES, INVALID, Lost, WorkerPool, describe
from posttrain.rewards.registry import (
    Batch,
    LoadedReward,
    RewardLoadError,
    absolute_name,
    call_reward,
    load_reward,
)

logger = logging.getLogger(__name__)


class RewardPluginError(RuntimeError):
    """A reward keeps failing on every sample: the run stops rather than train on no signal."""

    def __init__(self, message: str, names: list[str]) -> None:
        super().__init__(message)
        self.names = names


@dataclass
class RewardResult:
    values: dict[str, list[float | None]]
    """Per reward, per sample: the value, None for "no opinion" or (with `exclude`) a failure."""
    total: list[float]
    """Weighted sum of the values that are not None; 0.0 where the sample is not valid."""
    valid: list[bool]
    """False where a reward failed and `on_failure` is `exclude`: leave the sample out of the loss."""
    metrics: dict[str, float]
    """`reward/<name>/mean`, `reward/<name>/<failure class>` and `/none` counts, `reward/total/mean`,
    `reward/valid` (fraction) and `reward/seconds`."""
    failures: dict[str, list[str | None]]
    """Per reward, per sample: the failure class or None."""


# ------------------------------------------------------------------------------------------------ worker


@dataclass
class ChunkResult:
    values: list[float | None]
    failures: list[str | None]
    message: str | None = None
    """The first failure, for the log."""


def serve_rewards(plugins: list[dict[str, Any]]) -> Callable[[tuple[int, Batch]], ChunkResult]:
    """The pool workers' setup: load (and warm up) every reward; serve (reward index, chunk) calls."""
    rewards = [_load(plugin) for plugin in plugins]
    return lambda task: evaluate(rewards[task[0]], task[1])


def _load(plugin: dict[str, Any]) -> LoadedReward:
    try:
        loaded = load_reward(**plugin)
        if loaded.warmup is not None:
            loaded.warmup()
    except RewardLoadError:
        raise
    except Exception as err:
        raise RewardLoadError(f"reward {plugin['name']!r} failed to load: {describe(err)}") from err
    return loaded


def evaluate(reward: LoadedReward, batch: Batch) -> ChunkResult:
    """Call `reward` on `batch`; if it raises, isolate the samples that raise on their own."""
    result = _attempt(reward, batch)
    if len(batch) == 1 or EXCEPTION not in result.failures:
        return result
    parts = [_attempt(reward, batch.subset([i])) for i in range(len(batch))]
    return ChunkResult([p.values[0] for p in parts], [p.failures[0] for p in parts], result.message)


def _attempt(reward: LoadedReward, batch: Batch) -> ChunkResult:
    try:
        return check_values(call_reward(reward, batch), len(batch))
    except Exception as err:
        return ChunkResult([None] * len(batch), [EXCEPTION] * len(batch), describe(err))


def check_values(raw: Any, n: int) -> ChunkResult:
    """Validate a reward's output: a sized sequence of n items, each None or a finite real number."""
    if isinstance(raw, (str, bytes, Mapping)) or not hasattr(raw, "__len__") or not hasattr(raw, "__iter__"):
        return ChunkResult([None] * n, [INVALID] * n, f"returned a {type(raw).__name__}, not a list")
    if len(raw) != n:
        return ChunkResult([None] * n, [INVALID] * n, f"returned {len(raw)} values for {n} samples")
    result = ChunkResult([], [])
    for item in raw:
        ok = item is None or (isinstance(item, numbers.Real) and math.isfinite(item))
        result.values.append(None if item is None or not ok else float(item))
        result.failures.append(None if ok else INVALID)
        if not ok and result.message is None:
            result.message = f"returned {str(item)[:60]!r} ({type(item).__name__}), not a finite number"
    return result


# ------------------------------------------------------------------------------------------------ parent


@dataclass
class _Task:
    reward: int
    indices: list[int]


class _Board:
    """Per-sample outcomes of one batch, filled in as chunks come back."""

    def __init__(self, num_rewards: int, n: int) -> None:
        self.values: list[list[float | None]] = [[None] * n for _ in range(num_rewards)]
        self.failures: list[list[str | None]] = [[None] * n for _ in range(num_rewards)]
        self.messages: dict[int, str] = {}

    def record(self, task: _Task, result: ChunkResult | Lost) -> None:
        if isinstance(result, Lost):
            n = len(task.indices)
            result = ChunkResult([None] * n, [result.failure] * n, result.message)
        for i, value, failure in zip(task.indices, result.values, result.failures, strict=True):
            self.values[task.reward][i] = value
            self.failures[task.reward][i] = failure
        if result.message is not None:
            self.messages.setdefault(task.reward, result.message)


class RewardRuntime:
    """Rewards evaluated in a killable worker pool. Use as a context manager; `score` is thread-safe."""

    def __init__(
        self,
        specs: Sequence[RewardSpec | dict[str, Any] | str],
        *,
        pool_size: int = 2,
        timeout_s: float = 10.0,
        on_failure: Literal["exclude", "value"] = "exclude",
        failure_value: float = 0.0,
        max_consecutive_failures: int = 3,
    ) -> None:
        self.config = RewardsConfig(
            rewards=list(specs),  # a validator turns names into specs
            pool_size=pool_size,
            timeout_s=timeout_s,
            on_failure=on_failure,
            failure_value=failure_value,
            max_consecutive_failures=max_consecutive_failures,
        )
        self.names = [spec.key for spec in self.config.rewards]
        plugins = [
            {
                "name": absolute_name(s.name),
                "kind": s.kind,
                "params": s.params,
                "ground_truth": s.ground_truth,
            }
            for s in self.config.rewards
        ]
        self._consecutive = dict.fromkeys(self.names, 0)
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="posttrain-rewards")
        self.pool = WorkerPool(
            "posttrain.rewards.runtime:serve_rewards",
            plugins,
            size=pool_size,
            timeout_s=timeout_s,
            what="reward",
            load_error=RewardLoadError,
        )

    @classmethod
    def from_config(cls, cfg: RewardsConfig) -> RewardRuntime:
        return cls(cfg.rewards, **cfg.model_dump(exclude={"rewards"}))

    def __enter__(self) -> RewardRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill the workers (a score in progress finishes first)."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self.pool.close()

    # --------------------------------------------------------------------------------------------- scoring

    def score(
        self,
        completions: Sequence[str],
        prompts: Sequence[str],
        completion_ids: Sequence[Sequence[int]],
        columns: Mapping[str, Sequence[Any]] | None = None,
    ) -> RewardResult:
        """Every reward on every sample. A reward that hangs adds at most `timeout_s` plus a kill (its
        chunks run side by side); one that crashes adds at most a worker restart (~1 s, usually none:
        the standby takes over). Raises RewardPluginError when a reward has kept failing on every sample."""
        batch = make_batch(completions, prompts, completion_ids, columns)
        with self._lock:
            start = time.monotonic()
            board = self._run(batch)
            result = self._assemble(board, time.monotonic() - start)
        self._check_persistent(board, len(batch))
        return result

    def score_async(
        self,
        completions: Sequence[str],
        prompts: Sequence[str],
        completion_ids: Sequence[Sequence[int]],
        columns: Mapping[str, Sequence[Any]] | None = None,
    ) -> Future[RewardResult]:
        """`score` on a background thread, so RL can overlap rewards with other work
        (in asyncio code: `await asyncio.wrap_future(runtime.score_async(...))`)."""
        return self._executor.submit(self.score, completions, prompts, completion_ids, columns)

    def _run(self, batch: Batch) -> _Board:
        board = _Board(len(self.names), len(batch))
        chunks = split_chunks(len(batch), self.config.pool_size)
        tasks = [_Task(r, chunk) for r in range(len(self.names)) for chunk in chunks]
        answers = self.pool.run([(t.reward, batch.subset(t.indices)) for t in tasks])
        for task, answer in zip(tasks, answers, strict=True):
            board.record(task, answer)
        return board

    # -------------------------------------------------------------------------------------------- results

    def _assemble(self, board: _Board, seconds: float) -> RewardResult:
        n = len(board.values[0]) if board.values else 0
        exclude = self.config.on_failure == "exclude"
        valid = [True] * n
        values: dict[str, list[float | None]] = {}
        metrics: dict[str, float] = {}
        for r, name in enumerate(self.names):
            failures = board.failures[r]
            if exclude:
                valid = [ok and f is None for ok, f in zip(valid, failures, strict=True)]
            fallback = None if exclude else self.config.failure_value
            values[name] = [
                v if f is None else fallback for v, f in zip(board.values[r], failures, strict=True)
            ]
            metrics |= _reward_metrics(name, values[name], failures)
            if any(failures):
                counts = {k: failures.count(k) for k in FAILURES if k in failures}
                logger.warning(
                    "reward %r failed on %s of %d samples: %s", name, counts, n, board.messages.get(r)
                )
        weights = [spec.weight for spec in self.config.rewards]
        columns = list(values.values())
        total = [_weighted(weights, [c[i] for c in columns]) if valid[i] else 0.0 for i in range(n)]
        kept = [t for t, ok in zip(total, valid, strict=True) if ok]
        metrics |= {"reward/valid": sum(valid) / n if n else 1.0, "reward/seconds": seconds}
        if kept:
            metrics["reward/total/mean"] = sum(kept) / len(kept)
        failures_out = {name: list(board.failures[r]) for r, name in enumerate(self.names)}
        return RewardResult(values, total, valid, metrics, failures_out)

    def _check_persistent(self, board: _Board, n: int) -> None:
        limit = self.config.max_consecutive_failures
        broken = []
        for r, name in enumerate(self.names):
            every = n > 0 and all(board.failures[r])
            self._consecutive[name] = self._consecutive[name] + 1 if every else 0
            if self._consecutive[name] >= limit:
                broken.append(name)
                logger.error("reward %r: %s", name, board.messages.get(r))
        if broken:
            details = "; ".join(f"{name!r}: {board.messages.get(self.names.index(name))}" for name in broken)
            raise RewardPluginError(
                f"reward plugin(s) {', '.join(map(repr, broken))} failed on every sample of {limit} "
                f"consecutive batch(es) (max_consecutive_failures). Last error: {details}",
                broken,
            )


def _weighted(weights: list[float], values: list[float | None]) -> float:
    """Weighted sum over the rewards with an opinion (None is "no opinion", as in TRL)."""
    return sum((w * v for w, v in zip(weights, values, strict=True) if v is not None), 0.0)


def _reward_metrics(name: str, values: list[float | None], failures: list[str | None]) -> dict[str, float]:
    numbers_ = [v for v in values if v is not None]
    metrics = {f"reward/{name}/{kind}": float(failures.count(kind)) for kind in FAILURES}
    metrics[f"reward/{name}/none"] = float(
        sum(v is None and f is None for v, f in zip(values, failures, strict=True))
    )
    if numbers_:
        metrics[f"reward/{name}/mean"] = sum(numbers_) / len(numbers_)
    return metrics


def split_chunks(n: int, parts: int) -> list[list[int]]:
    """Indices 0..n-1 in at most `parts` contiguous chunks of near-equal size."""
    size = max(1, math.ceil(n / parts))
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def make_batch(
    completions: Sequence[str],
    prompts: Sequence[str],
    completion_ids: Sequence[Sequence[int]],
    columns: Mapping[str, Sequence[Any]] | None,
) -> Batch:
    """A Batch of plain lists (token ids from tensors or arrays too); every field must align."""
    n = len(completions)
    ids = [list(x.tolist() if hasattr(x, "tolist") else x) for x in completion_ids]
    cols = {k: list(v) for k, v in (columns or {}).items()}
    for what, seq in [
        ("prompts", prompts),
        ("completion_ids", ids),
        *((f"column {k!r}", v) for k, v in cols.items()),
    ]:
        if len(seq) != n:
            raise ValueError(f"{what} has {len(seq)} items for {n} completions")
    return Batch(list(completions), list(prompts), ids, cols)
