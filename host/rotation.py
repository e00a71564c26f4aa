"""Orthogonal per-head rotation of keys (after RoPE), queries and values, outside the device.

A normalised Sylvester-Hadamard matrix H (head_dim x head_dim, H = H^T, H @ H = I) spreads a key's outlier
channels over all channels, so one per-token scale/zero quantises it better. The device only sees codes, so the
rotation needs no datapath change:

- keys:    k' = k @ H   (after RoPE and after the key reparameterisation), stored in the cache;
- queries: q' = q @ H, so q' . k' = q . k (scores unchanged up to float rounding);
- values:  v' = v @ H, stored in the cache; the attention output o' = sum_j p_j v'_j = o @ H is rotated
  back on the host: o = o' @ H^T = o' @ H.

The value rotation could be folded into v_proj / o_proj; the key rotation cannot be folded into k_proj
(RoPE sits between them), so it is applied on the host to each new key and to each query.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

ROTATIONS = ("none", "hadamard")


@lru_cache(maxsize=8)
def hadamard(n: int) -> np.ndarray:
    """The n x n normalised Sylvester-Hadamard matrix (float64, symmetric, orthogonal); n a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester-Hadamard rotation needs a power-of-two head_dim, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    h = h / np.sqrt(n)
    h.setflags(write=False)
    return h


def check_rotation(name) -> str:
    """Normalise a rotation name from a table/CLI ('none', 'hadamard', None -> 'none'); raise for others."""
    name = "none" if name is None else str(name)
    if name not in ROTATIONS:
        raise ValueError(f"unknown KV rotation {name!r}; known: {ROTATIONS}")
    return name


def matrix(name, head_dim: int):
    """The rotation matrix R (x' = x @ R), or None for 'none'."""
    return None if check_rotation(name) == "none" else hadamard(head_dim)


def rotate(x, name, inverse: bool = False):
    """x @ R (or x @ R^T with inverse) over the last axis; NumPy arrays or torch tensors, any leading shape."""
    r = matrix(name, x.shape[-1])
    if r is None:
        return x
    if inverse:
        r = r.T
    try:
        import torch
        if isinstance(x, torch.Tensor):
            return x @ torch.tensor(r, dtype=x.dtype, device=x.device)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return np.asarray(x, dtype=np.float64) @ r


__all__ = ["ROTATIONS", "hadamard", "check_rotation", "matrix", "rotate"]
