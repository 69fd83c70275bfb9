"""Input builders: `build:` entries resolve like rewards, check their own arguments at config time with
errors naming the full key, run only when the input is missing; the old `tiny` / `generate` keys point at
`build`; the core package never imports the synthetic home at module level."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.builders import BuilderLoadError, BuildError, available_builders, resolve_builder
from posttrain.config import ConfigError, DatasetSpec, validate
from posttrain.inputs import ensure_dataset

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "tests" / "plugins" / "builders.py"
MINIMAL = {"output_dir": "o", "model": {"path": "m"}, "data": {"train": [{"path": "d"}]}}


def sft(**sections: object) -> dict:
    return {**MINIMAL, **sections}


def error_of(raw: dict) -> str:
    with pytest.raises(ConfigError) as err:
        validate("sft", raw)
    return str(err.value)


# -------------------------------------------------------------------------------------------- old keys


def test_old_tiny_key_names_model_build_with_the_new_form() -> None:
    message = error_of(sft(model={"path": "m", "tiny": {"kind": "vl", "size": "micro"}}))
    assert (
        "model.tiny: replaced by 'model.build'; write "
        "`build: {builder: tiny_model, args: {kind: vl, size: micro}}`" in message
    )


def test_old_generate_key_names_the_dataset_build_with_the_new_form() -> None:
    old = {"name": "shapes", "train_size": 50, "shortcut_fraction": 0.5}
    message = error_of(
        sft(data={"train": [{"path": "d", "generate": old}], "eval": {"path": "d", "generate": {}}})
    )
    assert (
        "data.train.0.generate: replaced by 'data.train.0.build'; write "
        "`build: {builder: shapes, args: {train_size: 50, shortcut_fraction: 0.5}}`" in message
    )
    assert (
        "data.eval.generate: replaced by 'data.eval.build'; write `build: {builder: arithmetic, args: {}}`"
        in message
    )


# ------------------------------------------------------------------------------------- checked arguments


def test_builder_arguments_are_typed_and_normalised() -> None:
    cfg = validate(
        "sft", sft(model={"path": "m", "build": {"builder": "tiny_model", "args": {"kind": "vl"}}})
    )
    assert cfg.model.build.args == {"kind": "vl", "size": "tiny", "seed": 0, "tools": False}
    assert type(cfg.model.build.declaration().check_args(cfg.model.build.args)).__name__ == "TinyModel"


def test_unknown_builder_argument_names_the_full_key_and_suggests() -> None:
    message = error_of(
        sft(data={"train": [{"path": "d", "build": {"builder": "arithmetic", "args": {"train_sise": 8}}}]})
    )
    assert (
        "data.train.0.build.args.train_sise: unknown key; did you mean 'data.train.0.build.args.train_size'?"
        in message
    )
    assert "(valid here: train_size, test_size, seed, shortcut_fraction)" in message


def test_bad_builder_argument_value_names_the_full_key() -> None:
    message = error_of(sft(model={"path": "m", "build": {"builder": "tiny_model", "args": {"size": "huge"}}}))
    assert "model.build.args.size: Input should be 'micro', 'tiny' or 'small'" in message


def test_a_builder_must_make_what_its_key_needs() -> None:
    assert "model.build: builder 'arithmetic' makes a dataset, not a model" in error_of(
        sft(model={"path": "m", "build": {"builder": "arithmetic"}})
    )
    assert "data.train.0.build: builder 'tiny_model' makes a model, not a dataset" in error_of(
        sft(data={"train": [{"path": "d", "build": {"builder": "tiny_model"}}]})
    )


def test_build_entries_stay_strict() -> None:
    message = error_of(sft(model={"path": "m", "build": {"buildr": "tiny_model"}}))
    assert "model.build.buildr: unknown key; did you mean 'model.build.builder'?" in message


# ------------------------------------------------------------------------------------------- resolution


def test_unknown_builder_lists_builtins_and_forms() -> None:
    message = error_of(sft(model={"path": "m", "build": {"builder": "tiny_modl"}}))
    assert (
        "model.build: unknown builder 'tiny_modl'. Built-in: arithmetic, arithmetic_tools, qwen3_shape, shapes, "
        "tiny_model, vl_zoom." in message
    )
    assert "'posttrain.builders'" in message and "'module:function' or 'path/to/file.py:function'" in message
    assert {"tiny_model", "arithmetic", "shapes"} <= set(available_builders())


def test_plugin_builder_errors_name_the_culprit(tmp_path: Path) -> None:
    with pytest.raises(BuilderLoadError, match=r"builder plugin file .*nope\.py does not exist"):
        resolve_builder("nope.py:x")
    with pytest.raises(
        BuilderLoadError, match=r"builder plugin module 'no_such_module_xyz' failed to import"
    ):
        resolve_builder("no_such_module_xyz:x")
    with pytest.raises(BuilderLoadError, match=r"builder plugin .*builders\.py has no attribute 'missing'"):
        resolve_builder(f"{PLUGINS}:missing")
    with pytest.raises(BuilderLoadError, match=r"is a function, not a Builder: declare it with @posttrain"):
        resolve_builder(f"{PLUGINS}:not_a_builder")
    message = error_of(sft(data={"train": [{"path": "d", "build": {"builder": f"{PLUGINS}:not_a_builder"}}]}))
    assert "data.train.0.build: builder" in message and "not a Builder" in message


def test_plugin_builder_runs_only_when_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(PLUGINS.parent)
    spec = DatasetSpec.model_validate(
        {"path": str(tmp_path / "sums"), "build": {"builder": "builders.py:sums", "args": {"rows": 3}}}
    )
    assert spec.build is not None and spec.build.builder == f"{PLUGINS}:sums"  # absolute for other processes
    ensure_dataset(spec)
    assert len((tmp_path / "sums" / "test.jsonl").read_text().splitlines()) == 3
    ensure_dataset(spec.model_copy(update={"build": spec.build.model_copy(update={"args": {"rows": 1}})}))
    assert len((tmp_path / "sums" / "test.jsonl").read_text().splitlines()) == 3  # present: left alone
    forgetful = DatasetSpec.model_validate(
        {"path": str(tmp_path / "f"), "build": {"builder": f"{PLUGINS}:forgetful"}}
    )
    with pytest.raises(BuildError, match=r"returned without writing"):
        ensure_dataset(forgetful)


# -------------------------------------------------------------------------------------------------- CLI


def test_cli_build_writes_a_task_with_its_card(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from posttrain.cli import main

    out = tmp_path / "arith"
    assert main(["build", "arithmetic", str(out), "train_size=6", "test_size=3", "seed=2"]) == 0
    card = json.loads((out / "task.json").read_text())
    assert card == {
        "verifier": "exact_match",
        "build": {
            "builder": "arithmetic",
            "args": {"train_size": 6, "test_size": 3, "seed": 2, "shortcut_fraction": 0.0},
        },
    }
    assert main(["build", "arithmetic", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["build", "shapes", str(tmp_path / "s"), "train_sise=3"]) == 2
    assert "args.train_sise: unknown key; did you mean 'args.train_size'?" in capsys.readouterr().err
    assert main(["make-task", str(tmp_path / "t")]) == 2
    assert "is now `posttrain build arithmetic|shapes DIR" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- layering


def test_core_modules_do_not_import_the_synthetic_home_at_module_level() -> None:
    core = [p for p in (ROOT / "posttrain").glob("*.py")]
    offenders = []
    for path in core:
        for node in ast.parse(path.read_text()).body:  # module level only
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("posttrain.synthetic")]
    assert not offenders
    code = (
        "import sys, posttrain.config, posttrain.cli, posttrain.data, posttrain.inputs, posttrain.stage; "
        "from posttrain.config import validate; "
        "validate('sft', {'output_dir': 'o', 'model': {'path': 'm'}, 'data': {'train': [{'path': 'd'}]}}); "
        "print('posttrain.synthetic' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_synthetic_argument_models_document_every_field() -> None:
    from pydantic import BaseModel

    from posttrain.data.cards import TaskCard
    from posttrain.synthetic.models import TinyModel
    from posttrain.synthetic.shapes import Qwen3Shape
    from posttrain.synthetic.tasks import TaskArgs, TinyTask

    models: list[type[BaseModel]] = [TinyModel, Qwen3Shape, TaskArgs, TinyTask, TaskCard]
    assert not [f"{m.__name__}.{n}" for m in models for n, f in m.model_fields.items() if not f.description]
