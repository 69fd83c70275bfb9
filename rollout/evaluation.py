"""Held-out accuracy by greedy generation on the learners (HF generate) or the engines (vLLM), scored by
the dataset's verifier: a reward (named as in `rewards:`) whose 1.0 marks a correct answer. The verifier is
the dataset spec's `verifier`, else the task's own (its folder's `task.json`, or its builder's), else
`exact_match` with `solution`. It is called in this process, once per evaluation, on every answer."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from posttrain.config import DatasetSpec, EvalConfig
from posttrain.data.cards import dataset_tools, dataset_verifier
from posttrain.data.processing import pad_id, tokenizer_of
from posttrain.data.prompts import build_eval_prompts
from posttrain.groups import LearnerGroup
from posttrain.rewards.registry import Batch, LoadedReward, call_reward, load_reward
from posttrain.rewards.runtime import check_values
from posttrain.rewards.table import RewardLoadError
from posttrain.rewards.tools import load_tools
from posttrain.rollout.config import ToolsConfig
from posttrain.rollout.engine import RolloutGroup
from posttrain.rollout.multiturn import episode_metrics
from posttrain.rollout.samples import RolloutRequest


class VerifierError(RuntimeError):
    """The evaluation's verifier raised or returned something that is not one score per answer."""


@dataclass
class Verifier:
    """The reward that scores held-out answers, and where it was chosen (for messages)."""

    name: str
    source: str
    reward: LoadedReward

    @classmethod
    def load(cls, name: str, source: str = "the default") -> Verifier:
        try:
            return cls(name, source, load_reward(name))
        except RewardLoadError as err:
            raise RewardLoadError(f"evaluation verifier {name!r} (from {source}): {err}") from None

    @property
    def needs(self) -> dict[str, str]:
        """Columns every evaluation row must have, as data loading names who needs them."""
        return {column: f"the evaluation's verifier {self.name!r}" for column in self.reward.required}

    def accepts(self, texts: list[str], prompts: list[Any], completions: list[list[int]]) -> list[bool]:
        """Whether the verifier gives each answer full credit (1.0); `prompts` are `data.EvalPrompt`s."""
        names = dict.fromkeys(k for p in prompts for k in p.extra)
        columns: dict[str, list[Any]] = {k: [p.extra.get(k) for p in prompts] for k in names}
        columns.setdefault("solution", [p.solution for p in prompts])  # rows without one: ""
        batch = Batch(texts, [p.prompt_text for p in prompts], completions, columns)
        try:
            checked = check_values(call_reward(self.reward, batch), len(batch))
        except Exception as err:
            raise VerifierError(
                f"evaluation verifier {self.name!r} (from {self.source}) failed: {type(err).__name__}: {err}"
            ) from err
        if checked.message is not None:
            raise VerifierError(f"evaluation verifier {self.name!r} (from {self.source}) {checked.message}")
        return [v is not None and v >= 1.0 for v in checked.values]


def declared_schemas(spec: DatasetSpec) -> list[dict[str, Any]] | None:
    """The JSON schemas (as RL declares them) of the tools `spec` names: its `tools`, else its folder's
    task card's; None when it names none. SFT declares them to rows without a `tools` column."""
    names = dataset_tools(spec)
    return load_tools(names).schemas if names else None


def default_verifier() -> Verifier:
    return Verifier.load("exact_match")


@dataclass
class EvalSet:
    prompts: list[Any]  # data.EvalPrompt
    cfg: EvalConfig
    tokenizer: Any
    eos_id: int
    pad_id: int
    verifier: Verifier = field(default_factory=default_verifier)

    @classmethod
    def build(
        cls,
        spec: DatasetSpec,
        cfg: EvalConfig,
        processing: Any,
        is_vl: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> EvalSet:
        """`tools`: the schemas the prompts declare (a tool-use stage evaluates with its tools)."""
        verifier = Verifier.load(*dataset_verifier(spec))
        tok = tokenizer_of(processing)
        prompts = build_eval_prompts(
            spec, processing, cfg.thinking, cfg.max_samples, needs=verifier.needs, tools=tools
        )
        return cls(prompts, cfg, tok, tok.convert_tokens_to_ids("<|im_end|>"), pad_id(tok), verifier)

    def evaluate(self, learners: LearnerGroup) -> dict[str, float]:
        """Generate on every learner (each takes a contiguous shard), then score with the verifier."""
        world = len(learners)
        per_rank = math.ceil(len(self.prompts) / world)
        # Equal shard sizes keep ranks in lockstep (ZeRO-3 gathers parameters collectively);
        # the filler repeats prompt 0 and its output is dropped.
        order = list(range(len(self.prompts))) + [0] * (per_rank * world - len(self.prompts))
        shards = [order[r * per_rank : (r + 1) * per_rank] for r in range(world)]
        batches = [self._batches(shard) for shard in shards]
        outputs = learners.generate(batches, self.cfg.max_new_tokens, self.eos_id)
        return self.score(outputs[: len(self.prompts)])

    def evaluate_on_engines(
        self, engines: RolloutGroup, tools: ToolsConfig | None = None
    ) -> dict[str, float]:
        """Greedy generation on the rollout engines (RL: they serve the current weights), same scoring;
        with `tools` the same multi-turn loop as training, scoring each episode's final turn."""
        tok = self.tokenizer
        requests = [
            RolloutRequest(
                p.prompt_ids if not p.images else tok(p.prompt_text, add_special_tokens=False)["input_ids"],
                max_tokens=self.cfg.max_new_tokens,
                temperature=0.0,
                stop_token_ids=[self.eos_id],
                logprobs=None,
                images=p.images or None,
                thinking=p.mode == "thinking",
            )
            for p in self.prompts
        ]
        samples = [r.samples[0] for r in engines.generate(requests, tools)]
        if tools is None:
            return self.score([[i for i in s.token_ids if i != self.eos_id] for s in samples])
        finals = [s.token_ids[s.turn_starts[-1] :] if s.turn_starts else [] for s in samples]
        metrics = self.score([[i for i in ids if i != self.eos_id] for ids in finals])
        return metrics | episode_metrics(samples, [p.mode for p in self.prompts], prefix="eval/tools")

    def _batches(self, indices: list[int]) -> list[dict[str, Any]]:
        size = self.cfg.batch_size
        return [
            left_padded([self.prompts[i] for i in indices[k : k + size]], self.pad_id)
            for k in range(0, len(indices), size)
        ]

    def score(self, completions: list[list[int]]) -> dict[str, float]:
        """Accuracy (overall and per chat mode), response length and truncation of `completions`."""
        texts = [self.tokenizer.decode(ids, skip_special_tokens=False) for ids in completions]
        accepted = self.verifier.accepts(texts, self.prompts, completions) if texts else []
        hits: dict[str, list[bool]] = defaultdict(list)
        lengths, truncated = [], 0
        for prompt, ids, hit in zip(self.prompts, completions, accepted, strict=True):
            hits["all"].append(hit)
            hits[prompt.mode].append(hit)
            lengths.append(len(ids))
            truncated += len(ids) >= self.cfg.max_new_tokens
        metrics = {"eval/accuracy": _mean(hits.pop("all"))}
        metrics |= {f"eval/accuracy_{mode}": _mean(v) for mode, v in hits.items()}
        metrics |= {
            "eval/response_tokens": _mean(lengths),
            "eval/truncated": truncated / max(1, len(lengths)),
        }
        return metrics


def left_padded(prompts: list[Any], pad_id: int) -> dict[str, Any]:
    """A generation batch: prompts right-aligned so new tokens follow every prompt directly."""
    import torch

    width = max(len(p.prompt_ids) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        input_ids[b, width - len(p.prompt_ids) :] = torch.tensor(p.prompt_ids)
        attention_mask[b, width - len(p.prompt_ids) :] = 1
    batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if prompts[0].vision is not None:
        types = torch.zeros((len(prompts), width), dtype=torch.long)
        for b, p in enumerate(prompts):
            types[b, width - len(p.prompt_ids) :] = p.vision["mm_token_type_ids"][0]
        batch["mm_token_type_ids"] = types
        for key in ("pixel_values", "image_grid_thw"):
            parts = [p.vision[key] for p in prompts if key in p.vision]
            if parts:
                batch[key] = torch.cat(parts)
    return batch


def _mean(values: list[Any]) -> float:
    return sum(values) / len(values) if values else 0.0
