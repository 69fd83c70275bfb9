"""Tiny random Qwen3 / Qwen3-VL models with a locally trained tokenizer, for tests and the CPU demo
(the `tiny_model` builder, see posttrain.synthetic.builders).

Nothing is downloaded: the tokenizer is a byte-level BPE trained on the synthetic tasks' text, the weights
are random (seeded) and the folder is a normal Hugging Face checkpoint that transformers and vLLM load.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from posttrain.config import Strict
from posttrain.synthetic.tasks import corpus

Kind = Literal["text", "vl"]
Size = Literal["micro", "tiny", "small"]


class TinyModel(Strict):
    """The `tiny_model` builder's arguments: which tiny random model to build at `model.path`."""

    kind: Kind = "text"
    """`text` builds a Qwen3, `vl` a Qwen3-VL."""
    size: Size = "tiny"
    """`micro`: ~0.2M parameters (a distillation student); `tiny`: ~1M for tests and the demo; `small`:
    ~10M for benchmarks. All sizes share the tokenizer of a given `seed`."""
    seed: int = 0
    """Seed for tokenizer corpus order and weight initialisation."""
    tools: bool = False
    """Add Qwen3's tool tokens (`<tool_call>`, `</tool_call>`, `<tool_response>`, `</tool_response>`) as
    single ids after the think tokens, so a tool call ends on one stop id. Off by default: four more ids
    change the random weights, and every recorded tiny-model figure was measured without them."""


# Ids 0..6 in this order; <think>/</think> are added last and, as in Qwen3, are not "special", so decoding
# with skip_special_tokens keeps them and reasoning can be parsed from generated text.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
THINK_TOKENS = ["<think>", "</think>"]
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
# Qwen2's pre-tokenizer regex: `\p{N}` alone splits every digit into its own piece (what arithmetic needs),
# and `\s*[\r\n]+` keeps "\n\n" whole, so the template's "</think>\n\n" ends a piece in every context.
PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
VOCAB_SIZE = 768  # a cap: the narrow corpus runs out of merges first (~380 tokens)
IMAGE_PIXELS = 96 * 96  # min = max pixels: any square 64–128 px image becomes 96×96 → 9 image tokens

# Qwen3-style: assistant turns always carry a think block (empty without reasoning); the assistant span
# after "<|im_start|>assistant\n" through <|im_end|> is the {% generation %} block (the loss mask).
CHAT_TEMPLATE = """\
{%- macro render(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content is not none -%}{%- for part in content -%}
{%- if part.type == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>
{%- elif part.type == 'text' -%}{{ part.text }}
{%- endif -%}{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{#- Tools as Qwen3 declares them, a system turn listing JSON schemas in <tools>, without Qwen3's sentence on
    the call format: it costs a tiny model ~120 tokens per prompt, and tiny models learn the format from SFT. -#}
{%- if tools -%}
{{- '<|im_start|>system\\n' -}}
{%- if messages[0].role == 'system' -%}{{- render(messages[0].content) + '\\n\\n' -}}{%- endif -%}
{{- '# Tools\\n\\n<tools>' -}}
{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}
{{- '\\n</tools><|im_end|>\\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if message.role == 'system' and tools and loop.first -%}
{%- elif message.role == 'assistant' -%}
{{- '<|im_start|>assistant\\n' -}}
{%- set reasoning = (message.reasoning_content or '') | trim -%}
{#- A non-thinking answer's empty think block is prompt, as enable_thinking=false generates it: a model
    trained on it never learns to skip thinking by itself. -#}
{%- if not reasoning -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}
{%- generation -%}
{%- if reasoning -%}{{- '<think>\\n' + reasoning + '\\n</think>\\n\\n' -}}{%- endif -%}
{{- render(message.content) -}}
{#- Qwen3's call format: one <tool_call> JSON object per call, after the content, one per line. -#}
{%- for call in message.tool_calls or [] -%}
{%- set fn = call.function if call.function is defined else call -%}
{%- if not loop.first or message.content -%}{{- '\\n' -}}{%- endif -%}
{{- '<tool_call>\\n{"name": "' + fn.name + '", "arguments": ' -}}
{{- (fn.arguments if fn.arguments is string else fn.arguments | tojson) + '}\\n</tool_call>' -}}
{%- endfor -%}
{{- '<|im_end|>' -}}
{%- endgeneration -%}
{{- '\\n' -}}
{%- elif message.role == 'tool' -%}
{#- Consecutive tool answers share one user turn, each in <tool_response> tags (Qwen3). -#}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
{{- '\\n<tool_response>\\n' + render(message.content) + '\\n</tool_response>' -}}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}
{%- else -%}
{{- '<|im_start|>' + message.role + '\\n' + render(message.content) + '<|im_end|>\\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\\n' -}}
{%- if enable_thinking is defined and not enable_thinking -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}
{%- endif -%}"""

SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4},
    "micro": {
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "head_dim": 32,
    },
    "small": {
        "hidden_size": 384,
        "intermediate_size": 1024,
        "num_hidden_layers": 6,
        "num_attention_heads": 6,
    },
}
VISION = {
    "depth": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_heads": 2,
    "num_position_embeddings": 256,
    "deepstack_visual_indexes": [0, 1],
}


def _chat_pieces(seed: int) -> Iterator[str]:
    """The text between special tokens of rendered task chats, so BPE also learns the template's newlines."""
    yield from ("system\nYou are a helpful assistant.", "\n", "assistant\n")
    for prompt, reasoning, answer in corpus(seed):
        yield from (f"user\n{prompt}", f"\n{reasoning}\n", f"\n\n{answer}")


def train_bpe(seed: int = 0) -> Any:
    """Byte-level BPE with Qwen's pre-tokenizer, trained on the synthetic tasks and chat scaffolding (a
    `tokenizers.Tokenizer`: SPECIAL_TOKENS at ids 0-6, then the learned tokens; no think tokens yet)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(THINK_TOKENS),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_chat_pieces(seed), trainer)
    return tok


def wrap_tokenizer(tok: Any, extra_special_tokens: list[str], model_max_length: int = 4096) -> Any:
    """`tok` as a transformers tokenizer with Qwen's roles (eos <|im_end|>, pad <|endoftext|>) and the
    chat template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=extra_special_tokens,
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def build_tokenizer(seed: int = 0, tools: bool = False) -> Any:
    """The tiny models' tokenizer: the trained BPE with <think>/</think> added last (ids 380, 381), then
    with `tools` the tool tokens; as in Qwen3 none is "special", so decoded text keeps them."""
    from tokenizers import AddedToken

    tok = train_bpe(seed)
    added = THINK_TOKENS + (TOOL_TOKENS if tools else [])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    return wrap_tokenizer(tok, SPECIAL_TOKENS[1:])


def _text_config(tokenizer: Any, size: str) -> dict[str, Any]:
    dims = SIZES[size]
    return {
        **dims,
        "vocab_size": len(tokenizer),
        "num_key_value_heads": 2,
        "head_dim": dims.get("head_dim", 32 if size == "tiny" else 64),  # vLLM's CPU attention rejects 16
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,  # a separate lm_head keeps engine weight sync uniform
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
    }


def qwen3_config(tokenizer: Any, kind: str, text: dict[str, Any], vision: dict[str, Any]) -> Any:
    """A Qwen3Config (`text`) or Qwen3VLConfig (`vl`, with its `vision` tower) from the text dims, with the
    tokenizer's multimodal ids and Qwen3's rope (theta 1e6; Qwen3-VL: 5e6 with interleaved mrope)."""
    from transformers import Qwen3Config, Qwen3VLConfig

    if kind == "text":
        return Qwen3Config(**text, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    half = text["head_dim"] // 2  # mrope sections (t, h, w) split the rotary half of head_dim
    section = [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16]
    text = {
        **text,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5e6,
            "mrope_section": section,
            "mrope_interleaved": True,
        },
    }
    ids = {
        f"{name}_token_id": tokenizer.convert_tokens_to_ids(f"<|{name}|>")
        for name in ("vision_start", "vision_end", "image_pad", "video_pad")
    }
    return Qwen3VLConfig(
        text_config=text,
        vision_config={
            **vision,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": text["hidden_size"],
        },
        image_token_id=ids.pop("image_pad_token_id"),
        video_token_id=ids.pop("video_pad_token_id"),
        tie_word_embeddings=text["tie_word_embeddings"],
        **ids,
    )


def _model_config(tokenizer: Any, kind: str, size: str) -> Any:
    return qwen3_config(tokenizer, kind, _text_config(tokenizer, size), VISION)


def build_processor(tokenizer: Any) -> Any:
    """Qwen3-VL processor whose images become 96×96 (9 tokens) and videos stay a few frames small."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    patches = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2}
    norm = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}  # as Qwen3-VL
    image = Qwen2VLImageProcessor(
        **patches, **norm, size={"shortest_edge": IMAGE_PIXELS, "longest_edge": IMAGE_PIXELS}
    )
    video = Qwen3VLVideoProcessor(
        **patches, size={"shortest_edge": 2 * IMAGE_PIXELS, "longest_edge": 8 * IMAGE_PIXELS}, max_frames=8
    )
    return Qwen3VLProcessor(
        image_processor=image, tokenizer=tokenizer, video_processor=video, chat_template=CHAT_TEMPLATE
    )


def save_model(out: Path, config: Any, tokenizer: Any, seed: int, dtype: str = "float32") -> None:
    """Random weights for `config` (seeded, made in `dtype`, which the safetensors keep) saved at `out`
    with the tokenizer, or for Qwen3-VL the processor around it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

    vl = "vision_config" in config.to_dict()
    auto = AutoModelForImageTextToText if vl else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = auto.from_config(config, attn_implementation="sdpa", dtype=getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    model.save_pretrained(out)
    (build_processor(tokenizer) if vl else tokenizer).save_pretrained(out)


def _write(out: Path, kind: str, size: str, seed: int, tools: bool) -> None:
    tokenizer = build_tokenizer(seed, tools)
    save_model(out, _model_config(tokenizer, kind, size), tokenizer, seed)


def write_atomically(out_dir: str | Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` in a temporary sibling folder renamed to `out_dir` when it is done: a killed build
    leaves no half folder, and a concurrent builder that finished first wins."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is a normal shared folder
    try:
        write(tmp)
        os.rename(tmp, out)
    except OSError:
        if not (out / "config.json").is_file():  # not a concurrent builder that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_tiny_model(
    out_dir: str | Path,
    kind: Kind,
    size: Size = "tiny",
    seed: int = 0,
    tools: bool = False,
) -> Path:
    """Write a complete random Qwen3 (`text`) or Qwen3-VL (`vl`) folder at `out_dir`, atomically."""
    return write_atomically(out_dir, lambda tmp: _write(tmp, kind, size, seed, tools))
