"""What engines take and give: a request (prompt ids and how to sample them) and its sampled results.
Plain dataclasses, so they cross Ray and checkpoints as they are."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from posttrain.rollout.tool_turns import CallRecord

if TYPE_CHECKING:
    from PIL.Image import Image


@dataclass
class RolloutRequest:
    """One prompt (token ids, as the caller's chat template rendered them) and how to sample it."""

    prompt_token_ids: list[int]
    n: int = 1
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off (vLLM 0.32)
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    logprobs: int | None = 0  # None: none; 0: the sampled token's only; k: also the top k
    prompt_logprobs: int | None = None  # None: none; 0: each prompt token's; k: also the top k
    images: list[Image] | None = None  # PIL images for a VL prompt (its ids hold one image pad per image)
    thinking_budget: int | None = None  # close the think block after this many generated tokens
    ignore_eos: bool = False
    thinking: bool = False  # the chat mode the prompt was rendered in (tool turns are rendered the same)


@dataclass
class RolloutSample:
    token_ids: list[int]
    text: str
    logprobs: list[float]  # of each sampled token (0.0 where `forced`), raw fp32 log_softmax
    finish_reason: str  # "stop" | "length"
    top_logprobs: list[dict[int, float]] | None = None
    forced: list[int] = field(default_factory=list)  # positions the engine inserted (not sampled)
    thinking_tokens: int | None = None  # generated tokens before the think block closed
    # Multi-turn tool episodes (`generate_episodes`); `token_ids` then holds every turn, tool turns forced.
    turn_starts: list[int] = field(default_factory=list)  # where each assistant turn begins
    tool_calls: list[CallRecord] = field(default_factory=list)
    images: list[Image] = field(default_factory=list)  # returned by tools, in order
    truncation: str | None = None  # the limit that ended the episode: length, turns, tokens, images


@dataclass
class RolloutResult:
    prompt_token_ids: list[int]
    samples: list[RolloutSample]
    prompt_logprobs: list[float | None] | None = None  # first is None (no context)
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    weight_version: int = 0


def encode_images(sample: dict[str, Any]) -> dict[str, Any]:
    """A sample's `asdict` made JSON-safe: its tool-returned images as base64 PNG (lossless)."""
    import base64
    import io

    def png(image: Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    return {**sample, "images": [png(im) for im in sample.get("images", [])]}


def decode_images(sample: dict[str, Any]) -> RolloutSample:
    """The RolloutSample of an `encode_images` dict."""
    import base64
    import io

    from PIL import Image as PILImage

    images = [PILImage.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in sample.get("images", [])]
    calls = [CallRecord(**c) for c in sample.get("tool_calls", [])]
    return RolloutSample(**{**sample, "images": images, "tool_calls": calls})
