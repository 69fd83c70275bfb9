"""Built-in rewards against hand-computed cases; the registry's four forms; TRL and verl plugins from a
config alone; weighted combination."""

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from posttrain.rewards import (
    Batch,
    RewardLoadError,
    RewardRuntime,
    RewardsConfig,
    available_rewards,
    call_reward,
    load_reward,
    resolve_reward,
)
from posttrain.rewards.builtin import (
    answer_present,
    choice_match,
    exact_match,
    extract_choice,
    grounding_iou,
    length_penalty,
    math_accuracy,
    model_judge,
    parse_box,
    parse_judge_score,
    think_format,
)

PLUGINS = Path(__file__).parents[1] / "plugins"


def test_import_is_light() -> None:
    code = "import sys, posttrain.rewards; print('torch' in sys.modules, 'math_verify' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ------------------------------------------------------------------------------------------------- math


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        ("so the answer is \\boxed{1/2}", "0.5", 1.0),
        ("so the answer is \\boxed{1/2}", "\\frac{1}{2}", 1.0),
        ("\\boxed{0.5}", "\\boxed{\\frac{1}{2}}", 1.0),
        ("$\\frac{1}{2}$", "1/2", 1.0),
        ("\\boxed{\\frac{1}{3}}", "1/2", 0.0),
        ("The answer is 42", "42", 1.0),
        ("The answer is 41", "42", 0.0),
        ("first \\boxed{3}, no wait: \\boxed{4}", "4", 1.0),  # the last box counts
        ("<think>maybe 7? no.</think>The answer is \\boxed{42}.", "42", 1.0),
        ("<think>the answer is 42</think>So it is 7.", "42", 0.0),  # only the text after </think>
        ("<think>still thinking about 42", "42", 0.0),  # unfinished thinking has no answer
        ("\\boxed{" + "1+" * 600 + "1}", "1201", 0.0),  # a box over max_answer_chars is not read
        ("anything", "", None),  # an unparseable gold answer: no opinion
    ],
)
def test_math_accuracy(completion: str, gold: str, expected: float | None) -> None:
    assert math_accuracy([completion], [gold]) == [expected]


def test_math_accuracy_sees_think_opened_by_the_prompt() -> None:
    prompt = "<|im_start|>assistant\n<think>\n"  # Qwen3 thinking templates open the block themselves
    assert math_accuracy(["12 or 13?</think>\\boxed{13}"], ["13"], prompts=[prompt]) == [1.0]
    assert math_accuracy(["the answer is 13"], ["13"], prompts=[prompt]) == [0.0]


def test_math_accuracy_off_the_main_thread() -> None:
    """math-verify's SIGALRM timeouts fail off the main thread; ours are off, so threads work."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(math_accuracy(["\\boxed{1/2}", "3"], ["0.5", "0.5"])))
    thread.start()
    thread.join()
    assert out == [[1.0, 0.0]]


# ----------------------------------------------------------------------------------------------- format


@pytest.mark.parametrize(
    ("completion", "prompt", "expected"),
    [
        ("<think>\nlet me see\n</think>\n\nThe answer is 4.", "", 1.0),
        ("  <think></think>4", "", 1.0),  # an empty think block is well formed
        ("<think>a</think>", "", 0.0),  # no answer
        ("<think>a</think>   \n", "", 0.0),
        ("The answer is 4.", "", 0.0),  # no block
        ("4 <think>a</think> 4", "", 0.0),  # not at the start
        ("<think>a</think>4<think>b</think>4", "", 0.0),  # two blocks
        ("<think>a<think>b</think>4", "", 0.0),  # nested opening
        ("<think>a</think>4</think>", "", 0.0),
        ("reasoning</think>\n\n4", "...<think>\n", 1.0),  # the template opened the block
        ("<think>reasoning</think>4", "...<think>\n", 0.0),
    ],
)
def test_think_format(completion: str, prompt: str, expected: float) -> None:
    assert think_format([completion], prompts=[prompt]) == [expected]


def test_answer_present() -> None:
    completions = ["<think>x</think> 4", "<think>x</think>  ", "<think>x", "4", "<think>x</think>\\boxed{}"]
    assert answer_present(completions) == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert answer_present(completions, require_boxed=True) == [0.0, 0.0, 0.0, 0.0, 0.0]
    assert answer_present(["<think>x</think>so \\boxed{4}"], require_boxed=True) == [1.0]


# ------------------------------------------------------------------------------------------------ match


def test_exact_match() -> None:
    completions = ["<think>x</think>  New   York ", "new york", "\\boxed{New York} is it", "New-York"]
    gold = ["New York"] * 4
    assert exact_match(completions, gold) == [1.0, 0.0, 1.0, 0.0]
    assert exact_match(completions, gold, ignore_case=True) == [1.0, 1.0, 1.0, 0.0]


def test_digit_match_gives_partial_credit_by_place() -> None:
    from posttrain.rewards.builtin import digit_match

    completions = ["<think>1+1</think>\n\n1708", "1197", "97", "", "<think>unfinished", "\\boxed{1197}."]
    assert digit_match(completions, ["1197"] * 6) == [0.25, 1.0, 0.5, 0.0, 0.0, 1.0]
    assert digit_match(["12"], ["none"]) == [None]


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("(B)", "B"),
        ("B", "B"),
        ("C.", "C"),
        ("Answer: B", "B"),
        ("The answer is (C).", "C"),
        ("the answer is D because ...", "D"),
        ("A looks tempting, but \\boxed{D}", "D"),
        ("Between (A) and (C), I pick (C)", "C"),
        ("answer: A. Actually, final answer: B", "B"),
        ("I am not sure", None),
        ("Answer: a dog", None),  # lower-case words are not choices
    ],
)
def test_extract_choice(text: str, letter: str | None) -> None:
    assert extract_choice(text) == letter


def test_choice_match() -> None:
    completions = ["<think>(A)?</think>The answer is (B).", "Answer: C", "no idea", "(B)"]
    assert choice_match(completions, ["B", "(B)", "B", "?"]) == [1.0, 0.0, 0.0, None]
    assert choice_match(["Answer: E"], ["D"], letters="ABCD") == [0.0]
    assert choice_match(["Answer: D"], ["E"], letters="ABCD") == [None]  # gold outside the letters


# -------------------------------------------------------------------------------------------- grounding


def test_parse_box() -> None:
    assert parse_box('```json\n[{"bbox_2d": [10, 20, 30.5, 40], "label": "cat"}]\n```') == (10, 20, 30.5, 40)
    assert parse_box({"bbox_2d": [1, 2, 3, 4]}) == (1, 2, 3, 4)
    assert parse_box([{"bbox_2d": [1, 2, 3, 4]}]) == (1, 2, 3, 4)
    assert parse_box([1, 2, 3, 4]) == (1, 2, 3, 4)
    assert parse_box("[1, 2, 3]") is None
    assert parse_box("no box") is None


def test_grounding_iou() -> None:
    completions = [
        '[{"bbox_2d": [0, 0, 100, 100], "label": "dog"}]',
        "The dog is at [0, 0, 100, 50].",  # half the gold box: IoU 0.5
        "[200, 200, 300, 300]",  # disjoint
        "somewhere on the left",  # unparseable: 0
        "<think>[0, 0, 100, 100]?</think>[50, 0, 150, 100]",  # only the answer counts: IoU 1/3
    ]
    gold = [[0, 0, 100, 100]] * 4 + ['{"bbox_2d": [0, 0, 100, 100]}']
    assert grounding_iou(completions, gold) == pytest.approx([1.0, 0.5, 0.0, 0.0, 1 / 3])
    assert grounding_iou(["[0, 0, 10, 10]"], ["not a box"]) == [None]


def test_grounding_iou_converts_conventions() -> None:
    """Qwen3-VL answers in 0-1000 normalised coordinates; gold here is in pixels of a 640x480 image."""
    pred = ["[0, 0, 500, 500]", "[500, 500, 1000, 1000]"]
    gold = [[0, 0, 320, 240], [0, 0, 320, 240]]
    sizes = [[640, 480], [640, 480]]
    out = grounding_iou(pred, gold, pred_coords="norm1000", gold_coords="absolute", image_size=sizes)
    assert out == pytest.approx([1.0, 0.0])
    absolute = grounding_iou(["[0, 0, 320, 240]"], [[0, 0, 320, 240]], pred_coords="absolute")
    assert absolute == [1.0]
    with pytest.raises(ValueError, match="image_size"):
        grounding_iou(pred, gold, gold_coords="absolute")


# ----------------------------------------------------------------------------------------------- length


def test_length_penalty_dapo() -> None:
    ids = [[0] * n for n in (3, 6, 7, 8, 10, 12)]
    out = length_penalty([""] * len(ids), ids, max_length=10, buffer=4)
    assert out == pytest.approx([0.0, 0.0, -0.25, -0.5, -1.0, -1.0])


# ------------------------------------------------------------------------------------------------ judge


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("Score: 7/10", 0.7),
        ("score = 3", 0.3),
        ("SCORE: 4 / 5", 0.8),
        ("Score: 2/10. On reflection, Score: 8/10", 0.8),
        ("Score: 12/10", None),
        ("I cannot rate this.", None),
    ],
)
def test_parse_judge_score(reply: str, score: float | None) -> None:
    assert parse_judge_score(reply) == (pytest.approx(score) if score is not None else None)


def test_model_judge_with_a_fake_judge() -> None:
    seen: list[str] = []

    def judge(prompts: list[str]) -> list[str]:
        seen.extend(prompts)
        return ["Score: 7/10", "no score here"]

    out = model_judge(
        ["<think>hmm</think>Paris", "???"], ["Capital of France?"] * 2, judge, solution=["Paris"] * 2
    )
    assert out == [pytest.approx(0.7), None]
    assert "Capital of France?" in seen[0] and "Response:\nParis" in seen[0] and "hmm" not in seen[0]
    by_path = model_judge(["Paris", "Lyon", "???"], ["q"] * 3, f"{PLUGINS / 'judges.py'}:fake_judge")
    assert by_path == [pytest.approx(0.9), pytest.approx(0.2), None]
    with pytest.raises(ValueError, match="2 replies for 1 prompts"):
        model_judge(["x"], ["q"], judge)


# --------------------------------------------------------------------------------------------- registry


def test_builtins_are_registered() -> None:
    assert {
        "math_accuracy",
        "think_format",
        "answer_present",
        "exact_match",
        "choice_match",
        "grounding_iou",
        "length_penalty",
        "model_judge",
    } <= set(available_rewards())
    assert resolve_reward("math_accuracy") is math_accuracy


def test_module_and_file_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(PLUGINS))
    by_module = resolve_reward("trl_style:my_reward")
    by_file = resolve_reward(f"{PLUGINS / 'trl_style.py'}:my_reward")
    assert by_module(["= 4"], ["4"]) == by_file(["= 4"], ["4"]) == [1.0]
    monkeypatch.chdir(PLUGINS.parent)
    assert resolve_reward("plugins/trl_style.py:my_reward") is by_file  # relative to the working dir


def test_entry_point_form(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package declaring `[project.entry-points."posttrain.rewards"]`, installed as a dist-info."""
    (tmp_path / "shout_rewards.py").write_text(
        "def loud(completions, **kw):\n    return [float(c.isupper()) for c in completions]\n"
    )
    dist = tmp_path / "shout_rewards-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shout-rewards\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[posttrain.rewards]\nshout = shout_rewards:loud\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "shout" in available_rewards()
    assert resolve_reward("shout")(["HEY", "hey"]) == [1.0, 0.0]
    with RewardRuntime(["shout"], pool_size=1) as runtime:  # workers find it the same way
        assert runtime.score(["HEY", "hey"], ["", ""], [[], []]).values["shout"] == [1.0, 0.0]


def test_unknown_name_lists_rewards_and_forms() -> None:
    with pytest.raises(RewardLoadError) as err:
        resolve_reward("math_acuracy")
    message = str(err.value)
    assert "unknown reward 'math_acuracy'" in message
    assert "math_accuracy" in message and "think_format" in message
    assert "'module:function' or 'path/to/file.py:function'" in message


def test_plugin_errors_name_the_culprit(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = PLUGINS / "broken_import.py"
    with pytest.raises(
        RewardLoadError, match=rf"{broken} failed to import: RuntimeError: this plugin file fails"
    ):
        resolve_reward(f"{broken}:anything")
    with pytest.raises(RewardLoadError, match=r"has no attribute 'nope'"):
        resolve_reward(f"{PLUGINS / 'trl_style.py'}:nope")
    with pytest.raises(RewardLoadError, match=r"does not exist"):
        resolve_reward("missing/file.py:f")
    with pytest.raises(RewardLoadError, match=r"module 'no_such_module_xyz' failed to import"):
        resolve_reward("no_such_module_xyz:f")


# ----------------------------------------------------------------------------------- calling conventions


def _batch(completions: list[str], **columns: list) -> Batch:
    n = len(completions)
    return Batch(completions, ["p"] * n, [[1] * (i + 1) for i in range(n)], columns)


def test_verl_adapter() -> None:
    reward = load_reward(f"{PLUGINS / 'verl_style.py'}:compute_score")
    assert reward.kind == "verl"  # detected from the signature
    batch = _batch(
        ["x = 4", "x = 5"],
        answer=["4", "4"],
        data_source=["detailed", "plain"],
    )
    with pytest.raises(ValueError, match="ground-truth column 'solution'"):
        call_reward(reward, batch)
    reward = load_reward(f"{PLUGINS / 'verl_style.py'}:compute_score", ground_truth="answer")
    assert call_reward(reward, batch) == [1.0, 0.0]  # a dict result gives its "score"


def test_trl_conventions() -> None:
    async_reward = load_reward(f"{PLUGINS / 'trl_style.py'}:async_reward")
    assert async_reward.kind == "trl"
    assert call_reward(async_reward, _batch(["a", "b"])) == [1.0, 2.0]
    strict = load_reward(f"{PLUGINS / 'trl_style.py'}:strict_signature")  # gets only what it names
    assert call_reward(strict, _batch(["4", "5"], solution=["4", "4"], other=[0, 0])) == [1.0, 0.0]
    penalty = load_reward("length_penalty", params={"max_length": 2, "buffer": 1})
    assert call_reward(penalty, _batch(["a", "b", "c"])) == [0.0, -1.0, -1.0]


# ----------------------------------------------------------------------------------------------- config


def test_config_shorthand_labels_and_unknown_keys() -> None:
    cfg = RewardsConfig.model_validate({"rewards": ["math_accuracy", {"name": "m.py:f", "weight": 0.5}]})
    assert [s.key for s in cfg.rewards] == ["math_accuracy", "f"]
    with pytest.raises(ValueError, match="more than one reward is reported as 'length_penalty'"):
        RewardsConfig.model_validate({"rewards": ["length_penalty", "length_penalty"]})
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        RewardsConfig.model_validate({"rewards": [{"name": "x", "wieght": 1}]})


def test_trl_and_verl_plugins_from_a_config_alone() -> None:
    """The config a user writes: TRL file, verl file, async plugin and built-ins, weighted."""
    cfg = RewardsConfig.model_validate(
        {
            "rewards": [
                {"name": str(PLUGINS / "trl_style.py") + ":my_reward", "weight": 2.0},
                {"name": str(PLUGINS / "verl_style.py") + ":compute_score", "label": "verl", "weight": 1.0},
                {"name": str(PLUGINS / "trl_style.py") + ":async_reward", "weight": 0.0},
                {"name": "math_accuracy", "weight": 1.0},
                {"name": "length_penalty", "weight": 0.5, "params": {"max_length": 4, "buffer": 2}},
            ],
            "pool_size": 2,
        }
    )
    completions = ["so \\boxed{4}", "it is 5", "<think>4?</think>4", "4"]
    columns = {"solution": ["\\boxed{4}", "4", "4", ""], "data_source": ["detailed", "x", "x", "x"]}
    ids = [[1] * n for n in (1, 3, 4, 5)]
    with RewardRuntime.from_config(cfg) as runtime:
        result = runtime.score(completions, ["q"] * 4, ids, columns)
    assert result.values == {
        "my_reward": [1.0, 0.0, 1.0, None],
        "verl": [1.0, 0.0, 1.0, 1.0],
        "async_reward": [1.0, 3.0, 4.0, 5.0],
        "math_accuracy": [1.0, 0.0, 1.0, None],
        "length_penalty": [0.0, -0.5, -1.0, -1.0],
    }
    assert result.total == pytest.approx([4.0, -0.25, 3.5, 0.5])  # None (no opinion) adds nothing
    assert result.valid == [True] * 4
    assert result.metrics["reward/my_reward/none"] == 1.0
    assert result.metrics["reward/math_accuracy/mean"] == pytest.approx(2 / 3)
    assert result.metrics["reward/total/mean"] == pytest.approx(7.75 / 4)
