"""The stage runtime: what every stage's run does, in one place.

    with StageRun(cfg) as run:                    # logging, output folder, config.yaml, elapsed time
        run.start_ray(cpus)                        # one Ray sizing: what the stage runs at once
        learners = run.own(LearnerGroup(...))      # every group is shut down on exit, newest first
        run.train(learners, stage, total_steps)    # resume, eval at 0, steps, eval / checkpoint when due
        final = run.export(learners, processing)   # final/: HF folder + tokenizer, published atomically

A stage supplies a `Stage`: its step, its evaluation and the state its checkpoints carry beyond the
learners'. Nothing else of the loop lives in a stage.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

from posttrain.checkpoint import (
    CheckpointError,
    begin_checkpoint,
    commit_checkpoint,
    latest_checkpoint,
    prune_checkpoints,
    publish_folder,
    verify_checkpoint,
)
from posttrain.config import DatasetSpec, ModelConfig, TrainingStage, dump_config
from posttrain.groups import LearnerGroup
from posttrain.inputs import ensure_dataset, ensure_model
from posttrain.metrics import MetricsLog, due, quiet_libraries
from posttrain.workers import SharedPlacement, init_ray

log = logging.getLogger("posttrain")
G = TypeVar("G")


class Stage(Protocol):
    """What a stage gives the runtime."""

    def step(self, step: int) -> dict[str, float]:
        """One optimizer step (global step index `step`, 0-based) and its metrics."""
        ...

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics now ({} without an evaluation set)."""
        ...

    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, str]]:
        """What a checkpoint keeps beyond the learners: JSON metadata and files (name -> text)."""
        ...

    def restore(self, meta: dict[str, Any], path: Path) -> None:
        """Continue from a checkpoint's metadata and folder (the learners are already loaded)."""
        ...


def prepare_inputs(model_cfg: ModelConfig, datasets: list[DatasetSpec | None]) -> str:
    """Build the model and datasets whose `build` entries the config sets when missing; return the model path."""
    model = ensure_model(model_cfg)
    model_path = str(model.resolve()) if isinstance(model, Path) else model
    for spec in datasets:
        if spec is not None:
            ensure_dataset(spec)
    return model_path


class StageRun:
    """One stage's run in `cfg.output_dir`: see the module docstring."""

    def __init__(self, cfg: TrainingStage) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir).resolve()  # actors may run in another working directory
        self._exit = contextlib.ExitStack()
        self.began = 0.0

    def __enter__(self) -> StageRun:
        self.began = time.perf_counter()
        quiet_libraries()
        self.out.mkdir(parents=True, exist_ok=True)
        dump_config(self.cfg, self.out / "config.yaml")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._exit.close()

    def start_ray(self, cpus: float) -> None:
        """Join or start Ray, sized for `cpus` (what the stage runs at the same time) unless `ray.num_cpus`."""
        init_ray(self.cfg.ray.address, self.cfg.ray.num_cpus or math.ceil(cpus - 1e-9))

    def own(self, group: G) -> G:
        """`group` (anything with `shutdown()`) is shut down when the run ends, however it ends."""
        self._exit.callback(group.shutdown)  # type: ignore[attr-defined]
        return group

    def enter(self, context: contextlib.AbstractContextManager[G]) -> G:
        return self._exit.enter_context(context)

    def learners(
        self, model_path: str, is_vl: bool, total_steps: int, placement: SharedPlacement | None = None
    ) -> LearnerGroup:
        return self.own(LearnerGroup(self.cfg, model_path, is_vl, total_steps, placement))

    # ------------------------------------------------------------------------------------------ the loop

    def train(
        self, learners: LearnerGroup, stage: Stage, total_steps: int, first: dict[str, float] | None = None
    ) -> None:
        """Resume (or start), evaluate at step 0, then step to `total_steps` with evaluation and
        checkpoints when due; `first`: extra step-0 metrics of a fresh start (data counts, capture)."""
        cfg = self.cfg
        meta, path = self.resume(learners)
        start = int(meta["step"]) if meta else 0
        if meta and path:
            stage.restore(meta, path)
        metrics = MetricsLog(self.out, cfg.logging, cfg.model_dump(mode="json"), start, total_steps)
        if start == 0:
            record = {**(first or {}), **stage.evaluate()}
            if record:
                metrics.log(0, record)
        for step in range(start, total_steps):
            record = stage.step(step)
            done = step + 1
            if due(done, total_steps, cfg.eval.every_steps):
                record |= stage.evaluate()
            metrics.log(done, record)
            metrics.advance()
            if due(done, total_steps, cfg.checkpoint.every_steps):
                self.save_checkpoint(learners, done, *stage.checkpoint_state())
        metrics.close()

    # --------------------------------------------------------------------------------------- checkpoints

    def _layout(self) -> dict[str, Any]:
        """What a checkpoint's optimizer partitions depend on: resuming needs the same values."""
        return {"num_learners": self.cfg.learners.num_learners, "zero_stage": self.cfg.learners.zero_stage}

    def save_checkpoint(
        self, learners: LearnerGroup, step: int, meta: dict[str, Any], files: dict[str, str]
    ) -> Path:
        """Every rank writes into a temporary folder; it becomes `checkpoints/step-N` only once complete."""
        root = self.out / "checkpoints"
        tmp = begin_checkpoint(root, step)
        learners.save(str(tmp), {"step": step})
        for name, text in files.items():
            (tmp / name).write_text(text)
        path = commit_checkpoint(tmp, step, {"step": step, **self._layout(), **meta})
        prune_checkpoints(root, self.cfg.checkpoint.keep_last)
        return path

    def resume(self, learners: LearnerGroup) -> tuple[dict[str, Any] | None, Path | None]:
        """Load the checkpoint `checkpoint.resume` selects into the learners: (its metadata, its folder),
        or (None, None) for a fresh start."""
        choice = self.cfg.checkpoint.resume
        if choice == "never":
            return None, None
        path = latest_checkpoint(self.out / "checkpoints") if choice == "auto" else Path(choice)
        if path is None:
            return None, None
        meta: dict[str, Any] = verify_checkpoint(path)["meta"]
        saved, now = {k: meta.get(k) for k in self._layout()}, self._layout()
        if saved != now:
            raise CheckpointError(
                f"checkpoint {path} was written with {saved}, this run uses {now}: set learners.* to match, "
                "or checkpoint.resume=never to start over"
            )
        learners.load(str(path))
        log.info("resumed from %s (step %d)", path, meta["step"])
        return meta, path

    # -------------------------------------------------------------------------------------------- export

    def export(self, learners: LearnerGroup, processing: Any) -> Path:
        """`final/`: HF folder (or PEFT adapter) + tokenizer/processor with its chat template, published
        atomically."""
        final = self.out / "final"
        tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=self.out))
        merge = bool(self.cfg.model.lora and self.cfg.model.lora.merge_on_export)
        learners.export(str(tmp), merge)
        processing.save_pretrained(tmp)
        if merge:
            processing.save_pretrained(tmp / "merged")
        tmp.chmod(0o755)
        publish_folder(tmp, final)
        return final

    def finished(self, result: Path, shown: dict[str, float] | None = None) -> Path:
        minutes = (time.perf_counter() - self.began) / 60
        log.info("finished in %.1f min %s→ %s", minutes, f"{shown} " if shown else "", result)
        return result
