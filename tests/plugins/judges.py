"""A stand-in for a judge engine (`list[str] -> list[str]`), as `model_judge` calls one."""


def fake_judge(prompts):
    replies = []
    for prompt in prompts:
        response = prompt.rpartition("Response:\n")[2]
        if "???" in response:
            replies.append("I cannot rate this.")
        else:
            replies.append("Reasoning... Score: 9/10" if "Paris" in response else "score = 2")
    return replies
