"""RL data between the engines and the learners, one typed value per phase:

    Episode (rollout.episodes) → Scored (rewards) → Experience (advantage, old / reference logprobs)
            → learner batch (`collate`)

Per-token arrays use the learner layout (`Learner.logprobs`, posttrain.loss_head): position t of a sequence
predicts token t+1, so response token j of a prompt of P tokens sits at position P - 1 + j.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.rollout.episodes import Episode


@dataclass(frozen=True)
class Scored:
    """An episode with its rewards: `reward` is the total (overlong penalty included), `valid` False when
    a reward failed on it."""

    episode: Episode
    group: int
    rewards: dict[str, float | None]
    reward: float
    valid: bool


@dataclass(frozen=True)
class Experience:
    """A scored episode ready for the update: the reward its advantage came from (KL penalty included
    when `algorithm.kl_in_reward`), the advantage, and the logprobs the loss compares against (old:
    computed before the first of several updates; ref: the KL reference's)."""

    scored: Scored
    reward: float
    advantage: float
    old_logprobs: list[float] | None = None
    ref_logprobs: list[float] | None = None

    @property
    def episode(self) -> Episode:
        return self.scored.episode


# ---------------------------------------------------------------------------------------- learner side


def loss_positions(x: Experience, mask_truncated: bool) -> list[int]:
    """Positions (learner layout) of the response tokens that carry loss: sampled (not forced) tokens
    of a valid episode, none for one cut at a placeholder or (with `mask_truncated`) truncated."""
    e = x.episode
    if not x.scored.valid or e.placeholder or (mask_truncated and e.truncated):
        return []
    start, forced = len(e.prompt.ids) - 1, set(e.sample.forced)
    return [start + j for j in range(len(e.response)) if j not in forced]


def model_inputs(episodes: list[Episode], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt + response ids, attention mask and (VL) the prompts' vision inputs."""
    width = max(len(e.ids) for e in episodes)
    input_ids = torch.full((len(episodes), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(episodes), width), dtype=torch.long)
    for i, e in enumerate(episodes):
        input_ids[i, : len(e.ids)] = torch.tensor(e.ids)
        attention_mask[i, : len(e.ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if episodes[0].prompt.source.vision is not None:
        batch |= _vision(episodes, width)
    return batch


IMAGE_TOKEN_TYPE = 1  # `mm_token_type_ids` of an image pad (transformers' create_mm_token_type_ids)


def collate(experience: list[Experience], pad_id: int, mask_truncated: bool) -> dict[str, torch.Tensor]:
    """The learner batch of the RL objective: model inputs, response_mask, advantages and the per-token
    logprobs it needs (old / reference only when every episode has them)."""
    batch = model_inputs([x.episode for x in experience], pad_id)
    b, width = batch["input_ids"].shape
    mask = torch.zeros((b, width - 1))
    per_token = {"engine_logprobs": [x.episode.sample.logprobs for x in experience]}
    if all(x.old_logprobs is not None for x in experience):
        per_token["old_logprobs"] = [x.old_logprobs or [] for x in experience]
    if all(x.ref_logprobs is not None for x in experience):
        per_token["ref_logprobs"] = [x.ref_logprobs or [] for x in experience]
    out = {key: torch.zeros((b, width - 1)) for key in per_token}
    for i, x in enumerate(experience):
        start = len(x.episode.prompt.ids) - 1
        mask[i, loss_positions(x, mask_truncated)] = 1.0
        for key, rows in per_token.items():
            out[key][i, start : start + len(rows[i])] = torch.tensor(rows[i])
    batch |= {"response_mask": mask, **out}
    batch["advantages"] = torch.tensor([x.advantage for x in experience], dtype=torch.float32)
    return batch


def _vision(episodes: list[Episode], width: int) -> dict[str, torch.Tensor]:
    """Token types and every image's inputs, in the order of their pads: per episode the prompt's
    images, then those its tools returned."""
    types = torch.zeros((len(episodes), width), dtype=torch.long)
    parts: dict[str, list[torch.Tensor]] = {"pixel_values": [], "image_grid_thw": []}
    for i, e in enumerate(episodes):
        prompt = e.prompt.source.vision or {}
        prompt_types = prompt["mm_token_type_ids"][0]
        types[i, : len(prompt_types)] = prompt_types
        parts["pixel_values"] += [prompt["pixel_values"]] if "pixel_values" in prompt else []
        parts["image_grid_thw"] += [prompt["image_grid_thw"]] if "image_grid_thw" in prompt else []
        if e.tool_images is not None:  # their pads are forced tokens of the response
            pads = [j for j in e.sample.forced if e.response[j] == e.tool_images.pad_id]
            types[i, [len(prompt_types) + j for j in pads]] = IMAGE_TOKEN_TYPE
            parts["pixel_values"].append(e.tool_images.pixel_values)
            parts["image_grid_thw"].append(e.tool_images.image_grid_thw)
    return {"mm_token_type_ids": types} | {k: torch.cat(v) for k, v in parts.items() if v}


def response_logprobs(e: Episode, row: torch.Tensor) -> list[float]:
    """The response tokens' values from a [T-1] learner-layout row."""
    start = len(e.prompt.ids) - 1
    return [float(x) for x in row[start : start + len(e.response)]]
