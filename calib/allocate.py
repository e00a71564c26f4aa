"""Block-wise (per layer) width allocation as a small integer program (scipy.optimize.milp).

Minimise sum_l S_l(b_l) subject to sum_l mem_l(b_l) <= budget, one width per layer from a set; with
separate_kv, keys and values of each layer get their own widths (and their own sensitivities). mem is the
byte budget the progressive cache needs to hold max_len tokens with the body at b (the cache's own
accounting: sink and window at 16 bits, plus scales/zeros when cfg.count_metadata), i.e. what is stored.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pmkvq_accel.model.cache import CacheConfig, budget_for_width


class AllocationError(ValueError):
    """The budget cannot be met (too small), or the inputs are inconsistent."""


@dataclass
class Allocation:
    key_bits: list
    value_bits: list
    key_budgets: list
    value_budgets: list
    objective: float
    used_bytes: float
    budget_bytes: float


def layer_bytes(cfg: CacheConfig, bits: int, max_len: int, metadata: bool | None = None) -> float:
    return budget_for_width(cfg, bits, max_len, metadata)


def allocate(sens_k, sens_v, widths, cfg: CacheConfig, max_len: int, budget_bytes: float,
             separate_kv: bool = False) -> Allocation:
    """sens_k, sens_v: (n_layers, len(widths)) sensitivities S(b) for each width in `widths`."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    sens_k, sens_v = np.asarray(sens_k, float), np.asarray(sens_v, float)
    widths = [int(w) for w in widths]
    n_layers, nw = sens_k.shape
    if sens_v.shape != sens_k.shape or nw != len(widths):
        raise AllocationError(f"sensitivity shapes {sens_k.shape}/{sens_v.shape} do not match {len(widths)} widths")
    if not (np.all(np.isfinite(sens_k)) and np.all(np.isfinite(sens_v))):
        raise AllocationError("sensitivities must be finite")
    if not np.isfinite(budget_bytes) or budget_bytes <= 0:
        raise AllocationError(f"budget must be a positive number of bytes, got {budget_bytes}")
    mem = np.array([layer_bytes(cfg, w, max_len) for w in widths])     # one tensor kind, one layer
    if separate_kv:
        groups = [(sens_k[l], mem) for l in range(n_layers)] + [(sens_v[l], mem) for l in range(n_layers)]
    else:
        groups = [(sens_k[l] + sens_v[l], 2 * mem) for l in range(n_layers)]
    n_g = len(groups)
    c = np.concatenate([g[0] for g in groups])
    scale = np.abs(c).max() or 1.0
    c = c / scale
    m = np.concatenate([g[1] for g in groups])
    need = sum(g[1].min() for g in groups)
    if need > budget_bytes:
        raise AllocationError(
            f"budget of {budget_bytes:.0f} bytes ({budget_bytes / max_len:.1f} B/token at max_len={max_len}) is too "
            f"small: even every layer at {min(widths)} bits needs {need:.0f} bytes ({need / max_len:.1f} B/token), "
            f"sink and window included")
    onehot = np.zeros((n_g, n_g * nw))
    for i in range(n_g):
        onehot[i, i * nw:(i + 1) * nw] = 1
    cons = [LinearConstraint(onehot, 1, 1), LinearConstraint(m[None, :] / budget_bytes, -np.inf, 1.0)]
    res = milp(c, constraints=cons, integrality=np.ones_like(c), bounds=Bounds(0, 1))
    if res.status != 0 or res.x is None:
        raise AllocationError(f"MILP failed: {res.message}")
    choice = res.x.reshape(n_g, nw).argmax(axis=1)
    bits = [widths[j] for j in choice]
    used = float(sum(groups[i][1][choice[i]] for i in range(n_g)))
    if used > budget_bytes * (1 + 1e-9):
        raise AllocationError(f"MILP solution uses {used:.0f} bytes > budget {budget_bytes:.0f}")
    if separate_kv:
        kb, vb = bits[:n_layers], bits[n_layers:]
    else:
        kb, vb = bits, list(bits)
    return Allocation(key_bits=kb, value_bits=vb,
                      key_budgets=[layer_bytes(cfg, b, max_len) for b in kb],
                      value_budgets=[layer_bytes(cfg, b, max_len) for b in vb],
                      objective=float(res.fun * scale), used_bytes=used, budget_bytes=float(budget_bytes))


def uniform_budgets(cfg: CacheConfig, n_layers: int, budget_bytes: float) -> tuple[list, list]:
    """Ablation 'no allocation': every layer and tensor kind gets the same share of the budget."""
    share = budget_bytes / (2 * n_layers)
    return [share] * n_layers, [share] * n_layers


def rtn_equivalent_bytes(cfg: CacheConfig, n_layers: int, bits: float, max_len: int,
                         metadata: bool | None = None) -> float:
    """Bytes a plain per-token cache of `bits` (no 16-bit sink/window) takes for max_len tokens, all layers, K+V."""
    metadata = cfg.count_metadata if metadata is None else metadata
    per = cfg.n_kv_heads * (cfg.head_dim * bits / 8 + (4 if metadata else 0))
    return 2 * n_layers * max_len * per
