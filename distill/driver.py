"""`posttrain distill`: strong-to-weak distillation, one linear loop per mode.

    offline:    sequences → teacher engines (top-k, once) → top-k store on disk → learners stream it
    online:     sequences → teacher engines (top-k per batch) → learners
    on_policy:  prompts → student engines → teacher engines score the student's tokens → learners
                → weight sync to the student engines            (distill/on_policy.py)
    off_policy: prompts → teacher engines generate → reward filter → messages dataset → `posttrain sft`
                                                                 (distill/off_policy.py)

Teacher and student must share a tokenizer; that is checked before anything runs (against the store's
recorded teacher when an offline store already exists). The offline store is written in the order the
student will read it (the seed's permutation of the sequences, repeated every epoch) and is reused when it
exists, so capture happens once and any number of students train from it; the stream position is part of
every checkpoint, so a resumed run continues in the middle of a shard. Online mode scores exactly the
sequences the offline store would hold at each step, so both give the same loss.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.config import ConfigError, dump_config
from posttrain.distill.config import DistillConfig
from posttrain.metrics import due

log = logging.getLogger("posttrain.distill")


@dataclass
class Student:
    """The student model as the run sees it."""

    path: str
    processing: Any
    is_vl: bool

    @property
    def tokenizer(self) -> Any:
        from posttrain.data.processing import tokenizer_of

        return tokenizer_of(self.processing)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


def run(cfg: DistillConfig) -> Path:
    """Run the configured mode; return the exported `final/` folder (off_policy: the written dataset, or
    the SFT run's `final/` when `off_policy.then_sft` is set)."""
    from posttrain import runs
    from posttrain.data.processing import load_processing
    from posttrain.workers import init_ray

    began = time.perf_counter()
    runs.quiet_libraries()
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    path = runs.prepare_inputs(cfg.model, [*cfg.data.train, cfg.data.eval])
    student = Student(path, *load_processing(path, cfg.model.trust_remote_code))
    check_early(cfg, student)
    # Before any teacher SFT: it joins this cluster, sized for everything the mode runs at once.
    init_ray(cfg.ray.address, cfg.ray.num_cpus or cpus_needed(cfg))
    if cfg.mode == "offline":
        result = run_offline(cfg, out, student)
    elif cfg.mode == "online":
        teacher_path = prepare_teacher(cfg, student)
        result = run_online(cfg, out, student, teacher_path)
    elif cfg.mode == "on_policy":
        from posttrain.distill.on_policy import run_on_policy

        result = run_on_policy(cfg, out, student, prepare_teacher(cfg, student))
    else:
        from posttrain.distill.off_policy import run_off_policy

        result = run_off_policy(cfg, out, student, prepare_teacher(cfg, student))
    log.info("finished in %.1f min → %s", (time.perf_counter() - began) / 60, result)
    return result


def cpus_needed(cfg: DistillConfig) -> int:
    """Ray CPUs for what runs at the same time (offline captures first, then trains)."""
    learners = cfg.learners.num_learners * cfg.learners.cpus_per_learner
    teacher = cfg.teacher.num_engines * cfg.teacher.cpus_per_engine
    student = cfg.rollout.num_engines * cfg.rollout.cpus_per_engine
    needed = {
        "offline": max(learners, teacher),
        "online": learners + teacher,
        "on_policy": learners + teacher + student,
        "off_policy": max(learners, teacher),
    }[cfg.mode]
    return int(needed + 0.999)


# ------------------------------------------------------------------------------------ teacher and tokenizer


def prepare_teacher(cfg: DistillConfig, student: Student) -> str:
    """The teacher's path, built by `teacher.init_from_sft` first when missing; its tokenizer must be the
    student's."""
    from posttrain.data.processing import load_processing, tokenizer_of
    from posttrain.distill.topk_store import tokenizer_identity

    t = cfg.teacher
    if t.init_from_sft and not Path(t.path).exists():
        from posttrain.config import load_config
        from posttrain.sft.driver import run as run_sft

        init = t.init_from_sft
        log.info(
            "teacher %s is missing: running SFT %s %s first", t.path, init.config, " ".join(init.overrides)
        )
        run_sft(load_config("sft", init.config, [*init.overrides, f"output_dir={Path(t.path).parent}"]))
    if not Path(t.path).exists() and t.path.startswith((".", "/", "~")):
        raise ConfigError(f"teacher.path {t.path!r} does not exist; set teacher.init_from_sft to build it")
    path = str(Path(t.path).resolve()) if Path(t.path).exists() else t.path
    processing, _ = load_processing(path, t.trust_remote_code)
    check_tokenizers(tokenizer_identity(tokenizer_of(processing)), path, student)
    return path


def check_early(cfg: DistillConfig, student: Student) -> None:
    """The tokenizer check before Ray and engines start, where the teacher (or the offline store) is
    already on disk; a teacher built by `teacher.init_from_sft` is checked once it exists."""
    from posttrain.data.processing import load_processing, tokenizer_of
    from posttrain.distill.topk_store import MANIFEST, TopKStore, tokenizer_identity

    if cfg.mode == "offline" and (cfg.store_dir / MANIFEST).is_file():
        store = TopKStore(cfg.store_dir)
        check_tokenizers(
            store.teacher["tokenizer"],
            f"{store.teacher['name_or_path']} (the store {cfg.store_dir})",
            student,
        )
    elif Path(cfg.teacher.path).is_dir():
        processing, _ = load_processing(cfg.teacher.path, cfg.teacher.trust_remote_code)
        check_tokenizers(tokenizer_identity(tokenizer_of(processing)), cfg.teacher.path, student)


def check_tokenizers(teacher: dict[str, Any], teacher_name: str, student: Student) -> None:
    """ConfigError naming both models unless their vocabularies (token -> id) are identical: distillation
    compares distributions over token ids, so both must mean the same tokens by them."""
    from posttrain.distill.topk_store import check_same_tokenizer, tokenizer_identity

    mine = tokenizer_identity(student.tokenizer)
    try:
        check_same_tokenizer({"teacher": {"tokenizer": teacher}}, mine)
    except ValueError:
        raise ConfigError(
            f"teacher {teacher_name} and student {student.path} have different tokenizers (teacher: "
            f"{teacher['vocab_size']} tokens, vocab sha256 {teacher['vocab_sha256'][:12]}; student: "
            f"{mine['vocab_size']} tokens, vocab sha256 {mine['vocab_sha256'][:12]}); distillation compares "
            "token ids, so the student must use the teacher's tokenizer"
        ) from None


def start_teacher(cfg: DistillConfig, path: str) -> Any:
    """The teacher's vLLM engine group (scoring and generation only: its weights never change)."""
    from posttrain.distill.config import MAX_TOP_K
    from posttrain.rollout import RolloutGroup
    from posttrain.workers import resolve_device

    t = cfg.teacher
    return RolloutGroup(
        path,
        t.num_engines,
        num_cpus=t.cpus_per_engine,
        device=resolve_device(cfg.device),
        name="teacher",
        config_key="teacher",
        model_key="teacher.path",
        ray_address=cfg.ray.address,
        max_model_len=t.max_model_len,
        **t.group_kwargs(),
        dtype=t.dtype,
        seed=cfg.train.seed,
        max_logprobs=MAX_TOP_K,
    )


def ordered_sequences(cfg: DistillConfig, student: Student) -> list[Any]:
    """The training sequences in the order the student reads them: the seed's permutation."""
    from posttrain.data.order import epoch_order
    from posttrain.distill.batch import encode_sequences

    seqs = encode_sequences(cfg.data, student.processing, student.is_vl)
    return [seqs[int(i)] for i in epoch_order(len(seqs), cfg.train.seed, 0)]


# ------------------------------------------------------------------------------------------ offline store


def ensure_store(cfg: DistillConfig, out: Path, student: Student) -> tuple[Any, dict[str, float]]:
    """The finished store at `store.dir` (checked against the student's tokenizer and `loss.top_k`),
    captured first with the teacher engines when it is missing or unfinished."""
    from posttrain.distill.topk_store import MANIFEST, TopKStore

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
    import json

    from posttrain.data.processing import load_processing, tokenizer_of
    from posttrain.distill.batch import capture
    from posttrain.distill.topk_store import TopKWriter, teacher_identity

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

    def __init__(self, store: Any) -> None:
        self.store, self.position = store, 0
        self._rows: Any = None

    def __len__(self) -> int:
        return len(self.store)

    def seek(self, position: int) -> None:
        self.position, self._rows = position, None

    def take(self, n: int) -> list[Any]:
        rows: list[Any] = []
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

    def __init__(self, seqs: list[Any], teacher: Any, k: int, batch_size: int) -> None:
        self.seqs, self.teacher, self.k, self.batch_size = seqs, teacher, k, batch_size
        self.position = 0

    def __len__(self) -> int:
        return len(self.seqs)

    def seek(self, position: int) -> None:
        self.position = position

    def take(self, n: int) -> list[Any]:
        from posttrain.distill.batch import score_sequences

        chosen = [self.seqs[(self.position + i) % len(self.seqs)] for i in range(n)]
        self.position += n
        return score_sequences(self.teacher, chosen, self.k, self.batch_size)


def run_offline(cfg: DistillConfig, out: Path, student: Student) -> Path:
    store, capture_info = ensure_store(cfg, out, student)
    return train_loop(cfg, out, student, StoreStream(store), capture_info)


def run_online(cfg: DistillConfig, out: Path, student: Student, teacher_path: str) -> Path:
    seqs = ordered_sequences(cfg, student)
    teacher = start_teacher(cfg, teacher_path)
    try:
        return train_loop(
            cfg, out, student, OnlineStream(seqs, teacher, cfg.loss.top_k, cfg.teacher.batch_size)
        )
    finally:
        teacher.shutdown()


# ------------------------------------------------------------------------------------------- the loop


def train_loop(
    cfg: DistillConfig, out: Path, student: Student, stream: Any, first: dict[str, float] | None = None
) -> Path:
    """Top-k distillation over `stream` (offline or online): steps, evaluation, checkpoints, export."""
    from posttrain import runs
    from posttrain.evaluation import EvalSet
    from posttrain.metrics import MetricsLog

    t = cfg.train
    total = t.max_steps or max(1, math.ceil(len(stream) * t.epochs / t.global_batch_size))
    eval_set = (
        EvalSet.build(cfg.data.eval, cfg.eval, student.processing, student.is_vl) if cfg.data.eval else None
    )
    learners = runs.start_learners(cfg, student.path, student.is_vl, total)
    try:
        meta, _ = runs.resume_meta(cfg, learners, out)
        start = int(meta["step"]) if meta else 0
        stream.seek(int(meta["store_position"]) if meta else 0)
        metrics = MetricsLog(out, cfg.logging, cfg.model_dump(mode="json"), start, total)
        if start == 0:
            record = dict(first or {})
            if eval_set:
                record |= eval_set.evaluate(learners)
            if record:
                metrics.log(0, record)
        for step in range(start, total):
            t0 = time.perf_counter()
            rows = stream.take(t.global_batch_size)
            fetch = time.perf_counter() - t0
            record = distill_update(cfg, learners, rows, student)
            record["time/teacher" if isinstance(stream, OnlineStream) else "time/read_store"] = fetch
            record["store/position"] = float(stream.position)
            done = step + 1
            if eval_set and due(done, total, cfg.eval.every_steps):
                record |= eval_set.evaluate(learners)
            metrics.log(done, record)
            metrics.advance()
            if due(done, total, cfg.checkpoint.every_steps):
                runs.save_checkpoint(cfg, learners, out, done, {"store_position": stream.position})
        metrics.close()
        return runs.export(cfg, learners, student.processing, out / "final")
    finally:
        learners.shutdown()


def distill_update(cfg: DistillConfig, learners: Any, rows: list[Any], student: Student) -> dict[str, float]:
    """One optimizer step on `rows` (store rows with the teacher's top-k), split evenly over the learners,
    each rank's share sorted by length into micro-batches; the loss is the token mean over all of them."""
    from posttrain.distill.batch import collate
    from posttrain.rollout import split_evenly

    micro, k = cfg.train.micro_batch_size, cfg.loss.top_k
    if cfg.loss.estimator == "sampled":
        k = 1  # the one entry is the token itself (see on_policy)
    targets = sum(int(r.loss_mask[1:].sum()) for r in rows)
    norms = {"tokens": float(max(1, targets))}
    args = []
    for shard in split_evenly(rows, len(learners)):
        shard = sorted(shard, key=lambda r: len(r.token_ids))
        batches = [
            collate(shard[i : i + micro], student.pad_id, k, student.is_vl)
            for i in range(0, len(shard), micro)
        ]
        args.append((batches, norms, cfg.loss.model_dump(mode="json")))
    began = time.perf_counter()
    totals: dict[str, float] = {}
    for stats in learners.call_each("distill_step", args):
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + value
    seconds = time.perf_counter() - began
    tokens = max(1.0, totals["tokens"])
    ranks = len(learners)
    record = {
        "loss": totals["loss"],
        "distill/divergence": totals["divergence_sum"] / tokens,
        "distill/student_nll": totals["nll_sum"] / tokens,
        "grad_norm": totals["grad_norm"] / ranks,
        "lr": totals["lr"] / ranks,
        "loss_tokens": float(targets),
        "tokens_per_s": sum(len(r.token_ids) for r in rows) / seconds,
        "step_seconds": seconds,
    }
    if "teacher_topk_mass_sum" in totals:
        record["distill/teacher_topk_mass"] = totals["teacher_topk_mass_sum"] / tokens
    return record
