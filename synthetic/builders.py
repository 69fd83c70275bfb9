"""The built-in builders: what `build: {builder: NAME, args: {...}}` under `model` or a dataset spec makes.

    model:
      path: runs/models/tiny-text
      build: {builder: tiny_model, args: {kind: text, size: tiny}}
      # or Qwen3-0.6B's published shape, random, cut to 2 blocks (full width and vocabulary):
      # build: {builder: qwen3_shape, args: {shape: qwen3-0.6b, layers: 2}}
    data:
      train:
        - path: runs/data/arithmetic
          build: {builder: arithmetic, args: {train_size: 8000, test_size: 200}}

Imports only pydantic and the standard library (configs resolve these while they validate); the model and
dataset code loads torch, transformers and datasets when a builder runs.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.builders import builder
from posttrain.synthetic.models import TinyModel, build_tiny_model
from posttrain.synthetic.shapes import Qwen3Shape, build_qwen3_shape
from posttrain.synthetic.tasks import VERIFIERS, TaskArgs, TinyTask, write_task
from posttrain.synthetic.tool_tasks import ArithmeticToolsArgs, ToolTaskArgs, write_tool_task


@builder("tiny_model", makes="model", args=TinyModel)
def tiny_model(path: Path, args: TinyModel) -> None:
    """A tiny random Qwen3 (`kind: text`) or Qwen3-VL (`kind: vl`) with its tokenizer."""
    build_tiny_model(path, args.kind, args.size, args.seed, args.tools)


@builder("qwen3_shape", makes="model", args=Qwen3Shape)
def qwen3_shape(path: Path, args: Qwen3Shape) -> None:
    """A random model of Qwen3-0.6B's or Qwen3-VL-2B-Instruct's published shape, with a tokenizer covering
    all 151,936 ids."""
    build_qwen3_shape(path, args)


@builder("arithmetic", makes="dataset", args=TaskArgs, verifier=VERIFIERS["arithmetic"])
def arithmetic(path: Path, args: TaskArgs) -> None:
    """Multi-digit addition with digit-by-digit working: train, test, test_hard, test_long."""
    write_task(path, TinyTask(name="arithmetic", **args.model_dump()))


@builder("shapes", makes="dataset", args=TaskArgs, verifier=VERIFIERS["shapes"])
def shapes(path: Path, args: TaskArgs) -> None:
    """Count the shapes (1-4) in a rendered 96x96 image: train, test."""
    write_task(path, TinyTask(name="shapes", **args.model_dump()))


@builder("arithmetic_tools", makes="dataset", args=ArithmeticToolsArgs, verifier="exact_match")
def arithmetic_tools(path: Path, args: ArithmeticToolsArgs) -> None:
    """Additions of 1-3 and of 4-5 digits, with the `calculator` tool: train (RL prompts), sft (tool-use
    traces), test (1-3 digits), test_long (4-5 digits)."""
    write_tool_task(path, "arithmetic_tools", args)


@builder("vl_zoom", makes="dataset", args=ToolTaskArgs, verifier="exact_match")
def vl_zoom(path: Path, args: ToolTaskArgs) -> None:
    """Read a small digit in a 512x512 image, with the `crop_zoom` tool: train (RL prompts), sft
    (tool-use traces with the crops), test."""
    write_tool_task(path, "vl_zoom", args)
