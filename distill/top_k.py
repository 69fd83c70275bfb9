"""Top-k distillation (offline and online modes): the student learns the teacher's top-k distribution
over every target token of fixed training sequences.

    offline:    sequences → teacher engines (top-k, once) → top-k store on disk → learners stream it
    online:     sequences → teacher engines (top-k per batch) → learners

The offline store is written in the order the student will read it (the seed's permutation of the
sequences, repeated every epoch) and is reused when it exists, so capture happens once and any number of
students train from it; the stream position is part of every checkpoint, so a resumed run continues in the
middle of a shard. Online mode scores exactly the sequences the offline store would hold at each step, so
both give the same loss.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.config import ConfigError
from posttrain.data.processing import load_processing, tokenizer_of
from posttrain.distill.batch import Sequence, capture, collate, score_sequences
from posttrain.distill.config import DistillConfig
from posttrain.distill.objective import DistillObjective
from posttrain.distill.teacher import (
    Student,
    check_tokenizers,
    ordered_sequences,
    prepare_teacher,
    start_teacher,
)
from posttrain.distill.topk_store import MANIFEST, TopKRow, TopKStore, TopKWriter, teacher_identity
from posttrain.groups import LearnerGroup, shard_batches
from posttrain.objectives import Norms
from posttrain.rollout.engine import RolloutGroup
from posttrain.rollout.evaluation import EvalSet
from posttrain.stage import StageRun

log = logging.getLogger("posttrain.distill")


def ensure_store(cfg: DistillConfig, student: Student) -> tuple[TopKStore, dict[str, float]]:
    """The finished store at `store.dir` (checked against the student's tokenizer and `loss.top_k`),
    captured first with the teacher engines when it is missing or unfinished."""
    directory = cfg.store_dir.resolve()
    info: dict[str, float] = {}
    if not (directory / MANIFEST).is_file():
        info = capture_store(cfg, directory, student, prepare_teacher(cfg, student))
    else:
        log.info("reusing the top-k store %s (capture skipped)", directory)
    store = TopKStore(directory)
    check_tokenizers(
        store.teacher["tokenizer"], f"{store.teacher['name_or_path']} (the store {directory})", student
    )
    if store.k < cfg.loss.top_k:
        raise ConfigError(
            f"loss.top_k={cfg.loss.top_k} but the store {directory} holds the teacher's top-{store.k}; lower "
            "loss.top_k or capture a new store (store.dir)"
        )
    return store, info


def capture_store(
    cfg: DistillConfig, directory: Path, student: Student, teacher_path: str
) -> dict[str, float]:
    """Score every training sequence with the teacher engines and write the store; the engines are shut
    down before training starts."""
    seqs = ordered_sequences(cfg, student)
    for stale in directory.glob("shard-*.safetensors"):  # an unfinished capture's leftovers
        stale.unlink()
    config = (
        json.loads((Path(teacher_path) / "config.json").read_text()) if Path(teacher_path).is_dir() else {}
    )
    began = time.perf_counter()
    teacher = start_teacher(cfg, teacher_path)
    try:
        tok = tokenizer_of(load_processing(teacher_path, cfg.teacher.trust_remote_code)[0])
        identity = teacher_identity(teacher_path, config, tok, cfg.teacher.dtype)
        t0 = time.perf_counter()
        with TopKWriter(directory, k=cfg.loss.top_k, teacher=identity, shard_rows=cfg.store.shard_rows) as w:
            tokens = capture(teacher, seqs, w, cfg.loss.top_k, cfg.teacher.batch_size)
        seconds = time.perf_counter() - t0
    finally:
        teacher.shutdown()
    log.info("captured the teacher's top-%d of %d sequences (%d tokens) in %.1f s → %s",
             cfg.loss.top_k, len(seqs), tokens, seconds, directory)  # fmt: skip
    return {
        "capture/sequences": float(len(seqs)),
        "capture/tokens": float(tokens),
        "capture/seconds": seconds,
        "capture/tokens_per_s": tokens / max(seconds, 1e-9),
        "capture/total_seconds": time.perf_counter() - began,
    }


class StoreStream:
    """Rows of a store read in order, round after round; `position` counts rows read since the start,
    and `seek` resumes anywhere, also in the middle of a shard."""

    def __init__(self, store: TopKStore) -> None:
        self.store, self.position = store, 0
        self._rows: Iterator[TopKRow] | None = None

    def __len__(self) -> int:
        return len(self.store)

    def seek(self, position: int) -> None:
        self.position, self._rows = position, None

    def take(self, n: int) -> list[TopKRow]:
        rows: list[TopKRow] = []
        while len(rows) < n:
            if self._rows is None:
                self._rows = self.store.iter_rows(self.position % len(self.store))
            row = next(self._rows, None)
            if row is None:  # end of the store: the next epoch starts at row 0
                self._rows = None
                continue
            rows.append(row)
            self.position += 1
        return rows


class OnlineStream:
    """The same rows as a StoreStream over a store captured from `seqs`, scored by the teacher engines
    when they are needed."""

    def __init__(self, seqs: list[Sequence], teacher: RolloutGroup, k: int, batch_size: int) -> None:
        self.seqs, self.teacher, self.k, self.batch_size = seqs, teacher, k, batch_size
        self.position = 0

    def __len__(self) -> int:
        return len(self.seqs)

    def seek(self, position: int) -> None:
        self.position = position

    def take(self, n: int) -> list[TopKRow]:
        chosen = [self.seqs[(self.position + i) % len(self.seqs)] for i in range(n)]
        self.position += n
        return score_sequences(self.teacher, chosen, self.k, self.batch_size)


def train_top_k(
    run: StageRun,
    cfg: DistillConfig,
    student: Student,
    stream: StoreStream | OnlineStream,
    first: dict[str, float] | None = None,
) -> Path:
    """Top-k distillation over `stream` (offline or online): steps, evaluation, checkpoints, export."""
    t = cfg.train
    total = t.max_steps or max(1, math.ceil(len(stream) * t.epochs / t.global_batch_size))
    eval_set = (
        EvalSet.build(cfg.data.eval, cfg.eval, student.processing, student.is_vl) if cfg.data.eval else None
    )
    learners = run.learners(student.path, student.is_vl, total)
    run.train(learners, TopKStage(cfg, learners, student, stream, eval_set), total, first)
    return run.export(learners, student.processing)


@dataclass
class TopKStage:
    """Offline / online distillation: rows with the teacher's top-k, read from a stream whose position
    is the state a checkpoint carries."""

    cfg: DistillConfig
    learners: LearnerGroup
    student: Student
    stream: StoreStream | OnlineStream
    eval_set: EvalSet | None

    def step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        rows = self.stream.take(self.cfg.train.global_batch_size)
        fetch = time.perf_counter() - t0
        record = distill_update(self.cfg, self.learners, rows, self.student)
        record["time/teacher" if isinstance(self.stream, OnlineStream) else "time/read_store"] = fetch
        record["store/position"] = float(self.stream.position)
        return record

    def evaluate(self) -> dict[str, float]:
        return self.eval_set.evaluate(self.learners) if self.eval_set else {}

    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, str]]:
        return {"store_position": self.stream.position}, {}

    def restore(self, meta: dict[str, Any], path: Path) -> None:
        self.stream.seek(int(meta["store_position"]))


def distill_update(
    cfg: DistillConfig, learners: LearnerGroup, rows: list[TopKRow], student: Student
) -> dict[str, float]:
    """One optimizer step on `rows` (store rows with the teacher's top-k), split evenly over the learners,
    each rank's share sorted by length into micro-batches; the loss is the token mean over all of them."""
    k = 1 if cfg.loss.estimator == "sampled" else cfg.loss.top_k  # sampled: the one entry is the token
    targets = sum(int(r.loss_mask[1:].sum()) for r in rows)
    shards = shard_batches(
        rows,
        len(learners),
        cfg.train.micro_batch_size,
        lambda rs: collate(rs, student.pad_id, k, student.is_vl),
        sort_key=lambda r: len(r.token_ids),
    )
    began = time.perf_counter()
    stats = learners.step(shards, Norms(tokens=float(max(1, targets))), DistillObjective(cfg.loss))
    seconds = time.perf_counter() - began
    totals = stats.sums
    tokens = max(1.0, totals["tokens"])
    record = {
        "loss": totals["loss"],
        "distill/divergence": totals["divergence_sum"] / tokens,
        "distill/student_nll": totals["nll_sum"] / tokens,
        "grad_norm": stats.grad_norm,
        "lr": stats.lr,
        "loss_tokens": float(targets),
        "tokens_per_s": sum(len(r.token_ids) for r in rows) / seconds,
        "step_seconds": seconds,
        "memory/learner_peak_gib": stats.peak_gib,
    }
    if "teacher_topk_mass_sum" in totals:
        record["distill/teacher_topk_mass"] = totals["teacher_topk_mass_sum"] / tokens
    return record
