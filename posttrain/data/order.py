"""Data order: the permutation of each epoch is a pure function of (seed, epoch), so resuming at a step
needs no data state."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


@lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of `n` items used in `epoch`: a pure function of (seed, epoch)."""
    import numpy as np

    return np.random.default_rng([seed % 2**64, epoch]).permutation(n)
