"""A reward file written as for verl's custom_reward_function (called once per sample)."""


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    score = 1.0 if solution_str.strip().endswith(str(ground_truth)) else 0.0
    if data_source == "detailed":  # verl also accepts a dict whose "score" is the reward
        return {"score": score, "acc": bool(score), "split": (extra_info or {}).get("split")}
    return score
