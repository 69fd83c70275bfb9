"""`ray job submit` of a tiny RL run to a Ray head started here on loopback with token authentication: the
job attaches to that cluster, reads its config and reward plugin from the uploaded working dir and writes
its outputs to an absolute output_dir. Every subprocess has a timeout; teardown kills only the processes
of this head (never `ray stop`, which stops every Ray cluster of the user on the machine)."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from posttrain.metrics import read_metrics
from posttrain.workers import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's bin: `ray`, `posttrain`
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
JOB_TIMEOUT_S = 480


@dataclass
class Head:
    address: str  # the dashboard / job-submission address
    gcs_port: int
    env: dict[str, str]  # environment of an authenticated client
    proc: subprocess.Popen


def _ray(head: Head, *args: str, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run([str(BIN / "ray"), *args], env=env or head.env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)  # fmt: skip


@pytest.fixture
def ray_head() -> Iterator[Head]:
    import psutil

    # Short temp dir: Ray's session sockets must fit AF_UNIX's 107-byte path limit (tmp_path is too long).
    tmp = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),  # never ~/.ray/auth_token: other clusters on this machine use it
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # single-machine mode: every server stays on 127.0.0.1
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `posttrain` is the venv's
    )
    gcs_port, dashboard_port = free_port(), free_port()
    ports = {f"--{name}-port={free_port()}" for name in ("ray-client-server", "dashboard-agent-listen",
             "dashboard-agent-grpc", "runtime-env-agent", "metrics-export", "node-manager", "object-manager")}  # fmt: skip
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--num-cpus=2",
           f"--temp-dir={tmp / 'ray'}", "--disable-usage-stats", *sorted(ports)]  # fmt: skip
    log = (tmp / "head.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(f"http://127.0.0.1:{dashboard_port}", gcs_port, env, proc)
    try:
        deadline = time.monotonic() + 180
        while _ray(head, "job", "list", "--address", head.address).returncode != 0:
            assert proc.poll() is None, (tmp / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "Ray head not up within 180 s"
            time.sleep(1)
        yield head
    finally:
        tree: list[psutil.Process] = []
        with contextlib.suppress(psutil.NoSuchProcess):
            tree = psutil.Process(proc.pid).children(recursive=True)  # incl. the job driver's own session
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` tears its node down on SIGTERM
        try:
            proc.wait(timeout=5)  # its graceful teardown can take 30 s; the group kill below is as clean
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        for p in tree:  # what outlives the head (e.g. processes in the job's own session) is stopped too
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(tree, timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _status(reply: str) -> str | None:
    """The job status `ray job status` prints: "Job 'id' succeeded|failed|was stopped" once it ended,
    else "Status for job 'id': PENDING|RUNNING"."""
    if ended := re.search(r"Job '[^']+' (succeeded|failed|was stopped)", reply):
        return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[ended.group(1)]
    running = re.search(r"Status for job '[^']+': (\w+)", reply)
    return running.group(1) if running else None


def _listen_addresses(pid: int) -> set[str]:
    import psutil

    pids = {pid} | {p.pid for p in psutil.Process(pid).children(recursive=True)}
    return {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.pid in pids}


def test_rl_as_a_ray_job_on_a_loopback_cluster_with_token_auth(
    ray_head: Head, tmp_path: Path, tiny_text_model: Path
) -> None:
    from posttrain.synthetic.tasks import TinyTask, write_task

    listening = _listen_addresses(ray_head.proc.pid)
    assert listening and listening <= set(LOOPBACK), listening
    anonymous = {k: v for k, v in ray_head.env.items() if not k.startswith("RAY_AUTH")}
    anonymous["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    refused = _ray(ray_head, "job", "list", "--address", ray_head.address, env=anonymous)
    assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower()

    data, out = tmp_path / "arithmetic", tmp_path / "run"
    write_task(data, TinyTask(train_size=64, test_size=16))
    # The shipped runtime env, plus a variable posttrain's driver also sets (Ray refuses to merge the two).
    runtime_env = yaml.safe_load((ROOT / "configs/ray/runtime_env.yaml").read_text())
    runtime_env["env_vars"] = {"TOKENIZERS_PARALLELISM": "false"}
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    job_id = f"posttrain-test-{secrets.token_hex(4)}"
    # Relative paths (config, reward plugin) resolve in the job's unpacked copy of the working dir.
    submit = _ray(ray_head, "job", "submit", "--address", ray_head.address, "--submission-id", job_id,
                  "--runtime-env", str(tmp_path / "runtime_env.yaml"), "--working-dir", str(ROOT), "--no-wait",
                  "--", "posttrain", "rl", "configs/tiny/rl.yaml", f"output_dir={out}", f"model.path={tiny_text_model}",
                  "init_from_sft=null", f"data.prompts.0.path={data}", f"data.eval.path={data}",
                  "rewards.rewards=[{name: 'tests/plugins/token_parity.py:even_tokens'}, exact_match]",
                  "train.max_steps=2", "train.prompts_per_step=4", "rollout.samples_per_prompt=4",
                  "rollout.max_tokens=16", "train.micro_batch_size=16", "eval.max_samples=4",
                  "eval.max_new_tokens=16", "eval.every_steps=null", "logging.progress=false",
                  timeout=180)  # fmt: skip
    assert submit.returncode == 0, submit.stderr[-3000:]

    deadline, status = time.monotonic() + JOB_TIMEOUT_S, "PENDING"
    while status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        if time.monotonic() > deadline:
            _ray(ray_head, "job", "stop", "--address", ray_head.address, job_id)
            break
        time.sleep(3)
        reply = _ray(ray_head, "job", "status", "--address", ray_head.address, job_id)
        status = _status(reply.stdout + reply.stderr) or status
    logs = _ray(ray_head, "job", "logs", "--address", ray_head.address, job_id).stdout
    assert status == "SUCCEEDED", f"job {status}:\n{logs[-5000:]}"

    attached = f"Connecting to existing Ray cluster at address: 127.0.0.1:{ray_head.gcs_port}"
    assert attached in logs, logs[-3000:]
    assert re.search(rf"finished in [\d.]+ min → {re.escape(str(out / 'final'))}", logs), logs[-3000:]
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["grad_norm"] > 0
    assert (out / "config.yaml").is_file() and (out / "final" / "config.json").is_file()
