"""Held-out exact-match accuracy by greedy generation on the learners (HF generate) or the engines (vLLM)."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from posttrain.config import DatasetSpec, EvalConfig


@dataclass
class EvalSet:
    prompts: list[Any]  # data.EvalPrompt
    cfg: EvalConfig
    tokenizer: Any
    eos_id: int
    pad_id: int

    @classmethod
    def build(cls, spec: DatasetSpec, cfg: EvalConfig, processing: Any, is_vl: bool) -> EvalSet:
        from posttrain.data.processing import tokenizer_of
        from posttrain.data.prompts import build_eval_prompts

        tok = tokenizer_of(processing)
        prompts = build_eval_prompts(spec, processing, cfg.thinking, cfg.max_samples)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return cls(prompts, cfg, tok, tok.convert_tokens_to_ids("<|im_end|>"), pad)

    def evaluate(self, learners: Any) -> dict[str, float]:
        """Generate on every learner (each takes a contiguous shard), then score by exact match."""
        world = len(learners)
        per_rank = math.ceil(len(self.prompts) / world)
        # Equal shard sizes keep ranks in lockstep (ZeRO-3 gathers parameters collectively);
        # the filler repeats prompt 0 and its output is dropped.
        order = list(range(len(self.prompts))) + [0] * (per_rank * world - len(self.prompts))
        shards = [order[r * per_rank : (r + 1) * per_rank] for r in range(world)]
        batches = [self._batches(shard) for shard in shards]
        outputs = learners.generate(batches, self.cfg.max_new_tokens, self.eos_id)
        return self.score(outputs[: len(self.prompts)])

    def evaluate_on_engines(self, engines: Any) -> dict[str, float]:
        """Greedy generation on the rollout engines (RL: they serve the current weights), same scoring."""
        from posttrain.rollout import RolloutRequest

        tok = self.tokenizer
        requests = [
            RolloutRequest(
                p.prompt_ids if not p.images else tok(p.prompt_text, add_special_tokens=False)["input_ids"],
                max_tokens=self.cfg.max_new_tokens,
                temperature=0.0,
                stop_token_ids=[self.eos_id],
                logprobs=None,
                images=p.images or None,
            )
            for p in self.prompts
        ]
        results = engines.generate(requests)
        return self.score([[i for i in r.samples[0].token_ids if i != self.eos_id] for r in results])

    def _batches(self, indices: list[int]) -> list[dict[str, Any]]:
        size = self.cfg.batch_size
        return [
            left_padded([self.prompts[i] for i in indices[k : k + size]], self.pad_id)
            for k in range(0, len(indices), size)
        ]

    def score(self, completions: list[list[int]]) -> dict[str, float]:
        from posttrain.rewards.builtin import exact_match

        hits: dict[str, list[bool]] = defaultdict(list)
        lengths, truncated = [], 0
        for prompt, ids in zip(self.prompts, completions, strict=True):
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            hit = exact_match([text], [prompt.solution], prompts=[prompt.prompt_text])[0] == 1.0
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
