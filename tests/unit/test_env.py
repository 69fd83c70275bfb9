"""The installed stack works on this machine: vLLM imports and Qwen3-VL processors build in a fresh
interpreter (vLLM serving tiny models: tests/integration/test_env.py).

On CPU the PyPI torchvision is a CUDA build that breaks `import vllm` and the Qwen3-VL video processor
unless `tools/torchvision_cpu.py` has run; this test catches an environment where it has not.
"""

import subprocess
import sys


def test_import_vllm_and_build_qwen3vl_processor() -> None:
    # A fresh interpreter, so a torchvision already imported by another test cannot hide the failure.
    code = (
        "import vllm, torchvision\n"
        "from posttrain.synthetic.models import build_processor, build_tokenizer\n"
        "assert type(build_processor(build_tokenizer())).__name__ == 'Qwen3VLProcessor'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
