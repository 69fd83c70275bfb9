"""The generation side of the on-policy loops (RL, on-policy distillation): prompts, the stream that serves
them, the engines that sample them and the episodes that come back.

    sync = policy_sync(cfg, cfg.rollout, learners, engines, tokenizer, out)  # calibrated now
    rollouts = Rollouts(engines, sync, prompts, cfg.rollout, seed, stop_ids, placeholders)
    episodes = rollouts.take(16)           # the next 16 prompts of the stream, sampled (or prefetched)
    rollouts.prefetch(16)                  # async: the next batch generates while this one trains
    sync_metrics = rollouts.push_weights() # the learners' new weights to the engines, proved

Token ids flow end to end: the engine's sampled ids are appended to the learner's prompt ids (never
decoded and re-encoded). Each request's prompt and sampling seed are pure functions of (seed, position in
the stream), and the position (plus a prefetched batch) is checkpointed, so a resumed run repeats the
uninterrupted one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from posttrain.config import ConfigError, TrainingStage
from posttrain.data.errors import DataError
from posttrain.data.order import epoch_order
from posttrain.data.processing import tokenizer_of
from posttrain.data.prompts import EvalPrompt, build_eval_prompts
from posttrain.data.rows import Needs
from posttrain.groups import LearnerGroup
from posttrain.rollout.config import RolloutConfig, SamplingConfig, ToolsConfig
from posttrain.rollout.engine import RolloutGroup, sampled_request
from posttrain.rollout.evaluation import EvalSet
from posttrain.rollout.samples import (
    RolloutRequest,
    RolloutResult,
    RolloutSample,
    decode_images,
    encode_images,
)
from posttrain.rollout.weight_sync import PROBE_ATOL, WeightSync
from posttrain.workers import SharedPlacement, resolve_device

IMAGE_PAD = "<|image_pad|>"
VISION_PLACEHOLDERS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
PENDING_FILE = "pending_rollouts.json"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The `max_lora_rank` values vLLM accepts; engines take the smallest that fits `model.lora.r`."""


class RolloutError(RuntimeError):
    """An engine died or stopped answering during generation."""


@dataclass(frozen=True)
class Prompt:
    """A validated prompt: learner ids (image pads expanded) and engine ids (one pad per image)."""

    source: EvalPrompt
    engine_ids: list[int]

    @property
    def ids(self) -> list[int]:
        return self.source.prompt_ids


@dataclass(frozen=True)
class ToolImages:
    """The learner inputs of the images a tool episode's tools returned, in order."""

    pixel_values: Any  # torch.Tensor [patches, dim]
    image_grid_thw: Any  # torch.Tensor [images, 3]
    pad_id: int  # their pads in the response


@dataclass(frozen=True)
class Episode:
    """One sampled response to a prompt, as the engine produced it, in the learner's layout: a tool
    episode's response holds every turn (tool turns forced) with the image pads of tool-returned images
    expanded as the processor expands the prompt's, and `tool_images` holds those images' inputs."""

    prompt: Prompt
    sample: RolloutSample
    weight_version: int
    placeholder: bool = False  # cut at a sampled vision placeholder (see `episodes_of`)
    tool_images: ToolImages | None = None

    @property
    def response(self) -> list[int]:
        return self.sample.token_ids

    @property
    def final_response(self) -> list[int]:
        """The last assistant turn (the whole response of a single-turn episode): what rewards score."""
        starts = self.sample.turn_starts
        return self.sample.token_ids[starts[-1] :] if starts else self.sample.token_ids

    @property
    def ids(self) -> list[int]:
        return self.prompt.ids + self.sample.token_ids

    @property
    def truncated(self) -> bool:
        return self.sample.finish_reason == "length"


def build_prompts(
    specs: list[Any],
    processing: Any,
    is_vl: bool,
    max_prompt_length: int,
    needs: Needs,
    tools: list[dict[str, Any]] | None = None,
) -> list[Prompt]:
    """Every row of every prompt dataset, validated up front: a prompt that is too long, whose image
    tokens do not match its image features, or without a column in `needs` (the rewards') stops the run
    naming the dataset and row. `tools`: the tool schemas the prompts declare."""
    tok = tokenizer_of(processing)
    prompts = []
    for spec in specs:
        for p in build_eval_prompts(spec, processing, needs=needs, tools=tools):
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
    prompts: list[Prompt], positions: range, seed: int, rollout: SamplingConfig, stop_ids: list[int]
) -> tuple[list[Prompt], list[RolloutRequest]]:
    """The prompts at stream `positions` and their requests; each request's sampling seed is a function
    of (seed, position), so a resumed run samples the same tokens."""
    chosen = [prompts[prompt_order(len(prompts), seed, pos)] for pos in positions]
    requests = [
        replace(
            sampled_request(
                rollout, p.engine_ids, stop_ids, (seed * 1_000_003 + pos) % 2**31, p.source.images or None
            ),
            thinking=p.source.mode == "thinking",
        )
        for p, pos in zip(chosen, positions, strict=True)
    ]
    return chosen, requests


def episodes_of(
    prompts: list[Prompt],
    results: list[RolloutResult],
    placeholders: frozenset[int] | set[int] = frozenset(),
    processing: Any = None,
) -> list[Episode]:
    """One per sample, grouped by prompt. A VL model may sample an image/video placeholder token, which
    the learner's forward would try to match with image features: such a response is cut before it and
    marked (it carries no loss). Tool-returned images (forced pads) are expanded with `processing`."""
    out = []
    for p, r in zip(prompts, results, strict=True):
        for s in r.samples:
            forced = set(s.forced)
            cut = next((j for j, t in enumerate(s.token_ids) if t in placeholders and j not in forced), None)
            if cut is not None:
                s = replace(s, token_ids=s.token_ids[:cut], logprobs=s.logprobs[:cut], images=[])
                s = replace(s, forced=[j for j in s.forced if j < cut])
                out.append(Episode(p, s, r.weight_version, placeholder=True))
            elif s.images:
                out.append(with_tool_images(Episode(p, s, r.weight_version), processing))
            else:
                out.append(Episode(p, s, r.weight_version))
    return out


def with_tool_images(e: Episode, processing: Any) -> Episode:
    """`e` in the learner's layout: each tool-returned image's one pad (the engine's layout) expanded to
    its feature count, positions and logprobs shifted to match, and the images' vision inputs."""
    vision = dict(processing.image_processor(images=e.sample.images, return_tensors="pt"))
    merge = processing.image_processor.merge_size
    counts = iter((vision["image_grid_thw"].prod(-1) // merge**2).tolist())
    pad = tokenizer_of(processing).convert_tokens_to_ids(IMAGE_PAD)
    s, forced = e.sample, set(e.sample.forced)
    ids: list[int] = []
    logprobs: list[float] = []
    new_forced: list[int] = []
    where: list[int] = []  # each engine position's learner position
    for j, (t, lp) in enumerate(zip(s.token_ids, s.logprobs, strict=True)):
        where.append(len(ids))
        width = next(counts) if t == pad and j in forced else 1
        if j in forced:
            new_forced += range(len(ids), len(ids) + width)
        ids += [t] * width
        logprobs += [lp] * width
    sample = replace(
        s, token_ids=ids, logprobs=logprobs, forced=new_forced, turn_starts=[where[j] for j in s.turn_starts]
    )
    images = ToolImages(vision["pixel_values"], vision["image_grid_thw"], pad)
    return replace(e, sample=sample, tool_images=images)


def placeholder_ids(tokenizer: Any, is_vl: bool) -> set[int]:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_PLACEHOLDERS] if is_vl else []
    return {i for i in ids if isinstance(i, int) and i >= 0}


def start_policy_engines(
    cfg: TrainingStage,
    rollout: RolloutConfig,
    model_path: str,
    is_vl: bool,
    name: str,
    placement: SharedPlacement | None = None,
    memory_share: float | None = None,
) -> RolloutGroup:
    """The engines that serve the policy being trained (RL's, the on-policy student's): LoRA-enabled
    with the smallest rank vLLM accepts when the learners train an adapter. Colocated (`placement`):
    in the learners' bundles, with sleep mode and `memory_share` of each GPU (rollout/colocate.py)."""
    lora = cfg.model.lora
    colocated = {"gpu_memory_utilization": memory_share, "enable_sleep_mode": True} if placement else {}
    device = resolve_device(cfg.device)
    if device == "cpu" and rollout.weight_transfer != "shm":  # device: auto found no GPU
        raise ConfigError(
            f"rollout.weight_transfer: {rollout.weight_transfer} needs CUDA, and device {cfg.device} "
            "resolved to cpu here: use rollout.weight_transfer: shm"
        )
    return RolloutGroup(
        model_path,
        rollout.num_engines,
        num_cpus=rollout.cpus_per_engine,
        device=device,
        name=name,
        sync_timeout_s=rollout.sync_timeout_s,
        ray_address=cfg.ray.address,
        placement=placement,
        weight_transfer=rollout.weight_transfer,
        max_model_len=rollout.max_model_len,
        **{**rollout.group_kwargs(), **colocated},
        dtype=cfg.model.dtype,
        seed=cfg.train.seed,
        enable_lora=lora is not None,
        max_lora_rank=min((x for x in VLLM_LORA_RANKS if x >= lora.r), default=lora.r) if lora else 16,
        limit_images=4 if is_vl else None,
    )


def policy_sync(
    cfg: TrainingStage,
    rollout: RolloutConfig,
    learners: LearnerGroup,
    engines: RolloutGroup,
    tokenizer: Any,
    out: Path,
) -> WeightSync:
    """The weight sync of a policy's engines: the adapter for LoRA, else `rollout.sync`; the probe
    tolerance is `rollout.probe_atol` (default by `model.dtype`) on top of the learner-vs-engine
    difference calibrated now, on the starting weights."""
    return WeightSync.for_run(
        learners,
        engines,
        "adapter" if cfg.model.lora else rollout.sync,
        tokenizer,
        atol=rollout.probe_atol or PROBE_ATOL[cfg.model.dtype],
        bucket_mb=rollout.bucket_mb,
        adapters_dir=out / "adapters",
    )


@dataclass
class PendingRollouts:
    """Generation started for stream `positions`: engine refs until collected, then the results."""

    prompts: list[Prompt]
    positions: range
    refs: list[Any] | None = None
    results: list[RolloutResult] | None = None


class Rollouts:
    """The prompt stream, the engines sampling it, the weight sync keeping them on-policy, and the batch
    generating ahead (async). `state` / `restore` carry the stream position, the weight version and that
    batch through a checkpoint."""

    def __init__(
        self,
        engines: RolloutGroup,
        sync: WeightSync,
        prompts: list[Prompt],
        sampling: RolloutConfig,
        seed: int,
        stop_ids: list[int],
        placeholders: set[int] | None = None,
        tools: ToolsConfig | None = None,
        processing: Any = None,
    ) -> None:
        """`tools`: multi-turn tool episodes (None: single-turn); `processing`: the VL processor that
        expands tool-returned images for the learners."""
        self.engines, self.sync, self.prompts = engines, sync, prompts
        self.sampling, self.seed, self.stop_ids = sampling, seed, stop_ids
        self.placeholders = placeholders or set()
        self.tools, self.processing = tools, processing
        self.cursor = 0  # position in the prompt stream
        self.pending: PendingRollouts | None = None

    def submit(self, num_prompts: int) -> PendingRollouts:
        """Start generation for the next `num_prompts` prompts of the stream (returns at once)."""
        positions = range(self.cursor, self.cursor + num_prompts)
        self.cursor += num_prompts
        prompts, requests = requests_for(self.prompts, positions, self.seed, self.sampling, self.stop_ids)
        return PendingRollouts(prompts, positions, refs=self.engines.submit(requests, self.tools))

    def prefetch(self, num_prompts: int) -> None:
        """Generate the next batch while the caller trains on this one (with the current weights)."""
        self.pending = self.submit(num_prompts)

    def finish_prefetch(self) -> None:
        """Wait for the prefetched batch, so the engines are idle for the weight sync."""
        if self.pending is not None:
            self._collect(self.pending)

    def take(self, num_prompts: int) -> list[Episode]:
        """The prefetched batch, else the next `num_prompts` prompts sampled now."""
        pending, self.pending = self.pending or self.submit(num_prompts), None
        return episodes_of(pending.prompts, self._collect(pending), self.placeholders, self.processing)

    def _collect(self, pending: PendingRollouts) -> list[RolloutResult]:
        """The results; an engine that died or hangs becomes a RolloutError naming it."""
        import ray

        if pending.results is None:
            try:
                pending.results = list(self.engines.collect(pending.refs or []))
            except ray.exceptions.RayActorError as e:
                raise RolloutError(f"a rollout engine died during generation: {e}") from None
            except TimeoutError as e:
                raise RolloutError(f"rollout engines did not answer: {e}") from None
            pending.refs = None
        return pending.results

    def push_weights(self) -> dict[str, float]:
        """The learners' next weight version to every engine (proved, or WeightSyncError)."""
        return self.sync.push(self.sync.version + 1)

    @property
    def version(self) -> int:
        return self.sync.version

    def state(self) -> tuple[dict[str, Any], dict[str, str]]:
        """Checkpoint metadata (stream position, weight version) and files (a prefetched batch)."""
        files = {}
        if self.pending is not None:
            results = self._collect(self.pending)
            positions = self.pending.positions
            saved = [{**asdict(r), "samples": [encode_images(asdict(s)) for s in r.samples]} for r in results]
            files[PENDING_FILE] = json.dumps(
                {"positions": [positions.start, positions.stop], "results": saved}
            )
        return {"cursor": self.cursor, "version": self.sync.version}, files

    def restore(self, meta: dict[str, Any], path: Path) -> None:
        """Continue from a checkpoint: the stream position, the prefetched batch, and the engines get the
        restored weights (as the saved version) before the first step."""
        self.cursor = int(meta["cursor"])
        pending_file = path / PENDING_FILE
        if pending_file.is_file():
            saved = json.loads(pending_file.read_text())
            positions = range(*saved["positions"])
            results = [
                RolloutResult(**{**r, "samples": [decode_images(s) for s in r["samples"]]})
                for r in saved["results"]
            ]
            prompts = [self.prompts[prompt_order(len(self.prompts), self.seed, p)] for p in positions]
            self.pending = PendingRollouts(prompts, positions, results=results)
        self.sync.push(int(meta["version"]))


@dataclass
class OnPolicyStage:
    """What the on-policy stages (RL, on-policy distillation) share of the stage protocol: evaluation on
    the engines (they serve the current weights) and the rollouts' checkpointed state."""

    rollouts: Rollouts
    eval_set: EvalSet | None

    def evaluate(self) -> dict[str, float]:
        if self.eval_set is None:
            return {}
        return self.eval_set.evaluate_on_engines(self.rollouts.engines, self.rollouts.tools)

    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, str]]:
        return self.rollouts.state()

    def restore(self, meta: dict[str, Any], path: Path) -> None:
        self.rollouts.restore(meta, path)
