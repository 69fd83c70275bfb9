"""posttrain: post-train Qwen3 / Qwen3-VL into instruct and thinking variants.

Stages live in posttrain.sft, posttrain.distill, posttrain.rl; rewards in posttrain.rewards; vLLM rollout
engines in posttrain.rollout; tiny models and synthetic tasks in posttrain.synthetic. Shared pieces (config,
data, input builders, learners, worker groups, checkpoints) are modules of this package. Importing it is cheap: torch, ray, deepspeed and vllm load only where they are used.
"""

__version__ = "0.1.0"
