"""posttrain.rollout: vLLM rollout engines on Ray, thinking budgets, versioned learner -> engine weight sync.

    engines = RolloutGroup(model_path, num_engines=2, max_model_len=1024)   # device="cuda" on GPUs
    results = engines.generate([RolloutRequest(prompt_ids, n=4, max_tokens=64, seed=0)])
    sync_from_learners(learners, engines, version=1, probe_ids=probe)   # raises WeightSyncError
    logprob_mismatch([s.logprobs for s in samples], learner_logprobs)  # {"mean_abs", "max_abs", "tokens"}

See engine.py (generation, reload path in vLLM 0.32) and weight_sync.py (buckets, checks, metric).
"""

from posttrain.rollout.engine import (
    EngineStartError,
    RolloutEngine,
    RolloutGroup,
    RolloutRequest,
    RolloutResult,
    RolloutSample,
    split_evenly,
)
from posttrain.rollout.weight_sync import (
    Bucket,
    Probe,
    SyncManifest,
    WeightSyncError,
    iter_buckets,
    learner_probe,
    learner_stream_buckets,
    learner_weight_buckets,
    logprob_mismatch,
    module_state_buckets,
    put_buckets,
    stream_sync_from_learners,
    sync_from_learners,
    sync_lora_from_learners,
    tensor_checksum,
)

__all__ = [
    "Bucket",
    "EngineStartError",
    "Probe",
    "RolloutEngine",
    "RolloutGroup",
    "RolloutRequest",
    "RolloutResult",
    "RolloutSample",
    "SyncManifest",
    "WeightSyncError",
    "iter_buckets",
    "learner_probe",
    "learner_stream_buckets",
    "learner_weight_buckets",
    "logprob_mismatch",
    "module_state_buckets",
    "put_buckets",
    "split_evenly",
    "sync_from_learners",
    "stream_sync_from_learners",
    "sync_lora_from_learners",
    "tensor_checksum",
]
