"""The teacher and the student of a distillation run: who they are, that they share a tokenizer, the
teacher's engines, and the training sequences in the order the student reads them.

Teacher and student must share a tokenizer; that is checked before anything runs (against the store's
recorded teacher when an offline store already exists), and again once a teacher built by
`teacher.init_from_sft` exists.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.config import ConfigError
from posttrain.data.order import epoch_order
from posttrain.data.processing import load_processing, pad_id, tokenizer_of
from posttrain.distill.batch import Sequence, encode_sequences
from posttrain.distill.config import MAX_TOP_K, DistillConfig
from posttrain.distill.topk_store import (
    MANIFEST,
    TokenizerIdentity,
    TopKStore,
    check_same_tokenizer,
    tokenizer_identity,
)
from posttrain.rollout.engine import RolloutGroup
from posttrain.workers import resolve_device

log = logging.getLogger("posttrain.distill")


@dataclass
class Student:
    """The student model as the run sees it."""

    path: str
    processing: Any
    is_vl: bool

    @property
    def tokenizer(self) -> Any:
        return tokenizer_of(self.processing)

    @property
    def pad_id(self) -> int:
        return pad_id(self.tokenizer)


def prepare_teacher(cfg: DistillConfig, student: Student) -> str:
    """The teacher's path (built by `teacher.init_from_sft` before the stage runs, see
    posttrain.pipeline.stages); its tokenizer must be the student's."""
    t = cfg.teacher
    if not Path(t.path).exists() and t.path.startswith((".", "/", "~")):
        raise ConfigError(f"teacher.path {t.path!r} does not exist; set teacher.init_from_sft to build it")
    path = str(Path(t.path).resolve()) if Path(t.path).exists() else t.path
    processing, _ = load_processing(path, t.trust_remote_code)
    check_tokenizers(tokenizer_identity(tokenizer_of(processing)), path, student)
    return path


def check_early(cfg: DistillConfig, student: Student) -> None:
    """The tokenizer check before Ray and engines start, where the teacher (or the offline store) is
    already on disk; a teacher built by `teacher.init_from_sft` is checked once it exists."""
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


def check_tokenizers(teacher: TokenizerIdentity, teacher_name: str, student: Student) -> None:
    """ConfigError naming both models unless their vocabularies (token -> id) are identical: distillation
    compares distributions over token ids, so both must mean the same tokens by them."""
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


def start_teacher(cfg: DistillConfig, path: str) -> RolloutGroup:
    """The teacher's vLLM engine group (scoring and generation only: its weights never change)."""
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


def ordered_sequences(cfg: DistillConfig, student: Student) -> list[Sequence]:
    """The training sequences in the order the student reads them: the seed's permutation."""
    seqs = encode_sequences(cfg.data, student.processing, student.is_vl)
    return [seqs[int(i)] for i in epoch_order(len(seqs), cfg.train.seed, 0)]
