"""Reward runtime: reward functions run in killable worker processes, so no plugin can hang or kill a run.

Workers are fresh interpreters (`sys.executable -c ...`), not forks and not multiprocessing's spawn:
spawn re-imports the host's `__main__` in every child (a training script, Ray's default_worker), while a
plain interpreter imports only the rewards. Each worker loads every reward once, warms the built-ins up,
then serves calls; each has its own main thread, so math-verify is safe whichever thread or Ray actor
kind calls `score`.

Failure policy, per `score` call:
- one call is one reward on one chunk; each reward's batch is split into `pool_size` chunks and calls
  are dispatched reward by reward to idle workers, at most `pool_size` at a time, so one reward's chunks
  run side by side; one more worker stands by, loaded, to take over from a killed one at once;
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

import contextlib
import logging
import math
import numbers
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection, Pipe, wait
from typing import Any, Literal

from posttrain.rewards.config import RewardsConfig, RewardSpec
from posttrain.rewards.registry import (
    Batch,
    LoadedReward,
    RewardLoadError,
    absolute_name,
    call_reward,
    load_reward,
)

logger = logging.getLogger(__name__)

TIMEOUT, EXCEPTION, CRASH, INVALID = "timeout", "exception", "crash", "invalid"
FAILURES = (TIMEOUT, EXCEPTION, CRASH, INVALID)
STARTUP_TIMEOUT_S = 120.0
"""Time a worker gets to import and warm up its rewards (plugins may import heavy libraries)."""
MAX_LOAD_DEATHS = 3
"""Replacement workers that may die while loading, in a row, before the runtime gives up."""
STANDBY = 1
"""Workers kept beyond `pool_size`, loaded and idle, so a killed worker's calls move on at once instead
of waiting the ~1 s a fresh worker needs to import and warm up its rewards."""
POLL_S = 0.25
"""How often busy workers are checked for death when no message arrives."""
_BOOT = "import sys; from posttrain.rewards.runtime import worker_main; worker_main(int(sys.argv[1]))"


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


def worker_main(fd: int) -> None:
    """Entry point of a worker process: load the rewards named in the first message, then serve calls."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it kills us
    _exit_with_parent(os.getppid())
    conn = Connection(fd)
    try:
        rewards = [_load(plugin) for plugin in conn.recv()]
    except EOFError:
        return
    except RewardLoadError as err:
        conn.send(("load_error", str(err)))
        return
    conn.send(("ready",))
    while True:
        try:
            index, batch = conn.recv()
        except EOFError:
            return
        conn.send(("done", evaluate(rewards[index], batch)))


def _load(plugin: dict[str, Any]) -> LoadedReward:
    try:
        loaded = load_reward(**plugin)
        if loaded.warmup is not None:
            loaded.warmup()
    except RewardLoadError:
        raise
    except Exception as err:
        raise RewardLoadError(f"reward {plugin['name']!r} failed to load: {_describe(err)}") from err
    return loaded


def _exit_with_parent(parent_pid: int) -> None:
    """Workers live in their own session (so killing one takes its children too): exit when orphaned."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


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
        return ChunkResult([None] * len(batch), [EXCEPTION] * len(batch), _describe(err))


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


def _describe(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"{type(err).__name__}: {err}{where}"


# ------------------------------------------------------------------------------------------------ parent


@dataclass
class _Task:
    reward: int
    indices: list[int]


class _Worker:
    def __init__(self, plugins: list[dict[str, Any]]) -> None:
        self.conn, child = Pipe()
        # The worker imports what this process can import, and nothing from its __main__.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) or os.getcwd() for p in sys.path)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, str(child.fileno())],
            pass_fds=[child.fileno()],
            env=env,
            start_new_session=True,
        )
        child.close()
        self.conn.send(plugins)
        self.ready = False
        self.task: _Task | None = None
        self.deadline = time.monotonic() + STARTUP_TIMEOUT_S

    def exit_reason(self) -> str:
        code = self.proc.poll()
        if code is None:
            return "still running"
        return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the worker and anything it started
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.conn.close()


def _kill_all(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.kill()
    workers.clear()


class _Board:
    """Per-sample outcomes of one batch, filled in as chunks come back."""

    def __init__(self, num_rewards: int, n: int) -> None:
        self.values: list[list[float | None]] = [[None] * n for _ in range(num_rewards)]
        self.failures: list[list[str | None]] = [[None] * n for _ in range(num_rewards)]
        self.messages: dict[int, str] = {}

    def record(self, task: _Task, result: ChunkResult) -> None:
        for i, value, failure in zip(task.indices, result.values, result.failures, strict=True):
            self.values[task.reward][i] = value
            self.failures[task.reward][i] = failure
        if result.message is not None:
            self.messages.setdefault(task.reward, result.message)

    def fail(self, task: _Task, failure: str, message: str) -> None:
        n = len(task.indices)
        self.record(task, ChunkResult([None] * n, [failure] * n, message))


class RewardRuntime:
    """A pool of reward worker processes. Use as a context manager; `score` is thread-safe."""

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
        self._plugins = [
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
        self._workers: list[_Worker] = []
        self._load_deaths = 0
        self._started = False
        self._closed = weakref.finalize(self, _kill_all, self._workers)
        self._start()

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
            self._closed()

    def _start(self) -> None:
        try:
            self._workers.extend(_Worker(self._plugins) for _ in range(self.config.pool_size + STANDBY))
            while not all(w.ready for w in self._workers):
                self._wait(_Board(0, 0))
            self._started = True
        except BaseException:
            self._closed()
            raise

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
            if not self._closed.alive:
                raise RuntimeError("RewardRuntime is closed")
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
        board = _Board(len(self._plugins), len(batch))
        chunks = split_chunks(len(batch), self.config.pool_size)
        pending = deque(_Task(r, chunk) for r in range(len(self._plugins)) for chunk in chunks)
        try:
            while pending or any(w.task is not None for w in self._workers):
                for i, worker in enumerate(self._workers):
                    running = sum(w.task is not None for w in self._workers)
                    if pending and running < self.config.pool_size and worker.ready and worker.task is None:
                        if worker.proc.poll() is not None:  # died while idle: not any call's fault
                            logger.warning("reward worker %s while idle; replacing it", worker.exit_reason())
                            self._replace(i)
                            continue
                        self._dispatch(i, pending.popleft(), batch, board)
                self._wait(board)
        finally:  # interrupted (e.g. KeyboardInterrupt): calls still running belong to no batch
            for i, worker in enumerate(self._workers):
                if worker.task is not None:
                    self._replace(i)
        return board

    def _dispatch(self, i: int, task: _Task, batch: Batch, board: _Board) -> None:
        worker = self._workers[i]
        worker.task = task
        try:
            worker.conn.send((task.reward, batch.subset(task.indices)))
        except OSError:
            self._lost(i, board, CRASH, f"worker died ({worker.exit_reason()})")
            return
        worker.deadline = time.monotonic() + self.config.timeout_s

    def _wait(self, board: _Board) -> None:
        """Wait for one message or deadline, then handle every worker that has news."""
        busy = [w for w in self._workers if w.task is not None or not w.ready]
        if not busy:
            return
        timeout = min(POLL_S, max(0.0, min(w.deadline for w in busy) - time.monotonic()))
        readable = wait([w.conn for w in busy], timeout)
        for worker in busy:
            i = self._workers.index(worker)
            if worker.conn in readable:
                self._receive(i, board)
            elif worker.proc.poll() is not None:
                self._lost(i, board, CRASH, f"worker died ({worker.exit_reason()})")
            elif time.monotonic() >= worker.deadline:
                late = (
                    f"no result within {self.config.timeout_s:g} s" if worker.ready else "not ready in time"
                )
                self._lost(i, board, TIMEOUT, late)

    def _receive(self, i: int, board: _Board) -> None:
        worker = self._workers[i]
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(timeout=1)  # the pipe closed as the process exits: get its status
            self._lost(i, board, CRASH, f"worker died ({worker.exit_reason()})")
            return
        if message[0] == "load_error":
            self._fail_loading(message[1])
        if message[0] == "ready":
            worker.ready = True
            self._load_deaths = 0
        else:
            assert worker.task is not None
            board.record(worker.task, message[1])
            worker.task = None

    def _lost(self, i: int, board: _Board, failure: str, message: str) -> None:
        """Kill worker i and start a replacement; its call (if any) fails with `failure`."""
        task = self._workers[i].task
        if task is None:
            self._died_loading(message)
        else:
            board.fail(task, failure, message)
        self._replace(i)

    def _died_loading(self, message: str) -> None:
        """At start that is the plugins' fault; a replacement may have been killed from outside (e.g. the
        OOM killer), so it gets a few more tries before the runtime gives up."""
        self._load_deaths += 1
        if not self._started or self._load_deaths >= MAX_LOAD_DEATHS:
            self._fail_loading(f"a reward worker failed while loading the rewards: {message}")
        logger.warning("reward worker died while loading (%s); restarting it", message)

    def _fail_loading(self, message: str) -> None:
        """Workers cannot load the rewards: nothing can be scored, so close and say why."""
        self._closed()
        raise RewardLoadError(message)

    def _replace(self, i: int) -> None:
        self._workers[i].kill()
        self._workers[i] = _Worker(self._plugins)

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
