"""The reward runtime never hangs: adversarial plugins are classified, cost at most timeout + 1 s, and the
pool recovers."""

import os
import signal
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from posttrain.rewards import (
    RewardLoadError,
    RewardPluginError,
    RewardResult,
    RewardRuntime,
    RewardsConfig,
    RewardSpec,
)

PLUGINS = Path(__file__).parents[1] / "plugins"
ADVERSARIAL = [
    "hang",
    "boom",
    "abort",
    "segfault",
    "hard_exit",
    "nan",
    "wrong_length",
    "wrong_type",
    "text_items",
]
TIMEOUT_S = 2.0
BUILTINS = [
    RewardSpec(name="math_accuracy"),
    RewardSpec(name="think_format"),
    RewardSpec(name="answer_present"),
    RewardSpec(name="exact_match"),
    RewardSpec(name="choice_match"),
    RewardSpec(name="grounding_iou"),
    RewardSpec(name="length_penalty", params={"max_length": 8, "buffer": 4}),
    RewardSpec(name="model_judge", params={"judge": f"{PLUGINS / 'judges.py'}:fake_judge"}),
]


@pytest.fixture(scope="module")
def runtime() -> Iterator[RewardRuntime]:
    specs = BUILTINS + [RewardSpec(name=f"{PLUGINS / 'adversarial.py'}:{name}") for name in ADVERSARIAL]
    with RewardRuntime(specs, pool_size=2, timeout_s=TIMEOUT_S) as rt:
        yield rt


def score(runtime: RewardRuntime, completions: list[str]) -> tuple[float, RewardResult]:
    n = len(completions)
    start = time.monotonic()
    result = runtime.score(completions, ["q"] * n, [[1, 2]] * n, {"solution": ["1"] * n})
    return time.monotonic() - start, result


def healthy_seconds(runtime: RewardRuntime) -> float:
    return statistics.median(score(runtime, ["\\boxed{1}"] * 4)[0] for _ in range(3))


def assert_healthy(result: RewardResult) -> None:
    assert result.valid == [True] * 4
    assert result.values["math_accuracy"] == [1.0] * 4
    assert not any(
        v for k, v in result.metrics.items() if k.endswith(("timeout", "exception", "crash", "invalid"))
    )


@pytest.mark.parametrize(
    ("plugin", "trigger", "failure", "failed"),
    [
        ("hang", "HANG", "timeout", [0, 1]),  # the chunk (samples 0-1) is lost, not retried
        ("boom", "BOOM", "exception", [0]),  # re-run one by one: only the raising sample fails
        ("abort", "ABORT", "crash", [0, 1]),
        ("segfault", "SEGV", "crash", [0, 1]),
        ("hard_exit", "EXIT", "crash", [0, 1]),
        ("nan", "NAN", "invalid", [0]),
        ("wrong_length", "LENGTH", "invalid", [0, 1]),
        ("wrong_type", "TYPE", "invalid", [0, 1]),
        ("text_items", "TEXT", "invalid", [0]),
    ],
)
def test_adversarial_plugin_is_contained(
    runtime: RewardRuntime, plugin: str, trigger: str, failure: str, failed: list[int]
) -> None:
    baseline = healthy_seconds(runtime)
    seconds, result = score(runtime, [f"{trigger} \\boxed{{1}}"] + ["\\boxed{1}"] * 3)
    print(f"{plugin}: {seconds:.2f} s (healthy {baseline:.3f} s)")
    assert seconds - baseline <= TIMEOUT_S + 1.0
    metrics = result.metrics
    assert metrics[f"reward/{plugin}/{failure}"] == len(failed)
    other = {k: v for k, v in metrics.items() if k.endswith(("timeout", "exception", "crash", "invalid"))}
    assert sum(other.values()) == len(failed)  # nothing else is blamed
    assert [i for i, ok in enumerate(result.valid) if not ok] == failed
    assert result.values[plugin] == [None if i in failed else 0.5 for i in range(4)]
    assert result.values["math_accuracy"] == [1.0] * 4
    assert_healthy(score(runtime, ["\\boxed{1}"] * 4)[1])  # the pool recovered


def test_plugin_hanging_on_every_sample_costs_one_timeout(runtime: RewardRuntime) -> None:
    """Both workers hang at once: the standby worker takes over, no wait for a restart."""
    baseline = healthy_seconds(runtime)
    seconds, result = score(runtime, ["HANG \\boxed{1}"] * 4)
    print(f"hang on every sample: {seconds:.2f} s (healthy {baseline:.3f} s)")
    assert seconds >= TIMEOUT_S and seconds - baseline <= TIMEOUT_S + 1.0
    assert result.metrics["reward/hang/timeout"] == 4
    assert result.values["math_accuracy"] == [1.0] * 4
    assert_healthy(score(runtime, ["\\boxed{1}"] * 4)[1])


def test_worker_dying_while_idle_is_replaced_silently(runtime: RewardRuntime) -> None:
    for worker in list(runtime.pool.workers):
        os.kill(worker.proc.pid, signal.SIGKILL)
    time.sleep(0.1)
    assert_healthy(score(runtime, ["\\boxed{1}"] * 4)[1])


def test_long_completions_with_builtins_stay_fast(runtime: RewardRuntime) -> None:
    """100k-character completions built to trip slow parsers and regexes."""
    digits = " ".join(str(i % 97) for i in range(40_000))[:100_000]  # 17 s in math-verify if fed whole
    completions = [
        digits,
        "<think>" + "\\frac{" * 20_000,
        "answer" + " " * 99_990 + "x",
        "[1, 2, " + "3" * 100_000,
    ]
    seconds, result = score(runtime, completions)
    print(f"4 x 100k characters, {len(BUILTINS)} built-ins + plugins: {seconds:.2f} s")
    assert seconds < TIMEOUT_S
    for spec in BUILTINS:
        assert result.failures[spec.key] == [None] * 4


def test_failing_on_every_sample_stops_the_run() -> None:
    always = f"{PLUGINS / 'adversarial.py'}:always_fails"
    with RewardRuntime(
        ["exact_match", always],
        pool_size=1,
        on_failure="value",
        failure_value=-1.0,
        max_consecutive_failures=2,
    ) as rt:
        first = rt.score(["1", "2"], ["", ""], [[], []], {"solution": ["1", "1"]})
        assert first.values["always_fails"] == [-1.0, -1.0] and first.valid == [True, True]
        assert first.total == [0.0, -1.0]
        assert first.metrics["reward/always_fails/exception"] == 2
        with pytest.raises(RewardPluginError, match=r"'always_fails' failed on every sample of 2") as err:
            rt.score(["1"], [""], [[]], {"solution": ["1"]})
        assert err.value.names == ["always_fails"]
        assert "RuntimeError: this plugin is broken" in str(err.value)


def test_load_failures_surface_at_start() -> None:
    with pytest.raises(RewardLoadError, match=r"broken_import.py failed to import: RuntimeError"):
        RewardRuntime([f"{PLUGINS / 'broken_import.py'}:f"], pool_size=1)
    with pytest.raises(RewardLoadError, match=r"unknown reward 'nope'.*math_accuracy"):
        RewardRuntime(["nope"], pool_size=1)


def test_score_async_and_threads_share_one_runtime() -> None:
    with RewardRuntime.from_config(RewardsConfig(rewards=BUILTINS[:1], pool_size=1)) as rt:
        futures = [
            rt.score_async([f"\\boxed{{{k}}}", "0"], ["", ""], [[], []], {"solution": [str(k)] * 2})
            for k in range(1, 5)
        ]
        assert [f.result(timeout=30).values["math_accuracy"] for f in futures] == [[1.0, 0.0]] * 4
        with pytest.raises(ValueError, match="column 'solution' has 1 items for 2 completions"):
            rt.score(["a", "b"], ["", ""], [[], []], {"solution": ["1"]})


def test_runtime_defaults_match_the_config() -> None:
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(RewardRuntime).parameters.items() if k != "specs"}
    assert defaults == RewardsConfig(rewards=["x"]).model_dump(exclude={"rewards"})
