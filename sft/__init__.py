"""posttrain.sft"""
