from pathlib import Path
from typing import Any

import pytest

LONG_TESTS = {
    "test_distilled_student_beats_sft_only_at_equal_steps",
    "test_text_episodes_are_token_exact_and_every_tool_failure_is_answered",
    "test_vl_crop_zoom_rl_end_to_end_and_exact_resume",
    "test_tiny_rl_with_the_calculator_solves_long_additions",
    "test_tiny_vl_rl_improves_a_weak_sft_checkpoint",
    "test_cpu_smoke_run_of_the_phases_other_tests_cover",
    "test_tiny_vl_sft_learns_to_count_shapes",
}
"""Run with POSTTRAIN_LONG_TESTS=1. Distillation: over 10 minutes on 2 cores (several full SFT runs). The
tool-episode runs: their fixture overfits a tool policy for ~2-3 minutes, too long for CI until the
policies are built cheaper. Tool RL: its SFT cold start alone is ~34 minutes on 2 cores. Out of CI for its
40-minute budget: VL SFT and RL learning (~4 and 2-2.5 min; CI keeps the text SFT and RL learning runs and
the VL integration runs: SFT, distillation, RL steps, engine parity), and the GPU smoke script's CPU run of
the phases whose product code other integration tests run too (~2.5 min; CI runs its other phases,
tests/integration/test_gpu_smoke.py)."""

TESTS = Path(__file__).parent
TIERS = {
    "unit": (),
    "integration": (pytest.mark.integration,),
    "learning": (pytest.mark.integration, pytest.mark.slow),
}
"""The tier of a test is its folder: tests/integration/ is real Ray / DeepSpeed / vLLM on tiny models,
tests/learning/ is learning runs (minutes); `-m "not integration and not slow"` selects tests/unit/."""


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test gets its folder's tier markers. `gpu` tests run only where CUDA is present; CI and
    laptops skip them. LONG_TESTS run on request."""
    import os

    for item in items:
        if not item.path.is_relative_to(TESTS):
            continue
        tier = item.path.relative_to(TESTS).parts[0]
        if tier not in TIERS:
            raise pytest.UsageError(
                f"{item.nodeid}: a test module belongs in one of tests/{{{','.join(TIERS)}}}/"
            )
        for mark in TIERS[tier]:
            item.add_marker(mark)
    if os.environ.get("POSTTRAIN_LONG_TESTS") != "1":
        for item in items:
            if item.name in LONG_TESTS:
                item.add_marker(pytest.mark.skip(reason="long: set POSTTRAIN_LONG_TESTS=1"))
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory: pytest.TempPathFactory):
    """Folder of a tiny random Qwen3 with the local tokenizer, built once per session."""
    from posttrain.synthetic.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "text", "text")


@pytest.fixture(scope="session")
def tiny_vl_model(tmp_path_factory: pytest.TempPathFactory):
    """Folder of a tiny random Qwen3-VL with its processor, built once per session."""
    from posttrain.synthetic.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "vl", "vl")


GOLDEN_DIR = Path(__file__).parent / "golden"
VOLATILE = ("time/", "_per_s", "seconds", "memory/")
"""Metric keys that measure the machine, not the run: left out of golden files."""


@pytest.fixture
def golden():
    """`golden(name, metrics_file)`: the run's deterministic metrics (every key but timings) must equal
    `tests/golden/<name>.json` to 1e-6, step by step. CPU runs are deterministic on a machine of one kind;
    POSTTRAIN_RECORD_GOLDEN=1 writes the file instead (after a change that is meant to alter behaviour)."""
    import json
    import os

    from posttrain.metrics import read_metrics

    def by_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One dict per step (a step may be logged in several records), machine-measuring keys left out."""
        steps: dict[int, dict[str, Any]] = {}
        for r in records:
            kept = {
                k: v
                for k, v in r.items()
                if isinstance(v, (int, float)) and not any(s in k for s in VOLATILE)
            }
            steps.setdefault(int(r["step"]), {}).update(kept)
        return [steps[s] for s in sorted(steps)]

    def check(name: str, metrics_file: Path) -> None:
        rows = by_step(read_metrics(metrics_file))
        path = GOLDEN_DIR / f"{name}.json"
        if os.environ.get("POSTTRAIN_RECORD_GOLDEN") == "1":
            GOLDEN_DIR.mkdir(exist_ok=True)
            path.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
            return
        expected = by_step(json.loads(path.read_text()))
        assert [sorted(r) for r in rows] == [sorted(r) for r in expected], f"{name}: metric keys changed"
        for got, want in zip(rows, expected, strict=True):
            assert got == pytest.approx(want, rel=1e-6, abs=1e-6), f"{name} step {want.get('step')}"

    return check
