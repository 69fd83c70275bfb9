"""Helpers shared by test modules of more than one tier (tests/ is on sys.path: `from helpers import ...`)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from posttrain.config import SFTConfig, validate


def run_ok(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a `posttrain` command line; it must exit 0 (the end of its stderr is the failure message)."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def sft_config(tmp_path: Path, model: Path, **model_changes: Any) -> SFTConfig:
    """A one-step SFT config on a generated arithmetic task, two learners, `model` with `model_changes`."""
    task = {
        "path": str(tmp_path / "arithmetic"),
        "build": {"builder": "arithmetic", "args": {"train_size": 24}},
    }
    return validate(
        "sft",
        {
            "output_dir": str(tmp_path / "out"),
            "model": {"path": str(model), **model_changes},
            "data": {"train": [task], "max_length": 200},
            "train": {"global_batch_size": 8, "micro_batch_size": 4, "max_steps": 1},
            "learners": {"num_learners": 2},
        },
    )


def sync_sft_config(tmp_path: Path, model_path: Path, **sections: Any) -> SFTConfig:
    """An SFT config on a 32-row arithmetic task for the weight-sync tests; `sections` replace or add
    top-level sections (a LoRA run passes its whole `model`)."""
    raw: dict[str, Any] = {
        "output_dir": str(tmp_path / "run"),
        "device": "cpu",
        "model": {"path": str(model_path)},
        "data": {
            "train": [
                {
                    "path": str(tmp_path / "arith"),
                    "build": {"builder": "arithmetic", "args": {"train_size": 32, "test_size": 4}},
                }
            ],
            "max_length": 128,
        },
        "logging": {"progress": False},
    }
    return validate("sft", raw | sections)


def next_token_logprobs(logits: Any, tokens: Any) -> Any:
    """log p(tokens[:, t+1] | ≤ t) of every position from full logits [B, T, V], in fp32 at least: [B, T-1]
    (the learner's computation before its loss path went chunked, kept as the reference)."""
    import torch

    logits = logits[:, :-1]
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)


def objective_on_logits(objective: Any, logits: Any, input_ids: Any, batch: Any, norms: Any) -> Any:
    """`objective`'s (loss, statistics) of given full logits [B, T, V]: its loss path with an identity LM
    head (the logits as hidden states), chunked, so gradients with respect to `logits` are the objective's."""
    import torch

    from posttrain.loss_head import ChunkedHead

    vocab = logits.shape[-1]
    head = torch.nn.Linear(vocab, vocab, bias=False, dtype=logits.dtype).requires_grad_(False)
    head.weight.copy_(torch.eye(vocab, dtype=logits.dtype))
    loss_head = ChunkedHead(head, objective.terms(input_ids, batch, norms), chunk_rows=3)
    return objective(loss_head.unpack(loss_head(logits)), input_ids, batch, norms)


def vl_response_logprobs(model: Any, inputs: Any, prompt: list[int], response: list[int]) -> list[float]:
    """Log-probabilities of `response` after the processed VL `inputs` (prompt ids `prompt`) under an HF
    Qwen3-VL model, in fp32."""
    import torch

    ids = torch.tensor([prompt + response])
    mm = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, len(response), dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=mm,
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
        ).logits
    logp = torch.log_softmax(logits[0, len(prompt) - 1 : -1].float(), dim=-1)
    return [float(x) for x in logp.gather(-1, torch.tensor(response)[:, None])[:, 0]]


def assert_only_language_model_trained(before_file: Path, after_file: Path) -> None:
    """The vision tower's weights are bit-identical after training, the language model's are not."""
    import torch
    from safetensors.torch import load_file

    before, after = load_file(str(before_file)), load_file(str(after_file))
    vision = [k for k in before if ".visual." in k]
    language = [k for k in before if ".language_model." in k]
    assert vision and language and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in language)
