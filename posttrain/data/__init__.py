"""Data for every stage: load splits, validate every row into a chat sample, encode it with the model's
chat template, pack and batch SFT rows, order epochs, build generation prompts.

Rows become Qwen-style chats (`messages`, or `prompt`/`completion`) in a thinking or non-thinking form,
are checked before any training starts (errors name file, row and column), and are encoded with the
model's own chat template.

Modules, in import order:

- `errors`: DataError (for the user: which file, row and column to fix) and RowError (one bad row).
- `images`: images left undecoded on load, decoded and checked per row.
- `files`: loading a split from JSON / JSON Lines / parquet files, a folder, a saved or a hub dataset.
- `rows`: validating rows into Samples (messages, tool calls, images, thinking mode, tools); `load_samples`.
- `processing`: loading the tokenizer or processor; the tokenizer inside a processor.
- `chat`: chat-template rendering, and encoding with assistant-only labels (Item).
- `order`: the permutation of each epoch, a pure function of (seed, epoch).
- `sft_dataset`: the SFT training set: encoding, packing, batching, collation (SFTData).
- `prompts`: generation prompts for evaluation and RL (EvalPrompt).
"""
