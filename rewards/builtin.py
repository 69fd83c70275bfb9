"""Built-in rewards: pure functions in the TRL convention, `f(completions, **kwargs) -> list[float | None]`.

Every text scan here is linear in the completion length (no nested or adjacent open-ended quantifiers),
so a 100k-character completion costs milliseconds; math-verify only ever sees a bounded answer span.
`None` means "no opinion" (e.g. a gold answer that cannot be parsed).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

from posttrain.rewards.table import load_object, reward

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
Box = tuple[float, float, float, float]


# ------------------------------------------------------------------------------------------- text helpers


def answer_part(completion: str, prompt: str = "") -> str:
    """The answer after the last `</think>`; empty while thinking is unfinished (an opening tag in the
    completion or at the end of the prompt, as Qwen3 thinking templates pre-fill it, but no closing tag)."""
    if THINK_CLOSE in completion:
        return completion.rpartition(THINK_CLOSE)[2]
    if THINK_OPEN in completion or prompt.rstrip().endswith(THINK_OPEN):
        return ""
    return completion


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (braces balanced), None if there is none or it is unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
    return None


def _prompts(kwargs: dict[str, Any], n: int) -> list[str]:
    """The prompts (to see a thinking block opened by the template), or empty ones when not given."""
    prompts: list[str] | None = kwargs.get("prompts")
    return prompts if prompts is not None else [""] * n


def _normalise(text: str, ignore_case: bool) -> str:
    text = " ".join(text.split())
    return text.casefold() if ignore_case else text


# -------------------------------------------------------------------------------------------------- math


def _warm_math_verify() -> None:
    """Import math-verify and build its grammars before the first timed call; silence its one-time
    'timeout is disabled' warning (the runtime enforces time by killing the worker)."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    _math_score("1/2", "\\boxed{0.5}", 1000)


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple[Any, ...]:
    from math_verify import parse

    return tuple(parse(gold, parsing_timeout=None))  # GRPO groups repeat each gold answer


def _math_score(gold: str, answer: str, max_answer_chars: int) -> float | None:
    from math_verify import parse, verify

    gold_parsed = _parse_gold(gold)
    if not gold_parsed:
        return None
    boxed = last_boxed(answer)
    if boxed is None:
        span = answer[-max_answer_chars:]  # a plain answer ends the text
    else:
        span = f"\\boxed{{{boxed}}}" if len(boxed) <= max_answer_chars else ""
    predicted = parse(span, parsing_timeout=None) if span.strip() else []
    if not predicted:
        return 0.0
    return float(verify(list(gold_parsed), predicted, timeout_seconds=None))


@reward("math_accuracy", warmup=_warm_math_verify, requires=("solution",))
def math_accuracy(
    completions: list[str], solution: list[str], max_answer_chars: int = 1000, **kwargs: Any
) -> list[float | None]:
    """1.0 when the answer (the last `\\boxed{}`, else the last `max_answer_chars` of the text after
    `</think>`) equals the gold `solution` by math-verify (LaTeX, fractions, decimals), else 0.0; None when
    the gold answer does not parse. math-verify's own SIGALRM timeouts are off: they fail off the main
    thread, and the runtime bounds time from outside."""
    return [
        _math_score(str(gold), answer_part(c, p), max_answer_chars)
        for c, gold, p in zip(completions, solution, _prompts(kwargs, len(completions)), strict=True)
    ]


# ------------------------------------------------------------------------------------------------ format


def _think_format_ok(completion: str, prompt: str) -> bool:
    if prompt.rstrip().endswith(THINK_OPEN):  # the template opened the block
        body = completion
    else:
        body = completion.lstrip()
        if not body.startswith(THINK_OPEN):
            return False
        body = body[len(THINK_OPEN) :]
    if THINK_OPEN in body or body.count(THINK_CLOSE) != 1:
        return False
    return bool(body.partition(THINK_CLOSE)[2].strip())


@reward("think_format")
def think_format(completions: list[str], **kwargs: Any) -> list[float | None]:
    """1.0 for exactly one `<think>...</think>` block at the start followed by a non-empty answer."""
    return [
        float(_think_format_ok(c, p))
        for c, p in zip(completions, _prompts(kwargs, len(completions)), strict=True)
    ]


@reward("answer_present")
def answer_present(completions: list[str], require_boxed: bool = False, **kwargs: Any) -> list[float | None]:
    """1.0 when there is a non-empty answer after the thinking (with `require_boxed`: a non-empty
    `\\boxed{}` in it)."""
    out: list[float | None] = []
    for c, p in zip(completions, _prompts(kwargs, len(completions)), strict=True):
        answer = answer_part(c, p)
        found = (last_boxed(answer) or "").strip() if require_boxed else answer.strip()
        out.append(float(bool(found)))
    return out


# ------------------------------------------------------------------------------------------------- match


@reward("exact_match", requires=("solution",))
def exact_match(
    completions: list[str], solution: list[str], ignore_case: bool = False, **kwargs: Any
) -> list[float | None]:
    """1.0 when the answer (its `\\boxed{}` content if any) equals `solution` up to whitespace runs
    (and case, with `ignore_case`)."""
    out: list[float | None] = []
    for c, gold, p in zip(completions, solution, _prompts(kwargs, len(completions)), strict=True):
        answer = answer_part(c, p)
        boxed = last_boxed(answer)
        predicted = boxed if boxed is not None else answer
        out.append(float(_normalise(predicted, ignore_case) == _normalise(str(gold), ignore_case)))
    return out


@reward("digit_match", requires=("solution",))
def digit_match(completions: list[str], solution: list[str], **kwargs: Any) -> list[float | None]:
    """Partial credit for a numeric answer: the share of digit places, aligned from the units digit, where
    the answer (its `\\boxed{}` content if any) agrees with `solution`; places either number lacks count as
    wrong. A dense verifiable signal next to `exact_match` for arithmetic (None: `solution` has no digits)."""
    out: list[float | None] = []
    for c, gold, p in zip(completions, solution, _prompts(kwargs, len(completions)), strict=True):
        want = "".join(ch for ch in str(gold) if ch.isdigit())[::-1]
        answer = answer_part(c, p)
        got = "".join(ch for ch in (last_boxed(answer) or answer) if ch.isdigit())[::-1]
        places = max(len(want), len(got))
        out.append(sum(a == b for a, b in zip(want, got, strict=False)) / places if want else None)
    return out


@functools.lru_cache(maxsize=16)
def _choice_patterns(letters: str) -> tuple[re.Pattern[str], ...]:
    # Each whitespace run sits between literals, so no pattern can backtrack quadratically.
    c = f"[{re.escape(letters)}]"
    return (
        re.compile(rf"(?i:answer)\s*(?:(?i:is)\s*)?(?::\s*)?\(?({c})(?![A-Za-z])"),
        re.compile(rf"\\boxed\{{\s*\(?({c})\)?\s*\}}"),
        re.compile(rf"\s*\(?({c})(?:[.):]\s*)?"),  # the whole answer is one letter (fullmatch)
        re.compile(rf"\(({c})\)"),
    )


def extract_choice(text: str, letters: str = "ABCDEFGHIJ") -> str | None:
    """The chosen letter: the last 'answer: X' / 'answer is (X)', else the last `\\boxed{X}`, else a
    bare 'X' / '(X).', else the last '(X)'."""
    stated, boxed, bare, paren = _choice_patterns(letters)
    for pattern in (stated, boxed):
        matches = pattern.findall(text)
        if matches:
            return str(matches[-1])
    whole = bare.fullmatch(text.rstrip())
    if whole:
        return whole.group(1)
    matches = paren.findall(text)
    return str(matches[-1]) if matches else None


@reward("choice_match", requires=("solution",))
def choice_match(
    completions: list[str], solution: list[str], letters: str = "ABCDEFGHIJ", **kwargs: Any
) -> list[float | None]:
    """1.0 when the multiple-choice letter of the answer equals the gold letter; None if the gold letter
    cannot be read."""
    out: list[float | None] = []
    for c, gold, p in zip(completions, solution, _prompts(kwargs, len(completions)), strict=True):
        want = extract_choice(str(gold), letters)
        got = extract_choice(answer_part(c, p), letters)
        out.append(None if want is None else float(got == want))
    return out


# --------------------------------------------------------------------------------------------- grounding

_NUM = r"(-?\d+(?:\.\d+)?)"
_BOX_RE = re.compile(rf"\[\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*\]")
Coords = Literal["norm1000", "absolute"]


def parse_box(value: Any) -> Box | None:
    """`[x1, y1, x2, y2]` from a list, a `{"bbox_2d": [...]}` dict, a list of such dicts (the first), or
    text holding any of these (the first 4-number list, e.g. Qwen-VL's JSON answer)."""
    if isinstance(value, dict):
        return parse_box(value.get("bbox_2d"))
    if isinstance(value, (list, tuple)):
        if len(value) == 4 and all(isinstance(v, (int, float)) for v in value):
            return (float(value[0]), float(value[1]), float(value[2]), float(value[3]))
        return parse_box(value[0]) if value and isinstance(value[0], dict) else None
    if isinstance(value, str):
        match = _BOX_RE.search(value)
        return (float(match[1]), float(match[2]), float(match[3]), float(match[4])) if match else None
    return None


def _to_unit(box: Box, coords: Coords, size: Sequence[float] | None) -> Box:
    if coords == "norm1000":
        return (box[0] / 1000, box[1] / 1000, box[2] / 1000, box[3] / 1000)
    if size is None:
        raise ValueError("absolute boxes in different conventions need an `image_size` column ([w, h])")
    w, h = float(size[0]), float(size[1])
    return (box[0] / w, box[1] / h, box[2] / w, box[3] / h)


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union; 0 for empty or inverted boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, iw) * max(0.0, ih)
    area = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area - inter
    return inter / union if union > 0 else 0.0


@reward("grounding_iou", requires=("solution",))
def grounding_iou(
    completions: list[str],
    solution: list[Any],
    pred_coords: Coords = "norm1000",
    gold_coords: Coords | None = None,
    image_size: list[Sequence[float]] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """IoU of the first box in the answer with the gold box, 0.0 when no box is found, None when the
    gold box does not parse. Qwen3-VL predicts 0-1000 normalised `[x1, y1, x2, y2]` (`norm1000`),
    Qwen2.5-VL absolute pixels of the resized input (`absolute`). `gold_coords` defaults to `pred_coords`;
    when they differ the `image_size` column gives each image's `[width, height]` as the model saw it."""
    gold_coords = gold_coords or pred_coords
    sizes: Sequence[Sequence[float] | None] = image_size if image_size is not None else [None] * len(solution)
    out: list[float | None] = []
    for c, gold, size, p in zip(
        completions, solution, sizes, _prompts(kwargs, len(completions)), strict=True
    ):
        want, got = parse_box(gold), parse_box(answer_part(c, p))
        if want is None or got is None:
            out.append(None if want is None else 0.0)
        elif gold_coords == pred_coords:
            out.append(box_iou(got, want))
        else:
            out.append(box_iou(_to_unit(got, pred_coords, size), _to_unit(want, gold_coords, size)))
    return out


# ---------------------------------------------------------------------------------------------- length


def overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """DAPO's soft overlong penalty: 0 up to `max_length - buffer`, linear to -1 at `max_length`, -1 past."""
    if length <= max_length - buffer:
        return 0.0
    if length >= max_length:
        return -1.0
    return (max_length - buffer - length) / buffer


@reward("length_penalty")
def length_penalty(
    completions: list[str], completion_ids: list[list[int]], *, max_length: int, buffer: int, **kwargs: Any
) -> list[float | None]:
    """`overlong_penalty` of each completion's token count (params `max_length`, `buffer`)."""
    return [overlong_penalty(len(ids), max_length, buffer) for ids in completion_ids]


# ------------------------------------------------------------------------------------------------- judge

JUDGE_TEMPLATE = (
    "Rate the response to the question on a scale of 0 to 10.\n\nQuestion:\n{prompt}\n\n"
    "Reference answer (may be empty):\n{solution}\n\nResponse:\n{completion}\n\n"
    "Reply with a line 'Score: N/10'."
)
Judge = Callable[[list[str]], list[str]]
_SCORE_RE = re.compile(r"(?i:score)\s*(?:[:=]\s*)?(-?\d+(?:\.\d+)?)(?:\s*/\s*(\d+(?:\.\d+)?))?")


def parse_judge_score(reply: str, scale: float = 10.0) -> float | None:
    """'Score: 7/10' → 0.7, 'score = 7' → 7 / scale; the last such statement counts; None when absent or
    outside [0, 1] after scaling."""
    matches = _SCORE_RE.findall(reply)
    if not matches:
        return None
    value, denominator = matches[-1]
    bound = float(denominator) if denominator else scale
    score = float(value) / bound if bound else -1.0
    return score if 0.0 <= score <= 1.0 else None


def _judge(judge: Judge | str) -> Judge:
    return load_object(judge) if isinstance(judge, str) else judge


@reward("model_judge")
def model_judge(
    completions: list[str],
    prompts: list[str],
    judge: Judge | str,
    template: str = JUDGE_TEMPLATE,
    scale: float = 10.0,
    **kwargs: Any,
) -> list[float | None]:
    """Ask `judge` (a callable `list[str] -> list[str]`, or its 'module:function' / 'file.py:function'
    name) to rate each answer with `template` (fields `{prompt}`, `{completion}`, `{solution}`), and
    read the score from its reply; None where the reply has no usable score."""
    solutions = kwargs.get("solution") or [""] * len(completions)
    queries = [
        template.format(prompt=p, completion=answer_part(c, p), solution=s)
        for c, p, s in zip(completions, prompts, solutions, strict=True)
    ]
    replies = _judge(judge)(queries)
    if len(replies) != len(queries):
        raise ValueError(f"judge returned {len(replies)} replies for {len(queries)} prompts")
    return [parse_judge_score(str(r), scale) for r in replies]
