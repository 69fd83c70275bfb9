"""Running one stage by name, with the stages its config links to: the only place a stage launches another.

    init_from_sft (rl: model.path; distill: teacher.path)  an SFT run builds the missing model first
    off_policy.then_sft (distill)                          an SFT run trains the student on the written data

`posttrain sft|distill|rl` and every pipeline stage go through `run_stage`; each linked run is a stage run
of its own (its own folder, metrics and Ray session), exactly as when run alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posttrain.config import SFTInit, load_config
from posttrain.distill import driver as distill_driver
from posttrain.distill.config import DistillConfig
from posttrain.distill.topk_store import MANIFEST
from posttrain.rl import driver as rl_driver
from posttrain.rl.config import RLConfig
from posttrain.sft import driver as sft_driver

log = logging.getLogger("posttrain.pipeline")
RUNNERS: dict[str, Callable[[Any], Path]] = {
    "sft": sft_driver.run,
    "distill": distill_driver.run,
    "rl": rl_driver.run,
}


def run_stage(stage: str, cfg: Any) -> Path:
    """Build the models `cfg` links to when missing, run the stage, then its follow-up SFT (if any)."""
    for key, path, init in links_to_build(cfg):
        log.info(
            "%s %s is missing: running SFT %s %s first", key, path, init.config, " ".join(init.overrides)
        )
        run_linked_sft(init, [f"output_dir={Path(path).parent}"])
    result = RUNNERS[stage](cfg)
    if isinstance(cfg, DistillConfig) and cfg.mode == "off_policy" and cfg.off_policy.then_sft:
        result = run_linked_sft(cfg.off_policy.then_sft, student_sft_wiring(cfg, result))
    return result


def student_sft_wiring(cfg: DistillConfig, data: Path) -> list[str]:
    """`off_policy.then_sft`: the student (`model`) on the written data, in `output_dir/sft`."""
    model = Path(cfg.model.path)
    return [
        f"output_dir={Path(cfg.output_dir).resolve() / 'sft'}",
        f"model.path={model.resolve() if model.exists() else cfg.model.path}",
        "model.build=null",
        f"data.train=[{{path: '{data}', split: train, thinking: column}}]",
    ]


def links_to_build(cfg: Any) -> list[tuple[str, str, SFTInit]]:
    """(config key, missing model folder, the SFT that builds it) for each `init_from_sft` to run."""
    wanted = []
    if isinstance(cfg, RLConfig) and cfg.init_from_sft:
        wanted.append(("model.path", cfg.model.path, cfg.init_from_sft))
    if isinstance(cfg, DistillConfig) and cfg.teacher.init_from_sft and needs_teacher(cfg):
        wanted.append(("teacher.path", cfg.teacher.path, cfg.teacher.init_from_sft))
    return [(key, path, init) for key, path, init in wanted if not Path(path).exists()]


def needs_teacher(cfg: DistillConfig) -> bool:
    """Every mode runs the teacher, but offline only while its store is not captured yet."""
    return cfg.mode != "offline" or not (cfg.store_dir / MANIFEST).is_file()


def run_linked_sft(init: SFTInit, wiring: list[str]) -> Path:
    """One SFT run of `init.config` with its overrides and the link's wiring (folder, model, data), in a
    Ray session of its own so the stage after it sizes its cluster itself."""
    import ray

    try:
        return sft_driver.run(load_config("sft", init.config, [*init.overrides, *wiring]))
    finally:
        ray.shutdown()
