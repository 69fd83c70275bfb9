"""Run metrics: one JSON object per line in `metrics.jsonl`, plus optional TensorBoard and wandb."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from posttrain.checkpoint import publish_file
from posttrain.config import LoggingConfig


def quiet_libraries() -> None:
    """Our own progress bar and log lines are the run's output; silence the libraries' per-file bars."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def due(done: int, total: int, every: int | None) -> bool:
    """Whether a periodic action (evaluation, checkpoint) runs after step `done`: every `every` steps and
    always after the last."""
    return done == total or (every is not None and done % every == 0)


def truncate_after(path: Path, step: int) -> None:
    """Keep only records up to `step`: a resumed run re-logs later steps itself."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    publish_file(path, "".join(line + "\n" for line in kept))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


class MetricsLog:
    def __init__(
        self, out_dir: Path, cfg: LoggingConfig, run_config: dict[str, Any], start_step: int, total_steps: int
    ):
        self.path = out_dir / "metrics.jsonl"
        truncate_after(self.path, start_step if start_step else -1)  # a fresh start keeps nothing
        self.file = self.path.open("a")
        self.tensorboard = self.wandb = self.bar = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(out_dir / "tensorboard"))
        if cfg.wandb_project:
            import wandb

            self.wandb = wandb.init(
                project=cfg.wandb_project, dir=str(out_dir), config=run_config, resume="allow"
            )
        if cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, step: int, values: dict[str, Any]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)
        if self.bar is not None:
            shown = {
                k: f"{v:.4g}" for k, v in numbers.items() if k in ("loss", "tokens_per_s", "eval/accuracy")
            }
            self.bar.set_postfix(shown, refresh=False)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        self.file.close()
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _plain(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null rather than produce an unreadable file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
