"""TRL trainer arguments shared by the benchmarks: the optimizer posttrain's side runs (AdamW, constant
learning rate, posttrain's betas and clipping), fp32 on the CPU, no logging or saving."""

from typing import Any

BETAS = (0.9, 0.95)  # posttrain's default; TRL's adam_beta2 is set to match
GRAD_CLIP = 1.0


def trl_optimizer_args(lr: float) -> dict[str, Any]:
    return {
        "learning_rate": lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "optim": "adamw_torch",
        "adam_beta1": BETAS[0],
        "adam_beta2": BETAS[1],
        "weight_decay": 0.0,
        "max_grad_norm": GRAD_CLIP,
        "bf16": False,
        "gradient_checkpointing": False,  # TRL turns it on by default; posttrain's default is off
        "use_cpu": True,
    }
