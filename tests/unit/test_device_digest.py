"""The on-device digest of the ipc / nccl weight transfer (`device_digest_parts`): the same integers for
the same bytes, whatever the dtype, size, layout or device, and a different digest for one flipped bit or
two swapped elements anywhere in a tensor (checked against a pure-Python reference of the definition)."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.weights import (
    DIGEST_MULTIPLIERS,
    DIGEST_PRIME,
    DIGEST_ROW,
    DIGEST_SLICE_ROWS,
    device_digest,
    device_digest_parts,
    device_digests,
    nbytes,
)

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.int8]
SIZES = [1, 3, 1023, DIGEST_ROW + 1, 3 * DIGEST_ROW - 7]  # odd, under a row, over a row, ragged rows


def reference_parts(t: torch.Tensor) -> list[int]:
    """The digest's definition in plain Python integers, one level at a time."""
    raw = bytes(t.reshape(-1).view(torch.uint8).tolist())
    if len(raw) % 2:
        raw += b"\0"
    level = [[w, w] for w in (int.from_bytes(raw[i : i + 2], "little") for i in range(0, len(raw), 2))]
    weights = [[1 + (i * m + 1) % (DIGEST_PRIME - 1) for m in DIGEST_MULTIPLIERS] for i in range(DIGEST_ROW)]
    while True:
        rows = [level[i : i + DIGEST_ROW] for i in range(0, len(level), DIGEST_ROW)]
        sums = [
            [sum(v[k] * weights[j][k] for j, v in enumerate(row)) % DIGEST_PRIME for k in (0, 1)]
            for row in rows
        ]
        if len(sums) <= 1:
            return sums[0] if sums else [0, 0]
        level = [
            [part(s[k]) for k in (0, 1)] for s in sums for part in (lambda x: x & 0xFFFF, lambda x: x >> 16)
        ]


def random_tensor(dtype: torch.dtype, numel: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.int8:
        return torch.randint(-128, 128, (numel,), dtype=torch.int8, generator=g)
    return torch.randn(numel, generator=g).to(dtype)


def test_weights_of_a_row_are_distinct_and_nonzero_mod_the_prime() -> None:
    for m in DIGEST_MULTIPLIERS:
        assert math.gcd(m, DIGEST_PRIME - 1) == 1  # i -> i*m + 1 is a bijection mod P - 1
    # no int64 overflow: 16-bit values times weights below P, summed over a row
    assert DIGEST_ROW * 0xFFFF * (DIGEST_PRIME - 1) < 2**63


@pytest.mark.parametrize("dtype", DTYPES)
def test_digest_follows_its_definition(dtype: torch.dtype) -> None:
    for numel in (1, 3, DIGEST_ROW // 2 + 1, DIGEST_ROW + 1):  # one row, then two levels
        t = random_tensor(dtype, numel)
        assert device_digest_parts(t).tolist() == reference_parts(t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", SIZES)
def test_equal_bytes_give_equal_digests(dtype: torch.dtype, numel: int) -> None:
    t = random_tensor(dtype, numel)
    assert device_digest(t) == device_digest(t.clone())
    wide = torch.stack([t, t], 1)  # a strided column holds the same values
    assert device_digest(wide[:, 0]) == device_digest(t)
    if dtype.itemsize == 1:  # a one-byte tensor at an odd byte offset (a packed buffer's view)
        packed = torch.cat([torch.zeros(1, dtype=torch.uint8), t.view(torch.uint8)])
        assert device_digest(packed[1:].view(dtype)) == device_digest(t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", SIZES)
def test_one_flipped_bit_changes_the_digest(dtype: torch.dtype, numel: int) -> None:
    t = random_tensor(dtype, numel, seed=1)
    digest = device_digest(t)
    size = nbytes(t)
    for byte in sorted({0, size // 2, size - 1, min(size - 1, 2 * DIGEST_ROW + 1)}):
        for bit in (0, 7):
            flipped = t.clone()
            flipped.view(torch.uint8)[byte] ^= 1 << bit
            assert device_digest(flipped) != digest, (byte, bit)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", SIZES[1:])
def test_swapped_elements_change_the_digest(dtype: torch.dtype, numel: int) -> None:
    t = random_tensor(dtype, numel, seed=2)
    digest = device_digest(t)
    for i, j in sorted({(0, 1), (0, numel - 1), (numel // 2, numel - 1)}):
        if torch.equal(t[i], t[j]):
            continue
        swapped = t.clone()
        swapped[[i, j]] = t[[j, i]]
        assert device_digest(swapped) != digest, (i, j)


def test_length_and_large_tensors() -> None:
    assert device_digest(torch.zeros(4, dtype=torch.uint8)) != device_digest(
        torch.zeros(6, dtype=torch.uint8)
    )
    big = random_tensor(torch.bfloat16, DIGEST_ROW * DIGEST_SLICE_ROWS * 2 + 5)  # several slices, levels
    parts = [device_digest_parts(big), device_digest_parts(big[:-5])]
    assert device_digests(parts, [nbytes(big), nbytes(big[:-5])]) == [
        device_digest(big),
        device_digest(big[:-5]),
    ]
    assert len(set(device_digests(parts, [nbytes(big), nbytes(big[:-5])]))) == 2
    assert device_digests([], []) == []
    assert device_digest(torch.empty(0)) != device_digest(torch.zeros(1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_digest_equals_the_cpu_digest(dtype: torch.dtype) -> None:
    for numel in SIZES + [DIGEST_ROW * DIGEST_SLICE_ROWS + 3]:
        t = random_tensor(dtype, numel, seed=numel)
        assert device_digest(t.cuda()) == device_digest(t)
