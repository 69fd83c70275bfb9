"""Pure functions against independent references."""

import math

import pytest
import torch
import torch.nn.functional as F

from posttrain.losses import NextTokenLogprobs, lr_multiplier, token_logprobs
from posttrain.objectives import NLL, Norms

from helpers import objective_on_logits


def test_nll_matches_cross_entropy_and_its_gradient() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :4] = -100
    labels[2, 5:] = -100
    count = int((labels[:, 1:] != -100).sum())
    loss, stats = objective_on_logits(NLL(), logits, labels, {"labels": labels}, Norms(tokens=count))
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), reduction="sum")
    assert torch.allclose(stats["nll_sum"], reference, atol=1e-5)
    assert torch.allclose(loss, reference / count, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, logits)
    (ref_grad,) = torch.autograd.grad(reference / count, logits)
    assert torch.allclose(grad, ref_grad, atol=1e-6)
    assert (grad[:, -1] == 0).all()  # the last position predicts nothing


def test_loss_is_independent_of_how_the_batch_is_split() -> None:
    torch.manual_seed(1)
    logits, labels = torch.randn(4, 6, 5), torch.randint(0, 5, (4, 6))
    labels[1, :3] = -100
    norms = Norms(tokens=float((labels[:, 1:] != -100).sum()))
    whole, _ = objective_on_logits(NLL(), logits, labels, {"labels": labels}, norms)
    parts = [
        objective_on_logits(
            NLL(), logits[i : i + 1], labels[i : i + 1], {"labels": labels[i : i + 1]}, norms
        )[0]
        for i in range(4)
    ]
    assert torch.allclose(sum(parts), whole)


def test_token_logprobs_by_hand() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(2.0), 0.0]])
    expected = torch.tensor([math.log(3 / 4), math.log(2 / 3)])
    assert torch.allclose(token_logprobs(logits, torch.tensor([1, 0])), expected)
    assert token_logprobs(logits.to(torch.bfloat16), torch.tensor([1, 0])).dtype == torch.float32
    tempered, _ = NextTokenLogprobs(temperature=0.5)(logits, {"targets": torch.tensor([0, 1])}, stats=False)
    assert torch.allclose(tempered["logp"], token_logprobs(2 * logits, torch.tensor([0, 1])))


@pytest.mark.parametrize(
    ("step", "kind", "expected"),
    [
        (0, "cosine", 0.25),  # warmup: (0+1)/4
        (3, "cosine", 1.0),
        (4, "constant", 1.0),
        (14, "linear", 0.1 + 0.9 * 0.5),  # half-way through 20 decay steps
        (14, "cosine", 0.1 + 0.9 * 0.5),  # cos(pi/2) = 0
        (24, "cosine", 0.1),
        (30, "linear", 0.1),
    ],
)
def test_lr_multiplier(step: int, kind: str, expected: float) -> None:
    assert lr_multiplier(step, total_steps=24, warmup_steps=4, kind=kind, min_ratio=0.1) == pytest.approx(
        expected
    )
