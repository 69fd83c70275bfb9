"""Tool episodes on the learner side: tool-returned images expanded as the processor expands a prompt's,
their pixels in the batch in pad order, metrics, and pending episodes through a checkpoint."""

from dataclasses import asdict
from pathlib import Path

import pytest

from posttrain.rollout.multiturn import episode_metrics
from posttrain.rollout.samples import RolloutSample, decode_images, encode_images
from posttrain.rollout.tool_turns import CallRecord


def _image(color: str):
    from PIL import Image

    return Image.new("RGB", (64, 64), color)


@pytest.mark.parametrize("thinking", [True, False])
def test_tool_images_expand_like_the_processor(tiny_vl_model: Path, thinking: bool) -> None:
    """Qwen3-VL, both chat modes: the engine-layout episode (one pad per image, tool turn from the
    template) expanded for the learner equals the processor's ids of the whole conversation."""
    from transformers import AutoProcessor

    from posttrain.data.prompts import EvalPrompt
    from posttrain.rewards.tools import ToolAnswer
    from posttrain.rl.batch import model_inputs
    from posttrain.rollout.episodes import Episode, Prompt, with_tool_images
    from posttrain.rollout.tool_turns import tool_turn_ids

    proc = AutoProcessor.from_pretrained(tiny_vl_model)
    tok = proc.tokenizer
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "look"}]}]
    text = proc.apply_chat_template(
        msgs, add_generation_prompt=True, enable_thinking=thinking, tokenize=False
    )
    inputs = proc(text=[text], images=[_image("red")], return_tensors="pt")
    source = EvalPrompt(
        inputs["input_ids"][0].tolist(),
        text,
        "",
        "thinking" if thinking else "non_thinking",
        0,
        [_image("red")],
        dict(inputs),
    )
    sampled = tok.encode("<tool_call>\n{}\n</tool_call><|im_end|>", add_special_tokens=False)
    turn = tool_turn_ids(tok, [ToolAnswer((_image("blue"),))], thinking)
    final = tok.encode("red<|im_end|>", add_special_tokens=False)
    ids = sampled + turn + final
    forced = list(range(len(sampled), len(sampled) + len(turn)))
    logprobs = [-0.5 if j not in forced else 0.0 for j in range(len(ids))]
    sample = RolloutSample(
        ids,
        "red",
        logprobs,
        "stop",
        forced=forced,
        turn_starts=[0, len(sampled) + len(turn)],
        images=[_image("blue")],
    )
    e = with_tool_images(Episode(Prompt(source, tok.encode(text, add_special_tokens=False)), sample, 0), proc)
    # the whole episode as the processor would render it with both images
    whole = proc(text=[text + tok.decode(ids)], images=[_image("red"), _image("blue")], return_tensors="pt")
    assert e.ids == whole["input_ids"][0].tolist()
    assert e.final_response == final
    assert len(e.sample.logprobs) == len(e.response) and sum(e.sample.logprobs) == -0.5 * (
        len(sampled) + len(final)
    )
    batch = model_inputs([e], tok.pad_token_id)
    assert batch["mm_token_type_ids"][0].tolist() == whole["mm_token_type_ids"][0].tolist()
    assert (batch["pixel_values"] == whole["pixel_values"]).all()
    assert (batch["image_grid_thw"] == whole["image_grid_thw"]).all()


def test_pending_episodes_with_images_survive_a_checkpoint() -> None:
    import json

    sample = RolloutSample(
        [1, 2],
        "x",
        [0.0, -1.0],
        "stop",
        tool_calls=[CallRecord("crop_zoom", None, 0.1)],
        images=[_image("red")],
    )
    back = decode_images(json.loads(json.dumps(encode_images(asdict(sample)))))
    assert back.tool_calls == sample.tool_calls and back.token_ids == sample.token_ids
    assert back.images[0].tobytes() == sample.images[0].tobytes()


def test_episode_metrics_per_mode() -> None:
    calls = [
        CallRecord("calculator", None, 0.2),
        CallRecord("hang", "timeout", 1.0),
        CallRecord("", "malformed"),
    ]
    a = RolloutSample(
        [1] * 10, "", [0.0] * 10, "stop", forced=[3, 4, 5], turn_starts=[0, 6], tool_calls=calls
    )
    b = RolloutSample([1] * 4, "", [0.0] * 4, "length", turn_starts=[0], truncation="turns")
    m = episode_metrics([a, b], ["thinking", "non_thinking"])
    assert m["tools/turns"] == 1.5 and m["tools/calls"] == 1.5 and m["tools/calls_thinking"] == 3.0
    assert m["tools/model_tokens"] == (7 + 4) / 2 and m["tools/tool_tokens"] == 1.5
    assert m["tools/failures/timeout"] == 1.0 and m["tools/failures/malformed_thinking"] == 1.0
    assert m["tools/seconds"] == pytest.approx(1.2 / 3) and m["tools/truncated/turns"] == 0.5


def test_rl_config_takes_a_tools_section_and_the_report_plots_it() -> None:
    from posttrain.config import ConfigError, load_config
    from posttrain.pipeline.report import PANELS, series

    rl = Path(__file__).resolve().parents[2] / "configs/tiny/rl.yaml"
    tools = "tools={names: [calculator], max_episode_tokens: 300}"
    cfg = load_config("rl", rl, [tools, "rollout.max_model_len=1024"])
    assert cfg.tools is not None and cfg.tools.names == ["calculator"] and cfg.response_limit == 300
    with pytest.raises(ConfigError, match="tools.max_episode_tokens"):
        load_config("rl", rl, [tools, "rollout.max_model_len=300"])
    with pytest.raises(ConfigError, match="max_turns"):
        load_config("rl", rl, ["tools={names: [calculator], max_turns: 0}"])
    records = [{"step": 1, "tools/failures/timeout": 2.0, "tools/calls": 1.5, "tools/calls_thinking": 2.0}]
    assert set(series(records, PANELS["tool failures per step"])) == {"tools/failures/timeout"}
    assert set(series(records, PANELS["tool calls and turns per episode"])) == {
        "tools/calls",
        "tools/calls_thinking",
    }


# --------------------------------------------------------------------------- the episode loop, engine faked


class FakeLLM:
    """vLLM's surface the episode loop uses; each request's turn is `script(prompt ids)`, one token of
    logprob -0.5 per position, finished at the next step (one request per step, as a busy engine would)."""

    def __init__(self, tok, script) -> None:
        from types import SimpleNamespace

        self.tok, self.script, self.queue = tok, script, []
        self.llm_engine = SimpleNamespace(
            add_request=self._add, step=self._step, model_config=SimpleNamespace(max_model_len=4096)
        )
        self.prompts: list[list[int]] = []

    def get_tokenizer(self):
        return self.tok

    def _preprocess_cmpl_one(self, prompt):
        return prompt

    def _add(self, request_id, engine_input, params, lora_request=None) -> None:
        self.prompts.append(engine_input["prompt_token_ids"])
        ids = self.script(engine_input["prompt_token_ids"])[: params.max_tokens]
        self.queue.append((request_id, ids))

    def _step(self):
        from types import SimpleNamespace

        if not self.queue:
            return []
        request_id, ids = self.queue.pop(0)
        logprobs = [{t: SimpleNamespace(logprob=-0.5)} for t in ids]
        completion = SimpleNamespace(token_ids=ids, logprobs=logprobs)
        return [SimpleNamespace(finished=True, request_id=request_id, outputs=[completion])]


class FakeTools:
    def call(self, call, images=()):
        from concurrent.futures import Future

        from posttrain.rewards.tools import ToolAnswer

        future: Future = Future()
        future.set_result(ToolAnswer((f"ran {call.name}",), None, 0.01))
        return future


@pytest.fixture(scope="module")
def tok():
    from posttrain.synthetic.models import build_tokenizer

    return build_tokenizer(0, tools=True)


def _loop(tok, script, **limits):
    from posttrain.rollout.config import ToolsConfig
    from posttrain.rollout.multiturn import EpisodeLoop

    llm = FakeLLM(tok, script)
    cfg = ToolsConfig(names=["calculator"], **limits)
    return llm, EpisodeLoop(llm, FakeTools(), cfg, max_images=0)  # type: ignore[arg-type]


CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1"}}\n</tool_call><|im_end|>'


def test_loop_appends_tool_turns_and_stops_at_an_answer(tok) -> None:
    from posttrain.rollout.samples import RolloutRequest

    answer_after = tok.encode("ran calculator", add_special_tokens=False)

    def script(ids: list[int]) -> list[int]:  # the final answer once the tool answered
        return tok.encode("42<|im_end|>" if answer_after[0] in ids[-20:] else CALL, add_special_tokens=False)

    llm, loop = _loop(tok, script)
    prompt = tok.encode("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    (result,) = loop.run([RolloutRequest(prompt, n=2, max_tokens=64, thinking=True)], version=3)
    s = result.samples[0]
    assert result.weight_version == 3 and len(result.samples) == 2
    assert tok.decode(s.token_ids) == CALL + (
        "\n<|im_start|>user\n<tool_response>\nran calculator\n</tool_response><|im_end|>\n<|im_start|>assistant\n42<|im_end|>"
    )
    assert s.finish_reason == "stop" and s.truncation is None and s.text == "42"
    assert len(s.turn_starts) == 2 and s.forced == list(range(s.forced[0], s.turn_starts[1]))
    assert [lp for j, lp in enumerate(s.logprobs) if j not in set(s.forced)] == [-0.5] * (
        len(s.token_ids) - len(s.forced)
    )
    assert llm.prompts[2] == prompt + s.token_ids[: s.turn_starts[1]]  # the second turn sees the first
    assert [c.name for c in s.tool_calls] == ["calculator"] and s.tool_calls[0].seconds == 0.01


@pytest.mark.parametrize(
    ("limits", "max_tokens", "truncation"),
    [({"max_turns": 2}, 64, "turns"), ({"max_episode_tokens": 60}, 64, "tokens"), ({}, 5, "length")],
)
def test_loop_marks_each_limit(tok, limits, max_tokens, truncation) -> None:
    from posttrain.rollout.samples import RolloutRequest

    _, loop = _loop(tok, lambda ids: tok.encode(CALL, add_special_tokens=False), **limits)
    prompt = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    (result,) = loop.run([RolloutRequest(prompt, max_tokens=max_tokens)], version=0)
    s = result.samples[0]
    assert (s.finish_reason, s.truncation) == ("length", truncation)
    assert len(s.token_ids) <= limits.get("max_episode_tokens", 1024)
    if truncation == "turns":
        assert len(s.turn_starts) == 2 and len(s.tool_calls) == 1
