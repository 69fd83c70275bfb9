"""Pipeline config: stages that each name a stage config file, how their models feed later stages, the
exported variants, and the held-out evaluation table."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from posttrain.config import ConfigError, Device, EngineSettings, RayConfig, Strict, load_config

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class PipelineStage(Strict):
    name: str = Field(pattern=NAME)
    """The stage's folder under the pipeline's `output_dir`, and the name later stages and variants use."""
    stage: Literal["sft", "distill", "rl"]
    """Which trainer runs it."""
    config: str
    """The stage's own YAML config (as for `posttrain <stage>`); its `output_dir` is replaced."""
    overrides: list[str] = []
    """Dotted overrides applied to `config`, e.g. `train.max_steps=100`."""
    inputs: dict[str, str] | None = None
    """Config keys set to an earlier stage's trained model folder, e.g. `{teacher.path: sft}`. Default:
    `model.path` ← the previous stage (nothing for the first stage)."""


class Variant(Strict):
    stage: str | None = None
    """The stage whose model is exported (default: the last stage)."""
    thinking: bool
    """The exported chat template's default: think (`thinking/`) or answer directly (`instruct/`)."""


class PipelineEval(EngineSettings):
    path: str
    """Dataset folder or file holding the held-out splits (rows with what the verifier needs)."""
    splits: list[str] = Field(["test", "test_hard"], min_length=1)
    """Splits in the table, e.g. `test` and a harder `test_hard`."""
    verifier: str | None = None
    """The reward that scores an answer (named as in `rewards:`; 1.0 is correct). Default: the dataset's
    own, from its folder's `task.json`, else `exact_match` with `solution`."""
    max_samples: int = Field(200, ge=1)
    """Rows per split."""
    max_new_tokens: int = Field(128, ge=1)
    """Greedy generation length."""
    max_model_len: int = Field(512, ge=16)
    """Prompt + response tokens the evaluation engine accepts."""


class PipelineConfig(Strict):
    stage: ClassVar[str] = "pipeline"
    output_dir: str
    """Pipeline folder: one sub-folder per stage, the variants, `results.json` and `report.html`."""
    stages: list[PipelineStage] = Field(min_length=1)
    """Run in order; a stage whose folder records it finished is skipped on re-run."""
    variants: dict[str, Variant] = {"instruct": Variant(thinking=False), "thinking": Variant(thinking=True)}
    """Exported models: folder name → source stage and default chat mode."""
    eval: PipelineEval | None = None
    """Held-out accuracy of every stage's model in both modes and of every variant; None skips it."""
    report: bool = True
    """Write `report.html` (plots of every stage's metrics and the accuracy table)."""
    ray: RayConfig = RayConfig()
    """The cluster every stage runs on (the stages' own `ray` sections are ignored)."""
    device: Device | None = None
    """Where every stage's learners and engines and the evaluation engines run, overriding the stages'
    own `device` (None: each stage's own; the evaluation engines then use `auto`)."""

    @model_validator(mode="after")
    def _references(self) -> PipelineConfig:
        seen: list[str] = []
        for i, s in enumerate(self.stages):
            if s.name in seen:
                raise ValueError(f"stages.{i}.name: {s.name!r} is used by an earlier stage")
            for key, source in (s.inputs or {}).items():
                if source not in seen:
                    raise ValueError(f"stages.{i}.inputs.{key}: {source!r} is not an earlier stage ({seen})")
            seen.append(s.name)
        for name, v in self.variants.items():
            if v.stage is not None and v.stage not in seen:
                raise ValueError(f"variants.{name}.stage: {v.stage!r} is not a stage ({seen})")
            if name in seen:
                raise ValueError(f"variants.{name}: a stage already uses the folder {name!r}")
        return self

    @model_validator(mode="after")
    def _stage_configs(self) -> PipelineConfig:
        """Every stage's own config is checked before anything trains."""
        planned = {s.name: Path(self.output_dir) / s.name / "final" for s in self.stages}
        for i in range(len(self.stages)):
            self.stage_config(i, planned)
        return self

    def stage_config(self, index: int, models: Mapping[str, Path]) -> Any:
        """Stage `index`'s validated config: its file, its overrides, earlier stages' models as inputs,
        the pipeline's `ray` and `device`, and its folder `<output_dir>/<name>`."""
        spec = self.stages[index]
        wiring = [f"{key}={models[source]}" for key, source in self.inputs_of(index).items()]
        wiring += [f"ray.{k}={v}" for k, v in self.ray.model_dump().items() if v is not None]
        if self.device is not None:
            wiring.append(f"device={self.device}")
        wiring.append(f"output_dir={Path(self.output_dir).resolve() / spec.name}")
        try:
            return load_config(spec.stage, spec.config, [*spec.overrides, *wiring])
        except ConfigError as err:
            raise ConfigError(f"stages.{index} ({spec.name!r}) {err}") from None

    def inputs_of(self, index: int) -> dict[str, str]:
        """Config key → source stage for stage `index`, defaults applied."""
        spec = self.stages[index]
        if spec.inputs is not None:
            return spec.inputs
        return {"model.path": self.stages[index - 1].name} if index else {}

    def variant_stage(self, name: str) -> str:
        return self.variants[name].stage or self.stages[-1].name
