"""Rollout speed: posttrain's vLLM engine actor against bare `vllm.LLM.generate`, and learner -> engine weight
sync against this machine's memory-copy bandwidth, measured in one run.

    python bench/rollout_bench.py [--size tiny|small|qwen3-0.6b [--layers N]] [--prompts 64] [--n 8]
                                  [--max-tokens 128] [--repeats 3] [--sync-repeats 5] [--bucket-mb 64]
                                  [--out runs/bench]

Generation: the same arithmetic prompts (rendered by the model's chat template in thinking mode, as token ids),
the same sampling parameters (n samples, temperature 1, a fixed seed per prompt, `ignore_eos` so every sample
has `max_tokens` tokens) and the same vLLM arguments go to (a) a bare `vllm.LLM` in a Ray actor with the same
CPU reservation, thread count and environment as posttrain's engine actor, timed around `LLM.generate` inside
that actor, and (b) `RolloutGroup(num_engines=1).generate([RolloutRequest...])`, timed in this process (so it
includes Ray's transfer of requests and results and posttrain's conversion). Both run one untimed call, then
the timed repeats alternate between the two. Generated tokens/s = samples' tokens / seconds (median repeat).

Weight sync: one DeepSpeed learner (ZeRO 0, started as the tests start it) -> that engine through vLLM's
weight-transfer API and posttrain's shared-memory backend, with `sync_from_learners` (every bucket in
shared memory) and `stream_sync_from_learners` (a ring of `--max-inflight` buckets), with and without the
logprob probe; every variant checks the digests. Effective GB/s = bytes the engine received (tied
embeddings counted under both names, as vLLM loads them) / seconds, against memcpy measured in this run:
NumPy's copy of a 1 GiB buffer (one thread) and torch's `copy_` (all threads). The sender's and the
engine's clocks split the last plain sync into phases. `--size qwen3-0.6b`: Qwen3-0.6B's shape in fp32
(2.4 GB on disk, 3.0 GB loaded), best with `--skip-generation`.

Multi-turn (`--multi-turn`, run on its own): the micro text model overfit to call the calculator
(`posttrain.synthetic.tool_policy`) samples tool episodes (`RolloutGroup.generate(requests, tools)`:
turn, calculator call in the tool pool, tool turn, final turn) at temperature 1; then the same prompts
single-turn with `ignore_eos` and `max_tokens` equal to the episodes' mean sampled tokens per sample, so
both sides generate the same number of tokens. Tokens/s counts sampled tokens only (tool turns are
prefilled, not generated). Goal: multi-turn ≥ 0.8× single-turn.

Prints tables and ratios; writes them to `OUT/rollout_bench.json` under the model size's key (multi-turn:
under `multi_turn`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common  # bench/ is on sys.path when run; functions that run in Ray actors must not use it

MEMCPY_MB = 1024
MEMCPY_REPEATS = 5
REAL_SHAPE_KV_GIB = 0.5  # the 0.6B engine's KV cache: a few sequences, not 256
PROBE_EXTRA_TOKENS = 32  # the probe: the first prompt plus this many sampled tokens


def parse_args() -> argparse.Namespace:
    p = common.parser(__doc__)
    common.add_size(p, "tiny")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--repeats", type=int, default=3, help="timed generation calls per side (after 1 warm-up)")
    p.add_argument("--sync-repeats", type=int, default=5, help="timed syncs per variant (after 1 warm-up)")
    p.add_argument("--bucket-mb", type=float, default=64, help="bucket size of every sync (the default)")
    p.add_argument("--max-inflight", type=int, default=2, help="stream sync: buckets queued per engine")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPUs and threads per actor")
    p.add_argument("--skip-generation", action="store_true")
    p.add_argument("--skip-sync", action="store_true")
    p.add_argument("--multi-turn", action="store_true", help="only the multi-turn vs single-turn comparison")
    args = common.parse(p)
    if args.repeats < 1 or args.sync_repeats < 1:
        p.error("--repeats and --sync-repeats must be at least 1")
    return args


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


# ------------------------------------------------------------------------------------------- generation


def llm_args(args: argparse.Namespace, model: Path, ours: dict[str, Any]) -> dict[str, Any]:
    """What `RolloutEngine._setup` passes to `vllm.LLM` on a CPU with these engine options. The settings
    posttrain chooses for itself (logprobs mode; on CPU, whole-prompt prefill, its batch budget and the KV cache bytes) are
    copied from the running posttrain engine `ours`; the resolved configs of both engines are compared at
    run time."""
    return {
        "model": str(model),
        "seed": 0,
        "max_model_len": args.max_model_len,
        "max_logprobs": 20,
        "logprobs_mode": ours["logprobs_mode"],
        "tensor_parallel_size": 1,
        "enforce_eager": True,
        "kv_cache_memory_bytes": ours["kv_cache_memory_bytes"],
        "dtype": "float32",
        "distributed_executor_backend": "uni",
        "enable_chunked_prefill": ours["chunked_prefill"],
        "max_num_batched_tokens": ours["max_num_batched_tokens"],
        "max_num_seqs": ours["max_num_seqs"],
    }


def sampling_kwargs(req: Any) -> dict[str, Any]:
    """The `vllm.SamplingParams` fields posttrain sets from a RolloutRequest (rollout/engine.py `_params`)."""
    return {
        "n": req.n,
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "stop_token_ids": req.stop_token_ids,
        "seed": req.seed,
        "logprobs": req.logprobs,
        "prompt_logprobs": req.prompt_logprobs,
        "ignore_eos": req.ignore_eos,
        "skip_special_tokens": True,
    }


class BareVLLM:
    """A Ray actor holding nothing but `vllm.LLM` (in-process engine core, as posttrain's engine)."""

    def __init__(self, args: dict[str, Any]) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        self.llm = LLM(**args)

    def generate(
        self, prompts: list[list[int]], params: list[dict[str, Any]]
    ) -> tuple[float, list[list[list[int]]]]:
        """Seconds of `LLM.generate` alone, and each prompt's samples' token ids."""
        from vllm import SamplingParams

        inputs: Any = [{"prompt_token_ids": p} for p in prompts]
        sampling = [SamplingParams(**kw) for kw in params]
        t0 = time.perf_counter()
        outs = self.llm.generate(inputs, sampling, use_tqdm=False)
        seconds = time.perf_counter() - t0
        return seconds, [[list(c.token_ids) for c in sorted(o.outputs, key=lambda c: c.index)] for o in outs]


def engine_summary(actor: Any) -> dict[str, Any]:
    """The resolved vLLM settings that decide speed, and the actor's threads (runs inside either actor)."""
    import torch

    cfg = actor.llm.llm_engine.vllm_config
    return {
        "dtype": str(cfg.model_config.dtype),
        "max_model_len": cfg.model_config.max_model_len,
        "enforce_eager": cfg.model_config.enforce_eager,
        "max_num_seqs": cfg.scheduler_config.max_num_seqs,
        "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
        "chunked_prefill": cfg.scheduler_config.enable_chunked_prefill,
        "kv_blocks": cfg.cache_config.num_gpu_blocks,
        "kv_cache_memory_bytes": cfg.cache_config.kv_cache_memory_bytes,
        "block_size": cfg.cache_config.block_size,
        "prefix_caching": cfg.cache_config.enable_prefix_caching,
        "logprobs_mode": str(cfg.model_config.logprobs_mode),
        "max_logprobs": cfg.model_config.max_logprobs,
        "executor": str(cfg.parallel_config.distributed_executor_backend),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING"),
    }


def side_summary(seconds: list[float], tokens: int) -> dict[str, Any]:
    """One side's generation figures: its timed repeats, their median and generated tokens/s."""
    return {
        "seconds": seconds,
        "median_s": median(seconds),
        "tokens": tokens,
        "tokens_per_s": tokens / median(seconds),
    }


def bench_generation(
    args: argparse.Namespace, model: Path, prompts: list[list[int]], engines: Any
) -> dict[str, Any]:
    from posttrain.rollout import RolloutRequest
    from posttrain.workers import WorkerGroup

    ours = engines.workers.run(engine_summary)[0]
    bare = WorkerGroup(
        BareVLLM,
        1,
        num_cpus=args.threads,
        name="bare-vllm",
        init_args=(llm_args(args, model, ours),),
        env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
    )
    try:
        configs = {"bare": bare.run(engine_summary)[0], "posttrain": ours}
        reqs = [
            RolloutRequest(p, n=args.n, max_tokens=args.max_tokens, seed=i, ignore_eos=args.ignore_eos)
            for i, p in enumerate(prompts)
        ]
        params = [sampling_kwargs(r) for r in reqs]
        times: dict[str, list[float]] = {"bare": [], "bare_roundtrip": [], "posttrain": []}
        tokens: dict[str, int] = {}
        ids: dict[str, list[list[list[int]]]] = {}

        def run_bare(timed: bool) -> None:
            t0 = time.perf_counter()
            seconds, out = bare.call("generate", prompts, params)[0]
            roundtrip = time.perf_counter() - t0
            ids["bare"], tokens["bare"] = out, sum(len(s) for o in out for s in o)
            if timed:
                times["bare"].append(seconds)
                times["bare_roundtrip"].append(roundtrip)

        def run_posttrain(timed: bool) -> None:
            t0 = time.perf_counter()
            results = engines.generate(reqs)
            seconds = time.perf_counter() - t0
            ids["posttrain"] = [[s.token_ids for s in r.samples] for r in results]
            tokens["posttrain"] = sum(len(s) for o in ids["posttrain"] for s in o)
            if timed:
                times["posttrain"].append(seconds)

        load = [common.load_1m()]
        for rep in range(args.repeats + 1):  # rep 0: warm-up; the order alternates so drift hits both
            order = [run_bare, run_posttrain] if rep % 2 == 0 else [run_posttrain, run_bare]
            for fn in order:
                fn(rep > 0)
            load.append(common.load_1m())
            print(
                f"  generation repeat {rep}{' (warm-up)' if rep == 0 else ''}: bare "
                f"{times['bare'][-1] if rep else float('nan'):.2f} s, posttrain "
                f"{times['posttrain'][-1] if rep else float('nan'):.2f} s, load {load[-1]}",
                flush=True,
            )
    finally:
        bare.shutdown()
    side = {k: side_summary(seconds, tokens[k.removesuffix("_roundtrip")]) for k, seconds in times.items()}
    return {
        "prompts": len(prompts),
        "prompt_tokens": sum(len(p) for p in prompts),
        "vllm_config": configs,
        "configs_equal": configs["bare"] == configs["posttrain"],
        "token_ids_equal": ids["bare"] == ids["posttrain"],
        "bare": side["bare"],
        "bare_roundtrip": side["bare_roundtrip"],
        "posttrain": side["posttrain"],
        "ratio_tokens_per_s": side["posttrain"]["tokens_per_s"] / side["bare"]["tokens_per_s"],
        # Each repeat's two calls ran back to back: their ratios are less exposed to load drift.
        "ratio_per_repeat": [b / p for b, p in zip(times["bare"], times["posttrain"], strict=True)],
        "load_avg_1m": load,
    }


# ------------------------------------------------------------------------------------------ weight sync


def memcpy_bandwidth(threads: int) -> dict[str, float]:
    """GB/s (bytes copied / s, 1 GB = 1e9 B), median of repeats: `np.copyto` of a 1 GiB buffer (one
    thread: a memcpy) and torch's `copy_` on `threads` threads."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    src = np.random.default_rng(0).integers(0, 255, MEMCPY_MB * 2**20, dtype=np.uint8)
    dst = np.empty_like(src)

    def timed(fn: Callable[[], Any]) -> float:
        fn()  # warm-up (page faults of `dst`)
        ts = []
        for _ in range(MEMCPY_REPEATS):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return median(ts)

    copy_s = timed(lambda: np.copyto(dst, src))
    torch_s = timed(lambda: torch.from_numpy(dst).copy_(torch.from_numpy(src)))
    return {
        "mb": MEMCPY_MB,
        "memcpy_s": copy_s,
        "memcpy_gb_s": src.nbytes / copy_s / 1e9,
        "torch_copy_s": torch_s,
        "torch_copy_gb_s": src.nbytes / torch_s / 1e9,
    }


def learner_config(args: argparse.Namespace, model: Path) -> Any:
    from posttrain.config import validate

    return validate(
        "sft",
        {
            **common.posttrain_settings(args.out / f"rollout-learner-{args.size}", model, args.threads),
            "data": {"train": [{"path": str(args.out / "arithmetic")}]},  # not read: no training here
        },
    )


def sender_phases(learner: Any) -> dict[str, float]:
    """Inside the learner: its sender's seconds by phase in the last sync."""
    return dict(learner._sender.phases)


def bench_sync(args: argparse.Namespace, model: Path, engines: Any, probe_ids: list[int]) -> dict[str, Any]:
    from posttrain.groups import LearnerGroup
    from posttrain.rollout import stream_sync_from_learners, sync_from_learners

    memcpy = memcpy_bandwidth(args.threads)
    print(
        f"  memcpy {memcpy['memcpy_gb_s']:.2f} GB/s, torch copy_ {memcpy['torch_copy_gb_s']:.2f} GB/s, "
        f"load {common.load_1m()}",
        flush=True,
    )
    learners = LearnerGroup(learner_config(args, model), str(model), False, total_steps=1)
    load = [common.load_1m()]
    version = 0
    variants: dict[str, dict[str, Any]] = {}
    try:
        calls: dict[str, Callable[[int], list[dict[str, Any]]]] = {
            "sync": lambda v: sync_from_learners(learners, engines, v, args.bucket_mb),
            "sync+probe": lambda v: sync_from_learners(learners, engines, v, args.bucket_mb, probe_ids),
            "stream": lambda v: stream_sync_from_learners(
                learners, engines, v, args.bucket_mb, args.max_inflight
            ),
            "stream+probe": lambda v: stream_sync_from_learners(
                learners, engines, v, args.bucket_mb, args.max_inflight, probe_ids
            ),
        }
        phases: dict[str, dict[str, float]] = {}
        for name, call in calls.items():
            seconds, reports = [], []
            for rep in range(args.sync_repeats + 1):
                version += 1
                t0 = time.perf_counter()
                reports = call(version)
                if rep:
                    seconds.append(time.perf_counter() - t0)
            if name == "sync":
                phases = {"sender": learners.workers.run(sender_phases)[0], "engine": reports[0]["phases"]}
            nbytes = int(reports[0]["bytes"])
            s = median(seconds)
            variants[name] = {
                "seconds": seconds,
                "median_s": s,
                "bytes": nbytes,
                "tensors": reports[0]["tensors"],
                "gb_s": nbytes / s / 1e9,
                "ratio_to_memcpy": nbytes / s / 1e9 / memcpy["memcpy_gb_s"],
                "probe_max_abs": reports[0].get("probe_max_abs"),
            }
            load.append(common.load_1m())
            print(f"  {name}: median {s * 1e3:.1f} ms, load {load[-1]}", flush=True)
    finally:
        learners.shutdown()
    return {
        "memcpy": memcpy,
        "bucket_mb": args.bucket_mb,
        "max_inflight": args.max_inflight,
        "probe_tokens": len(probe_ids),
        "variants": variants,
        "phases_last_sync": phases,
        "load_avg_1m": load,
    }


# ----------------------------------------------------------------------------------------------------- main


def report_generation(g: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"\nGeneration: {g['prompts']} prompts ({g['prompt_tokens']} prompt tokens) × n={args.n} × "
        f"{args.max_tokens} tokens, ignore_eos {args.ignore_eos}; vLLM configs equal {g['configs_equal']}, "
        f"token ids equal {g['token_ids_equal']}"
    )
    sides = (
        ("bare", "bare vllm.LLM.generate (timed in actor)"),
        ("bare_roundtrip", "  (same call, timed here: + Ray)"),
        ("posttrain", "posttrain RolloutGroup.generate"),
    )
    common.print_table(
        ("side", "median s", "tokens", "tokens/s"),
        ("<40", ">9.3f", ">7", ">9.0f"),
        [(label, g[key]["median_s"], g[key]["tokens"], g[key]["tokens_per_s"]) for key, label in sides],
    )
    per = ", ".join(f"{r:.3f}" for r in g["ratio_per_repeat"])
    print(f"ratio posttrain/bare tokens/s = {g['ratio_tokens_per_s']:.3f}× (goal ≥ 0.95×); per repeat {per}")


def report_sync(s: dict[str, Any]) -> None:
    m = s["memcpy"]
    first = next(iter(s["variants"].values()))
    print(
        f"\nWeight sync: {first['bytes'] / 1e6:.1f} MB in {first['tensors']} tensors, bucket {s['bucket_mb']} MB, "
        f"probe {s['probe_tokens']} tokens; memcpy {m['memcpy_gb_s']:.2f} GB/s (1 GiB np.copyto), "
        f"torch copy_ {m['torch_copy_gb_s']:.2f} GB/s"
    )
    common.print_table(
        ("variant", "median s", "GB/s", "% of memcpy"),
        ("<14", ">9.3f", ">7.3f", ">12.1%"),
        [(name, v["median_s"], v["gb_s"], v["ratio_to_memcpy"]) for name, v in s["variants"].items()],
    )
    print("phases of the last plain sync (sender and engine clocks; they overlap):")
    for side, phases in s["phases_last_sync"].items():
        print(f"  {side:<7}" + "  ".join(f"{k} {v * 1e3:.0f} ms" for k, v in phases.items()))


# ------------------------------------------------------------------------------------------- multi-turn


def calculator_chats(count: int) -> list[list[dict[str, Any]]]:
    """Thinking-mode conversations that add two numbers with one calculator call."""
    chats = []
    for i in range(count):
        a, b = 17 * i + 23, 31 * i + 58
        call = {
            "type": "function",
            "function": {"name": "calculator", "arguments": {"expression": f"{a}+{b}"}},
        }
        chats.append(
            [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {
                    "role": "assistant",
                    "content": "",
                    "reasoning_content": f"I add {a} and {b}.",
                    "tool_calls": [call],
                },
                {"role": "tool", "content": str(a + b)},
                {"role": "assistant", "content": str(a + b), "reasoning_content": "The tool gave the sum."},
            ]
        )
    return chats


def bench_multi_turn(args: argparse.Namespace) -> dict[str, Any]:
    from posttrain.rewards.tools import load_tools
    from posttrain.rollout import RolloutGroup, RolloutRequest
    from posttrain.rollout.config import ToolsConfig
    from posttrain.synthetic.models import build_tiny_model
    from posttrain.synthetic.tool_policy import tool_policy
    from posttrain.workers import init_ray

    schemas = load_tools(["calculator"]).schemas
    chats = calculator_chats(16)
    base = build_tiny_model(args.out / "tools-micro", "text", "micro", tools=True)  # overfits in seconds
    policy = tool_policy(base, args.out / "tools-micro-policy", chats, schemas)
    init_ray(None, num_cpus=args.threads)
    engines = RolloutGroup(
        str(policy),
        1,
        num_cpus=args.threads,
        name="multi-turn-bench",
        seed=0,
        max_model_len=args.max_model_len,
    )
    tok = load_tokenizer(policy)
    prompts = [
        tok.encode(
            tok.apply_chat_template(
                chats[i % len(chats)][:1], tools=schemas, add_generation_prompt=True, tokenize=False
            ),
            add_special_tokens=False,
        )
        for i in range(args.prompts)
    ]
    tools = ToolsConfig(
        names=["calculator"], max_turns=3, max_episode_tokens=args.max_model_len - max(map(len, prompts))
    )
    episodes = [
        RolloutRequest(p, n=args.n, max_tokens=args.max_tokens, seed=i, thinking=True)
        for i, p in enumerate(prompts)
    ]
    times: dict[str, list[float]] = {"multi_turn": [], "single_turn": []}
    tokens: dict[str, int] = {}
    try:
        for rep in range(args.repeats + 1):  # rep 0: warm-up (and it fixes the single-turn length)
            t0 = time.perf_counter()
            samples = [s for r in engines.generate(episodes, tools) for s in r.samples]
            seconds = time.perf_counter() - t0
            tokens["multi_turn"] = sum(len(s.token_ids) - len(s.forced) for s in samples)
            calls = sum(len(s.tool_calls) for s in samples) / len(samples)
            if rep == 0:
                per_sample = max(1, round(tokens["multi_turn"] / len(samples)))
                single = [
                    RolloutRequest(p, n=args.n, max_tokens=per_sample, seed=i, ignore_eos=True)
                    for i, p in enumerate(prompts)
                ]
            t1 = time.perf_counter()
            tokens["single_turn"] = sum(len(s.token_ids) for r in engines.generate(single) for s in r.samples)
            single_seconds = time.perf_counter() - t1
            if rep > 0:
                times["multi_turn"].append(seconds)
                times["single_turn"].append(single_seconds)
            print(
                f"  repeat {rep}: multi-turn {seconds:.2f} s ({calls:.2f} calls/episode), single-turn {single_seconds:.2f} s",
                flush=True,
            )
    finally:
        engines.shutdown()
    side = {
        k: {"median_s": median(v), "tokens": tokens[k], "tokens_per_s": tokens[k] / median(v)}
        for k, v in times.items()
    }
    return {
        **side,
        "samples": len(samples),
        "calls_per_episode": calls,
        "turns_per_episode": sum(len(s.turn_starts) for s in samples) / len(samples),
        "ratio_tokens_per_s": side["multi_turn"]["tokens_per_s"] / side["single_turn"]["tokens_per_s"],
    }


def load_tokenizer(model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def report_multi_turn(m: dict[str, Any]) -> None:
    print(
        f"\nMulti-turn: {m['samples']} episodes, {m['turns_per_episode']:.2f} turns and {m['calls_per_episode']:.2f} "
        "calculator calls each, against single-turn at equal generated tokens"
    )
    common.print_table(
        ("side", "median s", "tokens", "tokens/s"),
        ("<14", ">9.3f", ">7", ">9.0f"),
        [(k, m[k]["median_s"], m[k]["tokens"], m[k]["tokens_per_s"]) for k in ("multi_turn", "single_turn")],
    )
    print(f"ratio multi-turn/single-turn tokens/s = {m['ratio_tokens_per_s']:.3f}× (goal ≥ 0.8×)")


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.multi_turn:
        result = bench_multi_turn(args)
        report_multi_turn(result)
        save_result(args.out / "rollout_bench.json", "multi_turn", {"args": common.args_json(args), **result})
        return
    from posttrain.rollout import RolloutGroup, RolloutRequest
    from posttrain.workers import init_ray

    model = common.bench_model(args.out, args.size, args.layers)
    prompts = common.arithmetic_prompt_ids(model, args.prompts)
    load = {"before": common.load_1m()}
    init_ray(None, num_cpus=3 * args.threads)  # bare engine, posttrain engine, learner: one at a time busy
    engines = RolloutGroup(
        str(model),
        1,
        num_cpus=args.threads,
        name="rollout-bench",
        seed=0,
        max_model_len=args.max_model_len,
        kv_cache_gib=REAL_SHAPE_KV_GIB if args.size == common.REAL_SHAPE else None,
    )
    summary: dict[str, Any] = {
        "args": common.args_json(args),
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
    }
    try:
        if not args.skip_generation:
            summary["generation"] = bench_generation(args, model, prompts, engines)
        if not args.skip_sync:
            req = RolloutRequest(prompts[0], max_tokens=PROBE_EXTRA_TOKENS, seed=0, ignore_eos=True)
            sampled = engines.generate([req])[0].samples[0].token_ids
            summary["sync"] = bench_sync(args, model, engines, prompts[0] + sampled)
    finally:
        engines.shutdown()
    load["after"] = common.load_1m()
    summary["load_avg_1m"] = load

    print(
        f"\nRollout bench: {common.size_label(args)} model, {args.threads} threads per actor; 1-min load "
        f"average before/after {load['before']}/{load['after']} (the run itself adds ~{args.threads})"
    )
    if "generation" in summary:
        report_generation(summary["generation"], args)
    if "sync" in summary:
        report_sync(summary["sync"])
    # one entry per model size: runs of both sizes share the file
    save_result(args.out / "rollout_bench.json", args.size, summary)


def save_result(path: Path, key: str, value: dict[str, Any]) -> None:
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        results = {}
    results[key] = value
    common.write_json(path, results)


if __name__ == "__main__":
    main()
