"""Rollout engines (vLLM in Ray actors) and learner -> engine weight sync, on the tiny text model.

One module-scoped group of two in-process CPU engines (half a core each) serves every test; the DeepSpeed
test adds a one-core ZeRO-3 learner beside it. Weight tests push the exact weights they compare against,
so the tests do not depend on each other's order.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from posttrain.groups import LearnerGroup
from posttrain.rollout import Probe, RolloutRequest, WeightSyncError, logprob_mismatch
from posttrain.stage import prepare_inputs
from posttrain.weights import Bucket, SyncManifest, bucket_digests, iter_buckets

from helpers import sync_sft_config, vl_response_logprobs

ENGINE_ARGS = {"gpu_memory_utilization": 0.08, "max_model_len": 512, "seed": 0}


def hf_token_logprobs(model: torch.nn.Module, ids: list[int]) -> list[float]:
    """fp32 log p(ids[t] | ids[<t]) for t = 1..T-1."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    return logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def manifest_of(buckets: list[Bucket], held: dict[str, int] | None = None) -> SyncManifest:
    """What a sender of `buckets` claims (and, in `held`, which unsent tensors the engines must hold)."""
    manifest = SyncManifest(held=held or {})
    for b in buckets:
        for (n, t), digest in zip(b, bucket_digests([t for _, t in b]), strict=True):
            manifest.add(n, digest, t.numel() * t.element_size())
    return manifest


def push(engines: Any, model: torch.nn.Module, version: int, probe_ids: list[int]) -> list[dict[str, Any]]:
    buckets = list(iter_buckets(model.named_parameters(), bucket_mb=0.5))
    probe = Probe(probe_ids, hf_token_logprobs(model, probe_ids))
    reports = engines.update_weights(version, buckets, probe=probe)
    assert all(r["checksum"] == manifest_of(buckets).checksum for r in reports)
    return reports


@pytest.fixture(scope="module")
def engines(tiny_text_model: Path) -> Any:
    from posttrain.rollout import RolloutGroup

    group = RolloutGroup(str(tiny_text_model), num_engines=2, num_cpus=0.5, sync_timeout_s=60, **ENGINE_ARGS)
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def tok(tiny_text_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_text_model)


def chat_ids(tok: Any, text: str, thinking: bool = True) -> list[int]:
    chat = [{"role": "user", "content": text}]
    out = tok.apply_chat_template(
        chat, add_generation_prompt=True, enable_thinking=thinking, return_dict=True
    )
    return list(out["input_ids"])


@pytest.fixture(scope="module")
def hf_model(tiny_text_model: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_text_model, dtype=torch.float32).eval()


def test_generate_n_samples_logprobs_finish_reasons(engines: Any, tok: Any) -> None:
    prompts = [chat_ids(tok, f"What is {a}+{a}?") for a in range(5)]
    reqs = [
        RolloutRequest(p, n=3, max_tokens=4, seed=i, logprobs=2, prompt_logprobs=0)
        for i, p in enumerate(prompts)
    ]
    t0 = time.perf_counter()
    pending = engines.submit(reqs)  # returns at once; collect waits
    results = engines.collect(pending)
    elapsed = time.perf_counter() - t0
    assert [r.prompt_token_ids for r in results] == prompts  # split over 2 engines, gathered in order
    for r in results:
        assert len(r.samples) == 3
        assert r.prompt_logprobs is not None and r.prompt_logprobs[0] is None
        assert len(r.prompt_logprobs) == len(r.prompt_token_ids)
        for s in r.samples:
            assert len(s.token_ids) == len(s.logprobs) == 4 and s.finish_reason == "length"
            assert s.top_logprobs is not None and all(
                s.token_ids[i] in d for i, d in enumerate(s.top_logprobs)
            )
            assert all(lp <= 0 for lp in s.logprobs)
    # Greedy first token as a stop token: finishes with "stop" after one token.
    greedy = engines.generate([RolloutRequest(prompts[0], temperature=0.0, max_tokens=1)])[0].samples[0]
    stop = RolloutRequest(prompts[0], temperature=0.0, max_tokens=50, stop_token_ids=greedy.token_ids)
    stopped = engines.generate([stop])[0].samples[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == greedy.token_ids
    print(f"\n5 prompts × 3 samples × 4 tokens on 2 engines: {elapsed:.2f} s")


def test_sampled_logprobs_equal_hf_fp32(engines: Any, tok: Any, hf_model: torch.nn.Module) -> None:
    prompt = chat_ids(tok, "What is 12+34?")
    push(engines, hf_model, version=1, probe_ids=prompt)  # the original weights, whatever ran before
    res = engines.generate([RolloutRequest(prompt, n=4, max_tokens=12, seed=0, ignore_eos=True)])[0]
    engine_lp = [s.logprobs for s in res.samples]
    hf_lp = [hf_token_logprobs(hf_model, prompt + s.token_ids)[len(prompt) - 1 :] for s in res.samples]
    m = logprob_mismatch(engine_lp, hf_lp)
    assert m["tokens"] == 48 and m["max_abs"] < 1e-4, m
    assert res.weight_version == 1


def test_weight_update_serves_new_version(engines: Any, tok: Any, tiny_text_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_text_model, dtype=torch.float32)
    prompt = chat_ids(tok, "What is 7+8?")
    target = torch.tensor([prompt + tok.encode("<think>\n7+8=15\n</think>\n\n15<|im_end|>")])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):  # a few real optimizer steps, so every tensor moves
        loss = model(input_ids=target, labels=target).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    before = engines.generate([RolloutRequest(prompt, max_tokens=8, seed=3, ignore_eos=True)])[0].samples[0]
    t0 = time.perf_counter()
    reports = push(engines, model, version=2, probe_ids=prompt)
    sync_s = time.perf_counter() - t0
    assert [r["version"] for r in reports] == [2, 2] and [i["version"] for i in engines.info()] == [2, 2]
    res = engines.generate([RolloutRequest(prompt, n=2, max_tokens=8, seed=3, ignore_eos=True)])[0]
    assert res.weight_version == 2
    for s in res.samples:
        hf = hf_token_logprobs(model, prompt + s.token_ids)[len(prompt) - 1 :]
        assert logprob_mismatch(s.logprobs, hf)["max_abs"] < 1e-4
    stale = hf_token_logprobs(model, prompt + before.token_ids)[len(prompt) - 1 :]
    assert logprob_mismatch(before.logprobs, stale)["max_abs"] > 1e-3  # the old version really differed
    mb = reports[0]["bytes"] / 2**20
    print(f"\nsync {mb:.1f} MB to 2 engines: {sync_s:.2f} s ({mb / sync_s:.0f} MB/s per engine incl. probe)")


def test_corrupted_sync_raises_naming_version(engines: Any, tok: Any, hf_model: torch.nn.Module) -> None:
    prompt = chat_ids(tok, "What is 1+1?")
    push(engines, hf_model, version=3, probe_ids=prompt)
    buckets = list(iter_buckets(hf_model.named_parameters(), bucket_mb=0.5))
    manifest = manifest_of(buckets)
    name, t = buckets[-1][-1]
    buckets[-1][-1] = (name, t.clone().index_put_((torch.tensor([0]),), torch.tensor(1.0), accumulate=True))
    with pytest.raises(WeightSyncError, match=r"version 4 .*rollout-\d.*checksum mismatch") as err:
        engines.update_weights(4, buckets, manifest)
    assert err.value.version == 4 and name in err.value.reason
    # A probe the engine cannot meet (its expected logprobs are someone else's) fails the same way.
    wrong = Probe(prompt, [lp - 0.01 for lp in hf_token_logprobs(hf_model, prompt)])
    with pytest.raises(WeightSyncError, match="version 5 .*probe logprobs differ"):
        engines.update_weights(5, list(iter_buckets(hf_model.named_parameters(), bucket_mb=0.5)), None, wrong)
    infos = engines.info()  # failed syncs never claim the new version, and the engines stop serving
    assert [i["version"] for i in infos] == [3, 3] and all("version 5 failed" in i["dirty"] for i in infos)
    with pytest.raises(RuntimeError, match="will not generate"):
        engines.generate([RolloutRequest(prompt, max_tokens=2)])
    push(engines, hf_model, version=6, probe_ids=prompt)  # a good sync recovers
    assert engines.generate([RolloutRequest(prompt, max_tokens=2)])[0].weight_version == 6


def test_sync_timeout_raises(engines: Any, hf_model: torch.nn.Module, tok: Any) -> None:
    busy = engines.workers.actors[0].__ray_call__.remote(lambda _: time.sleep(3))  # engine 0 cannot answer
    buckets = list(iter_buckets(hf_model.named_parameters(), bucket_mb=0.5))
    engines.sync_timeout_s = 0.5
    try:
        with pytest.raises(WeightSyncError, match=r"version 7 .*rollout-0.*no answer within"):
            engines.update_weights(7, buckets)
    finally:
        engines.sync_timeout_s = 60
    import ray

    ray.get(busy)
    push(engines, hf_model, version=8, probe_ids=chat_ids(tok, "What is 2+2?"))  # re-sync recovers


def test_thinking_budget_closes_think_block(engines: Any, tok: Any, hf_model: torch.nn.Module) -> None:
    end_ids = engines.info()[0]["think_end_ids"]
    assert tok.decode(end_ids) == "</think>\n\n"
    prompt = chat_ids(tok, "What is 3+4?")
    push(engines, hf_model, version=9, probe_ids=prompt)
    reqs = [
        RolloutRequest(prompt, n=3, max_tokens=16, seed=s, thinking_budget=5, ignore_eos=True)
        for s in range(2)
    ]
    results = engines.generate(reqs)
    closed = 0
    for res in results:
        for s in res.samples:
            assert len(s.token_ids) == len(s.logprobs) == 16 and s.finish_reason == "length"
            if end_ids[0] not in s.token_ids[:5]:
                closed += 1
                assert s.token_ids[5:7] == end_ids and s.forced == [5, 6] and s.thinking_tokens == 5
                assert s.logprobs[5:7] == [0.0, 0.0] and "</think>" in s.text
            # Both phases' sampled tokens carry their true logprobs; forced ones are masked out.
            hf = hf_token_logprobs(hf_model, prompt + s.token_ids)[len(prompt) - 1 :]
            keep = [i not in s.forced for i in range(len(s.token_ids))]
            assert logprob_mismatch(s.logprobs, hf, keep)["max_abs"] < 1e-4
    assert closed >= 5  # a random model almost never closes the block on its own
    # Non-thinking prompt (enable_thinking=False) is an ordinary prompt that already holds the empty block.
    plain = chat_ids(tok, "What is 3+4?", thinking=False)
    assert plain[-len(end_ids) :] == end_ids


def test_deepspeed_learner_sync_matches_token_logprobs(
    engines: Any, tmp_path: Path, tiny_text_model: Path
) -> None:
    from posttrain.data.processing import load_processing
    from posttrain.data.sft_dataset import build_sft_dataset
    from posttrain.rollout import stream_sync_from_learners, sync_from_learners
    from posttrain.sft.driver import train_step

    cfg = sync_sft_config(
        tmp_path,
        tiny_text_model,
        train={"global_batch_size": 4, "micro_batch_size": 2, "max_steps": 2, "lr": 1e-2},
        # Two ZeRO-3 ranks: every bucket is a collective gather of partitioned parameters.
        learners={"zero_stage": 3, "num_learners": 2, "cpus_per_learner": 0.5},
    )
    model_path = prepare_inputs(cfg.model, [*cfg.data.train, cfg.data.eval])
    processing, is_vl = load_processing(model_path)
    data = build_sft_dataset(cfg.data, processing, is_vl)
    prompt = chat_ids(processing, "What is 5+6?")
    learners = LearnerGroup(cfg, model_path, is_vl, total_steps=2)
    try:
        for step in range(2):
            train_step(learners, data, step, cfg)
            t0 = time.perf_counter()
            if step == 0:  # every bucket in its own place in shared memory
                reports = sync_from_learners(learners, engines, 100 + step, bucket_mb=1, probe_ids=prompt)
            else:  # pipelined: engines load while the learners gather, one bucket in flight per engine
                reports = stream_sync_from_learners(
                    learners, engines, 100 + step, bucket_mb=0.25, max_inflight=1, probe_ids=prompt
                )
            sync_s = time.perf_counter() - t0
            assert all(r["probe_max_abs"] < 1e-4 for r in reports)
            assert [i["version"] for i in engines.info()] == [100 + step] * 2
            res = engines.generate([RolloutRequest(prompt, n=2, max_tokens=10, seed=step, ignore_eos=True)])[
                0
            ]
            assert res.weight_version == 100 + step
            seqs = torch.tensor([prompt + s.token_ids for s in res.samples])
            lp = learners.batch_logprobs({"input_ids": seqs, "attention_mask": torch.ones_like(seqs)})
            learner_lp = lp[:, len(prompt) - 1 :].tolist()
            m = logprob_mismatch([s.logprobs for s in res.samples], learner_lp)
            print(f"\nstep {step}: sync {sync_s:.2f} s, |Δ| mean {m['mean_abs']:.2e} max {m['max_abs']:.2e}")
            assert m["max_abs"] < 1e-4, m
    finally:
        learners.shutdown()


def test_vl_engine_from_token_ids_and_weight_sync(tiny_vl_model: Path) -> None:
    """Qwen3-VL: prompt ids with one image pad + the image in, vLLM expands the pads as the HF processor
    does; after a sync of perturbed weights the sampled logprobs equal the HF forward's. A frozen tower is
    sent once, and again after a level-2 sleep."""
    import random

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from posttrain.rollout import RolloutGroup
    from posttrain.synthetic.tasks import SHAPES_PROMPT, render_shapes, shape_scene

    proc = AutoProcessor.from_pretrained(tiny_vl_model)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": SHAPES_PROMPT}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = proc.tokenizer(text)["input_ids"]
    image = render_shapes(shape_scene(random.Random(0)))
    inputs = proc(text=[text], images=[image], return_tensors="pt")
    model = AutoModelForImageTextToText.from_pretrained(tiny_vl_model, dtype=torch.float32).eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    group = RolloutGroup(
        str(tiny_vl_model), 1, num_cpus=0.5, name="rollout-vl", limit_images=1, **ENGINE_ARGS
    )
    try:
        text_probe = ids[:12]
        full = list(iter_buckets(model.named_parameters(), bucket_mb=0.5))
        group.update_weights(1, full, probe=Probe(text_probe, hf_token_logprobs(model, text_probe)))
        # A frozen vision tower is sent once: later syncs leave it out and the engine proves it still holds
        # the digests it verified (the images below still go through that tower).
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".visual." not in f".{n}":
                    p.mul_(1.01)
        named = list(model.named_parameters())
        frozen = manifest_of([[(n, p.detach()) for n, p in named if ".visual." in f".{n}"]]).checksums
        trained = list(iter_buckets([(n, p) for n, p in named if n not in frozen], bucket_mb=0.5))
        probe = Probe(text_probe, hf_token_logprobs(model, text_probe))
        report = group.update_weights(2, trained, manifest_of(trained, frozen), probe)[0]
        assert report["tensors"] < len(named) and frozen
        res, budgeted = group.generate(
            [
                RolloutRequest(ids, n=2, max_tokens=6, seed=0, images=[image], ignore_eos=True),
                RolloutRequest(ids, max_tokens=6, seed=0, images=[image], ignore_eos=True, thinking_budget=2),
            ]
        )
        # A level-2 sleep drops the weights (a colocated engine's): no earlier digest vouches for the tower
        # any more, so the next push must send it again.
        assert group.frozen_held
        group.sleep(2)
        group.wake_up("weights")
        assert not group.frozen_held
        with pytest.raises(WeightSyncError, match="not held from an earlier verified sync"):
            group.update_weights(3, trained, manifest_of(trained, frozen), probe)
    finally:
        group.shutdown()
    prompt = inputs["input_ids"][0].tolist()
    assert res.prompt_token_ids == prompt and res.weight_version == 2
    closed = budgeted.samples[0]  # phase 2 re-sends the unexpanded ids with the image: same expansion
    assert budgeted.prompt_token_ids == prompt and len(closed.token_ids) == 6 and closed.forced == [2, 3]
    for s in res.samples:
        hf = vl_response_logprobs(model, inputs, prompt, s.token_ids)
        assert logprob_mismatch(s.logprobs, hf)["max_abs"] < 1e-4


def test_lora_adapter_sync_matches_learner(tmp_path: Path, tiny_text_model: Path) -> None:
    from posttrain.data.processing import load_processing
    from posttrain.data.sft_dataset import build_sft_dataset
    from posttrain.rollout import RolloutGroup, sync_from_learners, sync_lora_from_learners
    from posttrain.sft.driver import train_step

    cfg = sync_sft_config(
        tmp_path,
        tiny_text_model,
        model={"path": str(tiny_text_model), "lora": {"r": 4, "alpha": 8}},
        train={"global_batch_size": 4, "micro_batch_size": 4, "max_steps": 2, "lr": 2e-2},
        learners={"cpus_per_learner": 0.5},  # beside the module's engines (1 CPU) on 2 cores
    )
    model_path = prepare_inputs(cfg.model, [*cfg.data.train, cfg.data.eval])
    processing, is_vl = load_processing(model_path)
    data = build_sft_dataset(cfg.data, processing, is_vl)
    prompt = chat_ids(processing, "What is 9+9?")
    engines = RolloutGroup(model_path, 1, num_cpus=0.5, name="rollout-lora", enable_lora=True, **ENGINE_ARGS)
    learners = LearnerGroup(cfg, model_path, is_vl, total_steps=2)
    try:
        with pytest.raises(ValueError, match="LoRA"):  # full-weight buckets refuse an unmerged adapter
            sync_from_learners(learners, engines, 1)
        base = engines.prompt_logprobs([prompt])[0]
        for step in range(2):
            train_step(learners, data, step, cfg)
            reports = sync_lora_from_learners(learners, engines, step + 1, str(tmp_path / "adapters"), prompt)
            assert reports[0]["version"] == step + 1 and reports[0]["probe_max_abs"] < 1e-4
        res = engines.generate([RolloutRequest(prompt, n=2, max_tokens=8, seed=0, ignore_eos=True)])[0]
        seqs = torch.tensor([prompt + s.token_ids for s in res.samples])
        lp = learners.batch_logprobs({"input_ids": seqs, "attention_mask": torch.ones_like(seqs)})
        m = logprob_mismatch([s.logprobs for s in res.samples], lp[:, len(prompt) - 1 :].tolist())
        print(f"\nLoRA sync: |Δ| mean {m['mean_abs']:.2e} max {m['max_abs']:.2e}")
        assert m["max_abs"] < 1e-4 and res.weight_version == 2
        assert (
            logprob_mismatch(base, engines.prompt_logprobs([prompt])[0])["max_abs"] > 1e-3
        )  # adapter in use
    finally:
        learners.shutdown()
        engines.shutdown()
