"""Rewards written exactly as for TRL's GRPOTrainer: a batch in, one float (or None) per completion out."""

import asyncio


def my_reward(completions, solution, **kwargs):
    """1.0 when the completion ends with the solution; None ("no opinion") when there is no solution."""
    return [
        None if not s else float(c.strip().endswith(str(s)))
        for c, s in zip(completions, solution, strict=True)
    ]


async def async_reward(completions, completion_ids, **kwargs):
    """An async reward (as if it awaited a remote service): the number of completion tokens."""
    await asyncio.sleep(0.01)
    return [float(len(ids)) for ids in completion_ids]


def strict_signature(completions, solution):
    """No **kwargs: only the arguments it names are passed (not prompts, completion_ids, other columns)."""
    return [float(str(s) in c) for c, s in zip(completions, solution, strict=True)]


def answer_match(completions, answer, **kwargs):
    """Declares the dataset column it cannot score without, so a prompt set lacking it fails up front."""
    return [float(c.strip() == str(a)) for c, a in zip(completions, answer, strict=True)]


answer_match.required_columns = ("answer",)
