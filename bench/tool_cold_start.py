"""How a tool cold start does on held-out prompts: greedy multi-turn episodes with HF generate, the tools
run in this process (no pool, no vLLM), each prompt once with its task's tools and once without (the
no-tool baseline on the same prompts).

    python bench/tool_cold_start.py runs/tiny-sft-tools/final runs/data/arithmetic-tools test test_long
    python bench/tool_cold_start.py runs/tiny-sft-vl-zoom/final runs/data/vl-zoom test

Per split and mode it prints: `called` (share of first turns with a well-formed tool call), `right call`
(`tool_call_correct`: the calculator with the right expression, or crop_zoom with a box around the digit),
`accuracy` (`exact_match` of the episode's last turn: the answer after the tool's), mean assistant turns.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from posttrain.config import DatasetSpec
from posttrain.data.chat import chat_messages
from posttrain.data.processing import load_processing, tokenizer_of
from posttrain.data.rows import Sample, load_samples
from posttrain.rewards.builtin import exact_match
from posttrain.rewards.tools import ToolSet, load_tools
from posttrain.rollout.evaluation import declared_schemas
from posttrain.synthetic.tool_tasks import first_tool_call, tool_call_correct

THINK_CLOSE = "</think>"


def generate(
    model: Any, processing: Any, is_vl: bool, chats: list[tuple[list[Any], list[Any]]], tools: Any, args: Any
) -> list[str]:
    """Greedy next assistant turns of `chats` ((messages, images) each), left-padded in batches."""
    import torch

    tok = tokenizer_of(processing)
    tok.padding_side = "left"
    out: list[str] = []
    for k in range(0, len(chats), args.batch_size):
        batch = chats[k : k + args.batch_size]
        texts = [
            processing.apply_chat_template(
                m, tools=tools, tokenize=False, add_generation_prompt=True, enable_thinking=True
            )
            for m, _ in batch
        ]
        if is_vl:
            images = [im for _, ims in batch for im in ims]
            inputs = processing(text=texts, images=images or None, padding=True, return_tensors="pt")
        else:
            inputs = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(
                **inputs,
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        for row in ids[:, inputs["input_ids"].shape[1] :].tolist():
            out.append(tok.decode(row, skip_special_tokens=False).partition("<|im_end|>")[0])
    return out


def call_turn(completion: str, call: dict[str, Any]) -> dict[str, Any]:
    """The assistant turn of a completion that calls a tool, as the chat template takes it."""
    reasoning = completion.partition(THINK_CLOSE)[0].removeprefix("<think>").strip()
    return {
        "role": "assistant",
        "content": "",
        "reasoning_content": reasoning,
        "tool_calls": [{"type": "function", "function": call}],
    }


def run_tool(toolset: ToolSet, call: dict[str, Any], images: list[Any]) -> Any:
    """The tool's answer as a tool message's content (an image is appended to `images`); errors as text."""
    tool = toolset.tools.get(call["name"])
    if tool is None:
        return f"Error: unknown tool {call['name']!r}"
    try:
        answer = tool.fn(**call["arguments"], **({"images": images} if "images" in tool.context else {}))
    except Exception as err:  # the model reads every failure, as in RL
        return f"Error: {type(err).__name__}: {err}"
    if isinstance(answer, str):
        return answer
    images.append(answer)
    return [{"type": "image"}]


def episodes(
    model: Any, processing: Any, is_vl: bool, samples: list[Sample], toolset: ToolSet | None, args: Any
) -> list[tuple[str, str, int]]:
    """(first turn, last turn, assistant turns) of one greedy episode per sample."""
    chats = [(chat_messages(s, is_vl), list(s.images)) for s in samples]
    first, last, turns = [""] * len(samples), [""] * len(samples), [0] * len(samples)
    active = list(range(len(samples)))
    schemas = toolset.schemas if toolset else None
    for turn in range(1, args.max_turns + 1):
        completions = generate(model, processing, is_vl, [chats[i] for i in active], schemas, args)
        calling = []
        for i, completion in zip(active, completions, strict=True):
            first[i], last[i], turns[i] = first[i] or completion, completion, turn
            call = first_tool_call(completion) if toolset else None
            if call is not None and turn < args.max_turns:
                messages, images = chats[i]
                messages += [
                    call_turn(completion, call),
                    {"role": "tool", "content": run_tool(toolset, call, images)},
                ]
                calling.append(i)
        active = calling
        if not active:
            break
    return list(zip(first, last, turns, strict=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("dataset")
    p.add_argument("splits", nargs="+")
    p.add_argument("--max-samples", type=int, default=100)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-turns", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=50)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    processing, is_vl = load_processing(args.model)
    model = (
        (AutoModelForImageTextToText if is_vl else AutoModelForCausalLM).from_pretrained(args.model).eval()
    )
    results = {}
    for split in args.splits:
        spec = DatasetSpec(path=args.dataset, split=split, thinking="thinking", max_rows=args.max_samples)
        samples = load_samples(spec, for_eval=True, tools=declared_schemas(spec))[0]
        names = [t["function"]["name"] for t in samples[0].tools or []]
        for mode, toolset in (("tools", load_tools(names)), ("no tools", None)):
            began = time.perf_counter()
            runs = episodes(model, processing, is_vl, samples, toolset, args)
            columns = {
                k: [s.extra[k] for s in samples] for k in ("expression", "bbox_2d") if k in samples[0].extra
            }
            firsts = [r[0] for r in runs]
            row = {
                "called": sum(first_tool_call(f) is not None for f in firsts) / len(runs),
                "right call": sum(tool_call_correct(firsts, **columns)) / len(runs),
                "accuracy": sum(exact_match([r[1] for r in runs], [s.extra["solution"] for s in samples]))
                / len(runs),
                "turns": sum(r[2] for r in runs) / len(runs),
                "seconds": round(time.perf_counter() - began, 1),
            }
            results[f"{split} / {mode}"] = row
            print(f"{split:10s} {mode:9s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
