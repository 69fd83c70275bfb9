"""RL data between the engines and the learners: prompts, trajectories and their learner batches.

Token ids flow end to end: the engine's sampled ids are appended to the learner's prompt ids (never
decoded and re-encoded). Per-token arrays use the learner layout of `next_token_logprobs`: position t of
a sequence predicts token t+1, so response token j of a prompt of P tokens sits at position P - 1 + j.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from posttrain.data.errors import DataError
from posttrain.data.order import epoch_order
from posttrain.data.processing import tokenizer_of
from posttrain.data.prompts import EvalPrompt, build_eval_prompts
from posttrain.data.rows import Needs
from posttrain.rollout.engine import RolloutRequest, RolloutResult, RolloutSample

IMAGE_PAD = "<|image_pad|>"
VISION_PLACEHOLDERS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


@dataclass
class Prompt:
    """A validated prompt: learner ids (image pads expanded) and engine ids (one pad per image)."""

    source: EvalPrompt
    engine_ids: list[int]

    @property
    def ids(self) -> list[int]:
        return self.source.prompt_ids


@dataclass
class Trajectory:
    prompt: Prompt
    group: int
    sample: RolloutSample
    weight_version: int
    rewards: dict[str, float | None] = field(default_factory=dict)
    reward: float = 0.0
    valid: bool = True
    advantage: float = 0.0
    old_logprobs: list[float] | None = None
    ref_logprobs: list[float] | None = None
    placeholder: bool = False  # cut at a sampled vision placeholder (see `trajectories`)

    @property
    def response(self) -> list[int]:
        return self.sample.token_ids

    @property
    def ids(self) -> list[int]:
        return self.prompt.ids + self.sample.token_ids

    @property
    def truncated(self) -> bool:
        return self.sample.finish_reason == "length"


def build_prompts(
    specs: list[Any], processing: Any, is_vl: bool, max_prompt_length: int, needs: Needs
) -> list[Prompt]:
    """Every row of every prompt dataset, validated up front: a prompt that is too long, whose image
    tokens do not match its image features, or without a column in `needs` (the rewards') stops the run
    naming the dataset and row."""
    tok = tokenizer_of(processing)
    prompts = []
    for spec in specs:
        for p in build_eval_prompts(spec, processing, needs=needs):
            where = f"{spec.path} (split {spec.split}) row {p.row}"
            if len(p.prompt_ids) > max_prompt_length:
                raise DataError(
                    f"{where}: prompt has {len(p.prompt_ids)} tokens (image tokens included), more than "
                    f"data.max_prompt_length={max_prompt_length}; raise it or shorten the prompt"
                )
            engine_ids = p.prompt_ids
            if is_vl and p.images:
                _check_image_tokens(p, processing, where)
                engine_ids = tok(p.prompt_text, add_special_tokens=False)["input_ids"]
            prompts.append(Prompt(p, engine_ids))
    return prompts


def _check_image_tokens(p: EvalPrompt, processing: Any, where: str) -> None:
    assert p.vision is not None
    pad = tokenizer_of(processing).convert_tokens_to_ids(IMAGE_PAD)
    merge = processing.image_processor.merge_size
    features = int(p.vision["image_grid_thw"].prod(-1).sum()) // merge**2
    tokens = p.prompt_ids.count(pad)
    if tokens != features:
        raise DataError(
            f"{where}: {tokens} image tokens in the prompt but the images give {features} features"
        )


def prompt_order(num_prompts: int, seed: int, position: int) -> int:
    """The prompt at `position` of the stream of epoch permutations laid end to end (pure, resumable)."""
    return int(epoch_order(num_prompts, seed, position // num_prompts)[position % num_prompts])


def requests_for(
    prompts: list[Prompt], positions: range, seed: int, rollout: Any, stop_ids: list[int]
) -> tuple[list[Prompt], list[RolloutRequest]]:
    """The prompts at stream `positions` and their requests; each request's sampling seed is a function
    of (seed, position), so a resumed run samples the same tokens."""
    chosen = [prompts[prompt_order(len(prompts), seed, pos)] for pos in positions]
    requests = [
        RolloutRequest(
            p.engine_ids,
            n=rollout.samples_per_prompt,
            max_tokens=rollout.max_tokens,
            temperature=rollout.temperature,
            top_p=rollout.top_p,
            top_k=rollout.top_k,
            stop_token_ids=stop_ids,
            seed=(seed * 1_000_003 + pos) % 2**31,
            images=p.source.images or None,
            thinking_budget=rollout.thinking_budget,
        )
        for p, pos in zip(chosen, positions, strict=True)
    ]
    return chosen, requests


def trajectories(
    prompts: list[Prompt],
    results: list[RolloutResult],
    first_group: int,
    placeholders: frozenset[int] | set[int] = frozenset(),
) -> list[Trajectory]:
    """One per sample. A VL model may sample an image/video placeholder token, which the learner's
    forward would try to match with image features: such a response is cut before it and carries no loss."""
    out = []
    for g, (p, r) in enumerate(zip(prompts, results, strict=True)):
        for s in r.samples:
            t = Trajectory(p, first_group + g, s, r.weight_version)
            cut = next((j for j, tok in enumerate(s.token_ids) if tok in placeholders), None)
            if cut is not None:
                s.token_ids, s.logprobs, t.placeholder = s.token_ids[:cut], s.logprobs[:cut], True
            out.append(t)
    return out


def placeholder_ids(tokenizer: Any, is_vl: bool) -> set[int]:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_PLACEHOLDERS] if is_vl else []
    return {i for i in ids if isinstance(i, int) and i >= 0}


# ---------------------------------------------------------------------------------------- learner side


def loss_positions(t: Trajectory, mask_truncated: bool) -> list[int]:
    """Positions (learner layout) of the response tokens that carry loss: sampled (not forced) tokens
    of a valid trajectory, none for one cut at a placeholder or (with `mask_truncated`) truncated."""
    if not t.valid or t.placeholder or (mask_truncated and t.truncated):
        return []
    start, forced = len(t.prompt.ids) - 1, set(t.sample.forced)
    return [start + j for j in range(len(t.response)) if j not in forced]


def collate(trajs: list[Trajectory], pad_id: int, mask_truncated: bool) -> dict[str, torch.Tensor]:
    """Right-padded learner batch: model inputs, response_mask, advantages and the per-token logprobs the
    objective needs (old / reference only when every trajectory has them)."""
    width = max(len(t.ids) for t in trajs)
    b = len(trajs)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    mask = torch.zeros((b, width - 1))
    per_token = {"engine_logprobs": [t.sample.logprobs for t in trajs]}
    if all(t.old_logprobs is not None for t in trajs):
        per_token["old_logprobs"] = [t.old_logprobs or [] for t in trajs]
    if all(t.ref_logprobs is not None for t in trajs):
        per_token["ref_logprobs"] = [t.ref_logprobs or [] for t in trajs]
    out = {key: torch.zeros((b, width - 1)) for key in per_token}
    for i, t in enumerate(trajs):
        n, start = len(t.ids), len(t.prompt.ids) - 1
        input_ids[i, :n] = torch.tensor(t.ids)
        attention_mask[i, :n] = 1
        mask[i, loss_positions(t, mask_truncated)] = 1.0
        for key, rows in per_token.items():
            out[key][i, start : start + len(rows[i])] = torch.tensor(rows[i])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": mask, **out}
    batch["advantages"] = torch.tensor([t.advantage for t in trajs], dtype=torch.float32)
    if trajs[0].prompt.source.vision is not None:
        batch |= _vision(trajs, width)
    return batch


def _vision(trajs: list[Trajectory], width: int) -> dict[str, torch.Tensor]:
    visions = [t.prompt.source.vision or {} for t in trajs]
    types = torch.zeros((len(trajs), width), dtype=torch.long)
    for i, v in enumerate(visions):
        prompt_types = v["mm_token_type_ids"][0]
        types[i, : len(prompt_types)] = prompt_types
    out = {"mm_token_type_ids": types}
    for key in ("pixel_values", "image_grid_thw"):
        parts = [v[key] for v in visions if key in v]
        if parts:
            out[key] = torch.cat(parts)
    return out


def response_logprobs(t: Trajectory, row: torch.Tensor) -> list[float]:
    """The response tokens' values from a [T-1] learner-layout row."""
    start = len(t.prompt.ids) - 1
    return [float(x) for x in row[start : start + len(t.response)]]
