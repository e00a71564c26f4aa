"""The golden kernel: executes one launch of the accelerator kernel from its registers and device memory,
exactly as docs/kernel-interface.md says the RTL does (unpack -> attention_partial -> write partials;
SHRINK with model.quant.shrink, COPY), on a NumPy byte array that stands in for HBM.

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
from pmkvq_accel.model.quant import (QuantizedKV, pack_codes, pack_metadata, shrink, unpack_codes,
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
    return np.ndarray((n_heads, nbytes), np.uint8, buffer=flat, strides=(stride, 1))


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


def read_meta(mem, address: int, stride: int, n_heads: int, tokens: int):
    """(scale, zero) uint16 bf16 patterns, each (n_heads, tokens), of the metadata block at `address`."""
    rows = head_rows(mem, address, stride, n_heads, 4 * tokens)
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
    """Executes launches against `mem` (an object with view(address, nbytes) -> uint8 array view).
    head_dim / group: the kernel's synthesis parameters (None accepts any valid value)."""

    def __init__(self, mem, head_dim: int | None = None, group: int | None = None, reference: bool = False):
        self.mem = mem
        self.head_dim, self.group = head_dim, group
        self.reference = reference
        self.launches = {name: 0 for name in L.OP_NAMES.values()}
        self.last_fault = None

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
            for name in ("k_window_off", "k_body_off", "v_window_off", "v_body_off", "k_codes_stride",
                         "v_codes_stride", "meta_stride", "meta_window_off", "meta_body_off", *L.ADDRESS_REGS):
                if arg(name) % L.WORD_BYTES:
                    raise AddressError(f"{name} = {arg(name):#x} is not {L.WORD_BYTES}-byte aligned")
            {L.OP_ATTENTION: self._attention, L.OP_SHRINK: self._shrink, L.OP_COPY: self._copy}[op](arg, hd)
            self.launches[L.OP_NAMES[op]] += 1
            return L.STATUS_OK
        except KernelFault as fault:
            self.last_fault = fault
            return fault.status
        except ValueError as e:  # bf16 Inf/NaN patterns and other data the golden model rejects
            self.last_fault = KernelFault(L.STATUS_BAD_DATA, str(e))
            return L.STATUS_BAD_DATA

    # -- helpers --------------------------------------------------------------------------------------------
    def _bits(self, arg, k: str) -> int:
        bits = arg(f"{k}_bits")
        if bits not in L.CODE_BITS:
            raise KernelFault(L.STATUS_BAD_BITS, f"{k}_bits {bits}")
        return bits

    def _segments(self, arg, k: str):
        """[(codes offset, metadata offset, bits, tokens)] of the sink, body and window blocks (non-empty)."""
        segs = [(0, 0, 16, arg("n_sink")),
                (arg(f"{k}_body_off"), arg("meta_body_off"), self._bits(arg, k), arg("n_body")),
                (arg(f"{k}_window_off"), arg("meta_window_off"), 16, arg("n_window"))]
        return [s for s in segs if s[3]]

    def _tensor(self, arg, k: str, hd: int):
        """All heads' tokens of one kind: packed segments [(rows (H, bytes), bits, tokens)] for the sink, body
        and window blocks, bits (T,), scale and zero (H, T) bf16 patterns."""
        H, codes, meta = arg("n_heads"), arg(f"{k}_codes"), arg(f"{k}_meta")
        cstride, mstride = arg(f"{k}_codes_stride"), arg("meta_stride")
        segs, metas = [], []
        for coff, moff, b, n in self._segments(arg, k):
            segs.append((head_rows(self.mem, codes + coff, cstride, H, L.codes_bytes(n, hd, b)), b, n))
            metas.append(read_meta(self.mem, meta + moff, mstride, H, n))
        tbits = np.concatenate([np.full(n, b, np.int64) for _, b, n in segs])
        return segs, tbits, np.concatenate([m[0] for m in metas], 1), np.concatenate([m[1] for m in metas], 1)

    def _blocks(self, arg, k: str, hd: int, h: int):
        """One head's [sink, body, window] blocks unpacked by model.quant.unpack_codes (reference mode)."""
        H, codes, meta = arg("n_heads"), arg(f"{k}_codes"), arg(f"{k}_meta")
        blocks = []
        for coff, moff, b, n in self._segments(arg, k):
            rows = head_rows(self.mem, codes + coff, arg(f"{k}_codes_stride"), H, L.codes_bytes(n, hd, b))
            scale, zero = read_meta(self.mem, meta + moff, arg("meta_stride"), H, n)
            blocks.append(QuantizedKV(unpack_codes(rows[h], b, n, hd), scale[h], zero[h], b))
        return blocks

    # -- ops ------------------------------------------------------------------------------------------------
    def _attention(self, arg, hd):
        H, G = arg("n_heads"), arg("group")
        if not 1 <= G <= L.MAX_GROUP or (self.group is not None and G != self.group):
            raise KernelFault(L.STATUS_BAD_GROUP, f"group {G} (kernel G {self.group})")
        T = arg("n_sink") + arg("n_body") + arg("n_window")
        if not 1 <= T <= MAX_PARTIAL_TOKENS:
            raise KernelFault(L.STATUS_BAD_TOKENS, f"{T} tokens")
        qdt, pdt = L.query_dtype(hd), L.partial_dtype(hd)
        q = self.mem.view(arg("query"), H * G * qdt.itemsize).view(qdt).reshape(H, G)
        out = self.mem.view(arg("partial"), H * G * pdt.itemsize).view(pdt).reshape(H, G)
        if self.reference:
            results = [attention_partial(Query(q["q"][h].astype(np.int64), q["exp"][h].astype(np.int64)),
                                         self._blocks(arg, "k", hd, h), self._blocks(arg, "v", hd, h))
                       for h in range(H)]
            for h, part in enumerate(results):
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

    def _regions(self, arg, k, n, bits, hd, code_off, meta_off):
        """(codes rows, metadata rows) views (H, bytes) of an n-token block at `bits` in every head."""
        H = arg("n_heads")
        codes = head_rows(self.mem, arg(f"{k}_codes") + code_off, arg(f"{k}_codes_stride"), H,
                          L.codes_bytes(n, hd, bits))
        meta = head_rows(self.mem, arg(f"{k}_meta") + meta_off, arg("meta_stride"), H, L.ceil_words(4 * n))
        return codes, meta

    def _shrink(self, arg, hd):
        """In place, every head: the n_body-token block at {k,v}_body_off / meta_body_off, 2n -> n bits
        (codes rewritten as whole zero-padded words, scales rewritten, zeros kept)."""
        k = self._kind(arg)
        bits, n = self._bits(arg, k), arg("n_body")
        if bits == 2:
            raise KernelFault(L.STATUS_BAD_BITS, "cannot shrink 2-bit codes")
        if n < 1:
            raise KernelFault(L.STATUS_BAD_TOKENS, "SHRINK of an empty block")
        codes, meta = self._regions(arg, k, n, bits, hd, arg(f"{k}_body_off"), arg("meta_body_off"))
        dst = codes[:, :L.codes_bytes(n, hd, bits // 2)]
        for h in range(arg("n_heads")):
            s, z = unpack_metadata(np.ascontiguousarray(meta[h, :4 * n]).view("<u4"))
            new = shrink(QuantizedKV(unpack_codes(codes[h], bits, n, hd), s, z, bits))
            dst[h] = pack_codes(new.codes, bits // 2)
            meta[h, :4 * n] = pack_metadata(new.scale, new.zero).astype("<u4").view(np.uint8)

    def _copy(self, arg, hd):
        """Every head: the n_window-token block at {k,v}_window_off / meta_window_off ({k,v}_bits wide) is
        copied, codes and metadata as whole words, to {k,v}_body_off / meta_body_off."""
        k = self._kind(arg)
        bits, n = self._bits(arg, k), arg("n_window")
        if n < 1:
            raise KernelFault(L.STATUS_BAD_TOKENS, "COPY of an empty block")
        src = self._regions(arg, k, n, bits, hd, arg(f"{k}_window_off"), arg("meta_window_off"))
        dst = self._regions(arg, k, n, bits, hd, arg(f"{k}_body_off"), arg("meta_body_off"))
        for a, b in zip(src, dst):
            b[...] = a.copy()
