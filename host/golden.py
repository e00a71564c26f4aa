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

# the arithmetic (attention_partials: attention_partial for H heads on packed segments) and the one unpacker
# are defined once, in model/
from pmkvq_accel.model.attention import Query, attention_partial, attention_partials
from pmkvq_accel.model.quant import (QuantizedKV, pack_codes, pack_metadata, shrink, unpack_codes,
                                     unpack_metadata)

from pmkvq_accel.hw import regmap as L


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


def read_meta(mem, address: int, stride: int, n_heads: int, tokens: int):
    """(scale, zero) uint16 bf16 patterns, each (n_heads, tokens), of the metadata block at `address`."""
    rows = head_rows(mem, address, stride, n_heads, 4 * tokens)
    return unpack_metadata(np.ascontiguousarray(rows).view("<u4"))


# ---------------------------------------------------------------------------------------------------------
# One launch

class GoldenKernel:
    """Executes launches against `mem` (an object with view(address, nbytes) -> uint8 array view), engine by
    engine, each over its own buffer and token slice, as the RTL's engines do.
    head_dim / group: the kernel's synthesis parameters (None accepts any valid value); engines: its engine
    count (the number of per-engine register sets it reads)."""

    def __init__(self, mem, head_dim: int | None = None, group: int | None = None, reference: bool = False,
                 engines: int = 1):
        self.mem = mem
        self.head_dim, self.group, self.engines = head_dim, group, int(engines)
        L.all_args(self.engines)  # validates the engine count
        self.reference = reference
        self.launches = {name: 0 for name in L.OP_NAMES.values()}
        self.last_fault = None

    @staticmethod
    def _engine_view(arg, e: int):
        """Engine e's view of the registers: its own counts, its cache buffer's base added to every cache
        region's offset and its records buffer's base to the record offsets."""
        base, records = arg(L.engine_arg(e, "base")), arg(L.engine_arg(e, "records"))
        buffer_of = {"k_codes": base, "v_codes": base, "k_meta": base, "v_meta": base,
                     "query": records, "partial": records}

        def view(name):
            if name in L.ENGINE_ARGS:
                return arg(L.engine_arg(e, name))
            return buffer_of[name] + arg(name) if name in buffer_of else arg(name)
        return view

    def execute(self, arg) -> int:
        """Run one launch; `arg(name)` reads an argument register (64-bit ones already combined).
        Returns the STATUS_* code (the launch does nothing when it is not OK)."""
        try:
            op = arg("op")
            if op not in L.OP_NAMES:
                raise KernelFault(L.STATUS_BAD_OP, f"op {op}")
            k = self._kind(arg) if op != L.OP_ATTENTION else None   # BAD_KIND before BAD_HEAD_DIM, as the RTL
            hd = arg("head_dim")
            if hd == 0 or hd * 16 % L.WORD_BITS or (self.head_dim is not None and hd != self.head_dim):
                raise KernelFault(L.STATUS_BAD_HEAD_DIM, f"head_dim {hd} (kernel HEAD_DIM {self.head_dim})")
            if op == L.OP_ATTENTION:
                G = arg("group")
                if not 1 <= G <= L.MAX_GROUP or (self.group is not None and G != self.group):
                    raise KernelFault(L.STATUS_BAD_GROUP, f"group {G} (kernel G {self.group})")
                self._bits(arg, "k"), self._bits(arg, "v")
            elif self._bits(arg, k) == 2 and op == L.OP_SHRINK:
                raise KernelFault(L.STATUS_BAD_BITS, "cannot shrink 2-bit codes")
            views = [self._engine_view(arg, e) for e in range(self.engines)]
            acts = {L.OP_ATTENTION: lambda a: a("n_sink") + a("n_body") + a("n_window"),
                    L.OP_SHRINK: lambda a: a("n_body"), L.OP_COPY: lambda a: a("n_window")}[op]
            tokens = [acts(a) for a in views]
            if arg("n_heads") < 1 or not any(tokens) or max(tokens) > L.ENGINE_MAX_TOKENS:
                raise KernelFault(L.STATUS_BAD_TOKENS, f"{arg('n_heads')} heads, tokens per engine {tokens}")
            for name in L.aligned_args(self.engines):
                if arg(name) % L.WORD_BYTES:
                    raise AddressError(f"{name} = {arg(name):#x} is not {L.WORD_BYTES}-byte aligned")
            run = {L.OP_ATTENTION: self._attention, L.OP_SHRINK: self._shrink, L.OP_COPY: self._copy}[op]
            for view, n in zip(views, tokens):
                if n:
                    run(view, hd)
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
        src = self._regions(arg, k, n, bits, hd, arg(f"{k}_window_off"), arg("meta_window_off"))
        dst = self._regions(arg, k, n, bits, hd, arg(f"{k}_body_off"), arg("meta_body_off"))
        for a, b in zip(src, dst):
            b[...] = a.copy()
