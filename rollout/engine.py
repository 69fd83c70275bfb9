"""vLLM rollout engines: one in-process `vllm.LLM` per Ray actor, token ids in, token ids out.

`RolloutEngine` is the actor class (also usable as a plain object in one process); `RolloutGroup` starts N
of them through `posttrain.workers.WorkerGroup`, splits requests across them and gathers results in order.

With tensor_parallel_size 1 (CPU or GPU) the engine runs in the actor's own process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`, executor backend "uni"): it loads in seconds on CPU. Weight updates
use vLLM 0.32's weight-transfer API: the engine starts with `weight_transfer_config` naming a backend
(`shm`: posttrain/rollout/shm_transfer.py; `ipc`, `nccl`: posttrain/rollout/gpu_transfer.py), and a sender
(posttrain.weight_transfer) calls the engine's methods of the API's names, which reach every worker:

    RolloutEngine.update_weights(update_info)        # an actor call from the sender
      -> LLM.collective_rpc("update_weights", ...)   # -> EngineCore -> UniProcExecutor
      -> Worker.update_weights                       # CPUWorker is a gpu_worker.Worker
      -> ShmWeightTransferEngine.receive_weights     # vLLM's layerwise reload, started by
                                                     # start_weight_update, ended by finish
                                                     # (or DigestingIpcEngine, DigestingNcclEngine)

(CPU linear layers keep their weights packed for oneDNN and drop `layer.weight`, so the engine cannot
checksum its own parameters: it digests what it received, and a logprob probe proves what it serves.)
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Required, TypedDict, Unpack, cast

from posttrain.config import ConfigError
from posttrain.rewards.tools import ToolRuntime, load_tools
from posttrain.rollout.config import SamplingConfig, ToolsConfig
from posttrain.rollout.multiturn import EpisodeLoop
from posttrain.rollout.samples import RolloutRequest, RolloutResult, RolloutSample
from posttrain.rollout.weight_sync import Probe, WeightSyncError
from posttrain.weight_transfer import (
    ENGINE_CLASSES,
    VLLM_BACKENDS,
    RayEngineClient,
    Receipt,
    ShmSender,
    TransferBackend,
    UpdatePayload,
    gather_engine_calls,
    send_buckets,
)
from posttrain.weights import Bucket, SyncManifest
from posttrain.workers import COLOCATED_GPU_SHARE, SharedPlacement, WorkerGroup, init_ray, split_evenly

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from PIL.Image import Image
    from ray import ObjectRef
    from vllm import RequestOutput, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.logprobs import FlatLogprobs, LogprobsOnePosition
    from vllm.lora.request import LoRARequest
    from vllm.outputs import CompletionOutput

THINK_END_TEXT = "</think>\n\n"
CPU_KV_BLOCK_TOKENS = 128  # vLLM 0.32's CPU block size: a sequence holds whole blocks
CPU_KV_FLOOR_BYTES = 64 << 20
GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SLEEP_TAGS = ("weights", "kv_cache")
"""What vLLM's sleep releases, in the order a wake restores them."""


class EngineStartError(ConfigError):
    """An engine group could not start: names the group, the model, vLLM's reason and the key to change."""


def sampled_request(
    sampling: SamplingConfig,
    prompt_ids: list[int],
    stop_ids: list[int],
    seed: int,
    images: list[Image] | None = None,
    logprobs: int | None = 0,
) -> RolloutRequest:
    """The request for `prompt_ids` sampled as `sampling` says."""
    return RolloutRequest(
        prompt_ids,
        n=sampling.samples_per_prompt,
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        stop_token_ids=stop_ids,
        seed=seed,
        logprobs=logprobs,
        images=images,
        thinking_budget=sampling.thinking_budget,
    )


def head_dim(model_config: dict[str, Any]) -> int:
    text = model_config.get("text_config") or model_config
    return int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])


def kv_bytes_per_token(model_config: dict[str, Any], dtype: str) -> int:
    """Bytes of K and V one token occupies over all layers (the text model's, for a VL config)."""
    text = model_config.get("text_config") or model_config
    kv_heads = text.get("num_key_value_heads") or text["num_attention_heads"]
    return 2 * text["num_hidden_layers"] * kv_heads * head_dim(model_config) * DTYPE_BYTES[dtype]


def _cpu_engine_args(
    model_config: dict[str, Any],
    dtype: str,
    max_model_len: int,
    max_num_seqs: int,
    kv_cache_gib: float | None,
) -> dict[str, Any]:
    """vLLM's CPU arguments: the KV cache in bytes (vLLM would take a share of one NUMA node's RAM minus its
    own RSS: fragile) and whole-prompt prefill."""
    _check_cpu_head_dim(model_config)
    kv_bytes, seqs = cpu_kv_cache(
        kv_bytes_per_token(model_config, dtype), max_model_len, max_num_seqs, kv_cache_gib
    )
    # vLLM 0.32 rewinds a seeded request's generator after a partial (chunked) prefill, which a CPU
    # generator cannot do ("CPU Generator does not use offset"): prefill whole prompts only.
    return {
        "kv_cache_memory_bytes": kv_bytes,
        "max_num_seqs": seqs,
        "enable_chunked_prefill": False,
        "max_num_batched_tokens": max(max_model_len, 8192),
    }


def _check_cpu_head_dim(model_config: dict[str, Any]) -> None:
    """vLLM meets an unsupported head size only at the first generate once its warm-up is skipped (eager
    with an explicit KV size): check at start with vLLM's own list."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    size = head_dim(model_config)
    if size not in CPUAttentionBackend.get_supported_head_sizes():
        raise ValueError(f"head_dim {size} is not supported by vLLM's CPU attention")


def cpu_kv_cache(
    per_token: int, max_model_len: int, max_num_seqs: int, kv_cache_gib: float | None = None
) -> tuple[int, int]:
    """(KV cache bytes, sequences at once) for a CPU engine, sized by what it runs, not by the host's RAM:
    `max_num_seqs` full-length sequences (at least CPU_KV_FLOOR_BYTES). With an explicit `kv_cache_gib` the
    sequences at once shrink to what fits, so vLLM never preempts (its CPU recompute path cannot rewind a
    seeded sampler)."""
    per_seq = -(-max_model_len // CPU_KV_BLOCK_TOKENS) * CPU_KV_BLOCK_TOKENS * per_token
    if kv_cache_gib is None:
        return max(CPU_KV_FLOOR_BYTES, max_num_seqs * per_seq), max_num_seqs
    nbytes = int(kv_cache_gib * GIB)
    if nbytes < per_seq:
        raise ValueError(
            f"kv_cache_gib={kv_cache_gib:g} holds less than one sequence of max_model_len={max_model_len} "
            f"({per_seq / GIB:.3g} GiB at {per_token} bytes per token)"
        )
    return nbytes, min(max_num_seqs, nbytes // per_seq)


def _model_config(model_path: str) -> dict[str, Any]:
    import json
    from pathlib import Path

    folder = Path(model_path).expanduser()
    if (folder / "config.json").is_file():
        config: dict[str, Any] = json.loads((folder / "config.json").read_text())
        return config
    if folder.exists() or model_path.startswith(("/", ".", "~")) or model_path.count("/") > 1:
        raise FileNotFoundError(f"{model_path} is not a local folder with a config.json")
    from transformers import AutoConfig  # a hub id (owner/name): its cached config, never remote code

    return dict(AutoConfig.from_pretrained(model_path).to_dict())


class GroupEngineOptions(TypedDict, total=False):
    """The keyword arguments of `RolloutEngine._setup` that `RolloutGroup` passes on as given."""

    gpu_memory_utilization: float | None
    kv_cache_gib: float | None
    max_num_seqs: int
    max_model_len: int
    tensor_parallel_size: int
    dtype: str | None
    seed: int
    max_logprobs: int
    enforce_eager: bool | None
    limit_images: int | None
    enable_lora: bool
    max_lora_rank: int
    think_end_ids: list[int] | None
    enable_sleep_mode: bool
    weight_transfer: TransferBackend
    extra_llm_args: dict[str, Any] | None


class EngineOptions(GroupEngineOptions, total=False):
    """All keyword arguments of `RolloutEngine._setup`."""

    device: str
    name: str


class EngineInfo(TypedDict):
    """What `RolloutEngine.info` reports."""

    name: str
    version: int
    dirty: str | None
    load_seconds: float
    is_vl: bool
    think_end_ids: list[int]
    kv_cache_bytes: int | None
    max_num_seqs: int
    asleep: list[str]


class StartFailure(TypedDict):
    """What `EngineActor.info` reports for an engine that did not start."""

    start_error: str


class SyncReport(TypedDict, total=False):
    """One engine's report of a weight sync (`update_weights`, `verify`, `load_lora`)."""

    name: Required[str]
    version: Required[int]
    checksum: float  # of the received tensors (the sum of their checksums)
    tensors: int
    bytes: int
    probe_max_abs: float | None  # the probe's largest logprob difference; None without a probe
    phases: dict[str, float]  # seconds of the update in the engine's worker, by phase
    seconds: float


class RolloutEngine:
    """A vLLM engine serving one copy of the policy; a Ray actor (or a plain object)."""

    def __init__(
        self, model_path: str, options: EngineOptions | None = None, **kwargs: Unpack[EngineOptions]
    ) -> None:
        """`options` (a dict, as Ray actors get positional init args) and `kwargs`: see `_setup`."""
        merged: EngineOptions = {**(options or {}), **kwargs}
        self._setup(model_path, **merged)

    def _setup(
        self,
        model_path: str,
        *,
        device: str = "cpu",
        gpu_memory_utilization: float | None = None,
        kv_cache_gib: float | None = None,
        max_num_seqs: int = 256,
        max_model_len: int = 2048,
        tensor_parallel_size: int = 1,
        dtype: str | None = None,
        seed: int = 0,
        max_logprobs: int = 20,
        enforce_eager: bool | None = None,
        limit_images: int | None = None,
        enable_lora: bool = False,
        max_lora_rank: int = 16,
        think_end_ids: list[int] | None = None,
        enable_sleep_mode: bool = False,
        name: str = "rollout",
        weight_transfer: TransferBackend = "shm",
        extra_llm_args: dict[str, Any] | None = None,
    ) -> None:
        t0 = time.perf_counter()  # load_seconds includes importing vLLM
        gpu = device == "cuda"
        in_process = tensor_parallel_size == 1
        if in_process:
            # Must precede the first vllm import: EngineCore and its one worker live in this process,
            # so weight buckets reach the model runner without serialisation.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        self.name = f"{name}-{os.environ.get('RANK', '0')}"
        self.model_path = model_path
        model_config = _model_config(model_path)
        self.is_vl = "vision_config" in model_config
        self.max_images = limit_images or 4 if self.is_vl else 0
        args: dict[str, Any] = {
            "model": model_path,
            "seed": seed,
            "max_model_len": max_model_len,
            "max_logprobs": max_logprobs,
            # Sampled tokens' logprobs under the distribution they were drawn from (temperature, top-k,
            # top-p applied): what an importance ratio needs. Prompt logprobs stay raw.
            "logprobs_mode": "processed_logprobs",
            "tensor_parallel_size": tensor_parallel_size,
            "enforce_eager": (not gpu) if enforce_eager is None else enforce_eager,
            "max_num_seqs": max_num_seqs,
            # TP > 1: Ray workers, each mapping the sender's shared memory itself; untested here.
            "distributed_executor_backend": "uni" if in_process else "ray",
            "weight_transfer_config": {"backend": transfer_backend(weight_transfer)},
        }
        if dtype or not gpu:
            args["dtype"] = dtype or "float32"
        if gpu:
            args["gpu_memory_utilization"] = gpu_memory_utilization or 0.9
            if kv_cache_gib is not None:
                args["kv_cache_memory_bytes"] = int(kv_cache_gib * GIB)
            # Off on the CPU, where vLLM refuses it and `sleep` keeps everything in place.
            args["enable_sleep_mode"] = enable_sleep_mode
        else:
            args.update(
                _cpu_engine_args(model_config, args["dtype"], max_model_len, max_num_seqs, kv_cache_gib)
            )
        if self.is_vl:
            args["limit_mm_per_prompt"] = {"image": self.max_images, "video": 0}
        if enable_lora:
            args.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1)
        args.update(extra_llm_args or {})
        self.llm = LLM(**args)
        self.tokenizer = self.llm.get_tokenizer()
        self.think_end_ids = think_end_ids or list(
            self.tokenizer.encode(THINK_END_TEXT, add_special_tokens=False)
        )
        self._init_weight_sync(weight_transfer)
        self.asleep: set[str] = set()  # of SLEEP_TAGS: what `sleep` released and no wake restored yet
        self._tools: ToolRuntime | None = None  # started by the first `generate_episodes`
        self._tools_cfg: ToolsConfig | None = None
        self.load_seconds = time.perf_counter() - t0

    def _init_weight_sync(self, backend: TransferBackend) -> None:
        """The weight-transfer handshake, and the sync state: version 0 is the weights loaded at start.
        shm and ipc need nothing to agree on now (ipc's sender sends its packing at its first sync); nccl's
        handshake is the NCCL group the sender sets up with every engine at its first sync."""
        if backend != "nccl":
            self.init_weight_transfer_engine({})
        self.version = 0
        self.dirty: str | None = None  # why the served weights are unknown (a failed sync), else None
        self._received: tuple[int, list[tuple[dict[str, int], int]]] | None = None  # awaiting `verify`
        self.held: dict[str, int] = {}  # digest of every tensor a verified sync delivered
        self._phases: dict[str, float] = {}  # the last update's seconds by phase, in the worker
        self.lora: LoRARequest | None = None  # LoRARequest of the current adapter version

    # ------------------------------------------------------------------------------------------ info

    def info(self) -> EngineInfo:
        return {
            "name": self.name,
            "version": self.version,
            "dirty": self.dirty,
            "load_seconds": self.load_seconds,
            "is_vl": self.is_vl,
            "think_end_ids": self.think_end_ids,
            "kv_cache_bytes": self.llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes,
            "max_num_seqs": self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs,
            "asleep": sorted(self.asleep),
        }

    # ------------------------------------------------------------------------------------ generation

    def generate(self, requests: Sequence[RolloutRequest]) -> list[RolloutResult]:
        """Sample every request; results in request order, samples in index order. Refused after a
        failed weight sync (the weights are then unknown) until a sync succeeds."""
        if self.dirty:
            raise RuntimeError(f"engine {self.name} will not generate: {self.dirty}; sync weights again")
        if not requests:
            return []
        self._awake()
        plain = [i for i, r in enumerate(requests) if r.thinking_budget is None]
        budgeted = [i for i, r in enumerate(requests) if r.thinking_budget is not None]
        results: list[RolloutResult | None] = [None] * len(requests)
        if plain:
            outs = self._run([_prompt(requests[i]) for i in plain], [_params(requests[i]) for i in plain])
            for i, out in zip(plain, outs, strict=True):
                results[i] = self._result(requests[i], out)
        if budgeted:
            for i, res in zip(
                budgeted, self._generate_budgeted([requests[i] for i in budgeted]), strict=True
            ):
                results[i] = res
        return [r for r in results if r is not None]

    def generate_episodes(
        self, requests: Sequence[RolloutRequest], tools: ToolsConfig
    ) -> list[RolloutResult]:
        """Multi-turn tool episodes (`rollout.multiturn`): each sample generates, calls tools, reads their
        answers and continues; results as `generate` gives them. The tool pool starts with the first call
        and lives with the engine."""
        if self.dirty:
            raise RuntimeError(f"engine {self.name} will not generate: {self.dirty}; sync weights again")
        loop = EpisodeLoop(self.llm, self._tool_runtime(tools), tools, self.max_images, self.lora)
        return loop.run(list(requests), self.version)

    def _tool_runtime(self, cfg: ToolsConfig) -> ToolRuntime:
        if self._tools is None or self._tools_cfg != cfg:
            if self._tools is not None:
                self._tools.close()
            self._tools = ToolRuntime(
                load_tools(cfg.names), timeout_s=cfg.timeout_s, pool_size=cfg.parallel_calls
            )
            self._tools_cfg = cfg
        return self._tools

    def prompt_logprobs(self, token_ids: Sequence[list[int]]) -> list[list[float]]:
        """Log-probabilities of tokens 1..T-1 of each sequence given its prefix (the learner's
        `token_logprobs` layout), from one prefill each."""
        reqs = [
            RolloutRequest(list(ids), max_tokens=1, logprobs=None, prompt_logprobs=0) for ids in token_ids
        ]
        outs = self.generate(reqs)
        return [[float(x) for x in (r.prompt_logprobs or [])[1:] if x is not None] for r in outs]

    def score_prompts(self, token_ids: list[list[int]], k: int) -> list[TokenScores]:
        """Per sequence, the model's top-k ids [L, k] and logprobs [L, k] (sorted, entry 0 absent) and its
        logprob of each token itself [L] (entry 0: 0), from one prefill each (the teacher of distillation).
        vLLM's flat logprobs and no detokenisation of the top-k: about twice as fast on CPU as `generate`
        with `prompt_logprobs`."""
        from vllm import SamplingParams

        params = SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False, flat_logprobs=True
        )
        self._awake()
        prompts: list[Any] = [{"prompt_token_ids": list(ids)} for ids in token_ids]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            flat_prompt_logprobs(ids, cast("FlatLogprobs", out.prompt_logprobs), k)  # flat_logprobs=True
            for ids, out in zip(token_ids, outs, strict=True)
        ]

    def _run(self, prompts: list[TokensPrompt], params: list[SamplingParams]) -> list[RequestOutput]:
        kwargs: dict[str, Any] = {"use_tqdm": False}
        if self.lora is not None:
            kwargs["lora_request"] = self.lora
        return list(self.llm.generate(prompts, params, **kwargs))

    def _result(self, req: RolloutRequest, out: RequestOutput) -> RolloutResult:
        assert out.prompt_token_ids is not None  # token-id prompts: vLLM always reports them
        samples = [_sample(req, c) for c in sorted(out.outputs, key=lambda c: c.index)]
        plp, ptop = None, None
        if out.prompt_logprobs is not None:
            ids = out.prompt_token_ids
            plp = [
                None if d is None else float(d[t].logprob)
                for d, t in zip(out.prompt_logprobs, ids, strict=True)
            ]
            if req.prompt_logprobs:
                ptop = [
                    None if d is None else {k: float(v.logprob) for k, v in d.items()}
                    for d in out.prompt_logprobs
                ]
        return RolloutResult(list(out.prompt_token_ids), samples, plp, ptop, self.version)

    def _generate_budgeted(self, requests: list[RolloutRequest]) -> list[RolloutResult]:
        """Two phases: sample up to `thinking_budget` tokens; samples that used the budget without
        emitting `</think>` get `</think>\\n\\n` appended and continue (one request per sample)."""
        end_id = self.think_end_ids[0]
        phase1 = []
        for r in requests:
            assert r.thinking_budget is not None
            phase1.append(_with(r, max_tokens=max(1, min(r.thinking_budget, r.max_tokens))))
        outs = self._run([_prompt(r) for r in phase1], [_params(r) for r in phase1])
        results = [self._result(r, o) for r, o in zip(phase1, outs, strict=True)]
        cont: list[tuple[RolloutSample, RolloutRequest]] = []
        for req, res in zip(requests, results, strict=True):
            for k, s in enumerate(res.samples):
                if end_id in s.token_ids:
                    s.thinking_tokens = s.token_ids.index(end_id) + 1
                if s.finish_reason == "stop":
                    continue
                left = req.max_tokens - len(s.token_ids)
                if end_id not in s.token_ids:  # budget spent inside the think block: close it
                    s.thinking_tokens = len(s.token_ids)
                    s.forced.extend(range(len(s.token_ids), len(s.token_ids) + len(self.think_end_ids)))
                    s.token_ids.extend(self.think_end_ids)
                    s.logprobs.extend([0.0] * len(self.think_end_ids))
                    if s.top_logprobs is not None:
                        s.top_logprobs.extend({} for _ in self.think_end_ids)
                    left -= len(self.think_end_ids)
                if left <= 0:
                    continue
                seed = None if req.seed is None else req.seed * 1000003 + k + 1
                nxt = _with(
                    req,
                    prompt_token_ids=list(req.prompt_token_ids) + s.token_ids,
                    n=1,
                    max_tokens=left,
                    seed=seed,
                )
                nxt.prompt_logprobs = None
                cont.append((s, nxt))
        if cont:
            outs2 = self._run([_prompt(r) for _, r in cont], [_params(r) for _, r in cont])
            for (s, r), o in zip(cont, outs2, strict=True):
                more = _sample(r, o.outputs[0])
                s.token_ids.extend(more.token_ids)
                s.logprobs.extend(more.logprobs)
                if s.top_logprobs is not None and more.top_logprobs is not None:
                    s.top_logprobs.extend(more.top_logprobs)
                s.finish_reason = more.finish_reason
        for res in results:
            for s in res.samples:
                s.text = self.tokenizer.decode(s.token_ids, skip_special_tokens=True)
        return results

    # ---------------------------------------------------------------------------------------- sleep

    def sleep(self, level: int) -> float:
        """Release the device for a colocated learner (vLLM sleep mode): the KV cache is dropped; level 1
        moves the weights to host memory, level 2 drops them, so the engine then refuses to generate until
        a weight sync succeeds and vouches for no tensor an earlier sync sent (frozen ones must come
        again). On the CPU vLLM's worker keeps everything in place (its sleep is a no-op) while the
        scheduler pauses and resumes as on a GPU. Returns the seconds it took."""
        t0 = time.perf_counter()
        self.llm.sleep(level=level)
        self.asleep = set(SLEEP_TAGS)
        if level == 2:
            self.dirty = f"weights dropped by sleep level 2 (version {self.version} needs a sync)"
            self.held.clear()
        return time.perf_counter() - t0

    def wake_up(self, tag: str) -> float:
        """Restore one of SLEEP_TAGS: `weights` before a sync loads into them, `kv_cache` after, so the
        sync's transient buffers never compete with the KV cache. Seconds it took (0 when awake)."""
        if tag not in self.asleep:
            return 0.0
        t0 = time.perf_counter()
        self.llm.wake_up(tags=[tag])
        self.asleep.discard(tag)
        return time.perf_counter() - t0

    def _awake(self) -> None:
        """Generation needs everything: what is still asleep wakes now (the probe of a sync, run right
        after the weights loaded, is the usual first user of the KV cache)."""
        for tag in SLEEP_TAGS:
            self.wake_up(tag)

    # ---------------------------------------------------------------------------------- weight sync

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        """vLLM's weight-transfer handshake, in the backend's format (shm: nothing, each bucket names its
        region; ipc: the sender's packing; nccl: the group's rendezvous and this engine's first rank)."""
        self.llm.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": init_info})

    def start_weight_update(self, version: int) -> None:
        """A sender begins replacing the weights: until `verify` passes, the engine refuses to generate."""
        self._received = None
        self.dirty = f"sync to version {version} not verified (last good version {self.version})"
        self.llm.collective_rpc(_end_unfinished_update)  # a sender that failed midway left one open
        self._transfer(version, "start_weight_update")

    def update_weights(self, update_info: UpdatePayload) -> None:
        """One bucket, in the backend's format (posttrain.weight_transfer.ShmUpdateInfo for shm, vLLM's
        IPC / NCCL update info for ipc / nccl: for nccl, every tensor of the sync at once)."""
        self._transfer(None, "update_weights", {"update_info": update_info})

    def finish_weight_update(self, version: int) -> None:
        """All buckets are in: vLLM finishes the reload; the digests the workers computed wait for `verify`."""
        self._transfer(version, "finish_weight_update")
        self.llm.reset_prefix_cache()
        if self.is_vl:  # the scheduler would otherwise trust image embeddings of the old weights
            self.llm.llm_engine.reset_encoder_cache()
        per_worker = self.llm.collective_rpc(received_digests)
        self._received = (version, [(digests, size) for digests, size, _ in per_worker])
        self._phases = per_worker[0][2]

    def _transfer(self, version: int | None, method: str, kwargs: dict[str, Any] | None = None) -> None:
        try:
            self.llm.collective_rpc(method, kwargs=kwargs)
        except Exception as e:
            raise self._failed(version, f"{method} failed: {type(e).__name__}: {e}") from e

    def verify(self, version: int, manifest: SyncManifest | None, probe: Probe | None) -> SyncReport:
        """The received digests against the sender's manifest (every TP worker), then the probe: only then
        does the engine serve `version`."""
        t0 = time.perf_counter()
        received = self._received
        if received is None or received[0] != version:
            raise self._failed(version, "verify without a finished update of this version")
        report = self._prove(version, received[1], manifest, probe)
        self._received = None
        return {**report, "phases": self._phases, "seconds": time.perf_counter() - t0}

    def _prove(
        self,
        version: int,
        per_worker: list[tuple[dict[str, int], int]],
        manifest: SyncManifest | None,
        probe: Probe | None,
    ) -> SyncReport:
        """Every TP worker's received digests against `manifest` (and the unsent tensors' against those
        this engine verified before), then the probe: only when both pass does the engine serve
        `version`, and the verified digests are kept."""
        if manifest is not None:
            for rank, (got, _) in enumerate(per_worker):
                problem = manifest.compare(got, self.held)
                if problem:
                    raise self._failed(
                        version, problem if len(per_worker) == 1 else f"TP worker {rank}: {problem}"
                    )
        probe_err = None
        if probe is not None:
            self.dirty = None  # the probe itself generates
            try:
                probe_err = self._check_probe(version, probe)
            except WeightSyncError as e:
                raise self._failed(version, e.reason) from None
        self.version, self.dirty = version, None
        seen, nbytes = per_worker[0]
        self.held.update(seen)
        return {
            "name": self.name,
            "version": version,
            "checksum": sum(seen.values()) % 2**64,
            "tensors": len(seen),
            "bytes": nbytes,
            "probe_max_abs": probe_err,
        }

    def _failed(self, version: int | None, reason: str) -> WeightSyncError:
        """The weights were (partly) overwritten: refuse to generate, and trust no earlier digest, until a
        full sync succeeds."""
        self.dirty = f"sync to version {version} failed (last good version {self.version})"
        self.held.clear()
        return WeightSyncError(-1 if version is None else version, self.name, reason)

    def _check_probe(self, version: int, probe: Probe) -> float:
        got = self.prompt_logprobs([probe.token_ids])[0]
        if len(got) != len(probe.expected):
            raise WeightSyncError(version, self.name, f"probe length {len(got)} != {len(probe.expected)}")
        err = max((abs(a - b) for a, b in zip(got, probe.expected, strict=True)), default=0.0)
        if not err <= probe.atol:  # also catches NaN
            raise WeightSyncError(
                version, self.name, f"probe logprobs differ by {err:.3g} (> {probe.atol:g}) from the sender's"
            )
        return err

    def load_lora(self, version: int, adapter_dir: str, probe: Probe | None = None) -> SyncReport:
        """Serve the PEFT adapter in `adapter_dir` (a new folder per version: vLLM caches adapters by id)
        on top of the base weights. With a `probe`, the adapter's logprobs must match the sender's, else
        the previous adapter is restored and WeightSyncError raised."""
        from vllm.lora.request import LoRARequest

        t0 = time.perf_counter()
        previous = self.lora
        self.lora = LoRARequest(f"policy-v{version}", version + 1, adapter_dir)
        try:
            err = self._check_probe(version, probe) if probe is not None else None
        except WeightSyncError:
            self.lora = previous
            raise
        except Exception as e:
            self.lora = previous
            raise WeightSyncError(version, self.name, f"adapter load failed: {type(e).__name__}: {e}") from e
        self.version = version
        return {
            "name": self.name,
            "version": version,
            "seconds": time.perf_counter() - t0,
            "probe_max_abs": err,
        }


# -------------------------------------------------------------------------------------------- helpers


HUGE_PAGE_MALLOC = "glibc.malloc.hugetlb=1"


def cpu_engine_env(device: str) -> dict[str, str]:
    """A CPU engine's malloc backs its large blocks with transparent huge pages: vLLM's reload allocates
    every layer afresh at each weight sync (then oneDNN packs it into another fresh block), and faulting
    those in 4 KiB pages halved the copy speed (1 GiB: 2.1 -> 4.1 GB/s measured). Numerics are unchanged."""
    if device != "cpu":
        return {}
    tunables = os.environ.get("GLIBC_TUNABLES")
    return {"GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGE_MALLOC}" if tunables else HUGE_PAGE_MALLOC}


def _end_unfinished_update(worker: Any) -> None:
    """`LLM.collective_rpc` target: close an update a failed sender left open (vLLM refuses to start
    another); the layers it never reached keep their weights, and the next update replaces them all."""
    if worker._weight_update_active:
        worker.finish_weight_update()


def received_digests(worker: Any) -> tuple[dict[str, int], int, dict[str, float]]:
    """`LLM.collective_rpc` target: what this worker's backend received in the last update (digests,
    bytes) and the update's seconds by phase (every posttrain backend keeps a `Receipt`)."""
    receipt: Receipt = worker.weight_transfer_engine.receipt
    return dict(receipt.digests), receipt.nbytes, dict(receipt.clock.laps)


def transfer_backend(name: TransferBackend) -> str:
    """The vLLM backend name of ours, registered with vLLM's factory in this (engine) process: by module
    path, so vLLM imports the worker-side engine only when it builds it."""
    from vllm.distributed.weight_transfer import WeightTransferEngineFactory

    registered = VLLM_BACKENDS[name]
    if registered not in WeightTransferEngineFactory._registry:
        module, cls = ENGINE_CLASSES[name]
        WeightTransferEngineFactory.register_engine(registered, module, cls)
    return registered


def _with(r: RolloutRequest, **changes: Any) -> RolloutRequest:
    from dataclasses import replace

    return replace(r, **changes)


def _prompt(r: RolloutRequest) -> TokensPrompt:
    p: TokensPrompt = {"prompt_token_ids": list(r.prompt_token_ids)}
    if r.images:
        p["multi_modal_data"] = {"image": r.images if len(r.images) > 1 else r.images[0]}
    return p


VLLM_SAMPLING = (
    *("n", "max_tokens", "temperature", "top_p", "top_k", "stop_token_ids", "seed"),
    *("logprobs", "prompt_logprobs", "ignore_eos"),
)
"""RolloutRequest fields that are vLLM SamplingParams of the same name."""


def _params(r: RolloutRequest) -> SamplingParams:
    from vllm import SamplingParams

    return SamplingParams(**{key: getattr(r, key) for key in VLLM_SAMPLING}, skip_special_tokens=True)


TokenScores = tuple["npt.NDArray[np.int32]", "npt.NDArray[np.float32]", "npt.NDArray[np.float32]"]
"""(top-k ids [L, k] int32, top-k logprobs [L, k] float32, each token's own logprob [L] float32)."""


def flat_prompt_logprobs(ids: list[int], flat: FlatLogprobs, k: int) -> TokenScores:
    """vLLM's FlatLogprobs of one prompt as arrays: position j > 0 holds k + 1 entries, the token itself
    first, then the top k by rank."""
    import numpy as np

    n = len(ids)
    top_ids = np.zeros((n, k), dtype=np.int32)
    top_logp = np.full((n, k), -np.inf, dtype=np.float32)
    own = np.zeros(n, dtype=np.float32)
    if n < 2:
        return top_ids, top_logp, own
    first = flat.start_indices[1]
    tokens = np.asarray(flat.token_ids[first:], dtype=np.int64)
    values = np.asarray(flat.logprobs[first:], dtype=np.float32)
    if tokens.size != (n - 1) * (k + 1) or (tokens.reshape(n - 1, k + 1)[:, 0] != np.asarray(ids[1:])).any():
        raise RuntimeError("unexpected vLLM prompt logprobs layout (expected the token, then its top k)")
    tokens, values = tokens.reshape(n - 1, k + 1), values.reshape(n - 1, k + 1)
    own[1:] = values[:, 0]
    top_ids[1:], top_logp[1:] = tokens[:, 1:], values[:, 1:]
    return top_ids, top_logp, own


def _sample(req: RolloutRequest, c: CompletionOutput) -> RolloutSample:
    ids = list(c.token_ids)
    lps: list[float] = []
    top: list[dict[int, float]] | None = None
    if c.logprobs is not None:
        steps = cast("list[LogprobsOnePosition]", c.logprobs)  # sample logprobs are never flat here
        lps = [float(d[t].logprob) for d, t in zip(steps, ids, strict=True)]
        if req.logprobs:
            top = [{k: float(v.logprob) for k, v in d.items()} for d in steps]
    reason = "length" if c.finish_reason == "length" else "stop"
    return RolloutSample(ids, c.text, lps, reason, top)


# ------------------------------------------------------------------------------------------ the group


class EngineActor(RolloutEngine):
    """The actor form of RolloutEngine: a failed start is kept as one line for `info`, so the group can
    raise EngineStartError instead of Ray printing the creation task's traceback."""

    def __init__(self, model_path: str, options: EngineOptions | None = None) -> None:
        self.start_error: str | None = None
        try:
            super().__init__(model_path, options)
        except Exception as e:
            self.start_error = one_line_reason(e)

    def info(self) -> EngineInfo | StartFailure:  # type: ignore[override]  # a failed start has no info
        return {"start_error": self.start_error} if self.start_error else super().info()


def one_line_reason(error: BaseException) -> str:
    """The root cause of `error` as `Type: message` on one line (vLLM wraps its reason in other errors)."""
    root = error
    while (root.__cause__ or root.__context__) is not None:
        root = root.__cause__ or root.__context__  # type: ignore[assignment]
    text = " ".join(line.strip() for line in str(root).splitlines() if line.strip())
    return f"{type(root).__name__}: {text[:600]}"


def start_hint(reason: str, config_key: str, model_key: str) -> str:
    """Which setting to change for a start failure, from vLLM's reason."""
    low = reason.lower()
    if "memory" in low or "kv cache" in low:
        return (
            f"lower {config_key}.max_num_seqs or {config_key}.max_model_len, or set {config_key}.kv_cache_gib"
        )
    if "head_dim" in low:
        return "vLLM's CPU attention takes head_dim 32, 64, 80, 96, 112, 128, 160, 192, 224, 256 or 512"
    if any(k in low for k in ("no such file", "not a local folder", "does not appear to have", "repo id")):
        return f"check {model_key}: it must be a Hugging Face model folder"
    return f"check the {config_key}.* settings and {model_key}"


class RolloutGroup:
    """N RolloutEngine actors (one placement-group bundle each); requests split in contiguous chunks."""

    def __init__(
        self,
        model_path: str,
        num_engines: int = 1,
        *,
        num_cpus: float = 1,
        device: str = "cpu",
        name: str = "rollout",
        config_key: str = "rollout",
        model_key: str = "model.path",
        start_timeout_s: float = 600.0,
        sync_timeout_s: float = 600.0,
        ray_address: str | None = None,
        placement: SharedPlacement | None = None,
        **engine_kwargs: Unpack[GroupEngineOptions],
    ) -> None:
        """`device`: "cpu" or "cuda" (resolved by the caller); `config_key` / `model_key`: the config keys a
        start failure names (e.g. "teacher", "teacher.path"); `placement`: engine i shares bundle i (and
        its GPU) with learner i."""
        init_ray(ray_address, num_cpus=int(num_engines * num_cpus + 0.999))
        tp = int(engine_kwargs.get("tensor_parallel_size", 1))
        t0 = time.perf_counter()
        self.workers = WorkerGroup(
            EngineActor,
            num_engines,
            num_cpus=num_cpus,
            num_gpus=COLOCATED_GPU_SHARE if placement else tp,
            name=name,
            init_args=(model_path, {**engine_kwargs, "name": name, "device": device}),
            env={**({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if tp == 1 else {}), **cpu_engine_env(device)},
            device=device,
            config_key=config_key,
            placement=placement,
        )
        self.infos = self._started(model_path, start_timeout_s, config_key, model_key)
        self.start_seconds = time.perf_counter() - t0
        self.sync_timeout_s = sync_timeout_s
        self.weight_transfer: TransferBackend = engine_kwargs.get("weight_transfer", "shm")
        self.workers_per_engine = tp
        self.version = 0
        self.frozen_held = False  # every engine holds the frozen parameters: a push may leave them out
        self._sender: ShmSender | None = None  # for `update_weights` from this process

    def _started(
        self, model_path: str, timeout_s: float, config_key: str, model_key: str
    ) -> list[EngineInfo]:
        """Every engine's info, or EngineStartError for the first that failed, died or did not answer."""
        import ray

        calls = [a.info.remote() for a in self.workers.actors]
        ready, _ = ray.wait(calls, num_returns=len(calls), timeout=timeout_s)
        infos, reason = [], None
        for ref in calls:
            if ref not in ready:
                reason = f"TimeoutError: not started within {timeout_s:g} s ({config_key}.start_timeout_s)"
                break
            try:
                info = ray.get(ref)
            except ray.exceptions.RayActorError as e:  # killed (out of memory) or crashed while loading
                reason = f"engine process died: {str(e).splitlines()[0]}"
                break
            if info.get("start_error"):
                reason = info["start_error"]
                break
            infos.append(info)
        if reason is None:
            return infos
        self.workers.shutdown(barrier=False)
        raise EngineStartError(
            f"{self.workers.name} engines (model {model_path}) could not start: {reason.rstrip('. ')}; "
            f"{start_hint(reason, config_key, model_key)}"
        )

    def __len__(self) -> int:
        return len(self.workers)

    def generate(
        self, requests: Sequence[RolloutRequest], tools: ToolsConfig | None = None
    ) -> list[RolloutResult]:
        """Results in request order; requests split over the engines in contiguous, even chunks."""
        return self.collect(self.submit(requests, tools))

    def submit(
        self, requests: Sequence[RolloutRequest], tools: ToolsConfig | None = None
    ) -> list[ObjectRef[list[RolloutResult]]]:
        """Start generation (multi-turn tool episodes with `tools`) and return at once (ObjectRefs, one per
        engine) so the caller can overlap other work, e.g. scoring the previous batch; `collect` waits."""
        reqs = list(requests)
        chunks = split_evenly(reqs, len(self.workers), [r.n * r.max_tokens for r in reqs])
        if tools is not None:
            return [
                a.generate_episodes.remote(c, tools) for a, c in zip(self.workers.actors, chunks, strict=True)
            ]
        return [a.generate.remote(c) for a, c in zip(self.workers.actors, chunks, strict=True)]

    def collect(self, refs: Sequence[ObjectRef[list[RolloutResult]]]) -> list[RolloutResult]:
        parts = self.workers.gather(refs)
        return [r for part in parts for r in part]

    def transfer_client(self, version: int) -> RayEngineClient:
        """The engines' weight-transfer control plane for a sender (a learner, or this process) pushing
        `version`: each call reaches every engine within `sync_timeout_s` or raises WeightSyncError."""
        self.frozen_held = False  # the push may overwrite them: trusted again once `verify` passes
        names = [f"{self.workers.name}-{i}" for i in range(len(self.workers))]
        return RayEngineClient(
            list(self.workers.actors),
            names,
            version,
            self.sync_timeout_s,
            self.weight_transfer,
            self.workers_per_engine,
        )

    def update_weights(
        self,
        version: int,
        buckets: Sequence[Bucket],
        manifest: SyncManifest | None = None,
        probe: Probe | None = None,
    ) -> list[SyncReport]:
        """Push buckets held by this process as `version` to every engine and prove it: the received
        digests against `manifest` (default: the digests of what was sent), then the probe. Through
        shared memory only: ipc and nccl send from a learner's GPU (`LearnerGroup.send_weights`)."""
        if self.weight_transfer != "shm":
            raise ValueError(
                f"{self.name} engines receive with weight_transfer={self.weight_transfer}: buckets held by this "
                "process go through shm only; push a learner group's weights with sync_from_learners"
            )
        if self._sender is None:
            self._sender = ShmSender()
        sent = send_buckets(self._sender, buckets, self.transfer_client(version), version)
        return self.verify(version, manifest or sent, probe)

    def verify(
        self, version: int, manifest: SyncManifest | None, probe: Probe | None = None
    ) -> list[SyncReport]:
        """Every engine proves that it received `manifest` and (with `probe`) serves it; only then does
        the group serve `version`."""
        reports = self._gather_sync(
            version, [a.verify.remote(version, manifest, probe) for a in self.workers.actors]
        )
        self.version, self.frozen_held = version, True
        return reports

    def load_lora(self, version: int, adapter_dir: str, probe: Probe | None = None) -> list[SyncReport]:
        """Adapter-only sync: every engine serves the PEFT adapter folder `adapter_dir` (write a new folder
        per version) from now on; errors and timeouts raise WeightSyncError as in `update_weights`."""
        calls = [a.load_lora.remote(version, adapter_dir, probe) for a in self.workers.actors]
        reports = self._gather_sync(version, calls)
        self.version = version
        return reports

    def _gather_sync(self, version: int, calls: list[ObjectRef[SyncReport]]) -> list[SyncReport]:
        names = [f"{self.workers.name}-{i}" for i in range(len(calls))]
        reports: list[SyncReport] = gather_engine_calls(version, names, calls, self.sync_timeout_s)
        return reports

    @property
    def name(self) -> str:
        return self.workers.name

    def score_prompts(self, token_ids: list[list[int]], k: int) -> list[TokenScores]:
        """`RolloutEngine.score_prompts` with the sequences split over the engines by length."""
        chunks = split_evenly(token_ids, len(self.workers), [len(ids) for ids in token_ids])
        refs = [a.score_prompts.remote(c, k) for a, c in zip(self.workers.actors, chunks, strict=True) if c]
        return [r for part in self.workers.gather(refs) for r in part]

    def prompt_logprobs(self, token_ids: Sequence[list[int]]) -> list[list[float]]:
        return self.prompt_logprobs_each(token_ids)[0]

    def prompt_logprobs_each(self, token_ids: Sequence[list[int]]) -> list[list[list[float]]]:
        """Every engine's prompt logprobs of the same sequences (to compare engines with each other)."""
        return self.workers.call("prompt_logprobs", list(token_ids))

    def info(self) -> list[EngineInfo]:
        return self.workers.call("info")

    def sleep(self, level: int) -> float:
        """Every engine sleeps (`RolloutEngine.sleep`); the slowest one's seconds."""
        if level == 2:  # the weights are dropped: the next push must send every tensor
            self.frozen_held = False
        return max(self.workers.call("sleep", level))

    def wake_up(self, tag: str) -> float:
        """Every engine restores `tag` (`RolloutEngine.wake_up`); the slowest one's seconds."""
        return max(self.workers.call("wake_up", tag))

    def shutdown(self) -> None:
        if self._sender is not None:
            self._sender.close()
        self.workers.shutdown()
