"""LoRA SFT on the DeepSpeed learner: the exported PEFT adapter reloads with the learner's exact logits, and
the merged export equals base + adapter."""

from __future__ import annotations

from pathlib import Path

import ray
import torch

from posttrain.config import validate

from helpers import next_token_logprobs


def test_lora_adapter_export_reloads_exactly(tmp_path: Path, tiny_text_model: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from posttrain.data.processing import load_processing
    from posttrain.data.sft_dataset import build_sft_dataset
    from posttrain.sft.driver import train_step
    from posttrain.stage import StageRun, prepare_inputs

    data_dir = tmp_path / "arithmetic"
    cfg = validate(
        "sft",
        {
            "output_dir": str(tmp_path / "run"),
            "device": "cpu",
            "model": {"path": str(tiny_text_model), "lora": {"r": 4, "alpha": 8, "merge_on_export": True}},
            "data": {
                "train": [
                    {
                        "path": str(data_dir),
                        "build": {"builder": "arithmetic", "args": {"train_size": 64, "test_size": 4}},
                    }
                ],
                "max_length": 128,
            },
            "train": {"global_batch_size": 8, "micro_batch_size": 4, "max_steps": 3, "lr": 1e-2},
            "logging": {"progress": False},
        },
    )
    model_path = prepare_inputs(cfg.model, [*cfg.data.train, cfg.data.eval])
    processing, is_vl = load_processing(model_path)
    data = build_sft_dataset(cfg.data, processing, is_vl)
    probe = data.collate(list(range(4)))
    with StageRun(cfg) as run:
        run.start_ray(1)
        learners = run.learners(model_path, is_vl, total_steps=3)
        counts = learners.num_parameters()
        for step in range(3):
            train_step(learners, data, step, cfg)
        trained = learners.batch_logprobs(probe)
        final = run.export(learners, processing)
    ray.shutdown()  # the stage started Ray in this process, as a driver does: later modules start their own

    assert 0 < counts["trainable"] < counts["total"] / 5
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in final.iterdir()}
    assert not (final / "model.safetensors").exists()  # adapter only, the base is not copied

    def logprobs(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            logits = model(
                input_ids=probe["input_ids"], position_ids=probe["position_ids"], use_cache=False
            ).logits
        return next_token_logprobs(logits, probe["input_ids"])

    base = AutoModelForCausalLM.from_pretrained(model_path)
    before = logprobs(base)
    reloaded = logprobs(PeftModel.from_pretrained(base, final).eval())
    merged = logprobs(AutoModelForCausalLM.from_pretrained(final / "merged"))
    assert (trained - before).abs().max() > 1e-3  # the adapter learned something
    assert (reloaded - trained).abs().max() < 1e-5
    assert (merged - reloaded).abs().max() < 1e-5
