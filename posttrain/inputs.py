"""A run's inputs built when missing: `model.build` and a dataset spec's `build` name a builder plugin
(posttrain.builders) that writes the model folder or the dataset at its path before anything reads it."""

from __future__ import annotations

import logging
from pathlib import Path

from posttrain.builders import BuildError
from posttrain.config import BuildSpec, DatasetSpec, ModelConfig

log = logging.getLogger("posttrain")

# ------------------------------------------------------------------------------------------------ build


def build_input(spec: BuildSpec, path: Path, key: str) -> Path:
    """Run the builder of `spec` to write `path`; `key` names the `build` entry in errors."""
    declared = spec.declaration()
    log.info("%s is missing: building it with %s %s", path, declared.name, spec.args)
    path.parent.mkdir(parents=True, exist_ok=True)
    declared(path, declared.check_args(spec.args))
    if not path.exists():
        raise BuildError(f"{key}: builder {spec.builder!r} returned without writing {path}")
    return path


def ensure_model(model_cfg: ModelConfig) -> Path | str:
    """A local model folder (built first if `model.build` asks for it), or the hub id unchanged."""
    path = Path(model_cfg.path).expanduser()
    if path.exists():
        return path
    if model_cfg.build is not None:
        return build_input(model_cfg.build, path, "model.build")
    if model_cfg.path.startswith((".", "/", "~")) or path.parent != Path(".") and path.parent.exists():
        raise FileNotFoundError(
            f"model.path {model_cfg.path!r} does not exist; set model.build to build a model there "
            "(e.g. `build: {builder: tiny_model}` for a tiny random Qwen3)"
        )
    return model_cfg.path


def ensure_dataset(spec: DatasetSpec) -> None:
    """Build the dataset behind `spec` if its path is missing and it has a `build` entry."""
    if spec.build is not None and not Path(spec.path).expanduser().exists():
        build_input(spec.build, Path(spec.path).expanduser(), f"build of dataset {spec.path}")
