"""A DeepSpeed checkpoint engine that never pickles: DeepSpeed decides *what* to save for each ZeRO stage
(module states, optimizer partitions, scheduler), this engine stores it as safetensors + JSON.

DeepSpeed's state holds a few small objects besides tensors and plain values. Only the classes listed in
SAFE_OBJECTS are stored (as their fields) and rebuilt on load; anything else is refused on save.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from pathlib import Path
from typing import Any

from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from posttrain.checkpoint import load_state, save_state


def _safe_objects() -> dict[str, type]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    classes = (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)
    return {c.__module__ + "." + c.__qualname__: c for c in classes}


SAFE_OBJECTS = _safe_objects()
_TAG = "__object__"


def encode_objects(obj: object) -> object:
    """Replace allowed objects by tagged dicts of their fields (recursively)."""
    name = type(obj).__module__ + "." + type(obj).__qualname__
    if name in SAFE_OBJECTS:
        fields = obj.value if isinstance(obj, enum.Enum) else dict(vars(obj))
        return {_TAG: name, "fields": encode_objects(fields)}
    if isinstance(obj, dict):
        return {k: encode_objects(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(encode_objects(v) for v in obj)
    return obj


def decode_objects(obj: object) -> Any:
    if isinstance(obj, dict) and _TAG in obj:
        cls = SAFE_OBJECTS[obj[_TAG]]  # KeyError: the file names a class we never store
        fields = decode_objects(obj["fields"])
        if issubclass(cls, enum.Enum):
            return cls(fields)
        instance = cls.__new__(cls)
        instance.__dict__.update(fields)
        return instance
    if isinstance(obj, dict):
        return OrderedDict((k, decode_objects(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(decode_objects(v) for v in obj)
    return obj


class SafeCheckpointEngine(CheckpointEngine):
    """Stores each state dict DeepSpeed hands over as a safetensors file under the name DeepSpeed chose."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "posttrain-safetensors"

    def create(self, info: object) -> None:
        pass

    def save(self, state_dict: object, path: str) -> None:
        target = Path(path)
        save_state(target.parent, target.name, encode_objects(state_dict))

    def load(self, path: str, map_location: object = None) -> Any:
        target = Path(path)
        return decode_objects(load_state(target.parent, target.name))

    def commit(self, info: object) -> bool:
        return True
