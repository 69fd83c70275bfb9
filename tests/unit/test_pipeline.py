"""`posttrain pipeline`: config wiring and errors, and variant export."""

from pathlib import Path

import pytest
import yaml

from posttrain.config import ConfigError, load_config, validate

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny"


def test_shipped_pipeline_wires_stages_in_order() -> None:
    cfg = load_config("pipeline", TINY / "pipeline.yaml")
    out = Path(cfg.output_dir).resolve()
    models = {s.name: out / s.name / "final" for s in cfg.stages}
    distill = cfg.stage_config(1, models)
    rl = cfg.stage_config(2, models)
    assert distill.teacher.path == str(models["sft"])  # the SFT model teaches
    assert distill.model.path == "runs/models/micro-text"  # a smaller student of its own
    assert rl.model.path == str(models["distill"])  # by default a stage continues the previous one
    assert (Path(rl.output_dir), rl.init_from_sft) == (out / "rl", None)
    assert {p.thinking for p in rl.data.prompts} == {"thinking", "non_thinking"}
    assert [cfg.variant_stage(v) for v in cfg.variants] == ["rl", "rl"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"inputs": {"model.path": "rl"}}, r"stages\.1\.inputs\.model\.path: 'rl' is not an earlier stage"),
        ({"name": "sft"}, r"stages\.1\.name: 'sft' is used by an earlier stage"),
        (
            {"overrides": ["train.lrr=1"]},
            r"stages\.1 \('distill'\) .*distill\.yaml:\n.*train\.lrr: unknown key",
        ),
        ({"config": "missing.yaml"}, r"stages\.1 \('distill'\) config file missing\.yaml does not exist"),
    ],
)
def test_pipeline_errors_name_the_stage_and_key(change: dict[str, object], message: str) -> None:
    raw = yaml.safe_load((TINY / "pipeline.yaml").read_text())
    raw["stages"] = [{**s, "config": str(ROOT / s["config"])} for s in raw["stages"]]
    raw["stages"][1] |= change
    with pytest.raises(ConfigError, match=message):
        validate("pipeline", raw)


def test_variant_template_defaults(tmp_path: Path, tiny_text_model: Path) -> None:
    from transformers import AutoTokenizer

    from posttrain.pipeline.driver import export_variant

    chat = [{"role": "user", "content": "What is 2+3?"}]
    for thinking in (False, True):
        folder = export_variant(tiny_text_model, tmp_path / f"v{thinking}", thinking)
        prompt = AutoTokenizer.from_pretrained(folder).apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True
        )
        assert prompt.endswith("<think>\n\n</think>\n\n") is not thinking
        assert (folder / "model.safetensors").is_file()
