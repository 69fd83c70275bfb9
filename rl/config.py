"""`posttrain rl` configuration: prompts, rollout engines, rewards, the algorithm and the learners.

Algorithms are chosen by name (`algorithm.type`); the name is a preset of the pieces below it, and any
piece set explicitly overrides the preset. Imports only pydantic (see posttrain.config).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from posttrain.config import DatasetSpec, OptimConfig, SFTInit, Strict, TrainingStage, check_fits
from posttrain.rewards.config import RewardsConfig
from posttrain.rollout.config import RolloutConfig, ToolsConfig, check_weight_transfer

Advantage = Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"]
PolicyLoss = Literal["ppo", "gspo", "sapo"]
Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
KLEstimator = Literal["k1", "k2", "k3"]
ISLevel = Literal["token", "sequence"]
ISMode = Literal["truncate", "mask"]
"""The names each choice accepts: the one source of truth (rl/losses.py and rl/advantages.py read them)."""

PRESETS: dict[str, dict[str, Any]] = {
    "grpo": {"advantage": "grpo", "policy_loss": "ppo", "aggregation": "seq_mean_token_mean"},
    "dr_grpo": {"advantage": "dr_grpo", "policy_loss": "ppo", "aggregation": "seq_mean_token_sum_norm"},
    "dapo": {
        "advantage": "grpo",
        "policy_loss": "ppo",
        "aggregation": "token_mean",
        "clip_high": 0.28,
        "dynamic_sampling": True,
    },
    "gspo": {
        "advantage": "grpo",
        "policy_loss": "gspo",
        "aggregation": "seq_mean_token_mean",
        "clip_low": 3e-4,
        "clip_high": 4e-4,
    },
    "sapo": {"advantage": "grpo", "policy_loss": "sapo", "aggregation": "token_mean"},
    "rloo": {"advantage": "rloo", "policy_loss": "ppo", "aggregation": "seq_mean_token_mean"},
    "reinforce_pp": {"advantage": "reinforce_pp", "policy_loss": "ppo", "aggregation": "token_mean"},
}
"""What each `algorithm.type` sets; the rest keeps the field defaults."""


class ImportanceSampling(Strict):
    """Correct the train/inference mismatch: weight each token's loss by learner/engine probability."""

    level: ISLevel = "token"
    """Per token, or one ratio per sequence (geometric mean of its token ratios)."""
    mode: ISMode = "truncate"
    """`truncate`: weight min(ratio, cap); `mask`: weight 0 where the ratio is outside [1/cap, cap]."""
    cap: float = Field(2.0, gt=1.0)
    """Truncation / masking threshold."""


class AlgorithmConfig(Strict):
    type: Literal["grpo", "dr_grpo", "dapo", "gspo", "sapo", "rloo", "reinforce_pp"] = "grpo"
    """Preset: grpo, dr_grpo, dapo (clip-higher + dynamic sampling + token mean), gspo (sequence ratio),
    sapo (soft gate, the Qwen3-VL RL algorithm), rloo, reinforce_pp. Fields set below override it."""
    advantage: Advantage = "grpo"
    """Group advantage estimator (default: the preset's)."""
    policy_loss: PolicyLoss = "ppo"
    """`ppo` token ratio with clip, `gspo` sequence ratio with clip, `sapo` soft gate (default: preset's)."""
    aggregation: Aggregation = "seq_mean_token_mean"
    """How token losses become one number (default: the preset's)."""
    clip_low: float = Field(0.2, gt=0)
    """Lower clip range: ratios below 1 - clip_low stop pushing down (default 0.2; gspo 3e-4)."""
    clip_high: float = Field(0.2, gt=0)
    """Upper clip range: ratios above 1 + clip_high stop pushing up (default 0.2; dapo 0.28; gspo 4e-4)."""
    sapo_tau_pos: float = Field(1.0, gt=0)
    """SAPO gate temperature for positive advantages."""
    sapo_tau_neg: float = Field(1.05, gt=0)
    """SAPO gate temperature for negative advantages (larger: negative updates fade faster)."""
    entropy_coef: float = Field(0.0, ge=0)
    """Entropy bonus weight (0: off; entropy is logged either way)."""
    kl_coef: float = Field(0.0, ge=0)
    """Weight of the KL to the reference model (0: no reference model is run)."""
    kl_estimator: KLEstimator = "k3"
    """Per-token KL estimator."""
    kl_in_reward: bool = False
    """Subtract kl_coef × KL (k1, summed over the response) from the reward instead of adding it to the loss."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and sample more prompts to refill the batch."""
    max_sampling_rounds: int = Field(3, ge=1)
    """Generation rounds per step with dynamic sampling; after the last, the batch trains as it is."""
    mask_truncated: bool = False
    """Leave responses cut at `rollout.max_tokens` out of the loss (overlong filtering)."""
    overlong_buffer: int | None = Field(None, ge=1)
    """DAPO soft overlong penalty: over the last N tokens before `rollout.max_tokens` the reward falls
    linearly to -overlong_penalty (None: off)."""
    overlong_penalty: float = Field(1.0, ge=0)
    """Size of the soft overlong penalty."""
    importance_sampling: ImportanceSampling | None = None
    """Truncated / masked importance sampling against the engines' logprobs (None: off)."""

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        """The preset of `type` fills the keys the config leaves out (before validation, so every field
        holds a concrete value and an explicit key always wins)."""
        if isinstance(data, dict):
            return {**PRESETS.get(data.get("type", "grpo"), {}), **data}
        return data


class RLData(Strict):
    prompts: list[DatasetSpec] = Field(min_length=1)
    """Prompt datasets (`messages` rows: the final assistant turn, if any, is dropped; other columns such
    as `solution` are passed to the rewards). Each spec's `thinking` picks the chat template per
    dataset or per row."""
    eval: DatasetSpec | None = None
    """Held-out split for `eval/accuracy` (greedy generation on the engines, exact match with `solution`)."""
    max_prompt_length: int = Field(512, ge=1)
    """Longer prompts (image tokens included) stop the run at preflight, naming the row."""


class RLTrainConfig(OptimConfig):
    max_steps: int = Field(100, ge=1)
    """RL steps (each: rollouts, rewards, updates, weight sync)."""
    prompts_per_step: int = Field(16, ge=1)
    """Prompts sampled per step; each gets `rollout.samples_per_prompt` responses."""
    mini_batches: int = Field(1, ge=1)
    """Optimizer steps per RL step (the batch split in this many parts)."""
    epochs_per_batch: int = Field(1, ge=1)
    """Passes over the step's batch (> 1, or mini_batches > 1, makes later updates off-policy: the loss
    then uses logprobs recomputed before the first update as the old policy)."""
    micro_batch_size: int = Field(16, ge=1)
    """Sequences per forward/backward on one learner."""
    async_rollout: bool = False
    """Generate step k+1's rollouts while step k trains (one step off-policy; staleness is logged)."""
    accuracy_reward: str | None = None
    """Reward whose mean is logged as `train/accuracy` (default: the first reward)."""


class ReferenceConfig(Strict):
    """The frozen reference policy for the KL term (only started when `algorithm.kl_coef` > 0; LoRA runs
    use the base model with the adapter disabled instead)."""

    num_workers: int = Field(1, ge=1)
    """Reference actors; sequences are split over them."""
    cpus_per_worker: float = Field(1, gt=0)
    """CPUs per reference actor."""
    gpus_per_worker: float = Field(1, ge=0)
    """GPUs per reference actor when on CUDA."""


class RLConfig(TrainingStage):
    stage = "rl"
    init_from_sft: SFTInit | None = None
    """How to build `model.path` when it is missing (else it must exist or be a hub id)."""
    data: RLData
    rollout: RolloutConfig = RolloutConfig()
    rewards: RewardsConfig
    tools: ToolsConfig | None = None
    """Multi-turn tool use (None: one response per prompt). Prompts declare the tools' schemas, rewards
    score each episode's final turn, and the loss covers only the tokens the model sampled."""
    algorithm: AlgorithmConfig = AlgorithmConfig()
    reference: ReferenceConfig = ReferenceConfig()
    train: RLTrainConfig = RLTrainConfig()

    @property
    def samples_per_step(self) -> int:
        return self.train.prompts_per_step * self.rollout.samples_per_prompt

    @property
    def response_limit(self) -> int:
        """The most response tokens of one episode (every turn of a tool episode)."""
        return self.tools.max_episode_tokens if self.tools else self.rollout.max_tokens

    @property
    def optimizer_batch(self) -> tuple[int, int, str]:
        per_update = self.samples_per_step // self.train.mini_batches
        return per_update, self.train.micro_batch_size, "train.prompts_per_step"

    @property
    def optimizer_steps(self) -> int:
        """Learning-rate schedule length."""
        return self.train.max_steps * self.train.mini_batches * self.train.epochs_per_batch

    @model_validator(mode="before")
    @classmethod
    def _mini_batches_divide(cls, data: Any) -> Any:
        """Checked before the shared batch rule so the message names the RL keys."""
        try:
            train, rollout = data.get("train", {}), data.get("rollout", {})
            prompts, mini = int(train.get("prompts_per_step", 16)), int(train.get("mini_batches", 1))
            n = int(rollout.get("samples_per_prompt", 8))
        except (AttributeError, TypeError, ValueError):
            return data  # field validation reports the bad value
        if prompts % mini:
            raise ValueError(
                f"train.prompts_per_step ({prompts}) must be a multiple of train.mini_batches ({mini})"
            )
        micro = int(train.get("micro_batch_size", 16))
        learners = int((data.get("learners") or {}).get("num_learners", 1))
        if (prompts * n // mini) % (micro * learners):
            raise ValueError(
                f"train.prompts_per_step × rollout.samples_per_prompt / train.mini_batches "
                f"({prompts} × {n} / {mini} = {prompts * n // mini} sequences per update) must be a "
                f"multiple of train.micro_batch_size × learners.num_learners ({micro} × {learners})"
            )
        return data

    @model_validator(mode="after")
    def _consistent(self) -> RLConfig:
        if self.init_from_sft and Path(self.model.path).name != "final":
            raise ValueError(
                f"model.path ({self.model.path}) must end in /final when init_from_sft is set: "
                "it is the SFT run's exported model"
            )
        keys = [spec.key for spec in self.rewards.rewards]
        if self.train.accuracy_reward is not None and self.train.accuracy_reward not in keys:
            raise ValueError(f"train.accuracy_reward {self.train.accuracy_reward!r} is not one of {keys}")
        sampled = {
            "data.max_prompt_length": self.data.max_prompt_length,
            "tools.max_episode_tokens" if self.tools else "rollout.max_tokens": self.response_limit,
        }
        check_fits(sampled, "rollout.max_model_len", self.rollout.max_model_len)
        if self.rollout.colocate:
            _check_colocation(self)
        check_weight_transfer(self.rollout, self.device)
        return self


def _check_colocation(cfg: RLConfig) -> None:
    """What `rollout.colocate` needs: one engine per learner, generation and training never at the same
    time, a DeepSpeed optimizer with `offload_states` on a GPU, and nothing else on the shared device."""
    rollout, learners = cfg.rollout, cfg.learners
    if rollout.num_engines != learners.num_learners:
        raise ValueError(
            f"rollout.colocate pairs learner rank i with engine i on device i: rollout.num_engines "
            f"({rollout.num_engines}) must equal learners.num_learners ({learners.num_learners})"
        )
    if cfg.train.async_rollout:
        raise ValueError(
            "train.async_rollout generates while the learners train, but with rollout.colocate they share "
            "the device and take turns: set train.async_rollout: false or rollout.colocate: false"
        )
    if rollout.gpu_memory_utilization is not None:
        raise ValueError(
            "rollout.gpu_memory_utilization is derived with rollout.colocate (the device's memory minus "
            "what the learner keeps resident while the engine is awake): remove it"
        )
    if cfg.model.lora is not None and rollout.sleep_level == 2:
        raise ValueError(
            "rollout.sleep_level: 2 drops the engine's weights, but a LoRA sync sends the adapter only and "
            "the base would be lost: use rollout.sleep_level: 1 with model.lora"
        )
    if cfg.algorithm.kl_coef > 0 and cfg.model.lora is None:
        raise ValueError(
            "rollout.colocate has no place for a separate reference model (algorithm.kl_coef > 0 without "
            "model.lora): set algorithm.kl_coef: 0, or train model.lora (its reference is the base model)"
        )
    if cfg.device != "cpu":
        needed = 2 if cfg.model.dtype == "bfloat16" else 1
        if learners.zero_stage < needed:
            raise ValueError(
                f"rollout.colocate offloads the optimizer states with DeepSpeed's offload_states, which only "
                f"ZeRO optimizers have: set learners.zero_stage >= {needed}"
                + (
                    " (with bfloat16, ZeRO-1 runs DeepSpeed's BF16_Optimizer, which has none)"
                    if needed == 2
                    else ""
                )
            )
