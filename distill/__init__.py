"""posttrain.distill: strong-to-weak distillation (`posttrain distill CONFIG.yaml [key.sub=value ...]`).

See the README's Distillation section.
"""
