"""Multi-turn tool episodes on one in-process vLLM engine, token-exact and without stalling the engine.

Every episode is its own engine request per turn. The loop drives vLLM's engine step by step
(`LLMEngine.step`): a turn that ends (`<|im_end|>`) with tool calls sends them to the tool pool (all of
them at once, all episodes' calls side by side) and leaves the batch; the other episodes keep generating.
When an episode's answers are in, their tool turn (`tool_turns.tool_turn_ids`) is appended as forced
tokens and the episode re-enters as a new request whose prompt is everything so far (vLLM's prefix cache
keeps the re-prefill cheap), with the episode's images as multimodal input: the prompt's, then those the
tools returned. A turn's sampling seed is a function of (request seed, sample, turn), so an episode's
tokens are the same whatever the tools' timing; its logprobs move by up to ~3e-6 on CPU with the other
requests that share an engine step (measured), far inside the learner-engine mismatch.

An episode ends at a turn without tool calls (`finish_reason` "stop"), or truncated (`finish_reason`
"length", `truncation` naming the limit): a turn cut at `max_tokens` ("length"), `tools.max_turns`
("turns"), `tools.max_episode_tokens` or the engine's `max_model_len` ("tokens"), or the engine's images
per prompt ("images"). Image pads count as one token here (the engine's layout).
"""

from __future__ import annotations

import itertools
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from posttrain.rewards.tools import TOOL_FAILURES, ToolAnswer, ToolCall, ToolRuntime
from posttrain.rollout.config import ToolsConfig
from posttrain.rollout.samples import RolloutRequest, RolloutResult, RolloutSample
from posttrain.rollout.tool_turns import CallRecord, cap_answer, parse_tool_calls, tool_turn_ids

if TYPE_CHECKING:
    from vllm import LLM, RequestOutput, SamplingParams
    from vllm.logprobs import LogprobsOnePosition
    from vllm.lora.request import LoRARequest
    from vllm.outputs import CompletionOutput

TRUNCATIONS = ("length", "turns", "tokens", "images")
"""The limits that can end an episode (`RolloutSample.truncation`)."""
WAIT_S = 0.05
"""How long an idle engine waits for a tool answer before looking again."""


@dataclass
class _Episode:
    request: RolloutRequest
    index: int  # sample index within the request
    ids: list[int] = field(default_factory=list)  # the response so far (engine layout)
    logprobs: list[float] = field(default_factory=list)
    forced: list[int] = field(default_factory=list)
    turn_starts: list[int] = field(default_factory=list)
    calls: list[CallRecord] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)  # returned by tools, in order
    answers: list[Future[ToolAnswer]] = field(default_factory=list)  # of the calls in flight
    finish_reason: str = "stop"
    truncation: str | None = None

    @property
    def turn(self) -> int:
        return len(self.turn_starts)


class EpisodeLoop:
    """One batch of multi-turn episodes on `llm`; `run` returns results as `RolloutEngine.generate` does."""

    def __init__(
        self,
        llm: LLM,
        tools: ToolRuntime,
        cfg: ToolsConfig,
        max_images: int,
        lora: LoRARequest | None = None,
    ) -> None:
        self.llm, self.tools, self.cfg, self.max_images, self.lora = llm, tools, cfg, max_images, lora
        self.tokenizer = llm.get_tokenizer()
        self.end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.max_model_len = llm.llm_engine.model_config.max_model_len  # the context a turn must fit in
        self.active: dict[str, _Episode] = {}
        self.waiting: list[_Episode] = []
        self.request_ids = itertools.count()

    def run(self, requests: list[RolloutRequest], version: int) -> list[RolloutResult]:
        episodes = [[_Episode(r, k) for k in range(r.n)] for r in requests]
        for ep in (e for group in episodes for e in group):
            self._start_turn(ep)
        while self.active or self.waiting:
            if self.active:
                for out in self.llm.llm_engine.step():
                    if out.finished:
                        completion = cast("RequestOutput", out).outputs[0]
                        self._turn_done(self.active.pop(out.request_id), completion)
            else:
                wait([f for ep in self.waiting for f in ep.answers], WAIT_S, FIRST_COMPLETED)
            for ep in [e for e in self.waiting if all(f.done() for f in e.answers)]:
                self.waiting.remove(ep)
                self._answers_in(ep)
        return [
            RolloutResult(
                list(r.prompt_token_ids), [self._sample(ep) for ep in group], weight_version=version
            )
            for r, group in zip(requests, episodes, strict=True)
        ]

    # ------------------------------------------------------------------------------------------ turns

    def _start_turn(self, ep: _Episode) -> None:
        context = len(ep.request.prompt_token_ids) + len(ep.ids)
        left = min(self.cfg.max_episode_tokens - len(ep.ids), self.max_model_len - context)
        if left <= 0:
            return self._truncate(ep, "tokens")
        ep.turn_starts.append(len(ep.ids))
        prompt: dict[str, Any] = {"prompt_token_ids": list(ep.request.prompt_token_ids) + ep.ids}
        images = list(ep.request.images or []) + ep.images
        if images:
            prompt["multi_modal_data"] = {"image": images}
        engine_input = self.llm._preprocess_cmpl_one(prompt)  # type: ignore[arg-type]  # LLM.generate's path
        request_id = f"episode-{next(self.request_ids)}"
        params = self._params(ep, min(ep.request.max_tokens, left))
        self.llm.llm_engine.add_request(request_id, engine_input, params, lora_request=self.lora)
        self.active[request_id] = ep

    def _params(self, ep: _Episode, max_tokens: int) -> SamplingParams:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        r = ep.request
        seed = None if r.seed is None else (r.seed * 1_000_003 + ep.index * 1009 + ep.turn) % 2**31
        return SamplingParams(
            n=1,
            max_tokens=max_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            stop_token_ids=[self.end_id],
            seed=seed,
            logprobs=0 if r.logprobs is not None else None,
            skip_special_tokens=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    def _turn_done(self, ep: _Episode, out: CompletionOutput) -> None:
        ids = list(out.token_ids)
        ep.ids += ids
        if out.logprobs is None:  # not asked for (evaluation)
            ep.logprobs += [0.0] * len(ids)
        else:
            steps = cast("list[LogprobsOnePosition]", out.logprobs)  # sample logprobs are never flat here
            ep.logprobs += [float(d[t].logprob) for d, t in zip(steps, ids, strict=True)]
        if not ids or ids[-1] != self.end_id:  # cut at max_tokens (or the episode's budget)
            left = self.cfg.max_episode_tokens - len(ep.ids)
            return self._truncate(ep, "length" if left > 0 else "tokens")
        parsed = parse_tool_calls(self.tokenizer.decode(ids, skip_special_tokens=False))
        if not parsed:
            return  # the final answer
        if ep.turn >= self.cfg.max_turns:
            return self._truncate(ep, "turns")
        images = list(ep.request.images or []) + ep.images
        for item in parsed:
            ep.calls.append(CallRecord(item.name if isinstance(item, ToolCall) else ""))
            ep.answers.append(self.tools.call(item, images) if isinstance(item, ToolCall) else _done(item))
        self.waiting.append(ep)

    def _answers_in(self, ep: _Episode) -> None:
        answers = [
            cap_answer(self.tokenizer, f.result(), self.cfg.max_tool_answer_tokens) for f in ep.answers
        ]
        ep.answers = []
        first = len(ep.calls) - len(answers)
        for k, a in enumerate(answers):
            ep.calls[first + k] = CallRecord(ep.calls[first + k].name, a.failure, a.seconds)
        new_images = [im for a in answers for im in a.images]
        if len(ep.request.images or []) + len(ep.images) + len(new_images) > self.max_images:
            return self._truncate(ep, "images")
        forced = tool_turn_ids(self.tokenizer, answers, ep.request.thinking)
        context = len(ep.request.prompt_token_ids) + len(ep.ids) + len(forced)
        if len(ep.ids) + len(forced) >= self.cfg.max_episode_tokens or context >= self.max_model_len:
            return self._truncate(ep, "tokens")
        ep.forced += range(len(ep.ids), len(ep.ids) + len(forced))
        ep.ids += forced
        ep.logprobs += [0.0] * len(forced)
        ep.images += new_images
        self._start_turn(ep)

    def _truncate(self, ep: _Episode, limit: str) -> None:
        ep.finish_reason, ep.truncation = "length", limit

    def _sample(self, ep: _Episode) -> RolloutSample:
        final = ep.ids[ep.turn_starts[-1] :] if ep.turn_starts else []
        return RolloutSample(
            ep.ids,
            self.tokenizer.decode(final, skip_special_tokens=True),
            ep.logprobs,
            ep.finish_reason,
            forced=ep.forced,
            turn_starts=ep.turn_starts,
            tool_calls=ep.calls,
            images=ep.images,
            truncation=ep.truncation,
        )


def _done(answer: ToolAnswer) -> Future[ToolAnswer]:
    future: Future[ToolAnswer] = Future()
    future.set_result(answer)
    return future


def episode_metrics(
    samples: list[RolloutSample], modes: list[str], prefix: str = "tools"
) -> dict[str, float]:
    """Per episode means of turns, tool calls and tokens from the model (sampled) and from tools (forced),
    seconds per call, failure counts by class and truncation by limit; overall and `_<mode>` (the chat
    mode of each sample's prompt, aligned with `samples`)."""
    out: dict[str, float] = {}
    for mode in [None, *sorted(set(modes))]:
        group = [s for s, m in zip(samples, modes, strict=True) if mode is None or m == mode]
        calls = [c for s in group for c in s.tool_calls]
        suffix = "" if mode is None else f"_{mode}"
        n = max(1, len(group))
        out |= {
            f"{prefix}/turns{suffix}": sum(len(s.turn_starts) for s in group) / n,
            f"{prefix}/calls{suffix}": len(calls) / n,
            f"{prefix}/seconds{suffix}": sum(c.seconds for c in calls) / max(1, len(calls)),
            f"{prefix}/model_tokens{suffix}": sum(len(s.token_ids) - len(s.forced) for s in group) / n,
            f"{prefix}/tool_tokens{suffix}": sum(len(s.forced) for s in group) / n,
        }
        out |= {
            f"{prefix}/failures/{k}{suffix}": float(sum(c.failure == k for c in calls)) for k in TOOL_FAILURES
        }
    for limit in TRUNCATIONS:
        out[f"{prefix}/truncated/{limit}"] = sum(s.truncation == limit for s in samples) / max(
            1, len(samples)
        )
    return out
