"""posttrain.distill: strong-to-weak distillation (`posttrain distill CONFIG.yaml [key.sub=value ...]`).

README section (text for the project README):

## Distillation

`posttrain distill configs/tiny/distill.yaml` distils a teacher into a smaller student that shares its
tokenizer (checked before anything starts; a mismatch is an error naming both models). `mode` picks one of
four linear loops (`distill/driver.py`, `on_policy.py`, `off_policy.py`):

| mode | what runs | what the student learns from |
|---|---|---|
| `offline` | the teacher's vLLM engines once, then DeepSpeed learners alone | the teacher's top-k log-probabilities over the training sequences, captured into a store on disk |
| `online` | teacher engines next to the learners | the same top-k, computed for each batch (no store) |
| `on_policy` | student engines, teacher engines, learners, weight sync | the teacher's top-k (or its logprob of each sampled token) over the student's own samples |
| `off_policy` | teacher engines, then `posttrain sft` | teacher answers (thinking and / or non-thinking), filtered by a verifiable reward, written as a `messages` dataset |

```yaml
mode: offline                  # offline | online | on_policy | off_policy
teacher: {path: runs/tiny-sft/final, init_from_sft: {config: configs/tiny/sft.yaml}}   # built when missing
model: {path: runs/models/micro-text, tiny: {kind: text, size: micro}}                 # the student
loss: {type: forward_kl, top_k: 16}  # forward_kl | reverse_kl | jsd (beta); on_policy: estimator sampled
store: {dir: null, shard_rows: 1024} # offline: default output_dir/topk; a finished store is reused
```

The offline store is the first-class path: capture the teacher once, then train any number of students from
the files without the teacher in memory. It holds safetensors shards (token ids, loss mask, top-k ids and
logprobs per token, 8k + 5 bytes a token) and a manifest with the teacher's identity (path, config hash,
dtype, tokenizer vocabulary hash) and each shard's sha256, checked on load. Capture writes the sequences in
the order the student reads them and a directory without a manifest is an unfinished capture (captured
again); a student's checkpoints carry the store position, so a resumed run continues in the middle of a
shard. Online mode scores the same sequences at each step with the same code, so offline and online give
the same loss. The divergences (`distill/losses.py`) compare the teacher's top-k buckets plus one tail
bucket with the student's full distribution: forward KL, reverse KL and GKD's generalised JSD (TRL's beta
convention), each tested against a full-vocabulary reference, with top-k converging to it as k grows; the
sampled reverse KL uses the score-function gradient. The loss is the token mean over the whole optimizer
step, however it is split over learners and micro-batches.

On-policy runs the student on its own vLLM engines (weights synced from the learners after every step and
proved by checksum and a logprob probe; LoRA syncs the adapter) and the teacher on its own engine group.
A Qwen3-VL student can be distilled from a text teacher on text data with `model.freeze_vision_tower`: the
vision tower is untouched and image inference works afterwards. Off-policy writes `output_dir/data/
train.parquet` (`thinking: column` rows) and, with `off_policy.then_sft`, trains the student on it.

Metrics per step: `loss`, `distill/divergence`, `distill/student_nll` (the student's NLL of the target
tokens), `distill/teacher_topk_mass` (teacher mass inside its top-k), `tokens_per_s`, `store/position`,
`time/read_store` or `time/teacher`; at step 0 of an offline run `capture/*` (sequences, tokens, tokens/s);
on-policy also `distill/reverse_kl_k1`, `train/accuracy`, response lengths, `time/generate|teacher|train|
sync` and `sync/probe_max_abs`; `eval/accuracy` as in the other stages.
"""
