"""Evaluation scores with the dataset's verifier: the spec's `verifier`, else the task's own (its folder's
`task.json` or its builder's declaration), else exact match; the shipped tasks' verifier scores exactly as
exact match did."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from posttrain.config import DatasetSpec, EvalConfig
from posttrain.data.cards import CARD, dataset_verifier
from posttrain.data.errors import DataError
from posttrain.rewards.builtin import exact_match
from posttrain.rewards.table import RewardLoadError
from posttrain.rollout.evaluation import EvalSet, VerifierError

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"
LENIENT = f"{PLUGINS / 'builders.py'}:last_number"
CFG = EvalConfig(max_samples=10, max_new_tokens=16)


@pytest.fixture(scope="module")
def tok() -> Any:
    from posttrain.synthetic.models import build_tokenizer

    return build_tokenizer(0)


def sums_folder(path: Path, card: dict | None) -> Path:
    """Two prompt-only rows whose solution is 42, with the task card `card` (None: no card)."""
    path.mkdir(parents=True)
    rows = [{"prompt": "What is 40+2?", "solution": "42"}, {"prompt": "What is 41+2?", "solution": "43"}]
    (path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if card is not None:
        (path / CARD).write_text(json.dumps(card))
    return path


def ids(tok: Any, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_a_tasks_verifier_scores_its_evaluation(tmp_path: Path, tok: Any) -> None:
    """`last_number` accepts "The answer is 42." where exact match rejects it."""
    folder = sums_folder(tmp_path / "sums", {"verifier": LENIENT})
    spec = DatasetSpec(path=str(folder), split="test")
    answers = [ids(tok, "The answer is 42."), ids(tok, "The answer is 42.")]  # right, then wrong
    own = EvalSet.build(spec, CFG, tok, False)
    assert own.verifier.name == LENIENT and own.verifier.source == str(folder / CARD)
    assert own.score(answers)["eval/accuracy"] == 0.5
    strict = EvalSet.build(spec.model_copy(update={"verifier": "exact_match"}), CFG, tok, False)
    assert strict.score(answers)["eval/accuracy"] == 0.0
    assert strict.score([ids(tok, "42"), ids(tok, "43")])["eval/accuracy"] == 1.0


def test_verifier_precedence(tmp_path: Path) -> None:
    carded = sums_folder(tmp_path / "carded", {"verifier": "digit_match"})
    plain = sums_folder(tmp_path / "plain", None)
    assert dataset_verifier(DatasetSpec(path=str(carded), verifier="math_accuracy"))[0] == "math_accuracy"
    assert dataset_verifier(DatasetSpec(path=str(carded))) == ("digit_match", str(carded / CARD))
    assert dataset_verifier(DatasetSpec(path=str(plain))) == ("exact_match", "the default")
    missing = {"path": str(tmp_path / "later"), "build": {"builder": f"{PLUGINS / 'builders.py'}:sums"}}
    name, source = dataset_verifier(DatasetSpec.model_validate(missing))  # not built yet: the declaration
    assert name == LENIENT and source.startswith("builder ")
    task = {"path": str(tmp_path / "arith"), "build": {"builder": "arithmetic"}}
    assert dataset_verifier(DatasetSpec.model_validate(task))[0] == "exact_match"


def test_a_cards_plugin_file_is_found_beside_it(tmp_path: Path) -> None:
    folder = sums_folder(tmp_path / "sums", {"verifier": "verify.py:check"})
    assert dataset_verifier(DatasetSpec(path=str(folder)))[0] == f"{folder / 'verify.py'}:check"


def test_verifier_errors_name_the_verifier_and_where_it_came_from(tmp_path: Path, tok: Any) -> None:
    folder = sums_folder(tmp_path / "sums", {"verifier": "exact_mach"})
    with pytest.raises(
        RewardLoadError, match=rf"verifier 'exact_mach' \(from {folder / CARD}\): unknown reward"
    ):
        EvalSet.build(DatasetSpec(path=str(folder), split="test"), CFG, tok, False)
    (folder / CARD).write_text(json.dumps({"verifer": "exact_match"}))
    with pytest.raises(DataError, match=r"task card .*task\.json is not valid: verifier: Field required"):
        EvalSet.build(DatasetSpec(path=str(folder), split="test"), CFG, tok, False)
    (folder / CARD).unlink()
    spec = DatasetSpec(path=str(folder), split="test", verifier=f"{PLUGINS / 'builders.py'}:one_score")
    answers = [ids(tok, "42"), ids(tok, "43")]
    with pytest.raises(
        VerifierError, match=r"verifier '.*:one_score' \(from `verifier` of dataset .*\) returned 1"
    ):
        EvalSet.build(spec, CFG, tok, False).score(answers)
    spec = spec.model_copy(update={"verifier": f"{PLUGINS / 'builders.py'}:raises"})
    with pytest.raises(VerifierError, match=r"verifier '.*:raises' .* failed: ValueError: cannot judge this"):
        EvalSet.build(spec, CFG, tok, False).score(answers)


def test_a_verifiers_columns_are_required_of_the_evaluation_rows(tmp_path: Path, tok: Any) -> None:
    folder = tmp_path / "nosolution"
    folder.mkdir()
    (folder / "test.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(DataError, match=r"solution.*the evaluation's verifier 'exact_match'"):
        EvalSet.build(DatasetSpec(path=str(folder), split="test"), CFG, tok, False)
    scored = EvalSet.build(
        DatasetSpec(path=str(folder), split="test", verifier="think_format"), CFG, tok, False
    )
    assert scored.score([ids(tok, "<think>\nx\n</think>\n\nok")])["eval/accuracy"] == 1.0


@pytest.mark.parametrize("name", ["arithmetic", "shapes"])
def test_shipped_tasks_verify_as_exact_match_did(tmp_path: Path, tok: Any, name: str) -> None:
    """The golden metric files were recorded with per-answer exact match: the task's own verifier (from its
    card) gives the same hits on its evaluation split, answers right, wrong, thinking and boxed alike."""
    from posttrain.synthetic.tasks import TinyTask, write_task

    folder = tmp_path / name
    write_task(folder, TinyTask(name=name, train_size=4, test_size=6))
    assert json.loads((folder / CARD).read_text())["verifier"] == "exact_match"
    if name == "shapes":
        from posttrain.synthetic.models import build_processor

        processing, is_vl = build_processor(tok), True
    else:
        processing, is_vl = tok, False
    evals = EvalSet.build(DatasetSpec(path=str(folder), split="test"), CFG, processing, is_vl)
    assert evals.verifier.source == str(folder / CARD)
    sols = [p.solution for p in evals.prompts]
    texts = [
        f"<think>\nworking\n</think>\n\n{sols[0]}",
        f"{sols[1]}0",
        f" {sols[2]} ",
        f"\\boxed{{{sols[3]}}}",
        "<think>\nunfinished",
        "7",
    ]
    completions = [ids(tok, t) for t in texts]
    decoded = [tok.decode(c, skip_special_tokens=False) for c in completions]
    old = [
        exact_match([t], [p.solution], prompts=[p.prompt_text])[0] == 1.0
        for t, p in zip(decoded, evals.prompts, strict=True)
    ]
    assert any(old) and not all(old)
    metrics = evals.score(completions)
    assert metrics["eval/accuracy"] == pytest.approx(sum(old) / len(old))
    assert evals.verifier.accepts(decoded, evals.prompts, completions) == old
