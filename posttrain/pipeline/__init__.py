"""posttrain.pipeline: SFT → distillation → RL declared in one file, exporting `instruct/` and `thinking/`
(`posttrain pipeline CONFIG.yaml [key.sub=value ...]`)."""
