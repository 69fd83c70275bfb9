"""posttrain.distill"""
