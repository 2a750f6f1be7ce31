"""Counter-based random numbers keyed by per-row seeds.

A row's noise is a pure function of (seed, element index, stream), computed with integer tensor
ops: identical on CPU and GPU, independent of the batch a row lands in, and usable inside
`torch.func.vmap` (where stateful generators are not).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_MASK16 = 0xFFFF
_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, constant: int) -> Tensor:
    """(x * constant) mod 2**32 for x in [0, 2**32), without int64 overflow."""
    low, high = x & _MASK16, x >> 16
    return (low * constant + (((high * constant) & _MASK16) << 16)) & _MASK32


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer hash with good avalanche (Wellons' "lowbias32")."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _row_keys(seeds: Tensor, stream: int) -> Tensor:
    """Mix each int64 seed and a stream number into one 32-bit key, shape (B,)."""
    low, high = seeds & _MASK32, (seeds >> 32) & _MASK32
    return _hash32(_hash32(low ^ _hash32(high + stream)) ^ _hash32(torch.full_like(low, stream + 1)))


def uniform(seeds: Tensor, shape: tuple[int, ...], *, stream: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform noise in (0, 1), shape (B, *shape), a pure function of each row's seed.

    Args:
        seeds: int64 (B,).
        shape: per-row shape.
        stream: separates independent uses of the same seed (e.g. noise draws).
    """
    count = math.prod(shape)
    index = torch.arange(count, device=seeds.device, dtype=torch.int64)
    bits = _hash32(_hash32(index)[None, :] ^ _row_keys(seeds, stream)[:, None])
    values = ((bits >> 8).to(torch.float64) + 0.5) / 2**24
    return values.to(dtype).reshape(-1, *shape)


def normal(seeds: Tensor, shape: tuple[int, ...], *, stream: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise, shape (B, *shape), by Box–Muller over two uniform streams."""
    u1 = uniform(seeds, shape, stream=2 * stream, dtype=torch.float64)
    u2 = uniform(seeds, shape, stream=2 * stream + 1, dtype=torch.float64)
    values = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return values.to(dtype)
