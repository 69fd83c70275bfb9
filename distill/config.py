"""`posttrain distill` configuration: the teacher, the student (`model`), the data, the divergence and the
mode (offline store, online top-k, on-policy, off-policy). Imports only pydantic (see posttrain.config).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from posttrain.config import (
    DatasetSpec,
    EngineSettings,
    OptimConfig,
    SFTInit,
    Strict,
    TrainingStage,
    check_fits,
)
from posttrain.rewards.config import RewardsConfig
from posttrain.rollout.config import RolloutConfig, SamplingConfig, check_weight_transfer

MAX_TOP_K = 20
"""vLLM's `max_logprobs` as the rollout engines start it: the most top-k entries a teacher reports."""


Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
"""The divergences `loss.type` accepts (distill/losses.py reads them from here)."""


class TeacherConfig(EngineSettings):
    """The teacher model and the vLLM engines that serve it (never trained, never synced)."""

    path: str
    """A local Hugging Face folder or a hub id. Must share the student's tokenizer (checked up front)."""
    init_from_sft: SFTInit | None = None
    """Build the teacher by running this SFT config when `path` is missing (`path` must end in /final)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Precision the teacher engines run in."""
    trust_remote_code: bool = False
    """Allow the teacher's repository to run its own Python code."""
    num_engines: int = Field(1, ge=1)
    """Teacher engine actors; requests are split over them."""
    cpus_per_engine: float = Field(1, gt=0)
    """CPUs reserved per teacher engine."""
    max_model_len: int = Field(1024, ge=16)
    """Longest sequence the teacher scores (prompt + response)."""
    batch_size: int = Field(256, ge=1)
    """Sequences per request to the engines (scoring for capture and online top-k; prompts for
    off_policy generation)."""

    @model_validator(mode="after")
    def _final(self) -> TeacherConfig:
        if self.init_from_sft and Path(self.path).name != "final":
            raise ValueError(
                f"teacher.path ({self.path}) must end in /final when teacher.init_from_sft is set: "
                "it is the SFT run's exported model"
            )
        return self


class LossConfig(Strict):
    """Which divergence between the teacher's and the student's next-token distributions is minimised."""

    type: Divergence = "forward_kl"
    """`forward_kl` KL(teacher || student), mode-covering; `reverse_kl` KL(student || teacher),
    mode-seeking; `jsd` generalised Jensen-Shannon with mixing `beta` (GKD)."""
    beta: float = Field(0.5, ge=0, le=1)
    """JSD mixing coefficient (TRL's convention: 0 is forward KL, 1 reverse KL; only used by `jsd`)."""
    top_k: int = Field(16, ge=1, le=MAX_TOP_K)
    """Teacher top-k per token; the remaining probability mass is one tail bucket."""
    estimator: Literal["topk", "sampled"] = "topk"
    """`topk`: the divergence over the teacher's top-k plus the tail bucket. `sampled` (on_policy with
    reverse_kl only): reverse KL on the student's sampled tokens, needing only the teacher's logprob of
    each sampled token (score-function gradient; see distill.losses.reverse_kl_sampled)."""
    nll_weight: float = Field(0.0, ge=0)
    """Also add this × the token NLL of the data's own response tokens (offline / online modes: the gold
    responses; 0: pure distillation)."""


class DistillData(Strict):
    train: list[DatasetSpec] = Field(min_length=1)
    """offline / online: chat datasets with responses (encoded as SFT samples: prompt + response, the loss on
    the response). on_policy / off_policy: prompt datasets (a final assistant turn, if any, is dropped)."""
    eval: DatasetSpec | None = None
    """Held-out split for `eval/accuracy` (greedy generation, exact match with `solution`)."""
    max_length: int = Field(1024, ge=8)
    """Maximum tokens per sequence (offline / online)."""
    overlong: Literal["error", "drop", "truncate"] = "error"
    """Sequences longer than `max_length`: stop with an error, drop them, or cut the response end."""
    bad_rows: Literal["error", "skip"] = "error"
    """Rows failing validation: stop naming file/row/column, or skip them."""
    max_prompt_length: int = Field(512, ge=1)
    """Longest prompt (on_policy / off_policy); a longer one stops the run at preflight, naming the row."""


class StoreConfig(Strict):
    """The offline top-k store (see distill.topk_store for its layout)."""

    dir: str | None = None
    """Store folder; default `output_dir/topk`. A finished store is reused (capture is skipped), so many
    students can train from one capture; a folder without a manifest is an unfinished capture and is
    captured again."""
    shard_rows: int = Field(1024, ge=1)
    """Sequences per shard file."""


class DistillTrainConfig(OptimConfig):
    global_batch_size: int = Field(32, ge=1)
    """Sequences per optimizer step across all learners (on_policy: prompts per step × samples)."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per forward/backward on one learner."""
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps (default: `epochs` over the data; required for on_policy)."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training sequences when `max_steps` is not set (offline / online)."""


class StudentRollout(RolloutConfig):
    """The student's vLLM engines (on_policy): they sample the sequences the teacher then scores, and get
    the learners' weights after every step."""

    samples_per_prompt: int = Field(1, ge=1)
    """Responses per prompt."""


class OffPolicyConfig(SamplingConfig):
    """Teacher generations written as a `messages` dataset the SFT stage trains on (each kept response a
    row; responses cut at `max_tokens` are dropped)."""

    temperature: float = Field(0.0, ge=0)
    """Sampling temperature (0: greedy)."""
    modes: list[Literal["thinking", "non_thinking", "dataset"]] = ["dataset"]
    """Chat modes each prompt is rendered in: `dataset` keeps the prompt's own (its spec's `thinking`);
    list `thinking` and `non_thinking` to get both variants of every prompt."""
    rewards: RewardsConfig | None = None
    """A verifiable reward; responses scoring below `min_reward` (or invalid) are left out."""
    min_reward: float = 1.0
    """Keep responses whose total reward is at least this."""
    output: str | None = None
    """Where the dataset is written (`train.parquet`); default `output_dir/data`."""
    then_sft: SFTInit | None = None
    """Afterwards run this SFT config on the written data with the student (`model`), writing to
    `output_dir/sft` (its data.train and model.path are set here)."""


class DistillConfig(TrainingStage):
    stage = "distill"
    mode: Literal["offline", "online", "on_policy", "off_policy"] = "offline"
    """`offline`: capture the teacher's top-k over the training sequences into `store` once, then train
    from the files (teacher not in memory). `online`: the teacher engines compute the same top-k for each
    batch (no store). `on_policy`: the student's engines sample, the teacher scores the student's tokens.
    `off_policy`: the teacher generates responses, written as an SFT dataset."""
    teacher: TeacherConfig
    data: DistillData
    loss: LossConfig = LossConfig()
    store: StoreConfig = StoreConfig()
    rollout: StudentRollout = StudentRollout()
    off_policy: OffPolicyConfig = OffPolicyConfig()
    train: DistillTrainConfig = DistillTrainConfig()

    @property
    def optimizer_batch(self) -> tuple[int, int, str]:
        return self.train.global_batch_size, self.train.micro_batch_size, "train.global_batch_size"

    @property
    def prompts_per_step(self) -> int:
        return self.train.global_batch_size // self.rollout.samples_per_prompt

    @property
    def store_dir(self) -> Path:
        return Path(self.store.dir or Path(self.output_dir) / "topk")

    @model_validator(mode="after")
    def _consistent(self) -> DistillConfig:
        loss, mode = self.loss, self.mode
        if loss.estimator == "sampled" and (mode != "on_policy" or loss.type != "reverse_kl"):
            raise ValueError(
                f"loss.estimator=sampled needs mode=on_policy and loss.type=reverse_kl (got mode={mode}, "
                f"loss.type={loss.type}); use loss.estimator=topk"
            )
        if self.rollout.colocate:
            raise ValueError(
                "rollout.colocate is supported by `posttrain rl` only so far (on-policy distillation's "
                "teacher engines would need a share of the device too): set rollout.colocate: false"
            )
        check_weight_transfer(self.rollout, self.device)
        if mode == "on_policy":
            if self.train.max_steps is None:
                raise ValueError("mode=on_policy needs train.max_steps")
            if self.train.global_batch_size % self.rollout.samples_per_prompt:
                raise ValueError(
                    f"train.global_batch_size ({self.train.global_batch_size}) must be a multiple of "
                    f"rollout.samples_per_prompt ({self.rollout.samples_per_prompt})"
                )
            sampled = {
                "data.max_prompt_length": self.data.max_prompt_length,
                "rollout.max_tokens": self.rollout.max_tokens,
            }
            check_fits(sampled, "rollout.max_model_len", self.rollout.max_model_len)
            check_fits(sampled, "teacher.max_model_len", self.teacher.max_model_len)
            if loss.nll_weight:
                raise ValueError(
                    "loss.nll_weight needs gold responses: mode offline or online, not on_policy"
                )
        if mode in ("offline", "online"):
            check_fits(
                {"data.max_length": self.data.max_length},
                "teacher.max_model_len",
                self.teacher.max_model_len,
                ": the teacher must score whole sequences",
            )
        if mode == "off_policy":
            generated = {
                "data.max_prompt_length": self.data.max_prompt_length,
                "off_policy.max_tokens": self.off_policy.max_tokens,
            }
            check_fits(generated, "teacher.max_model_len", self.teacher.max_model_len)
        return self
