"""Generation prompts: the evaluation sets' and the RL prompt set, rendered with the generation prompt."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from posttrain.config import DatasetSpec
from posttrain.data.chat import render
from posttrain.data.processing import tokenizer_of
from posttrain.data.rows import EVAL_NEEDS, Mode, Needs, load_samples

if TYPE_CHECKING:
    import torch


@dataclass
class EvalPrompt:
    prompt_ids: list[int]  # with image pads expanded (VL)
    prompt_text: str  # one image pad per image, as vLLM expects with `multi_modal_data`
    solution: str
    mode: Mode
    row: int
    images: list[Any] = field(default_factory=list)
    vision: dict[str, torch.Tensor] | None = (
        None  # pixel_values, image_grid_thw, mm_token_type_ids (HF generate)
    )
    extra: dict[str, Any] = field(default_factory=dict)


def build_eval_prompts(
    spec: DatasetSpec,
    processing: Any,
    thinking: bool | None = None,
    max_samples: int | None = None,
    needs: Needs = EVAL_NEEDS,
    tools: list[dict[str, Any]] | None = None,
) -> list[EvalPrompt]:
    """Generation prompts of the first `max_samples` rows; `thinking` None keeps the dataset's own choice.
    Also the RL prompt set, whose `needs` are its rewards'; `tools`: the schemas that rows without a
    `tools` column declare."""
    is_vl = hasattr(processing, "image_processor")
    if max_samples is not None:
        spec = spec.model_copy(update={"max_rows": min(max_samples, spec.max_rows or max_samples)})
    samples, _, _ = load_samples(spec, for_eval=True, needs=needs, tools=tools)
    prompts = []
    for s in samples:
        if thinking is not None:
            s.mode = "thinking" if thinking else "non_thinking"
        text = render(s, processing, is_vl, add_generation_prompt=True)
        vision = None
        if is_vl:
            out = processing(text=[text], images=s.images or None, return_tensors="pt")
            ids = out["input_ids"][0].tolist()
            vision = {k: out[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids") if k in out}
        else:
            ids = tokenizer_of(processing)(text, add_special_tokens=False)["input_ids"]
        solution = str(s.extra.get("solution", ""))
        prompts.append(EvalPrompt(ids, text, solution, s.mode, s.row, s.images, vision, s.extra))
    return prompts
