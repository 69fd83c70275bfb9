"""A reward that varies on a random model's output, so RL tests get non-zero advantages: the share of
even token ids in the completion."""


def even_tokens(completions, completion_ids, **kwargs):
    return [sum(t % 2 == 0 for t in ids) / max(1, len(ids)) for ids in completion_ids]
