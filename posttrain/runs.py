"""Pieces every stage driver shares: inputs built on demand, the learner group, checkpoints, export."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from posttrain.config import DatasetSpec, ModelConfig, TrainingStage

log = logging.getLogger("posttrain")


def quiet_libraries() -> None:
    """Our own progress bar and log lines are the run's output; silence the libraries' per-file bars."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def prepare_inputs(model_cfg: ModelConfig, datasets: list[DatasetSpec | None]) -> str:
    """Build the model and datasets whose `build` entries the config sets when missing; return the model path."""
    from posttrain.inputs import ensure_dataset, ensure_model

    model = ensure_model(model_cfg)
    model_path = str(model.resolve()) if isinstance(model, Path) else model
    for spec in datasets:
        if spec is not None:
            ensure_dataset(spec)
    return model_path


def start_learners(cfg: TrainingStage, model_path: str, is_vl: bool, total_steps: int) -> Any:
    from posttrain.learner import Learner
    from posttrain.workers import WorkerGroup, init_ray, resolve_device

    lc = cfg.learners
    init_ray(cfg.ray.address, cfg.ray.num_cpus or int(lc.num_learners * lc.cpus_per_learner + 0.999))
    return WorkerGroup(
        Learner,
        lc.num_learners,
        num_cpus=lc.cpus_per_learner,
        num_gpus=lc.gpus_per_learner,
        device=resolve_device(cfg.device),
        name="learner",
        init_args=(cfg.stage, cfg.model_dump(mode="json"), model_path, is_vl, total_steps),
    )


def _layout(cfg: TrainingStage) -> dict[str, Any]:
    """What a checkpoint's optimizer partitions depend on: resuming needs the same values."""
    return {"num_learners": cfg.learners.num_learners, "zero_stage": cfg.learners.zero_stage}


def save_checkpoint(
    cfg: TrainingStage,
    learners: Any,
    out: Path,
    step: int,
    meta: dict[str, Any] | None = None,
    files: dict[str, str] | None = None,
) -> Path:
    """Every rank writes into a temporary folder; it becomes `checkpoints/step-N` only once complete.
    `meta` (JSON) and `files` (name -> text) carry the driver's own state."""
    from posttrain.checkpoint import begin_checkpoint, commit_checkpoint, prune_checkpoints

    root = out / "checkpoints"
    tmp = begin_checkpoint(root, step)
    learners.call("save", str(tmp), {"step": step})
    for name, text in (files or {}).items():
        (tmp / name).write_text(text)
    path = commit_checkpoint(tmp, step, {"step": step, **_layout(cfg), **(meta or {})})
    prune_checkpoints(root, cfg.checkpoint.keep_last)
    return path


def resume(cfg: TrainingStage, learners: Any, out: Path) -> int:
    """Load the checkpoint `checkpoint.resume` selects into the learners; return its step (0: fresh)."""
    meta, _ = resume_meta(cfg, learners, out)
    return int(meta["step"]) if meta else 0


def resume_meta(cfg: TrainingStage, learners: Any, out: Path) -> tuple[dict[str, Any] | None, Path | None]:
    """`resume`, returning the checkpoint's metadata and folder (None, None: a fresh start)."""
    from posttrain.checkpoint import CheckpointError, latest_checkpoint, verify_checkpoint

    choice = cfg.checkpoint.resume
    if choice == "never":
        return None, None
    if choice == "auto":
        path = latest_checkpoint(out / "checkpoints")
        if path is None:
            return None, None
    else:
        path = Path(choice)
    meta: dict[str, Any] = verify_checkpoint(path)["meta"]
    saved, now = {k: meta.get(k) for k in _layout(cfg)}, _layout(cfg)
    if saved != now:
        raise CheckpointError(
            f"checkpoint {path} was written with {saved}, this run uses {now}: set learners.* to match, "
            "or checkpoint.resume=never to start over"
        )
    learners.call("load", str(path))
    log.info("resumed from %s (step %d)", path, meta["step"])
    return meta, path


def export(cfg: TrainingStage, learners: Any, processing: Any, final: Path) -> Path:
    """`final/`: HF folder (or PEFT adapter) + tokenizer/processor with its chat template, written atomically."""
    import tempfile

    from posttrain.checkpoint import publish_folder

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=final.parent))
    merge = bool(cfg.model.lora and cfg.model.lora.merge_on_export)
    learners.call("export", str(tmp), merge)
    processing.save_pretrained(tmp)
    if merge:
        processing.save_pretrained(tmp / "merged")
    tmp.chmod(0o755)
    publish_folder(tmp, final)
    return final
