"""Multi-turn tool episodes on real vLLM engines, token-exact from sampling to the loss.

Micro models overfit on a few tool conversations (`posttrain.synthetic.tool_policy`) replay their calls under
greedy decoding, so every failure class and both chat modes occur on purpose. The text episodes' prompts
declare no tools (the tiny tokenizer spells JSON schemas almost character by character: five schemas are
~900 prompt tokens); the VL run's prompts declare crop_zoom's, as every tool-use run does.

Which context we train on: the tokens the engine conditioned on, every turn's reasoning included. Qwen3's
template drops reasoning only of assistant turns before the last *user query*; tool answers are not
queries, so within one tool episode it keeps every turn's reasoning too (the tiny templates never drop it),
and `apply_chat_template` of the episode's conversation renders the same tokens whenever the model's
turns are the canonical tokenisation of their text (as here). Where a sampled turn is not (another split
of the same text), the two differ and we keep the engine's ids: re-tokenising would train on tokens the
model never sampled.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from posttrain.rewards.tools import load_tools

ROOT = Path(__file__).resolve().parents[2]
BAD_TOOLS = ROOT / "tests/plugins/bad_tools.py"
TOOLS = ["calculator", *(f"{BAD_TOOLS}:{name}" for name in ("hang", "boom", "crash", "garbage"))]


def call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def turn(*calls: dict[str, Any], content: str = "", reasoning: str | None = None) -> dict[str, Any]:
    message = {"role": "assistant", "content": content, "tool_calls": list(calls)}
    return message | ({"reasoning_content": reasoning} if reasoning else {})


def tool(content: Any) -> dict[str, Any]:
    return {"role": "tool", "content": content}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


MALFORMED = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+1"}\n</tool_call>'
SCENARIOS: dict[str | None, list[dict[str, Any]]] = {
    None: [
        user("add 12 and 30"),
        turn(call("calculator", expression="12+30")),
        tool("42"),
        turn(content="42"),
    ],
    "timeout": [
        user("wait"),
        turn(call("hang", x=1)),
        tool("Error: hang timed out after 1 s"),
        turn(content="no"),
    ],
    "exception": [
        user("explode"),
        turn(call("boom", x=2)),
        tool("Error: boom raised RuntimeError: boom 2"),
        turn(content="no"),
    ],
    "crash": [user("die"), turn(call("crash", x=3)), tool("Error: crash crashed"), turn(content="no")],
    "invalid": [user("junk"), turn(call("garbage", x=4)), tool("Error: junk"), turn(content="no")],
    "unknown_tool": [
        user("search"),
        turn(call("search", q="x")),
        tool("Error: unknown tool"),
        turn(content="no"),
    ],
    "bad_arguments": [
        user("typo"),
        turn(call("calculator", expr="1")),
        tool("Error: arguments"),
        turn(content="no"),
    ],
    "malformed": [user("broken"), turn(content=MALFORMED), tool("Error: not JSON"), turn(content="no")],
}
THINKING = [
    user("think and add 1 and 2"),
    turn(call("calculator", expression="1+2"), reasoning="one sum"),
    tool("3"),
    turn(content="3", reasoning="done"),
]
TWO_CALLS = [
    user("multiply and add"),
    turn(call("calculator", expression="2*3"), call("calculator", expression="4+5"), reasoning="two sums"),
    tool("6"),
    tool("9"),
    turn(content="6 and 9", reasoning="done"),
]  # thinking mode, two calls in one turn


@pytest.fixture(scope="module")
def text_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from posttrain.synthetic.models import build_tiny_model
    from posttrain.synthetic.tool_policy import tool_policy

    root = tmp_path_factory.mktemp("tool_models")
    base = build_tiny_model(root / "text", "text", "micro", tools=True)  # micro: overfits in seconds
    return tool_policy(
        base, root / "text_policy", [*SCENARIOS.values(), THINKING, TWO_CALLS], None, steps=200
    )


class PromptSpy:
    """Records the prompt ids of every request the episode loop adds to the engine."""

    def __init__(self, llm: Any) -> None:
        self.prompts: list[list[int]] = []
        self.add = llm.llm_engine.add_request
        llm.llm_engine.add_request = self

    def __call__(self, request_id: str, engine_input: Any, *args: Any, **kwargs: Any) -> Any:
        self.prompts.append(list(engine_input["prompt_token_ids"]))
        return self.add(request_id, engine_input, *args, **kwargs)


def test_text_episodes_are_token_exact_and_every_tool_failure_is_answered(text_policy: Path) -> None:
    from posttrain.rollout.config import ToolsConfig
    from posttrain.rollout.engine import RolloutEngine
    from posttrain.rollout.samples import RolloutRequest

    cfg = ToolsConfig(names=TOOLS, timeout_s=1.0, max_turns=3, max_episode_tokens=400)
    engine = RolloutEngine(str(text_policy), max_model_len=1024, max_num_seqs=16)
    tok = engine.tokenizer
    chats = [*SCENARIOS.values(), THINKING, TWO_CALLS]
    modes = [False] * len(SCENARIOS) + [True, True]
    texts = [
        tok.apply_chat_template(c[:1], add_generation_prompt=True, enable_thinking=t, tokenize=False)
        for c, t in zip(chats, modes, strict=True)
    ]
    requests = [
        RolloutRequest(
            tok.encode(x, add_special_tokens=False), max_tokens=256, temperature=0.0, thinking=t, seed=3
        )
        for x, t in zip(texts, modes, strict=True)
    ]
    spy = PromptSpy(engine.llm)
    samples = [r.samples[0] for r in engine.generate_episodes(requests, cfg)]
    for s in samples:
        print(repr(tok.decode(s.token_ids)), s.tool_calls)
    failures = {
        name: s.tool_calls[0].failure if s.tool_calls else "no call"
        for name, s in zip([*SCENARIOS, "thinking", "two"], samples, strict=True)
    }
    assert failures == {name: name for name in SCENARIOS} | {"thinking": None, "two": None}
    assert [c.failure for c in samples[-1].tool_calls] == [None, None]
    by_prompt = {tuple(r.prompt_token_ids): s for r, s in zip(requests, samples, strict=True)}
    for prompt_ids, s in by_prompt.items():
        assert s.finish_reason == "stop" and len(s.turn_starts) == 2, tok.decode(s.token_ids)
        # every turn's engine prompt is the episode so far: the training tokens are what it conditioned on
        turns = [p for p in spy.prompts if tuple(p[: len(prompt_ids)]) == prompt_ids]
        assert turns == [list(prompt_ids) + s.token_ids[:start] for start in s.turn_starts]
        # forced = the tool turn, every other position sampled with its engine logprob
        sampled = [j for j in range(len(s.token_ids)) if j not in set(s.forced)]
        assert all(s.logprobs[j] == 0.0 for j in s.forced) and all(s.logprobs[j] <= 0.0 for j in sampled)
        assert s.forced == list(range(s.forced[0], s.turn_starts[1]))
    # the same conversation through apply_chat_template gives the same ids (canonical turns, see above)
    for chat, t, (prompt_ids, s) in zip(chats, modes, by_prompt.items(), strict=True):
        if chat is SCENARIOS[None] or chat is THINKING or chat is TWO_CALLS:
            rendered = tok.apply_chat_template(chat, enable_thinking=t, tokenize=False)
            assert tok.encode(rendered, add_special_tokens=False)[: len(prompt_ids) + len(s.token_ids)] == (
                list(prompt_ids) + s.token_ids
            )
    # the tools' timing never changes an episode's tokens (resume repeats the same episodes); logprobs
    # move by up to ~3e-6 with the requests that share an engine step (measured, prefix cache on or off)
    again = [r.samples[0] for r in engine.generate_episodes(requests, cfg)]
    assert [s.token_ids for s in again] == [s.token_ids for s in samples]
    pairs = [
        (a, b)
        for x, y in zip(again, samples, strict=True)
        for a, b in zip(x.logprobs, y.logprobs, strict=True)
    ]
    drift = max(abs(a - b) for a, b in pairs)
    assert drift < 1e-5


def test_vl_crop_zoom_rl_end_to_end_and_exact_resume(tmp_path: Path, tiny_vl_model: Path) -> None:
    """crop_zoom returns the region as an image; the next turn's engine request carries it, the learners
    get its pixels, and learner and engine agree on every sampled token after it."""
    import datasets

    from posttrain.metrics import read_metrics
    from posttrain.synthetic.models import build_tiny_model
    from posttrain.synthetic.tasks import TinyTask, write_task
    from posttrain.synthetic.tool_policy import tool_policy

    data = tmp_path / "shapes"
    write_task(data, TinyTask(name="shapes", train_size=8, test_size=4))
    rows = datasets.load_dataset("parquet", data_files=str(data / "train.parquet"))["train"]
    tools = load_tools(["crop_zoom"])
    chats = []
    for row in rows:
        image = row["images"][0].convert("RGB")
        question = row["messages"][0]["content"][1]["text"]
        prompt = {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": question}],
        }
        region = tools.tools["crop_zoom"].fn([0, 0, 500, 500], 0, images=[image])
        answer = tool([{"type": "image", "image": region}])
        chats.append(
            [prompt, turn(call("crop_zoom", bbox_2d=[0, 0, 500, 500])), answer, turn(content=row["solution"])]
        )
    base = build_tiny_model(tmp_path / "vl", "vl", "micro", tools=True)
    policy = tool_policy(base, tmp_path / "vl_policy", chats, tools.schemas, steps=200)
    out = tmp_path / "run"
    command = [
            sys.executable,
            "-m",
            "posttrain",
            "rl",
            str(ROOT / "configs/tiny/rl_vl.yaml"),
            f"output_dir={out}",
            f"model.path={policy}",
            "init_from_sft=null",
            f"data.prompts.0.path={data}",
            f"data.eval.path={data}",
            "rewards.rewards=[exact_match]",
            "train.max_steps=2",
            "train.prompts_per_step=2",
            "rollout.samples_per_prompt=4",
            "rollout.max_tokens=96",
            "train.micro_batch_size=8",
            "tools={names: [crop_zoom], max_turns: 2, max_episode_tokens: 200}",
            "data.prompts.0.thinking=non_thinking",
            "data.eval.thinking=non_thinking",
            "data.max_prompt_length=640",
            "rollout.max_model_len=1024",
            "train.async_rollout=true",  # a checkpointed pending batch holds tool images
            "checkpoint.every_steps=1",
            "eval.max_samples=2",
            "eval.max_new_tokens=96",
            "logging.progress=false",
        ]  # fmt: skip
    _run(command)
    train = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    print({k: v for k, v in train[-1].items() if k.startswith(("tools/", "mismatch", "reward/"))})
    assert [r["step"] for r in train] == [1, 2]
    assert train[-1]["tools/calls"] == 1.0 and train[-1]["tools/turns"] == 2.0  # measured: every episode
    assert all(r["tools/failures/exception"] == 0 and r["tools/calls"] > 0 for r in train)
    assert train[0]["mismatch/max_abs"] <= 1e-4  # the learners saw the tool's image (step 2 is async)
    assert any(k.startswith("eval/tools/turns") for r in read_metrics(out / "metrics.jsonl") for k in r)
    # killed after step 1 (its checkpoint holds the prefetched batch, tool images included): the resumed
    # run repeats step 2 exactly
    weights = (out / "final" / "model.safetensors").read_bytes()
    shutil.rmtree(out / "checkpoints" / "step-00000002")
    shutil.rmtree(out / "final")
    _run(command)
    again = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    for key in ("loss", "reward/total/mean", "tools/calls", "tools/tool_tokens", "response/tokens"):
        assert again[1][key] == train[1][key], key
    assert (out / "final" / "model.safetensors").read_bytes() == weights


def _run(command: list[str]) -> None:
    proc = subprocess.run(command, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
