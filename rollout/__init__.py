"""posttrain.rollout: vLLM rollout engines on Ray, thinking budgets, versioned learner -> engine weight sync.

    engines = RolloutGroup(model_path, num_engines=2, max_model_len=1024)   # device="cuda" on GPUs
    results = engines.generate([RolloutRequest(prompt_ids, n=4, max_tokens=64, seed=0)])
    sync = WeightSync.for_run(learners, engines, "stream", tokenizer, atol, bucket_mb, adapters_dir)
    sync.push(version=1)                                                 # raises WeightSyncError
    logprob_mismatch([s.logprobs for s in samples], learner_logprobs)  # {"mean_abs", "max_abs", "tokens"}

See engine.py (generation, reload path in vLLM 0.32), weight_sync.py (strategies, checks, metric) and
posttrain.weights (the learners' buckets and checksums).
"""

from posttrain.rollout.engine import (
    EngineStartError,
    RolloutEngine,
    RolloutGroup,
    RolloutRequest,
    RolloutResult,
    RolloutSample,
)
from posttrain.rollout.weight_sync import (
    Probe,
    WeightSync,
    WeightSyncError,
    learner_probe,
    logprob_mismatch,
    stream_sync_from_learners,
    sync_from_learners,
    sync_lora_from_learners,
)

__all__ = [
    "EngineStartError",
    "Probe",
    "RolloutEngine",
    "RolloutGroup",
    "RolloutRequest",
    "RolloutResult",
    "RolloutSample",
    "WeightSync",
    "WeightSyncError",
    "learner_probe",
    "logprob_mismatch",
    "stream_sync_from_learners",
    "sync_from_learners",
    "sync_lora_from_learners",
]
