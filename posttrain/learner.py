"""The DeepSpeed learner: one Ray actor per data-parallel rank (see workers.WorkerGroup).

It owns the model (full or LoRA through peft), the optimizer and LR schedule under a DeepSpeed engine
(ZeRO 0-3, fp32/bf16, gradient accumulation, clipping, optional optimizer offload), and exposes the few
operations the stage drivers need: a train step over given micro-batches, greedy generation for
evaluation, resumable save/load, and export of an HF folder.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from posttrain.checkpoint import capture_rng, load_state, restore_rng, save_state
from posttrain.config import TrainingStage, stage_model
from posttrain.loss_head import TokenTerms, per_token
from posttrain.losses import NextTokenLogprobs, lr_multiplier
from posttrain.memory import PeakMemory, rss_bytes
from posttrain.metrics import quiet_libraries
from posttrain.objectives import Norms, Objective, StepStats, merge_stats
from posttrain.weight_transfer import EngineClient, GatherOnly, ModuleSender, ShmSender, TransferBackend
from posttrain.weights import ModuleBuckets, SyncManifest
from posttrain.workers import resolve_device

if TYPE_CHECKING:
    import torch

DS_TAG = "deepspeed"
Batch = dict[str, "torch.Tensor"]
"""A collated micro-batch: name -> tensor."""
log = logging.getLogger(__name__)
OFFLOADED_STATES = ("optim_states", "hp_params", "lp_grads", "contiguous_grad_buffer")
"""What a colocated learner moves to host memory while its engine generates: everything but the bf16/fp32
model weights (`lp_params`), which the weight sync and the probe read in the meantime."""


@dataclass(frozen=True)
class ResidentMemory:
    """A learner's memory after an offload or reload: `used_bytes` of `total_bytes` (on CUDA the whole
    device's, measured before its engine starts so all of it is the learner's; on the CPU this process's
    RSS of the host's memory), the optimizer-state bytes moved and the seconds it took."""

    used_bytes: int
    total_bytes: int
    moved_bytes: int
    seconds: float


def make_sender(backend: TransferBackend, rank: int) -> ModuleSender:
    """Learner rank `rank`'s weight sender for engines receiving with `backend`."""
    if backend in ("ipc", "nccl"):
        from posttrain.gpu_sender import VllmSender  # imports torch and vLLM at module level

        return VllmSender(backend, rank)
    return ShmSender() if rank == 0 else GatherOnly()


def deepspeed_config(cfg: TrainingStage) -> dict[str, Any]:
    learners = cfg.learners
    per_step, micro, _ = cfg.optimizer_batch
    bf16 = cfg.model.dtype == "bfloat16"
    zero: dict[str, Any] = {"stage": zero_stage(cfg)}
    if learners.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    config = {
        "train_batch_size": per_step,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": cfg.train.grad_clip or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31,
    }
    if bf16:  # DeepSpeed sums micro-batch gradients in the model's dtype unless told otherwise
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def zero_stage(cfg: TrainingStage) -> int:
    """The configured ZeRO stage, but ZeRO-1 for bf16 without ZeRO: DeepSpeed's stage-0 bf16 wrapper
    (FP16_UnfusedOptimizer) accumulates in bf16 and rejects an fp32 accumulation dtype, while ZeRO-1
    (BF16_Optimizer, also with one rank) keeps fp32 gradient buffers."""
    if cfg.model.dtype == "bfloat16" and cfg.learners.zero_stage == 0:
        return 1
    return cfg.learners.zero_stage


def load_model(cfg: TrainingStage, model_path: str, is_vl: bool, device: str) -> torch.nn.Module:
    """The HF model, with LoRA adapters or a frozen vision tower as configured."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    m = cfg.model
    cls = AutoModelForImageTextToText if is_vl else AutoModelForCausalLM
    dtype = torch.bfloat16 if m.dtype == "bfloat16" else torch.float32
    model: Any = cls.from_pretrained(
        model_path,
        dtype=dtype,
        attn_implementation=attention_kernel(m.attn_implementation, device),
        trust_remote_code=m.trust_remote_code,
    )
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if m.freeze_vision_tower and is_vl:
        vision_tower(model).requires_grad_(False)
    if m.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=m.lora.r,
            lora_alpha=m.lora.alpha,
            lora_dropout=m.lora.dropout,
            target_modules=m.lora.target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    return model


def attention_kernel(requested: str, device: str) -> str:
    """`requested`, except sdpa for flash_attention_2 where flash-attn or CUDA is missing (it is a separate
    install step, see README "Installing by hand")."""
    from transformers.utils import is_flash_attn_2_available

    if requested != "flash_attention_2" or (device == "cuda" and is_flash_attn_2_available()):
        return requested
    log.warning("model.attn_implementation=flash_attention_2: flash-attn or CUDA unavailable, using sdpa")
    return "sdpa"


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "model", model)
    return cast("torch.nn.Module", getattr(inner, "visual", None) or model.visual)


class Learner:
    """A Ray actor. RANK / WORLD_SIZE / MASTER_* come from the WorkerGroup's environment."""

    def __init__(
        self, stage: str, cfg_dict: Mapping[str, object], model_path: str, is_vl: bool, total_steps: int
    ) -> None:
        import deepspeed
        import torch

        quiet_libraries()
        self.cfg = cfg = stage_model(stage).model_validate(cfg_dict)
        self.rank, self.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.device = resolve_device(cfg.device)
        torch.set_num_threads(max(1, int(cfg.learners.cpus_per_learner)))
        torch.manual_seed(cfg.train.seed)  # identical adapter init on every rank
        deepspeed.init_distributed(dist_backend="nccl" if self.device == "cuda" else "gloo")
        model = load_model(cfg, model_path, is_vl, self.device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = _make_optimizer(cfg, params)
        schedule = _make_schedule(cfg, optimizer, total_steps)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=deepspeed_config(cfg)
        )
        from posttrain.ds_checkpoint import SafeCheckpointEngine  # imports deepspeed: actors only

        self.engine.checkpoint_engine = SafeCheckpointEngine()
        self._sender: ModuleSender | None = None  # for the engines' backend, its buffers kept
        self._sender_backend: TransferBackend = "shm"
        self._frozen: dict[str, int] = {}  # digests of the frozen parameters, as last sent

    # ------------------------------------------------------------------------------------------ training

    def step(self, micro_batches: list[Batch], norms: Norms, objective: Objective) -> StepStats:
        """Forward/backward every micro-batch under `objective`, then one optimizer step.

        Each micro-batch's loss is already its share of the global loss (`norms` are the whole step's
        counts); DeepSpeed divides gradients by the accumulation steps and averages them over ranks, so
        we scale those back: any split of the global batch over learners and micro-batches gives the
        same gradient."""
        assert len(micro_batches) == self.engine.gradient_accumulation_steps()
        lr = float(self.engine.get_lr()[0])
        with PeakMemory(self.device) as memory:  # the step's peak: what sizes a real model's batch
            sums, grad_norm = self._accumulate(micro_batches, norms, objective)
        return StepStats(sums, grad_norm, lr, memory.peak_gib)

    def _accumulate(
        self, micro_batches: list[Batch], norms: Norms, objective: Objective
    ) -> tuple[dict[str, float], float]:
        """(summed statistics, gradient norm before clipping) of the step's forward/backward passes."""
        scale = self.world_size * len(micro_batches)
        sums: dict[str, float] = {}
        grad_norm = None
        for batch in micro_batches:
            stats = self._backward(batch, norms, objective, scale)
            if self.engine.is_gradient_accumulation_boundary() and self.engine.zero_optimization_stage() == 0:
                grad_norm = _grad_norm(self.engine.module)  # ZeRO optimizers report their own
            self.engine.step()
            merge_stats(sums, stats)
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        return sums, float(grad_norm)

    def _backward(self, batch: Batch, norms: Norms, objective: Objective, scale: float) -> dict[str, float]:
        """Forward and backward of one micro-batch, its statistics as floats. Its own function so the
        activations are freed when it returns, not held through the next micro-batch's forward."""
        inputs, rest = split_model_inputs(batch, self.device)
        ids = inputs["input_ids"]
        request = objective.terms(ids, rest, norms)
        values = per_token(self.engine, inputs, request, self.cfg.model.logits_chunk_mib)
        loss, stats = objective(values, ids, rest, norms)
        self.engine.backward(loss * scale)
        return {**{k: float(v) for k, v in stats.items()}, "loss": float(loss.detach())}

    def logprobs(
        self, batches: list[Batch], base_model: bool = False, temperature: float = 1.0
    ) -> list[torch.Tensor]:
        """Per batch, log-probabilities of each next token under the current weights at `temperature`
        ([B, T-1], fp32, on CPU); `base_model` disables the LoRA adapter (a LoRA run's reference)."""
        import contextlib

        module = self.engine.module
        adapter_off = module.disable_adapter() if base_model else contextlib.nullcontext()
        chunk_mib = self.cfg.model.logits_chunk_mib
        with adapter_off:
            return [
                _next_token_logprobs(self.engine, batch, self.device, chunk_mib, temperature)
                for batch in batches
            ]

    # ----------------------------------------------------------------------------------------- weights

    def send_weights(
        self, client: EngineClient, version: int, bucket_mb: float, slots: int | None, include_frozen: bool
    ) -> SyncManifest | None:
        """All ranks gather (ZeRO-3) and take part in the send with the engines' backend (`client.backend`);
        rank 0 drives it and returns the manifest. Frozen parameters go only with `include_frozen` (or
        before they ever went); otherwise the manifest lists them with the digests they had when sent."""
        zero3 = self.cfg.learners.zero_stage == 3
        include = include_frozen or not self._frozen
        on_device = client.backend != "shm"  # ipc and nccl send from the GPU
        weights = ModuleBuckets(self.engine.module, bucket_mb, zero3, include, on_device)
        manifest = self._sender_for(client.backend).send_module(weights, client, version, slots)
        if manifest is not None:
            if weights.include_frozen:
                self._frozen = {n: manifest.checksums[n] for n in weights.frozen}
            else:
                manifest.held = dict(self._frozen)
        return manifest

    def _sender_for(self, backend: TransferBackend) -> ModuleSender:
        """The sender of `backend`, made at the first sync (or when the engines' backend changed)."""
        if self._sender is None or self._sender_backend != backend:
            if self._sender is not None:
                self._sender.close()
            self._sender, self._sender_backend = make_sender(backend, self.rank), backend
        return self._sender

    # -------------------------------------------------------------------------------------- colocation

    def offload_states(self) -> ResidentMemory:
        """Optimizer states (and gradient buffers) to host memory with DeepSpeed's `offload_states`, so
        the colocated engine can wake; the weights stay. Without a ZeRO optimizer (ZeRO-0 on the CPU,
        where both live in host memory anyway) nothing moves."""
        t0 = time.perf_counter()
        if self._zero_optimizer() is not None:
            from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum, OffloadStateTypeEnum

            include = [OffloadStateTypeEnum(name) for name in OFFLOADED_STATES]
            pin = self.device == "cuda"  # pinned host buffers make the reload an async copy
            self.engine.offload_states(include=include, device=OffloadDeviceEnum.cpu, pin_memory=pin)
        return self._resident(time.perf_counter() - t0)

    def reload_states(self) -> ResidentMemory:
        """The offloaded states back on the device before training."""
        t0 = time.perf_counter()
        if self._zero_optimizer() is not None:
            self.engine.reload_states()
        return self._resident(time.perf_counter() - t0)

    def _zero_optimizer(self) -> Any:
        """DeepSpeed's ZeRO optimizer when it can offload; an error on CUDA when it cannot."""
        optimizer = self.engine.optimizer
        if hasattr(optimizer, "offload_states"):
            return optimizer
        if self.device == "cuda":
            raise RuntimeError(
                f"{type(optimizer).__name__} has no offload_states: colocation needs learners.zero_stage >= 1 "
                "(>= 2 with bfloat16)"
            )
        return None

    def _resident(self, seconds: float) -> ResidentMemory:
        moved = _state_bytes(self._zero_optimizer())
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # freed blocks back to the device, or the engine cannot have them
            free, total = torch.cuda.mem_get_info()
            return ResidentMemory(total - free, total, moved, seconds)
        host_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return ResidentMemory(rss_bytes(), host_total, moved, seconds)

    # ---------------------------------------------------------------------------------------- generation

    def generate(self, batches: list[Batch], max_new_tokens: int, eos_token_id: int) -> list[list[int]]:
        """Greedy completions for left-padded prompt batches. Under ZeRO-3 every rank must run the same
        number of batches (the caller pads shards) and `synced_gpus` keeps parameter gathers in step."""
        import torch

        module = self.engine.module
        module.eval()
        outputs: list[list[int]] = []
        with torch.no_grad():
            for batch in batches:
                batch = {k: v.to(self.device) for k, v in batch.items()}
                width = batch["input_ids"].shape[1]
                generated = module.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=eos_token_id,
                    pad_token_id=eos_token_id,
                    synced_gpus=self.cfg.learners.zero_stage == 3 and self.world_size > 1,
                )
                outputs.extend(_strip_after_eos(row[width:].tolist(), eos_token_id) for row in generated)
        module.train()
        return outputs

    # --------------------------------------------------------------------------------------- checkpoints

    def save(self, directory: str, client_state: Mapping[str, object]) -> None:
        self.engine.save_checkpoint(
            directory,
            tag=DS_TAG,
            client_state=client_state,
            save_latest=False,
            exclude_frozen_parameters=self.cfg.model.lora is not None,
        )
        save_state(directory, f"rng-rank{self.rank}.safetensors", capture_rng())

    def load(self, directory: str) -> dict[str, Any]:
        path, client_state = self.engine.load_checkpoint(
            directory, tag=DS_TAG, load_module_strict=self.cfg.model.lora is None
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed state under {directory}/{DS_TAG}")
        restore_rng(load_state(directory, f"rng-rank{self.rank}.safetensors"))
        self._frozen = {}  # the next sync sends every parameter as loaded
        return client_state

    def export(self, directory: str, merge_lora: bool) -> None:
        """Rank 0 writes an HF folder (safetensors) or, for LoRA, the PEFT adapter (plus merged weights
        under `merged/` when asked). All ranks must call: ZeRO-3 gathers the parameters collectively."""
        import deepspeed

        module = self.engine.module
        gather = self.cfg.learners.zero_stage == 3
        with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=gather):
            if self.rank != 0:
                return
            module.save_pretrained(directory, safe_serialization=True)
            if self.cfg.model.lora and merge_lora:
                module.merge_and_unload().save_pretrained(Path(directory) / "merged", safe_serialization=True)

    def num_parameters(self) -> dict[str, int]:
        module = self.engine.module
        total = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters() if p.requires_grad)
        return {"total": total, "trainable": trainable}


MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "position_ids",  # packed rows restart positions per sample: the only sample boundary the model sees
    "pixel_values",
    "image_grid_thw",
    "mm_token_type_ids",
)
"""Batch keys the model's forward takes; the rest of a batch feeds the objective."""


def split_model_inputs(batch: Batch, device: str) -> tuple[Batch, Batch]:
    """(the keys the model's forward takes, the rest: what the objective reads), on `device`."""
    on_device = {k: v.to(device) for k, v in batch.items()}
    inputs = {k: v for k, v in on_device.items() if k in MODEL_INPUTS}
    return inputs, {k: v for k, v in on_device.items() if k not in MODEL_INPUTS}


def _next_token_logprobs(
    model: torch.nn.Module, batch: Batch, device: str, chunk_mib: float, temperature: float
) -> torch.Tensor:
    import torch

    module = getattr(model, "module", model)
    was_training = module.training
    module.eval()
    with torch.no_grad():
        inputs = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}
        targets = inputs["input_ids"][:, 1:]
        every = torch.ones_like(targets, dtype=torch.bool)
        request = TokenTerms(every, {"targets": targets}, NextTokenLogprobs(temperature))
        logp = per_token(model, inputs, request, chunk_mib)["logp"]
    module.train(was_training)
    return logp.cpu()


class Reference:
    """The frozen reference policy for RL's KL term: a Ray actor holding the starting model (no DeepSpeed,
    no optimizer)."""

    def __init__(self, stage: str, cfg_dict: Mapping[str, object], model_path: str, is_vl: bool) -> None:
        cfg = stage_model(stage).model_validate(cfg_dict)
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"lora": None})})
        self.chunk_mib = cfg.model.logits_chunk_mib
        self.device = resolve_device(cfg.device)  # threads: OMP_NUM_THREADS from the WorkerGroup
        model = load_model(cfg, model_path, is_vl, self.device)
        self.model = model.to(self.device).eval().requires_grad_(False)

    def logprobs(
        self, batches: list[Batch], base_model: bool = False, temperature: float = 1.0
    ) -> list[torch.Tensor]:
        return [
            _next_token_logprobs(self.model, batch, self.device, self.chunk_mib, temperature)
            for batch in batches
        ]


def _make_optimizer(cfg: TrainingStage, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    import torch

    t = cfg.train
    if cfg.learners.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)


def _make_schedule(
    cfg: TrainingStage, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    from functools import partial

    import torch

    t = cfg.train
    fn = partial(
        lr_multiplier,
        total_steps=total_steps,
        warmup_steps=t.warmup_steps,
        kind=t.lr_scheduler,
        min_ratio=t.min_lr_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def _grad_norm(module: torch.nn.Module) -> float:
    import torch

    grads = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def _state_bytes(optimizer: Any) -> int:
    """Bytes of a ZeRO optimizer's fp32 partitions and Adam moments (0 without one)."""
    import torch

    if optimizer is None:
        return 0
    base = getattr(optimizer, "optimizer", optimizer)
    tensors = [t for state in base.state.values() for t in state.values() if torch.is_tensor(t)]
    tensors += list(getattr(optimizer, "single_partition_of_fp32_groups", []))
    return sum(t.numel() * t.element_size() for t in tensors)


def _strip_after_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids
