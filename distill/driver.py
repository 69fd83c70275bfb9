"""`posttrain distill`: strong-to-weak distillation, one mode per run.

    offline:    sequences → teacher engines (top-k, once) → top-k store on disk → learners stream it
    online:     sequences → teacher engines (top-k per batch) → learners
    on_policy:  prompts → student engines → teacher engines score the student's tokens → learners
                → weight sync to the student engines            (distill/on_policy.py)
    off_policy: prompts → teacher engines generate → reward filter → messages dataset → `posttrain sft`
                                                                 (distill/off_policy.py)

Modes: distill/top_k.py (offline, online), distill/on_policy.py, distill/off_policy.py; the teacher, the
student and their shared tokenizer: distill/teacher.py.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.data.processing import load_processing
from posttrain.distill.config import DistillConfig
from posttrain.distill.off_policy import run_off_policy
from posttrain.distill.on_policy import run_on_policy
from posttrain.distill.teacher import Student, check_early, ordered_sequences, prepare_teacher, start_teacher
from posttrain.distill.top_k import OnlineStream, StoreStream, ensure_store, train_top_k
from posttrain.stage import StageRun, prepare_inputs


def run(cfg: DistillConfig) -> Path:
    """Run the configured mode; return the exported `final/` folder (off_policy: the written dataset,
    which `off_policy.then_sft` trains on next, see posttrain.pipeline.stages)."""
    with StageRun(cfg) as run:
        path = prepare_inputs(cfg.model, [*cfg.data.train, cfg.data.eval])
        student = Student(path, *load_processing(path, cfg.model.trust_remote_code))
        check_early(cfg, student)
        # Before any teacher SFT: it joins this cluster, sized for everything the mode runs at once.
        run.start_ray(cpus_needed(cfg))
        if cfg.mode == "offline":
            store, capture_info = ensure_store(cfg, student)
            result = train_top_k(run, cfg, student, StoreStream(store), capture_info)
        elif cfg.mode == "online":
            teacher = run.own(start_teacher(cfg, prepare_teacher(cfg, student)))
            seqs = ordered_sequences(cfg, student)
            stream = OnlineStream(seqs, teacher, cfg.loss.top_k, cfg.teacher.batch_size)
            result = train_top_k(run, cfg, student, stream)
        elif cfg.mode == "on_policy":
            result = run_on_policy(run, cfg, student, prepare_teacher(cfg, student))
        else:
            result = run_off_policy(cfg, run.out, student, prepare_teacher(cfg, student))
    return run.finished(result)


def cpus_needed(cfg: DistillConfig) -> float:
    """Ray CPUs for what runs at the same time (offline captures first, then trains)."""
    learners = cfg.learners.num_learners * cfg.learners.cpus_per_learner
    teacher = cfg.teacher.num_engines * cfg.teacher.cpus_per_engine
    student = cfg.rollout.num_engines * cfg.rollout.cpus_per_engine
    return {
        "offline": max(learners, teacher),
        "online": learners + teacher,
        "on_policy": learners + teacher + student,
        "off_policy": max(learners, teacher),
    }[cfg.mode]
