"""posttrain.rl"""
