"""Checkpoint round-trips, atomic commits under SIGKILL, corruption detection, pruning, and no unpickling."""

from __future__ import annotations

import ast
import json
import math
import os
import pickle
import random
import select
import signal
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import posttrain.checkpoint as ck
from posttrain.checkpoint import (
    CheckpointError,
    begin_checkpoint,
    capture_rng,
    commit_checkpoint,
    flatten_state,
    latest_checkpoint,
    load_state,
    prune_checkpoints,
    publish_file,
    read_manifest,
    restore_rng,
    save_state,
    unflatten_state,
    verify_checkpoint,
)

REPO = Path(__file__).resolve().parents[2]


def assert_identical(a: Any, b: Any, path: str = "state") -> None:
    """Same container types, key types, dtypes and bits all the way down."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        assert torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), (
            path
        )
    elif isinstance(a, (np.ndarray, np.generic)):
        assert (a.dtype, a.shape) == (b.dtype, b.shape) and a.tobytes() == b.tobytes(), path
    elif isinstance(a, dict):
        assert [(type(k), k) for k in a] == [(type(k), k) for k in b], path
        for k in a:
            assert_identical(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b and (not isinstance(a, float) or math.copysign(1, a) == math.copysign(1, b)), path


def roundtrip(obj: Any, tmp_path: Path) -> Any:
    """Through flatten/unflatten and through files, checking both agree with the original."""
    tensors, skeleton = flatten_state(obj)
    skeleton = json.loads(json.dumps(skeleton, allow_nan=False))  # must be strict JSON
    assert_identical(obj, unflatten_state(tensors, skeleton))
    save_state(tmp_path, "s", obj)
    loaded = load_state(tmp_path, "s")
    assert_identical(obj, loaded)
    return loaded


def adamw_run(steps: int, state: dict | None = None) -> tuple[torch.nn.Module, torch.optim.AdamW]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    data = torch.randn(steps, 3, 4)
    for x in data:
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    return model, opt


def test_adamw_state_dict_roundtrip_and_resume(tmp_path: Path) -> None:
    model, opt = adamw_run(3)
    state: dict[str, Any] = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 3}
    assert all(type(k) is int for k in state["optimizer"]["state"])
    loaded = roundtrip(state, tmp_path)
    # Resuming from the loaded state matches resuming from the in-memory one, bit for bit.
    expected = adamw_run(2, state)[0].state_dict()
    resumed = adamw_run(2, loaded)[0].state_dict()
    assert_identical(expected, resumed)


def test_all_supported_types_roundtrip(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    obj = {
        "tensors": {
            0: base,
            1: base.t(),  # non-contiguous view sharing storage with base
            2: base[1],  # slice of a bigger storage
            "bf16": torch.randn(5).to(torch.bfloat16),
            "f16": torch.tensor([1.5, -0.0, float("inf")], dtype=torch.float16),
            "f64": torch.tensor([float("nan"), -float("inf"), 1e-300], dtype=torch.float64),
            "int": torch.tensor([-(2**62), 7], dtype=torch.int64),
            "bool": torch.tensor([True, False]),
            "u8": torch.arange(256, dtype=torch.uint8),
            "empty": torch.zeros(0, 3),
            "empty2": torch.zeros(0, dtype=torch.int32),
            "scalar": torch.tensor(2.5),
        },
        "numpy": [
            np.arange(6, dtype=np.uint32).reshape(2, 3)[:, ::2],
            np.array(3.25),
            np.zeros((0, 2), dtype=np.int16),
            np.array([True, False]),
            np.float32(1.5),
            np.int64(-3),
        ],
        "python": (0, -(2**70), 1.0, -0.0, float("inf"), -float("inf"), float("nan"), True, False, None),
        "strings": ["", "ünïcode", "$t"],
        "keys": {"$t": "not a tag", 7: "int key", "7": "str key", -1: None},
        "empty": ([], (), {}, OrderedDict()),
        "ordered": OrderedDict([("b", 1), ("a", 2)]),
        "torch_meta": (torch.bfloat16, torch.Size([2, 3]), torch.Size([])),
    }
    loaded = roundtrip(obj, tmp_path)
    assert type(loaded["numpy"][4]) is np.float32 and type(loaded["numpy"][5]) is np.int64


class LossScaler:
    pass


def test_rejects_unsupported_objects_with_path() -> None:
    state = {"optimizer": {"loss_scaler": LossScaler()}}
    with pytest.raises(CheckpointError, match=r"state\['optimizer'\]\['loss_scaler'\]: .*type LossScaler"):
        flatten_state(state)
    with pytest.raises(CheckpointError, match=r"state\['x'\]\[1\]: .*type set"):
        flatten_state({"x": [1, {2}]})
    with pytest.raises(CheckpointError, match=r"state\[0\]: cannot store dict key of type tuple"):
        flatten_state([{(1, 2): 3}])
    with pytest.raises(CheckpointError, match=r"state\['a'\]: cannot store numpy array of dtype object"):
        flatten_state({"a": np.array([object()])})
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(CheckpointError, match=r"state\[0\]: reference cycle"):
        flatten_state(cyclic)


def draws() -> tuple[list[float], list[float], torch.Tensor]:
    return [random.random() for _ in range(3)], list(np.random.rand(3)), torch.rand(3)


def test_rng_capture_restore_through_files(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    save_state(tmp_path, "rng", capture_rng())
    expected = draws()
    draws()
    restore_rng(load_state(tmp_path, "rng"))
    got = draws()
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_load_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = adamw_run(1)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": capture_rng()}
    save_state(tmp_path, "s", state)

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("unpickling during load")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert_identical(state, load_state(tmp_path, "s"))


def test_source_has_no_pickle_or_torch_load() -> None:
    tree = ast.parse(Path(ck.__file__).read_text())
    banned_modules = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & banned_modules
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in banned_modules
            assert not (node.module or "").startswith("torch") or all(a.name != "load" for a in node.names)
        if isinstance(node, ast.Attribute):
            # json.load(s) is fine; torch.load / np.load / torch.serialization can unpickle.
            owner = node.value.id if isinstance(node.value, ast.Name) else ""
            bad = (owner in {"torch", "np", "numpy"} and node.attr == "load") or node.attr in {
                "serialization",
                "Unpickler",
            }
            assert not bad, f"line {node.lineno}: {ast.unparse(node)}"
        if isinstance(node, ast.Name):
            assert node.id not in banned_modules


def test_state_is_one_file_with_the_exact_name(tmp_path: Path) -> None:
    save_state(tmp_path, "mp_rank_00_model_states.pt", {"x": torch.ones(1)})
    assert [p.name for p in tmp_path.iterdir()] == ["mp_rank_00_model_states.pt"]
    (tmp_path / "plain").write_bytes((tmp_path / "mp_rank_00_model_states.pt").read_bytes()[:20])
    with pytest.raises(CheckpointError, match="plain: cannot read"):
        load_state(tmp_path, "plain")


def test_publish_file_writes_text_bytes_or_through_a_writer_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    publish_file(target, "text\n")
    assert target.read_text() == "text\n"
    publish_file(target, b"\x00bytes")
    assert target.read_bytes() == b"\x00bytes"
    publish_file(str(target), lambda p: p.write_text("by writer"))
    assert target.read_text() == "by writer" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_publish_file_that_fails_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")

    def half_then_fail(p: Path) -> None:
        p.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish_file(target, half_then_fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def commit(root: Path, step: int, value: float) -> Path:
    tmp = begin_checkpoint(root, step)
    save_state(tmp, "model", {"w": torch.full((4,), value)})
    save_state(tmp / "rank1", "optim", {"m": torch.full((2,), value)})
    return commit_checkpoint(tmp, step, {"value": value})


def test_commit_layout_manifest_and_replacement(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    path = commit(root, 1, 1.0)
    assert path == root / "step-00000001" and sorted(p.name for p in root.iterdir()) == ["latest", path.name]
    manifest = verify_checkpoint(path)
    assert manifest == read_manifest(path) and manifest["step"] == 1 and manifest["meta"] == {"value": 1.0}
    assert [f["path"] for f in manifest["files"]] == [
        "model",
        "rank1/optim",
    ]
    assert json.loads((root / "latest").read_text()) == {"step": 1, "dir": "step-00000001"}
    # Committing the same step again (e.g. a retried save) replaces the folder and leaves nothing behind.
    commit(root, 1, 5.0)
    assert latest_checkpoint(root) == path and sorted(p.name for p in root.iterdir()) == ["latest", path.name]
    assert load_state(path, "model")["w"][0] == 5.0
    with pytest.raises(CheckpointError, match="not a folder made by begin_checkpoint"):
        commit_checkpoint(begin_checkpoint(root, 3), 4, {})


CHILD = """
import os, sys, time, torch
from pathlib import Path
import posttrain.checkpoint as ck

root, mode = Path(sys.argv[1]), sys.argv[2]
real_rename = os.rename

def pausing_rename(src, dst):
    # Hold right before the temp folder becomes step-N: any old step-N has already been moved aside.
    if Path(src).name.startswith(".tmp-step-"):
        print("ready", flush=True)
        time.sleep(60)
    real_rename(src, dst)

os.rename = pausing_rename
tmp = ck.begin_checkpoint(root, 2)
ck.save_state(tmp, "model", {"w": torch.full((4,), 9.0)})
if mode == "writing":
    with open(tmp / "big.bin", "wb") as f:
        f.write(b"x" * (1 << 20))
        f.flush()
        print("ready", flush=True)
        time.sleep(60)
ck.commit_checkpoint(tmp, 2, {"value": 9.0})
"""


def run_and_kill(root: Path, mode: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-c", textwrap.dedent(CHILD), str(root), mode]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        try:
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            line = proc.stdout.readline() if ready else b""
            assert line == b"ready\n", proc.stderr.read() if proc.poll() is not None else "child timed out"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize(
    ("mode", "committed", "expect_step", "expect_value"),
    [
        ("writing", [1], 1, 1.0),  # killed mid-write of step 2: step 1 stays latest
        ("renaming", [1, 2], 2, 2.0),  # killed while replacing step 2: the old step 2 is rolled back
    ],
)
def test_sigkill_during_save_keeps_last_good_checkpoint(
    tmp_path: Path, mode: str, committed: list[int], expect_step: int, expect_value: float
) -> None:
    root = tmp_path / "ckpt"
    for step in committed:
        commit(root, step, float(step))
    run_and_kill(root, mode)
    assert any(p.name.startswith(".") for p in root.iterdir())  # the crash did leave debris
    path = latest_checkpoint(root)
    assert path == root / f"step-{expect_step:08d}"
    assert verify_checkpoint(path)["meta"] == {"value": expect_value}
    assert load_state(path, "model")["w"].tolist() == [expect_value] * 4
    assert not any(p.name.startswith(".") for p in root.iterdir())  # repaired
    assert commit(root, 2, 3.0) == root / "step-00000002"  # and saving works again


def test_corruption_after_commit_is_detected(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    path = commit(root, 1, 1.0)
    weights = path / "model"
    original = weights.read_bytes()
    data = bytearray(original)
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    for check in (verify_checkpoint, latest_checkpoint):
        with pytest.raises(CheckpointError, match=r"model: sha256 does not match"):
            check(path if check is verify_checkpoint else root)
    weights.write_bytes(bytes(data[:-1]))
    with pytest.raises(CheckpointError, match=r"model: size"):
        verify_checkpoint(path)
    weights.write_bytes(original)
    assert latest_checkpoint(root) == path
    (path / "rank1" / "optim").unlink()
    with pytest.raises(CheckpointError, match=r"rank1/optim: missing"):
        latest_checkpoint(root)


def test_broken_latest_falls_back_to_newest_valid_step(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    assert latest_checkpoint(root) is None
    commit(root, 1, 1.0)
    commit(root, 2, 2.0)
    (root / "step-00000009").mkdir()  # no manifest: never a checkpoint
    (root / "latest").write_text("{garbage")
    assert latest_checkpoint(root) == root / "step-00000002"
    (root / "latest").write_text(json.dumps({"step": 7, "dir": "step-00000007"}))
    assert latest_checkpoint(root) == root / "step-00000002"
    (root / "latest").unlink()
    assert latest_checkpoint(root) == root / "step-00000002"


def test_prune_keeps_newest_and_latest(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    for step in range(1, 6):
        commit(root, step, float(step))
    removed = prune_checkpoints(root, keep_last=2)
    assert [p.name for p in removed] == ["step-00000001", "step-00000002", "step-00000003"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000004", "step-00000005"]
    commit(root, 1, 1.0)  # latest now points at the oldest step
    prune_checkpoints(root, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001", "step-00000005"]
    assert latest_checkpoint(root) == root / "step-00000001"
    with pytest.raises(ValueError):
        prune_checkpoints(root, keep_last=0)
