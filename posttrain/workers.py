"""Ray plumbing: a loopback-bound local cluster and one small worker-group abstraction.

A WorkerGroup is a placement group plus N actors of one class, each with the torch.distributed rank
environment set (so DeepSpeed never probes for MPI), methods called on all ranks and gathered, and a
teardown that cannot turn a finished run into a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from posttrain.config import ConfigError

if TYPE_CHECKING:
    from ray import ObjectRef

T = TypeVar("T")

CALL_TIMEOUT_S = 3600.0
"""Upper bound on any single call to a worker group: a lost actor surfaces as an error, never a hang."""


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join `address` (or the cluster `ray job submit` runs us in), else start a local one on 127.0.0.1."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        _loopback_only()
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": _ds_accelerator()}}
    if address:
        # Under `ray job submit` (RAY_ADDRESS is the job's cluster) Ray refuses to merge a variable that the
        # job's runtime env sets too: the job's value wins.
        job_vars = _job_env_vars()
        env["env_vars"] = {k: v for k, v in env["env_vars"].items() if k not in job_vars}
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return
    ray.init(
        num_cpus=max(num_cpus or 0, os.cpu_count() or 1),
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        runtime_env=env,
        log_to_driver=True,
        configure_logging=False,
    )


def _job_env_vars() -> dict[str, str]:
    """`env_vars` of the runtime env `ray job submit` gave this driver (empty outside a job)."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return dict((job.get("runtime_env") or {}).get("env_vars") or {})


def _loopback_only() -> None:
    """Make a local Ray cluster listen on 127.0.0.1 only. Ray replaces a loopback `_node_ip_address` by
    the machine's routable address and then listens on every interface; its single-machine mode (the
    switch it uses on macOS / Windows) keeps every server on loopback. Set for this process and, through
    the environment, for every Ray process it starts."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # read at call time; covers a Ray imported before us


def _ds_accelerator() -> str:
    return resolve_device("auto")


def resolve_device(setting: str) -> str:
    """`auto` → "cuda" when this process sees a GPU, else "cpu"; "cpu" / "cuda" as given."""
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_env(device: str) -> dict[str, str]:
    """Environment pinning a worker to `device`: DeepSpeed's accelerator, and no visible GPU on "cpu"."""
    return {"DS_ACCELERATOR": device, **({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {})}


class PlacementError(ConfigError):
    """A worker group asks for more than the whole cluster has: it could never be placed."""


def check_placement(name: str, config_key: str, bundle: dict[str, float], count: int) -> None:
    """Fail at once, naming what was asked and what the cluster has, instead of waiting for resources
    that do not exist (e.g. a 2-GPU config on a 1-GPU machine)."""
    import ray

    have = ray.cluster_resources()
    short = {k: v * count for k, v in bundle.items() if v * count > have.get(k, 0) + 1e-9}
    if short:
        asked = ", ".join(f"{v:g} {k}" for k, v in short.items())
        has = ", ".join(f"{have.get(k, 0):g} {k}" for k in short)
        raise PlacementError(
            f"{name}: {count} × {bundle} needs {asked} but the Ray cluster has {has}; lower the "
            f"{config_key} worker count or resources per worker, or set device: cpu"
        )


COLOCATED_GPU_SHARE = 0.5
"""Ray GPU fraction each of a colocated learner and engine asks for: both fit one GPU bundle. Ray only
counts it; the memory split between them is derived at run time (rollout/colocate.py)."""


class SharedPlacement:
    """One placement group whose bundle i holds rank i of several worker groups (a colocated learner and
    engine): `count` bundles of `bundle`, packed; removed by `shutdown` after the groups in it."""

    def __init__(self, name: str, count: int, bundle: dict[str, float], config_key: str) -> None:
        from ray.util.placement_group import placement_group

        check_placement(name, config_key, bundle, count)
        self.count, self.bundle, self.name = count, bundle, name
        self.group = placement_group([bundle] * count, strategy="PACK", name=name)
        _wait_reserved(self.group, name, count, bundle)

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(self.group)


def _wait_reserved(group: Any, name: str, count: int, bundle: dict[str, float]) -> None:
    import ray

    try:
        ray.get(group.ready(), timeout=120)
    except ray.exceptions.GetTimeoutError:
        raise RuntimeError(
            f"{name}: Ray could not reserve {count} × {bundle} within 120 s; "
            f"cluster has {ray.cluster_resources()} (lower the worker count or resources per worker)"
        ) from None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rendezvous_address() -> tuple[str, int]:
    """This node's address and a port free on it (a process group's rendezvous)."""
    import ray

    ip = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        return ip, int(s.getsockname()[1])


def _barrier_if_distributed(_actor: object) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class WorkerGroup:
    """`num_workers` actors of `actor_cls`, one per placement-group bundle, ranks 0..N-1."""

    def __init__(
        self,
        actor_cls: type,
        num_workers: int,
        *,
        num_cpus: float = 1,
        num_gpus: float = 0,
        name: str = "workers",
        init_args: Sequence[object] = (),
        env: dict[str, str] | None = None,
        device: str | None = None,
        config_key: str = "learners",
        placement: SharedPlacement | None = None,
    ) -> None:
        """`device` ("cpu" / "cuda"): pin every worker to it (`num_gpus` counts only on "cuda");
        `config_key`: the config section an impossible placement names; `placement`: rank r goes into
        bundle r of this shared group (colocation) instead of a placement group of its own."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if device is not None:
            num_gpus = num_gpus if device == "cuda" else 0
            env = {**device_env(device), **(env or {})}
        bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
        self._owns_placement = placement is None
        if placement is None:
            check_placement(name, config_key, bundle, num_workers)
            self.placement_group = placement_group([bundle] * num_workers, strategy="PACK", name=name)
            _wait_reserved(self.placement_group, name, num_workers, bundle)
        else:
            assert placement.count == num_workers, (
                f"{name}: {num_workers} workers in {placement.count} bundles"
            )
            self.placement_group = placement.group

        def in_bundle(rank: int) -> PlacementGroupSchedulingStrategy:
            return PlacementGroupSchedulingStrategy(self.placement_group, rank)

        # Rendezvous on rank 0's node: 127.0.0.1 locally, the node's address on a multi-node cluster.
        probe = ray.remote(rendezvous_address).options(num_cpus=0, scheduling_strategy=in_bundle(0))
        master_addr, master_port = ray.get(probe.remote(), timeout=120)
        rendezvous = {"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}
        remote_cls: Any = ray.remote(actor_cls)
        self.actors: list[Any] = [
            remote_cls.options(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                name=f"{name}-{rank}-{os.getpid()}",
                scheduling_strategy=in_bundle(rank),
                runtime_env={
                    "env_vars": {**_rank_env(rank, num_workers, num_cpus), **rendezvous, **(env or {})}
                },
            ).remote(*init_args)
            for rank in range(num_workers)
        ]
        self.name = name

    def __len__(self) -> int:
        return len(self.actors)

    def call(self, method: str, *args: object, **kwargs: object) -> list[Any]:
        """Call `method` with the same arguments on every rank; return the results in rank order."""
        return self.gather([getattr(a, method).remote(*args, **kwargs) for a in self.actors])

    def call_each(self, method: str, per_rank_args: Sequence[Sequence[object]]) -> list[Any]:
        """Call `method` on rank r with `per_rank_args[r]`."""
        assert len(per_rank_args) == len(self.actors)
        refs = [getattr(a, method).remote(*args) for a, args in zip(self.actors, per_rank_args, strict=True)]
        return self.gather(refs)

    def run(self, fn: Callable[..., T], *args: object) -> list[T]:
        """Run a module-level function `fn(actor_instance, *args)` inside every actor (benchmarks time
        the phases of a call this way)."""
        return self.gather([a.__ray_call__.remote(fn, *args) for a in self.actors])

    def gather(self, refs: Sequence[ObjectRef[T]]) -> list[T]:
        import ray

        try:
            return ray.get(refs, timeout=CALL_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"{self.name}: no answer within {CALL_TIMEOUT_S:.0f} s") from None

    def shutdown(self, barrier: bool = True) -> None:
        """Barrier, then kill the actors hard: torch's gloo teardown can SIGABRT at interpreter exit
        after a successful run, and a killed actor never reaches that exit path. `barrier=False` for
        actors that may never have started (a barrier call would queue behind their constructor)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        with contextlib.suppress(Exception):  # teardown must not mask the run's own outcome
            if barrier:
                ray.get([a.__ray_call__.remote(_barrier_if_distributed) for a in self.actors], timeout=60)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self._owns_placement:
            remove_placement_group(self.placement_group)
        self.actors = []


def _rank_env(rank: int, world_size: int, num_cpus: float) -> dict[str, str]:
    threads = str(max(1, int(num_cpus)))
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": "0",  # each actor sees only its own devices
        "LOCAL_WORLD_SIZE": "1",
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
    }


def split_evenly(items: list[T], parts: int, weights: Sequence[float] | None = None) -> list[list[T]]:
    """Contiguous chunks: without `weights`, sizes differ by at most one (earlier chunks larger); with
    them, chunk k ends where the running weight first reaches k/parts of the total."""
    if weights is None or len(set(weights)) <= 1:
        q, r = divmod(len(items), parts)
        out, start = [], 0
        for i in range(parts):
            end = start + q + (1 if i < r else 0)
            out.append(items[start:end])
            start = end
        return out
    total, running, bounds = float(sum(weights)), 0.0, [0]
    for i, w in enumerate(weights):
        running += w
        while len(bounds) < parts and running >= total * len(bounds) / parts:
            bounds.append(i + 1)
    bounds += [len(items)] * (parts + 1 - len(bounds))
    return [items[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
