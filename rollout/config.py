"""Rollout configuration: how engines sample (`SamplingConfig`, shared by every generation) and the
policy's engines (RL's, on-policy distillation's student's). Imports only pydantic (see posttrain.config)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from posttrain.config import EngineSettings, Strict
from posttrain.weight_transfer import TransferBackend


class SamplingConfig(Strict):
    """How an engine samples responses: RL's rollouts, the on-policy student, off-policy teacher data."""

    samples_per_prompt: int = Field(1, ge=1)
    """Responses per prompt."""
    max_tokens: int = Field(256, ge=1)
    """Response length limit."""
    temperature: float = Field(1.0, ge=0)
    """Sampling temperature (0: greedy)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling."""
    top_k: int = Field(0, ge=0)
    """Top-k sampling (0: off)."""
    thinking_budget: int | None = Field(None, ge=1)
    """Close the think block after this many generated tokens and let the answer follow."""


class RolloutConfig(EngineSettings, SamplingConfig):
    """vLLM engines that serve the policy being trained, and how they sample."""

    num_engines: int = Field(1, ge=1)
    """Engine actors (each a full copy of the policy)."""
    cpus_per_engine: float = Field(1, gt=0)
    """CPUs reserved per engine."""
    max_model_len: int = Field(1024, ge=16)
    """Prompt + response tokens an engine accepts."""
    samples_per_prompt: int = Field(8, ge=2)
    """Responses per prompt (the group size of the advantage)."""
    sync: Literal["stream", "bulk"] = "stream"
    """Weight sync: `stream` keeps two buckets in flight (bounded shared memory; the engines copy each
    bucket out before loading it), `bulk` sizes shared memory for every bucket, so the learner never waits
    and the engines load straight from it."""
    weight_transfer: TransferBackend = "shm"
    """vLLM weight-transfer backend the engines receive full weights with: `shm`, posttrain's
    shared-memory backend (learner rank 0 and the engines on one host; CPU or GPU engines); on CUDA,
    vLLM's `ipc` (learner and engine on one GPU: needs `colocate`) or `nccl` (engines on other GPUs or
    nodes: not with `colocate`), which send from the learners' GPUs (not yet run on a GPU)."""
    bucket_mb: float = Field(64, gt=0)
    """Weight-sync bucket size."""
    probe_atol: float | None = Field(None, gt=0)
    """After each sync the engines' logprobs of a fixed sequence must match the learners' within this
    plus twice the difference measured on identical weights at the start (default by `model.dtype`:
    1e-4 for float32, 0.05 for bfloat16)."""
    sync_timeout_s: float = Field(600, gt=0)
    """An engine not confirming a weight version within this fails the run (WeightSyncError)."""
    colocate: bool = False
    """Learner rank i and engine i share device i (one placement group, one bundle per pair): the engines
    sleep while the learners train, the learners offload their optimizer states while the engines generate
    (rollout/colocate.py). Needs `num_engines` == `learners.num_learners`; the engines' memory share is
    derived from what the learners keep resident (`gpu_memory_utilization` must stay unset)."""
    sleep_level: Literal[1, 2] = 1
    """With `colocate`: vLLM's sleep level while the learners train. 1 keeps the weights in host memory
    (required for LoRA: its sync sends the adapter only); 2 drops them, which is safe because every wake is
    followed by a full weight sync proved by checksums and the probe."""


class ToolsConfig(Strict):
    """Multi-turn tool use: the model calls tools in Qwen3's `<tool_call>` format, each answer is appended
    as the chat template's tool turn, and generation resumes, until a turn without calls or a limit."""

    names: list[str] = Field(min_length=1)
    """Tools offered to the model (their schemas go to the chat template's `tools=`): a built-in
    (`calculator`, `crop_zoom`), an entry point in the group `posttrain.tools`, `module:function`, or
    `path/to/file.py:function`."""
    timeout_s: float = Field(10.0, gt=0)
    """Time limit of one call: a tool past it is killed and the model reads an error as its answer."""
    parallel_calls: int = Field(2, ge=1)
    """Calls running at once per engine (its tool worker processes; one more stands by)."""
    max_turns: int = Field(4, ge=1)
    """Assistant turns per episode; an episode still calling tools after the last one is truncated."""
    max_tool_answer_tokens: int = Field(256, ge=1)
    """Text tokens of one tool answer; a longer one is cut and marked `[truncated]`."""
    max_episode_tokens: int = Field(1024, ge=1)
    """Response tokens of an episode, sampled and tool turns together (`max_tokens` limits each turn);
    an episode that reaches it is truncated."""


def check_weight_transfer(rollout: RolloutConfig, device: str) -> None:
    """Where `rollout.weight_transfer` cannot work, a ValueError naming the keys to change (`device`: the
    stage's, "auto" passes here and is checked once resolved, by `start_policy_engines`)."""
    backend = rollout.weight_transfer
    if backend == "shm":
        return
    if device == "cpu":
        raise ValueError(
            f"rollout.weight_transfer: {backend} moves weights between CUDA devices, but device is cpu: "
            "use rollout.weight_transfer: shm, or device: cuda"
        )
    if backend == "ipc" and not rollout.colocate:
        raise ValueError(
            "rollout.weight_transfer: ipc shares the learner's GPU memory with an engine on the same GPU, "
            "which needs rollout.colocate: true; engines on their own GPUs take rollout.weight_transfer: nccl"
        )
    if backend == "nccl" and rollout.colocate:
        raise ValueError(
            "rollout.weight_transfer: nccl cannot connect a learner and an engine on the same GPU "
            "(rollout.colocate: true): use rollout.weight_transfer: ipc"
        )
