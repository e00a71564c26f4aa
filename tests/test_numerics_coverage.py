"""Random stimulus over every branch of docs/numerics.md, golden model against the independent scalar
implementation (tests/numerics_spec.py), bit for bit, with the branch coverage counted rather than trusted.

Branches (counted by numerics_spec.spec_partial and by the generator below, each must be hit):
which term sets E (scale, zero, tie), left/right/no shift of T1 and T2, saturation of T1, T2 and of the score
(both signs), the exp2 shift cap, Z's left shift, subnormal scales and zeros, quantizer-clamped scales
(1e-5 and 1e5), codes from progressive shrinks (not only direct quantization), 1..4 segments of mixed widths.
"""
from collections import Counter

import numpy as np
import pytest

from numerics_spec import spec_partial
from pmkvq_accel.model import attention as A
from pmkvq_accel.model import formats as F
from pmkvq_accel.model.fixedpoint import bf16_bits, bf16_round
from pmkvq_accel.model.quant import QuantizedKV, quantize, shrink_to

SCALE_MIN_BITS, SCALE_MAX_BITS = (int(bf16_bits(bf16_round([v]))[0]) for v in (F.SCALE_MIN, F.SCALE_MAX))


def random_block(rng, n, hd, bits, role, gen_cov):
    """One block of n tokens at `bits`, in a random regime; counts what the generator made."""
    regime = rng.choice(["normal", "offset", "tiny", "huge", "subnormal", "zero_min", "big"],
                        p=[0.25, 0.2, 0.1, 0.1, 0.1, 0.1, 0.15])
    gen_cov[f"{role}_regime_{regime}"] += 1
    x = rng.normal(size=(n, hd))
    if regime == "offset":        # offset larger than the spread: the zero sets E
        x = x * 10.0 ** rng.uniform(-3, 0) + rng.choice([-1, 1]) * 10.0 ** rng.uniform(0, 4)
    elif regime == "tiny":        # spread below the scale clamp
        x = x * 1e-7 + rng.normal() * 1e-6
    elif regime == "huge":        # spread beyond the upper scale clamp
        x = x * 1e7 * (2 ** bits)
    elif regime == "zero_min":    # min exactly 0: zero pattern 0 (a subnormal/zero field)
        x = np.abs(x)
        x[:, 0] = 0.0
    elif regime == "big":         # large keys: left-shifted, saturating terms and scores
        x = x * 10.0 ** rng.uniform(2, 5) + rng.normal() * 10.0 ** rng.uniform(0, 6)
    if regime == "subnormal":     # scale/zero patterns with exponent field 0, codes random
        codes = rng.integers(0, 1 << bits, size=(n, hd)).astype(np.uint16)
        scale = rng.integers(1, 0x80, size=n).astype(np.uint16)                  # positive subnormal
        zero = rng.integers(0, 0x80, size=n).astype(np.uint16) | (rng.integers(0, 2, size=n) << 15).astype(np.uint16)
        kv = QuantizedKV(codes, scale, zero, bits)
    else:
        start = int(rng.choice([b for b in F.SUPPORTED_BITS if b >= bits]))
        kv = shrink_to(quantize(x, start), bits) if start > bits else quantize(x, bits)
        gen_cov["shrunk" if start > bits else "direct"] += 1
    exp_field = (kv.scale >> 7) & 0xFF
    gen_cov["scale_subnormal"] += int(np.sum(exp_field == 0))
    gen_cov["zero_subnormal_or_zero"] += int(np.sum(((kv.zero >> 7) & 0xFF) == 0))
    gen_cov["scale_clamped_min"] += int(np.sum(kv.scale == SCALE_MIN_BITS))
    gen_cov["scale_clamped_max"] += int(np.sum(kv.scale == SCALE_MAX_BITS))
    return kv


def random_case(rng, gen_cov):
    T = int(rng.integers(1, 24))
    hd = int(rng.choice([1, 3, 8, 16]))
    G = int(rng.integers(1, 4))
    nseg = int(rng.integers(1, min(4, T) + 1))
    cuts = [0, *sorted(rng.choice(np.arange(1, T), size=nseg - 1, replace=False).tolist()), T] if nseg > 1 else [0, T]
    gen_cov[f"segments_{nseg}"] += 1
    keys, values = [], []
    for a, b in zip(cuts, cuts[1:]):
        keys.append(random_block(rng, b - a, hd, int(rng.choice(F.SUPPORTED_BITS)), "k", gen_cov))
        values.append(random_block(rng, b - a, hd, int(rng.choice(F.SUPPORTED_BITS)), "v", gen_cov))
    if len({b.bits for b in values}) > 1:
        gen_cov["mixed_widths"] += 1
    if rng.random() < 0.5:
        q = A.quantize_query(rng.normal(size=(G, hd)) * 10.0 ** rng.uniform(-3, 3), 1 / np.sqrt(hd))
    else:   # direct codes and exponents, from far right shifts to far left shifts
        codes = rng.integers(-F.QUERY_MAX, F.QUERY_MAX + 1, size=(G, hd))
        q = A.Query(codes.astype(np.int64), rng.integers(-60, 30, size=G).astype(np.int64))
    return q, keys, values


# Branch counters that every run must reach (minimum counts), spec side and generator side.
SPEC_BRANCHES = {
    "E_set_by_scale": 20, "E_set_by_zero": 20, "E_set_by_tie": 2,
    "T1_shift_left": 50, "T1_shift_right": 50, "T1_shift_zero": 1,
    "T2_shift_left": 50, "T2_shift_right": 50,
    "T1_sat": 10, "T2_sat": 10, "score_sat_pos": 10, "score_sat_neg": 10,
    "p_shift_capped": 10, "Z_shift_left": 10, "Z_shift_right": 50, "W_shift_min": 50, "W_shift_more": 50,
}
GEN_BRANCHES = {
    "segments_1": 10, "segments_2": 10, "segments_3": 10, "segments_4": 10, "mixed_widths": 20,
    "shrunk": 50, "direct": 50, "scale_subnormal": 20, "zero_subnormal_or_zero": 20,
    "scale_clamped_min": 10, "scale_clamped_max": 10,
}


def run_stimulus(seed: int, cases: int):
    rng = np.random.default_rng(seed)
    spec_cov, gen_cov = Counter(), Counter()
    for _ in range(cases):
        q, keys, values = random_case(rng, gen_cov)
        part = A.attention_partial(q, keys, values)
        for g, (M, L, acc, E) in enumerate(spec_partial(q, keys, values, spec_cov)):
            assert (part.m[g], part.L[g], part.E) == (M, L, E)
            assert part.acc[g].tolist() == acc
    return spec_cov, gen_cov


@pytest.mark.parametrize("seed", [1, 2])
def test_random_stimulus_covers_every_branch(seed):
    spec_cov, gen_cov = run_stimulus(seed, 300)
    short = {k: (spec_cov[k], n) for k, n in SPEC_BRANCHES.items() if spec_cov[k] < n}
    short.update({k: (gen_cov[k], n) for k, n in GEN_BRANCHES.items() if gen_cov[k] < n})
    assert not short, f"branches hit fewer times than required (got, need): {short}"
