"""`posttrain pipeline CONFIG.yaml`: the declared stages in order, each reading earlier stages' models, then
the exported variants, a held-out accuracy table of every model in both chat modes, and the run report.

Resumable: a stage whose folder holds `pipeline_stage.json` finished and is skipped on re-run; an
interrupted stage resumes from its own latest checkpoint (every stage resumes by default). Each stage gets
its own Ray session, sized by that stage, exactly as when run alone.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from posttrain.checkpoint import publish_file, publish_folder
from posttrain.config import ConfigError, DatasetSpec, EvalConfig, dump_config
from posttrain.data.processing import load_processing
from posttrain.metrics import quiet_libraries
from posttrain.pipeline.config import PipelineConfig
from posttrain.pipeline.report import write_report
from posttrain.pipeline.stages import run_stage
from posttrain.rollout.engine import RolloutGroup
from posttrain.rollout.evaluation import EvalSet
from posttrain.workers import resolve_device

log = logging.getLogger("posttrain.pipeline")
DONE = "pipeline_stage.json"
MODES = {False: "non_thinking", True: "thinking"}


def run(cfg: PipelineConfig) -> Path:
    began = time.perf_counter()
    quiet_libraries()
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    models: dict[str, Path] = {}
    for i, spec in enumerate(cfg.stages):
        models[spec.name] = train_stage(cfg, i, models)
    variants = {
        name: export_variant(models[cfg.variant_stage(name)], out / name, v.thinking)
        for name, v in cfg.variants.items()
    }
    rows = evaluate_all(cfg, models, variants) if cfg.eval else []
    write_json(out / "results.json", {"accuracy": rows, "stages": stage_records(cfg)})
    if rows:
        print(format_table(rows, cfg.eval.splits if cfg.eval else []))
    if cfg.report:
        log.info("report: %s", write_report(out, cfg, rows))
    log.info("pipeline finished in %.1f min → %s", (time.perf_counter() - began) / 60, out)
    return out


# ------------------------------------------------------------------------------------------------ stages


def train_stage(cfg: PipelineConfig, index: int, models: dict[str, Path]) -> Path:
    """Train stage `index` unless it already finished; return its model folder."""
    import ray

    spec = cfg.stages[index]
    done = Path(cfg.output_dir).resolve() / spec.name / DONE
    if done.is_file():
        model = Path(json.loads(done.read_text())["model"])
        if (model / "config.json").is_file():
            log.info("stage %s finished earlier: %s", spec.name, model)
            return model
    log.info("stage %s: posttrain %s %s", spec.name, spec.stage, spec.config)
    began = time.perf_counter()
    try:
        final = run_stage(spec.stage, cfg.stage_config(index, models))
    finally:
        ray.shutdown()  # the next stage sizes its own cluster (or reconnects to `ray.address`)
    model = trained_model(Path(final), spec.name)
    write_json(done, {"model": str(model), "minutes": (time.perf_counter() - began) / 60})
    return model


def trained_model(final: Path, stage: str) -> Path:
    """The full model a stage produced (a LoRA run's merged export), which later stages can load."""
    for folder in (final, final / "merged"):
        if (folder / "config.json").is_file():
            return folder
    raise ConfigError(
        f"stage {stage!r} produced {final}, which holds no full model: a LoRA stage needs "
        "model.lora.merge_on_export=true, an off_policy distillation needs off_policy.then_sft"
    )


def stage_records(cfg: PipelineConfig) -> dict[str, Any]:
    out = Path(cfg.output_dir).resolve()
    return {s.name: json.loads((out / s.name / DONE).read_text()) for s in cfg.stages}


# ---------------------------------------------------------------------------------------------- variants


def export_variant(model: Path, folder: Path, thinking: bool) -> Path:
    """Copy `model` to `folder` with a chat template that thinks (or not) when the caller does not say."""

    processing, _ = load_processing(model)
    with_default(processing, thinking)
    check_default(processing, thinking, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    shutil.copytree(model, tmp, dirs_exist_ok=True)
    processing.save_pretrained(tmp)
    tmp.chmod(0o755)
    publish_folder(tmp, folder)
    log.info("exported %s (%s by default)", folder, MODES[thinking])
    return folder


def with_default(processing: Any, thinking: bool) -> None:
    """Prefix the chat template so an unset `enable_thinking` means `thinking`."""
    prefix = f"{{%- if enable_thinking is not defined -%}}{{%- set enable_thinking = {str(thinking).lower()} -%}}{{%- endif -%}}"
    holders = [processing, getattr(processing, "tokenizer", None)]
    for holder in holders:
        if holder is not None and getattr(holder, "chat_template", None):
            holder.chat_template = prefix + holder.chat_template


def check_default(processing: Any, thinking: bool, folder: Path) -> None:
    messages = [{"role": "user", "content": "1+1"}]
    default = processing.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    explicit = processing.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
    )
    if default != explicit:
        raise RuntimeError(f"{folder}: the chat template's default is not {MODES[thinking]}")


# -------------------------------------------------------------------------------------------- evaluation


def evaluate_all(
    cfg: PipelineConfig, models: dict[str, Path], variants: dict[str, Path]
) -> list[dict[str, Any]]:
    """Accuracy per split for every stage's model in both modes, and every variant in its default mode
    (loaded from its exported folder by vLLM, as a user would)."""
    import ray

    targets = [(name, path, [False, True]) for name, path in models.items()]
    targets += [(f"{name}/", path, [cfg.variants[name].thinking]) for name, path in variants.items()]
    rows = []
    try:
        for label, path, modes in targets:
            rows += evaluate_model(cfg, label, path, modes)
    finally:
        ray.shutdown()
    return rows


def evaluate_model(cfg: PipelineConfig, label: str, path: Path, modes: list[bool]) -> list[dict[str, Any]]:

    assert cfg.eval is not None
    e = cfg.eval
    processing, is_vl = load_processing(path)
    engines = RolloutGroup(
        str(path),
        1,
        device=resolve_device(cfg.device or "auto"),
        name="eval",
        config_key="eval",
        model_key=f"the {label} model ({path})",
        ray_address=cfg.ray.address,
        max_model_len=e.max_model_len,
        **e.group_kwargs(),
        seed=0,
        limit_images=4 if is_vl else None,
    )
    rows = []
    try:
        for thinking in modes:
            row: dict[str, Any] = {"model": label, "mode": MODES[thinking]}
            for split in e.splits:
                spec = DatasetSpec(path=e.path, split=split, verifier=e.verifier)
                evaluation = EvalConfig(
                    max_samples=e.max_samples, max_new_tokens=e.max_new_tokens, thinking=thinking
                )
                metrics = EvalSet.build(spec, evaluation, processing, is_vl).evaluate_on_engines(engines)
                row[split] = metrics["eval/accuracy"]
                row[f"{split}/response_tokens"] = metrics["eval/response_tokens"]
            log.info("eval %s", row)
            rows.append(row)
    finally:
        engines.shutdown()
    return rows


def format_table(rows: list[dict[str, Any]], splits: list[str]) -> str:
    """Held-out accuracy (answers the dataset's verifier accepts), one line per model and mode."""
    header = f"{'model':<14}{'mode':<14}" + "".join(f"{s:>12}" for s in splits)
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['model']:<14}{r['mode']:<14}" + "".join(f"{r[s]:>12.3f}" for s in splits))
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    publish_file(path, json.dumps(data, indent=1))
