"""posttrain.synthetic: tiny random Qwen3 / Qwen3-VL models and synthetic verifiable tasks, built locally
(no downloads) for tests, benchmarks and the CPU demo.

    models      tiny models with a locally trained tokenizer (`build_tiny_model`, `TinyModel`)
    shapes      random models of Qwen3-0.6B's / Qwen3-VL-2B's published shapes (`build_qwen3_shape`)
    tasks       addition and shape counting written as parquet splits with their task card (`write_task`)
    tool_tasks  long additions (`calculator`) and a small digit to zoom into (`crop_zoom`), with tool-use
                SFT traces (`write_tool_task`)
    builders    the `tiny_model`, `qwen3_shape`, `arithmetic`, `shapes`, `arithmetic_tools` and `vl_zoom`
                builders that configs name under `build:`

Nothing in the core package imports this one: configs reach it through the builder names (see
posttrain.builders), and each task names the reward that verifies it.
"""
