"""Ray plumbing: a local cluster listens on loopback only; worker groups set ranks and tear down cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

LISTENERS = """
import json, psutil
from posttrain.workers import init_ray
init_ray(num_cpus=2)
import ray
ray.get(ray.remote(lambda: 1).remote())  # a worker process is up too
tree = [psutil.Process()] + psutil.Process().children(recursive=True)
pids = {p.pid for p in tree}
print(json.dumps(sorted({c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.pid in pids})))
"""


def test_local_ray_listens_on_loopback_only() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = subprocess.run(
        [sys.executable, "-c", LISTENERS], capture_output=True, text=True, env=env, timeout=180
    )
    assert out.returncode == 0, out.stderr[-2000:]
    addresses = json.loads(out.stdout.strip().splitlines()[-1])
    assert addresses, "found no listening sockets"
    assert all(a in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for a in addresses), addresses


def test_worker_group_sets_rank_environment_and_shuts_down() -> None:
    import ray

    from posttrain.workers import WorkerGroup, init_ray

    class Probe:  # defined here so Ray ships it by value (workers cannot import tests/)
        def env(self) -> dict[str, str]:
            keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
            return {k: os.environ[k] for k in keys}

    init_ray(num_cpus=2)
    group = WorkerGroup(Probe, 2, num_cpus=1, name="probe")
    envs = group.call("env")
    assert [e["RANK"] for e in envs] == ["0", "1"] and {e["WORLD_SIZE"] for e in envs} == {"2"}
    assert len({(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs}) == 1
    assert envs[0]["MASTER_ADDR"] == "127.0.0.1"
    actors = list(group.actors)
    group.shutdown()
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actors[0].env.remote(), timeout=30)
