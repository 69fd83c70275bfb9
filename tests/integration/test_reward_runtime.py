"""math-verify is right from every Ray actor kind."""

import asyncio
import sys

from posttrain.rewards import (
    RewardRuntime,
)

COMPLETIONS = ["\\boxed{1/2}", "0.5", "<think>1/2?</think>\\frac{1}{3}", "$\\frac{1}{2}$"]
SOLUTIONS = {"solution": ["\\frac{1}{2}"] * 4}


class PlainActor:
    def __init__(self) -> None:
        self.rt = RewardRuntime(["math_accuracy"], pool_size=1)

    def score(self) -> list:
        return self.rt.score(COMPLETIONS, [""] * 4, [[]] * 4, SOLUTIONS).values["math_accuracy"]


class AsyncActor(PlainActor):
    async def score(self) -> list:
        future = self.rt.score_async(COMPLETIONS, [""] * 4, [[]] * 4, SOLUTIONS)
        return (await asyncio.wrap_future(future)).values["math_accuracy"]


def test_math_accuracy_from_every_ray_actor_kind() -> None:
    """A normal actor, a threaded one (calls on pool threads) and an async one (calls on its event loop)."""
    import ray

    from posttrain.workers import init_ray

    init_ray(num_cpus=2)  # joins the session's cluster when an earlier test started one
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    try:
        plain = ray.remote(PlainActor).options(num_cpus=0).remote()
        threaded = ray.remote(PlainActor).options(num_cpus=0, max_concurrency=4).remote()
        asynchronous = ray.remote(AsyncActor).options(num_cpus=0, max_concurrency=4).remote()
        refs = [plain.score.remote()] + [a.score.remote() for a in (threaded, asynchronous) for _ in range(3)]
        assert ray.get(refs, timeout=120) == [[1.0, 1.0, 0.0, 1.0]] * 7
        for actor in (plain, threaded, asynchronous):
            ray.kill(actor)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
