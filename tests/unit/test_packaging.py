"""The one import name works from a built wheel too: stage folders at the repo root land in posttrain/."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_contains_every_stage_under_posttrain(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("posttrain-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for stage in ("sft", "distill", "rl", "rewards", "rollout", "synthetic"):
        assert f"posttrain/{stage}/__init__.py" in names
    assert "posttrain/sft/driver.py" in names and "posttrain/py.typed" in names
    assert "posttrain/synthetic/builders.py" in names
    assert not any(n.startswith(("sft/", "synthetic/", "tests/", "configs/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "posttrain = posttrain.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
