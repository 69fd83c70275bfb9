"""The installed stack serves tiny models: vLLM's logprobs of the tiny text and VL models match HF's."""

import gc
import random
from pathlib import Path

import pytest

from posttrain.synthetic.tasks import SHAPES_PROMPT, render_shapes, shape_scene

from helpers import vl_response_logprobs

LLM_ARGS = {
    "enforce_eager": True,
    "kv_cache_memory_bytes": 64 << 20,  # bytes, not a share of one NUMA node's RAM
    "dtype": "float32",
    "max_model_len": 512,
    "seed": 0,
}


@pytest.fixture
def in_process_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: no spawn in pytest


def hf_logprobs(logits, ids: list[int], n_prompt: int) -> list[float]:
    """Log-probabilities of ids[n_prompt:] under fp32 logits of the whole sequence."""
    import torch

    logp = torch.log_softmax(logits[0, n_prompt - 1 : -1].float(), dim=-1)
    return logp.gather(-1, torch.tensor(ids[n_prompt:])[:, None])[:, 0].tolist()


def test_vllm_text_logprobs_match_hf(tiny_text_model: Path, in_process_vllm: None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(tiny_text_model)
    chat = [{"role": "user", "content": "What is 12+34?"}]
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
    llm = LLM(str(tiny_text_model), **LLM_ARGS)
    params = SamplingParams(max_tokens=12, temperature=1.0, logprobs=0, seed=0, ignore_eos=True)
    out = llm.generate([tok.decode(prompt)], params, use_tqdm=False)[0]
    del llm
    gc.collect()
    assert out.prompt_token_ids == prompt  # vLLM tokenises the rendered chat exactly like HF
    gen = list(out.outputs[0].token_ids)
    vllm_lp = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, gen, strict=True)]
    model = AutoModelForCausalLM.from_pretrained(tiny_text_model)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + gen])).logits
    assert hf_logprobs(logits, prompt + gen, len(prompt)) == pytest.approx(vllm_lp, abs=1e-4)


def test_vllm_vl_generates_and_matches_hf(tiny_vl_model: Path, in_process_vllm: None) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from vllm import LLM, SamplingParams

    proc = AutoProcessor.from_pretrained(tiny_vl_model)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": SHAPES_PROMPT}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    image = render_shapes(shape_scene(random.Random(0)))
    llm = LLM(str(tiny_vl_model), limit_mm_per_prompt={"image": 1, "video": 0}, **LLM_ARGS)
    params = SamplingParams(max_tokens=8, temperature=1.0, logprobs=0, seed=0, ignore_eos=True)
    out = llm.generate([{"prompt": text, "multi_modal_data": {"image": image}}], params, use_tqdm=False)[0]
    del llm
    gc.collect()
    inputs = proc(text=[text], images=[image], return_tensors="pt")
    prompt = inputs["input_ids"][0].tolist()
    assert out.prompt_token_ids == prompt  # image pads expanded identically
    gen = list(out.outputs[0].token_ids)
    assert len(gen) == 8
    vllm_lp = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, gen, strict=True)]
    model = AutoModelForImageTextToText.from_pretrained(tiny_vl_model)
    assert vl_response_logprobs(model, inputs, prompt, gen) == pytest.approx(vllm_lp, abs=1e-4)
