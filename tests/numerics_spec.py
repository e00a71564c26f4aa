"""An independent scalar implementation of docs/numerics.md sections 5-7 in plain Python integers, written
from the document (not from model/): the constants below are the document's numbers, not model.formats'.
`spec_partial(query, keys, values, cov)` returns [(M, L, acc, E)] per query head and, when `cov` is a
collections.Counter, counts which branch of the spec every token took (tests check those counts)."""

TERM_LIMIT = 62      # numerics.md 5: T1, T2 = sat_62(...)
SCORE_LIMIT = 31     # numerics.md 5: score = sat_31(T1 - T2)
P_SHIFT_CAP = 62     # numerics.md 6: p = rshr(v, min(n, 62))


def rshr(x: int, k: int) -> int:
    return (x + (1 << (k - 1))) >> k if k > 0 else x << -k


def sat(x: int, n: int) -> int:
    lim = (1 << n) - 1
    return max(-lim, min(lim, x))


def field(pattern: int):
    """numerics.md 1: bf16 pattern -> (m, x), value m * 2^x."""
    sign, e, frac = pattern >> 15, (pattern >> 7) & 0xFF, pattern & 0x7F
    assert e != 255
    m, x = (128 + frac, e - 134) if e else (frac, -133)
    return (-m if sign else m), x


def term(v: int, shift_left: int, cov, name: str) -> int:
    """sat_62(rshr(v, -shift_left)) with a left shift saturating instead of wrapping (Python ints are exact)."""
    if cov is not None:
        cov[f"{name}_shift_" + ("left" if shift_left > 0 else "right" if shift_left < 0 else "zero")] += 1
    t = rshr(v, -shift_left)
    out = sat(t, TERM_LIMIT)
    if cov is not None and out != t:
        cov[f"{name}_sat"] += 1
    return out


def spec_scores(query, keys, cov=None):
    """numerics.md 5: scores [[score_t for t] for each head] as Python ints."""
    krows = [(b.codes[t].tolist(), int(b.scale[t]), int(b.zero[t])) for b in keys for t in range(b.tokens)]
    out = []
    for g in range(query.codes.shape[0]):
        Q = [int(v) for v in query.codes[g]]
        eq, sq = int(query.exp[g]), sum(Q)
        sc = []
        for codes, s, z in krows:
            (ms, xs), (mz, xz) = field(s), field(z)
            d = sum(a * b for a, b in zip(Q, codes))
            t1 = term(ms * d, xs + eq + 16, cov, "T1")
            t2 = term(mz * sq, xz + eq + 16, cov, "T2")
            score = sat(t1 - t2, SCORE_LIMIT)
            if cov is not None and score != t1 - t2:
                cov["score_sat_" + ("pos" if t1 > t2 else "neg")] += 1
            sc.append(score)
        out.append(sc)
    return out


def spec_partial(query, keys, values, cov=None):
    vrows = [(b.codes[t].tolist(), b.bits, int(b.scale[t]), int(b.zero[t])) for b in values for t in range(b.tokens)]
    out = []
    for sc in spec_scores(query, keys, cov):
        M = max(sc)
        table = [round(2 ** (32 - j / 256)) for j in range(257)]   # exact enough: no entry is near a tie
        ps = []
        for s_ in sc:
            x = M - s_
            n, f = x >> 16, x & 0xFFFF
            i, r = f >> 8, f & 0xFF
            v = table[i] - (((table[i] - table[i + 1]) * r + 128) >> 8)
            if cov is not None and n >= P_SHIFT_CAP:
                cov["p_shift_capped"] += 1
            ps.append(rshr(v, min(n, P_SHIFT_CAP)))
        E = max(max(field(s)[1] + b, field(z)[1]) for _, b, s, z in vrows)
        if cov is not None:
            for _, b, s, z in vrows:
                a, c = field(s)[1] + b, field(z)[1]
                cov["E_term_" + ("scale" if a > c else "zero" if c > a else "tie")] += 1
                if max(a, c) == E:
                    cov["E_set_by_" + ("scale" if a > c else "zero" if c > a else "tie")] += 1
        acc = [0] * len(vrows[0][0])
        for p, (codes, b, s, z) in zip(ps, vrows):
            (ms, xs), (mz, xz) = field(s), field(z)
            kw, kz = E + 14 - xs - b, E - 2 - xz
            W = rshr(p * ms, kw)
            Z = rshr(p * mz, kz)
            if cov is not None:
                cov["Z_shift_" + ("left" if kz < 0 else "right" if kz > 0 else "zero")] += 1
                cov["W_shift_min" if kw == 14 else "W_shift_more"] += 1
            assert 0 <= W < 2**26 and abs(Z) < 2**42
            for d, c in enumerate(codes):
                acc[d] += W * (c << (16 - b)) - Z
        out.append((M, sum(ps), acc, E))
    return out
