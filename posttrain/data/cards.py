"""Task cards. A dataset folder may hold a `task.json` card, `{"verifier": "exact_match", "build": {...}}`:
`verifier` is a reward name (built-in, entry point, `module:function`, or `path/to/file.py:function`
relative to the folder) and `build` the entry that makes the folder again. Synthetic tasks write one; any
dataset folder can carry one by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from posttrain.config import DatasetSpec, Strict
from posttrain.data.errors import DataError
from posttrain.plugins import is_file

CARD = "task.json"
"""A dataset folder's task card (never read as a split)."""
DEFAULT_VERIFIER = "exact_match"


class TaskCard(Strict):
    """What a dataset folder says about itself (`task.json`)."""

    verifier: str
    """The reward that scores an answer in evaluation (1.0: correct), named as in `rewards:`."""
    build: dict[str, Any] | None = None
    """The `build` entry (`{builder, args}`) that makes this folder again, when a builder wrote it."""
    tools: list[str] | None = None
    """Tool plugins the task's prompts are answered with (named as RL names tools); SFT declares their
    schemas to rows without a `tools` column, unless a dataset spec's `tools` says otherwise."""


def write_card(folder: Path, card: TaskCard) -> None:
    (folder / CARD).write_text(json.dumps(card.model_dump(mode="json", exclude_none=True), indent=1) + "\n")


def read_card(path: str | Path) -> TaskCard | None:
    """The task card of the dataset folder `path` (None: not a folder, or it has none)."""
    file = Path(path).expanduser() / CARD
    if not file.is_file():
        return None
    try:
        return TaskCard.model_validate_json(file.read_bytes())
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in err.errors())
        raise DataError(f"task card {file} is not valid: {problems}") from None


def dataset_verifier(spec: DatasetSpec) -> tuple[str, str]:
    """(reward name, where it was chosen) of the verifier that scores answers on `spec`: its `verifier`,
    else its folder's task card, else its builder's declared one, else exact match with `solution`."""
    if spec.verifier is not None:
        return spec.verifier, f"`verifier` of dataset {spec.path}"
    card = read_card(spec.path)
    if card is not None:
        folder = Path(spec.path).expanduser()
        target, sep, attr = card.verifier.rpartition(":")
        name = card.verifier
        if sep and is_file(target) and not Path(target).expanduser().is_absolute():
            name = f"{(folder / target).resolve()}:{attr}"  # a card's plugin file sits beside it
        return name, str(folder / CARD)
    if spec.build is not None and (declared := spec.build.declaration()).verifier is not None:
        return declared.verifier, f"builder {spec.build.builder!r} of dataset {spec.path}"
    return DEFAULT_VERIFIER, "the default"


def dataset_tools(spec: DatasetSpec) -> list[str]:
    """Names of the tool plugins declared to `spec`'s rows without a `tools` column: its `tools`, else
    its folder's task card's, else none."""
    if spec.tools is not None:
        return spec.tools
    card = read_card(spec.path)
    return card.tools or [] if card is not None else []
