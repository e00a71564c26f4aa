"""The golden kernel: executes one launch of the accelerator kernel from its registers and device memory,
exactly as docs/kernel-interface.md says the RTL does (unpack -> attention_partial -> write partials;
SHRINK and FLUSH with model.quant.shrink), on a NumPy byte array that stands in for HBM.

Two execution modes give bit-identical results (tests/test_host_golden.py):
- reference=True: per KV head, model.quant.unpack_codes + model.attention.attention_partial, the golden model
  itself (slow: ~3 ms per head at 1k tokens);
- reference=False (default): the same integer arithmetic, built from the same model/ primitives, vectorised
  over the KV heads of a launch, with a table-driven unpack (fast enough for real-time decoding on a CPU).
"""
from __future__ import annotations

import numpy as np

from pmkvq_accel.model.attention import Query, attention_partial, exp2_neg
from pmkvq_accel.model.fixedpoint import bf16_fields, shift_round, shift_round_saturate
from pmkvq_accel.model.formats import (ACC_UNIT_OFFSET, MAX_PARTIAL_TOKENS, P_FRAC, SCORE_BITS, SCORE_FRAC,
                                       TERM_LIMIT_BITS)
from pmkvq_accel.model.quant import (QuantizedKV, pack_codes, pack_metadata, shrink, shrink_to, unpack_codes,
                                     unpack_metadata)

from . import layout as L


class KernelFault(Exception):
    """A launch the kernel refuses: carries the STATUS_* code it reports."""

    def __init__(self, status: int, detail: str = ""):
        super().__init__(f"{L.STATUS_NAMES.get(status, status)}{': ' + detail if detail else ''}")
        self.status = status


class AddressError(KernelFault):
    def __init__(self, detail: str):
        super().__init__(L.STATUS_BAD_ADDRESS, detail)


# ---------------------------------------------------------------------------------------------------------
# Memory access as the kernel sees it

def head_rows(mem, address: int, stride: int, n_heads: int, nbytes: int) -> np.ndarray:
    """(n_heads, nbytes) uint8 view: the first nbytes of each head's region (regions `stride` apart)."""
    if address % L.WORD_BYTES or stride % L.WORD_BYTES:
        raise AddressError(f"address {address:#x} / stride {stride} not aligned to {L.WORD_BYTES} bytes")
    if n_heads > 1 and stride < nbytes:
        raise AddressError(f"head stride {stride} is smaller than the {nbytes} bytes read per head")
    flat = mem.view(address, (n_heads - 1) * stride + nbytes)
    return np.lib.stride_tricks.as_strided(flat, shape=(n_heads, nbytes), strides=(stride, 1))


def _lut(bits: int) -> np.ndarray:
    per = 8 // bits
    b = np.arange(256, dtype=np.uint16)[:, None]
    return (b >> (np.arange(per, dtype=np.uint16) * bits)) & ((1 << bits) - 1)


_LUTS = {b: _lut(b) for b in (4, 2)}


def unpack_rows(rows: np.ndarray, bits: int, tokens: int, head_dim: int, out=None, msb: bool = False):
    """Codes (n_heads, tokens, head_dim) from packed rows (n_heads, >= bytes of the block).
    Returns uint16 codes, or writes them into the float64 array `out` (MSB-aligned to 16 bits if msb)."""
    n = tokens * head_dim
    h = rows.shape[0]
    if bits == 16:  # each row is contiguous, so it can be reinterpreted in place
        codes = rows[:, :2 * n].view("<u2").reshape(h, tokens, head_dim)
    elif bits == 8:
        codes = rows[:, :n].reshape(h, tokens, head_dim)
    else:
        per = 8 // bits
        lut = _LUTS[bits] if out is None else _LUTS_F64[bits, msb]
        codes = lut[rows[:, :-(-n // per)]].reshape(h, -1)[:, :n].reshape(h, tokens, head_dim)
        if out is not None:
            out[...] = codes
            return out
    if out is None:
        return codes.astype(np.uint16)
    np.multiply(codes, float(1 << (16 - bits)) if msb else 1.0, out=out)
    return out


_LUTS_F64 = {(b, msb): _LUTS[b] * float(1 << (16 - b) if msb else 1) for b in (4, 2) for msb in (False, True)}


def read_meta(mem, address: int, stride: int, n_heads: int, first: int, tokens: int):
    """(scale, zero) uint16 bf16 patterns, each (n_heads, tokens), of tokens first..first+tokens-1."""
    rows = head_rows(mem, address, stride, n_heads, 4 * (first + tokens))[:, 4 * first:]
    return unpack_metadata(np.ascontiguousarray(rows).view("<u4"))


# ---------------------------------------------------------------------------------------------------------
# The datapath, vectorised over KV heads (same integer arithmetic as model.attention.attention_partial)

CHUNK_TOKENS = 256  # codes are decoded to float64 a chunk at a time, so the matmuls read them from cache


def iter_chunks(segments, head_dim: int, msb: bool, chunk: int | None = None):
    """Decode packed code segments [(rows (H, bytes) uint8, bits, tokens)] in token order, a chunk at a time:
    yields (first token, float64 codes (H, m, head_dim)); the array is reused between chunks."""
    chunk = chunk or CHUNK_TOKENS
    lo, scratch = 0, None
    for rows, bits, n in segments:
        per_token = head_dim * bits // 8  # whole bytes: head_dim is a multiple of 32
        for t0 in range(0, n, chunk):
            m = min(chunk, n - t0)
            if scratch is None:
                scratch = np.empty((rows.shape[0], chunk, head_dim))
            yield lo + t0, unpack_rows(rows[:, t0 * per_token:(t0 + m) * per_token], bits, m, head_dim,
                                       out=scratch[:, :m], msb=msb)
        lo += n


def attention_partials(qcodes, qexp, ksegs, kbits, kscale, kzero, vsegs, vbits, vscale, vzero):
    """Partials for H KV heads at once (the integer arithmetic of model.attention.attention_partial).
    qcodes (H, G, hd) int, qexp (H, G); ksegs/vsegs: packed code segments in token order
    [(rows (H, bytes) uint8, bits, tokens)]; kbits/vbits (T,) width of each token; scale/zero (H, T) bf16
    patterns. Returns m (H, G), L (H, G), acc (H, G, hd) int64, E (H,) int64."""
    H, G, hd = qcodes.shape
    qf = qcodes.astype(np.float64)
    df = np.empty((H, G, kbits.size))
    for lo, c in iter_chunks(ksegs, hd, msb=False):  # exact: |D| < 2^38
        np.matmul(qf, c.transpose(0, 2, 1), out=df[:, :, lo:lo + c.shape[1]])
    d = df.astype(np.int64)
    sq = qcodes.astype(np.int64).sum(axis=2)[:, :, None]
    ms, xs = bf16_fields(kscale)
    mz, xz = bf16_fields(kzero)
    eq = qexp.astype(np.int64)[:, :, None]
    t1 = shift_round_saturate(ms[:, None, :] * d, -(xs[:, None, :] + eq + SCORE_FRAC), TERM_LIMIT_BITS)
    t2 = shift_round_saturate(mz[:, None, :] * sq, -(xz[:, None, :] + eq + SCORE_FRAC), TERM_LIMIT_BITS)
    lim = (1 << (SCORE_BITS - 1)) - 1
    s = np.clip(t1 - t2, -lim, lim)
    m = s.max(axis=2)
    p = exp2_neg(m[:, :, None] - s)
    vms, vxs = bf16_fields(vscale)
    vmz, vxz = bf16_fields(vzero)
    if np.any(vms <= 0):
        raise KernelFault(L.STATUS_BAD_DATA, "value scales must be positive")
    vb = np.asarray(vbits, np.int64)[None, :]
    E = np.max(np.maximum(vxs + vb, vxz), axis=1)                          # (H,)
    Eb = E[:, None, None]
    w = shift_round(p * vms[:, None, :], Eb - ACC_UNIT_OFFSET + 48 - (vxs + vb)[:, None, :])
    z = shift_round(p * vmz[:, None, :], Eb - ACC_UNIT_OFFSET + P_FRAC - vxz[:, None, :])
    # sum_t W_t * c16_t exactly: a chunk of <= 256 tokens sums below 2^8 * 2^26 * 2^16 = 2^50 < 2^53.
    wf = w.astype(np.float64)
    acc = np.zeros((H, G, hd), np.int64)
    for lo, c in iter_chunks(vsegs, hd, msb=True):
        acc += np.matmul(wf[:, :, lo:lo + c.shape[1]], c).astype(np.int64)
    return m, p.sum(axis=2), acc - z.sum(axis=2)[:, :, None], E


# ---------------------------------------------------------------------------------------------------------
# One launch

class GoldenKernel:
    """Executes launches against `mem` (an object with view(address, nbytes) -> uint8 array view)."""

    def __init__(self, mem, head_dim: int | None = None, reference: bool = False):
        self.mem = mem
        self.head_dim = head_dim   # the synthesised HEAD_DIM; None accepts any valid head_dim
        self.reference = reference
        self.launches = {name: 0 for name in L.OP_NAMES.values()}

    def execute(self, arg) -> int:
        """Run one launch; `arg(name)` reads an argument register (64-bit ones already combined).
        Returns the STATUS_* code (the launch does nothing when it is not OK)."""
        try:
            op = arg("op")
            if op not in L.OP_NAMES:
                raise KernelFault(L.STATUS_BAD_OP, f"op {op}")
            hd = arg("head_dim")
            if hd == 0 or hd * 16 % L.WORD_BITS or (self.head_dim is not None and hd != self.head_dim):
                raise KernelFault(L.STATUS_BAD_HEAD_DIM, f"head_dim {hd} (kernel HEAD_DIM {self.head_dim})")
            if arg("n_heads") < 1:
                raise KernelFault(L.STATUS_BAD_TOKENS, "n_heads is 0")
            {L.OP_ATTENTION: self._attention, L.OP_SHRINK: self._shrink, L.OP_FLUSH: self._flush}[op](arg, hd)
            self.launches[L.OP_NAMES[op]] += 1
            return L.STATUS_OK
        except KernelFault as fault:
            self.last_fault = fault
            return fault.status
        except ValueError as e:  # bf16 Inf/NaN patterns and other data the golden model rejects
            self.last_fault = KernelFault(L.STATUS_BAD_DATA, str(e))
            return L.STATUS_BAD_DATA

    # -- helpers --------------------------------------------------------------------------------------------
    def _kind_regs(self, arg, k: str):
        bits = arg(f"{k}_bits")
        if bits not in L.CODE_BITS:
            raise KernelFault(L.STATUS_BAD_BITS, f"{k}_bits {bits}")
        off = (arg(f"{k}_window_off"), arg(f"{k}_body_off"))
        if off[0] % L.WORD_BYTES or off[1] % L.WORD_BYTES:
            raise AddressError(f"{k} block offsets {off} not word aligned")
        return bits, arg(f"{k}_codes"), arg(f"{k}_codes_stride"), off[0], off[1], arg(f"{k}_meta")

    def _tensor(self, arg, k: str, hd: int):
        """All heads' tokens of one kind: packed segments [(rows (H, bytes), bits, tokens)] for the sink, body
        and window blocks (empty ones left out), bits (T,), scale and zero (H, T) bf16 patterns."""
        H, ns, nb, nw = arg("n_heads"), arg("n_sink"), arg("n_body"), arg("n_window")
        bits, codes, stride, w_off, b_off, meta = self._kind_regs(arg, k)
        segs = [(head_rows(self.mem, codes + off, stride, H, L.codes_bytes(n, hd, b)), b, n)
                for off, b, n in [(0, 16, ns), (b_off, bits, nb), (w_off, 16, nw)] if n]
        scale, zero = read_meta(self.mem, meta, arg("meta_stride"), H, 0, ns + nb + nw)
        tbits = np.concatenate([np.full(n, b, np.int64) for _, b, n in segs])
        return segs, tbits, scale, zero

    def _blocks(self, arg, k: str, hd: int, h: int):
        """One head's [sink, body, window] blocks unpacked by model.quant.unpack_codes (reference mode)."""
        H, ns, nb, nw = arg("n_heads"), arg("n_sink"), arg("n_body"), arg("n_window")
        bits, codes, stride, w_off, b_off, meta = self._kind_regs(arg, k)
        scale, zero = read_meta(self.mem, meta, arg("meta_stride"), H, 0, ns + nb + nw)
        blocks, first = [], 0
        for off, b, n in [(0, 16, ns), (b_off, bits, nb), (w_off, 16, nw)]:
            if n:
                rows = head_rows(self.mem, codes + off, stride, H, L.codes_bytes(n, hd, b))
                blocks.append(QuantizedKV(unpack_codes(rows[h], b, n, hd), scale[h, first:first + n],
                                          zero[h, first:first + n], b))
                first += n
        return blocks

    # -- ops ------------------------------------------------------------------------------------------------
    def _attention(self, arg, hd):
        H, G = arg("n_heads"), arg("group")
        if not 1 <= G <= L.MAX_GROUP:
            raise KernelFault(L.STATUS_BAD_GROUP, f"group {G}")
        T = arg("n_sink") + arg("n_body") + arg("n_window")
        if not 1 <= T <= MAX_PARTIAL_TOKENS:
            raise KernelFault(L.STATUS_BAD_TOKENS, f"{T} tokens")
        qdt, pdt = L.query_dtype(hd), L.partial_dtype(hd)
        if arg("query") % L.WORD_BYTES or arg("partial") % L.WORD_BYTES:
            raise AddressError("query/partial buffers must be word aligned")
        q = self.mem.view(arg("query"), H * G * qdt.itemsize).view(qdt).reshape(H, G)
        out = self.mem.view(arg("partial"), H * G * pdt.itemsize).view(pdt).reshape(H, G)
        if self.reference:
            for h in range(H):
                part = attention_partial(Query(q["q"][h].astype(np.int64), q["exp"][h].astype(np.int64)),
                                         self._blocks(arg, "k", hd, h), self._blocks(arg, "v", hd, h))
                out["m"][h], out["L"][h], out["acc"][h], out["E"][h] = part.m, part.L, part.acc, part.E
        else:
            kc, kb, ks, kz = self._tensor(arg, "k", hd)
            vc, vb, vs, vz = self._tensor(arg, "v", hd)
            m, Lsum, acc, E = attention_partials(q["q"], q["exp"], kc, kb, ks, kz, vc, vb, vs, vz)
            out["m"], out["L"], out["acc"], out["E"] = m, Lsum, acc, E[:, None]

    def _kind(self, arg):
        kind = arg("kind")
        if kind not in (L.KIND_KEYS, L.KIND_VALUES):
            raise KernelFault(L.STATUS_BAD_KIND, f"kind {kind}")
        return "k" if kind == L.KIND_KEYS else "v"

    def _rewrite(self, arg, hd, k, src_off, src_bits, n, first, dst_off, dst_bits, step):
        """Read n tokens at src_bits, shrink to dst_bits, write codes at dst_off and their scales in place."""
        H = arg("n_heads")
        _, codes, stride, _, _, meta = self._kind_regs(arg, k)
        mstride = arg("meta_stride")
        src = head_rows(self.mem, codes + src_off, stride, H, L.codes_bytes(n, hd, src_bits))
        dst = head_rows(self.mem, codes + dst_off, stride, H, L.codes_bytes(n, hd, dst_bits))
        mrows = head_rows(self.mem, meta, mstride, H, 4 * (first + n))[:, 4 * first:]
        for h in range(H):
            s, z = unpack_metadata(np.ascontiguousarray(mrows[h]).view("<u4"))
            new = step(QuantizedKV(unpack_codes(src[h], src_bits, n, hd), s, z, src_bits))
            dst[h] = pack_codes(new.codes, dst_bits)          # fills whole words (zero padded)
            mrows[h] = pack_metadata(new.scale, new.zero).astype("<u4").view(np.uint8)

    def _shrink(self, arg, hd):
        """In-place shrink of every head's body block from {k,v}_bits to half that width."""
        k = self._kind(arg)
        bits, _, _, _, b_off, _ = self._kind_regs(arg, k)
        n = arg("n_body")
        if bits == 2:
            raise KernelFault(L.STATUS_BAD_BITS, "cannot shrink a 2-bit body")
        if n < 1:
            raise KernelFault(L.STATUS_BAD_TOKENS, "empty body")
        self._rewrite(arg, hd, k, b_off, bits, n, arg("n_sink"), b_off, bits // 2, shrink)

    def _flush(self, arg, hd):
        """Move every head's window block (16-bit) to the end of its body, shrunk to the body width."""
        k = self._kind(arg)
        bits, _, _, w_off, b_off, _ = self._kind_regs(arg, k)
        nb, nw = arg("n_body"), arg("n_window")
        if nw < 1:
            raise KernelFault(L.STATUS_BAD_TOKENS, "empty window")
        if nb * hd * bits % L.WORD_BITS:
            raise KernelFault(L.STATUS_BAD_TOKENS, f"body end ({nb} tokens at {bits} bits) is not word aligned")
        self._rewrite(arg, hd, k, w_off, 16, nw, arg("n_sink") + nb, b_off + nb * hd * bits // 8, bits,
                      lambda kv: shrink_to(kv, bits))
