"""Host KV cache manager against the model/cache.py reference: random append sequences with shrinks, every token
present with the widths the schedule says, only the new token's bytes uploaded per step, clear errors."""
import numpy as np
import pytest

from pmkvq_accel.host.device import DeviceError, GoldenDevice
from pmkvq_accel.host.kvcache import ContextTooLong, DeviceKVCache
from pmkvq_accel.hw import regmap as R
from pmkvq_accel.model.attention import Query, attention, attention_partial, merge_partials, quantize_query
from pmkvq_accel.model.quant import QuantizedKV
from pmkvq_accel.model.cache import BudgetError, CacheConfig, ProgressiveStore, budget_for_width, shrink_schedule


def same_blocks(a, b):
    assert [x.bits for x in a] == [y.bits for y in b]
    for x, y in zip(a, b):
        assert np.array_equal(x.codes, y.codes)
        assert np.array_equal(x.scale, y.scale) and np.array_equal(x.zero, y.zero)


CASES = [  # (n_kv_heads, head_dim, n_sink, window, key width, value width, max_len, count_metadata)
    (2, 32, 2, 16, 2, 4, 300, True),
    (3, 64, 1, 16, 8, 2, 200, False),
    (1, 32, 0, 16, 16, 8, 150, True),
    (3, 64, 4, 32, 4, 4, 330, True),
]


@pytest.mark.parametrize("case, engines", [(c, e) for c in CASES for e in (1, 3)] + [(CASES[0], 32)])
def test_random_appends_match_reference(case, engines):
    """The striped cache, gathered back in token order, equals the reference store token for token."""
    heads, hd, sink, window, kbits, vbits, max_len, meta = case
    rng = np.random.default_rng(sum(case[:7]))
    cfg = CacheConfig(heads, hd, sink, window, count_metadata=meta)
    kb, vb = budget_for_width(cfg, kbits, max_len), budget_for_width(cfg, vbits, max_len)
    kv = DeviceKVCache(GoldenDevice(engines=engines), [cfg, cfg], [kb, vb], [vb, kb], max_len, group=2)
    ref = [(ProgressiveStore(cfg, kb), ProgressiveStore(cfg, vb)), (ProgressiveStore(cfg, vb), ProgressiveStore(cfg, kb))]
    n = 0
    while n < max_len:
        T = int(min(rng.choice([1, 1, 1, 2, 5, 17, 40]), max_len - n))
        n += T
        for layer in (0, 1):
            k = rng.normal(size=(heads, T, hd)) * rng.uniform(0.1, 5)
            v = rng.normal(size=(heads, T, hd)) + rng.normal()
            kv.append(layer, k, v)
            ref[layer][0].append(k)
            ref[layer][1].append(v)
        for layer in (0, 1):
            for i, kind in enumerate("kv"):
                store = ref[layer][i]
                assert kv.widths(layer)[i] == store.body_bits
                assert kv.events(layer)[i] == store.events
                for h in range(heads):
                    same_blocks(kv.blocks(layer, h, kind), store.blocks(h))
                    assert sum(b.tokens for b in kv.blocks(layer, h, kind)) == n  # nothing lost
    # the widths at the end are what the reference schedule says for this many tokens
    assert kv.widths(0) == (kbits, vbits) and kv.widths(1) == (vbits, kbits)
    assert kv.events(0)[0] == shrink_schedule(cfg, kb, max_len)
    assert kv.memory_bytes(True) == sum(s.memory_bytes(True) for pair in ref for s in pair)
    assert kv.memory_bytes(False) == sum(s.memory_bytes(False) for pair in ref for s in pair)
    assert kv.fp16_bytes() == 2 * 2 * n * heads * hd * 2


def cut(b: QuantizedKV, lo: int, hi: int) -> QuantizedKV:
    return QuantizedKV(b.codes[lo:hi], b.scale[lo:hi], b.zero[lo:hi], b.bits)


def engine_blocks(store: ProgressiveStore, head: int, engines: int) -> list[list[QuantizedKV]]:
    """The reference store's tokens of one head dealt to the engines as the contract says (written here
    from the rule, independently of hw/regmap.py): sink to engine 0, window block k to engine k mod N."""
    occ, w = store.occ, store.cfg.window
    blocks = dict(zip(("sink", "body", "window"), [None] * 3))
    it = iter(store.blocks(head))
    for name, n in (("sink", occ.sink), ("body", occ.body), ("window", occ.window)):
        if n:
            blocks[name] = next(it)
    out = [[] for _ in range(engines)]
    if blocks["sink"] is not None:
        out[0].append(blocks["sink"])
    body = [[] for _ in range(engines)]
    for k in range(occ.body // w):
        body[k % engines].append(cut(blocks["body"], k * w, (k + 1) * w))
    for e, parts in enumerate(body):
        if parts:
            out[e].append(QuantizedKV(np.concatenate([p.codes for p in parts]),
                                      np.concatenate([p.scale for p in parts]),
                                      np.concatenate([p.zero for p in parts]), parts[0].bits))
    if blocks["window"] is not None:
        out[(occ.body // w) % engines].append(blocks["window"])
    return out


@pytest.mark.parametrize("engines", [1, 2, 4])
def test_attention_equals_golden_model_on_reference_cache(engines):
    """Each engine's partial over its slice, merged in engine order; one engine is the plain attention."""
    rng = np.random.default_rng(5)
    cfg = CacheConfig(3, 64, 1, 16)
    max_len = 240
    kb, vb = budget_for_width(cfg, 2, max_len), budget_for_width(cfg, 4, max_len)
    kv = DeviceKVCache(GoldenDevice(engines=engines), [cfg], [kb], [vb], max_len, group=3)
    ks, vs = ProgressiveStore(cfg, kb), ProgressiveStore(cfg, vb)
    for T in (50, 70, 1, 1, 100, 3):
        k, v = rng.normal(size=(3, T, 64)), rng.normal(size=(3, T, 64))
        kv.append(0, k, v)
        ks.append(k)
        vs.append(v)
        q = rng.normal(size=(9, 64)) * 2
        out = kv.attention(0, q, 0.125)
        qq = quantize_query(q, 0.125)
        ref = []
        for h in range(3):
            query = Query(qq.codes[3 * h:3 * h + 3], qq.exp[3 * h:3 * h + 3])
            if engines == 1:
                ref.append(attention(query, ks.blocks(h), vs.blocks(h)))
                continue
            parts = [attention_partial(query, kb_, vb_) for kb_, vb_ in
                     zip(engine_blocks(ks, h, engines), engine_blocks(vs, h, engines)) if kb_]
            ref.append(merge_partials(parts))
        assert np.array_equal(out, np.concatenate(ref))
    assert kv.widths(0) == (2, 4)


class CountingDevice(GoldenDevice):
    """Counts the bytes the host writes into device memory."""

    def __init__(self, engines=2):
        super().__init__(engines=engines)
        self.written = 0

    def allocate(self, nbytes, bank=0):
        buf = super().allocate(nbytes, bank)
        write = buf.write

        def counted(offset, data):
            self.written += np.asarray(data).nbytes
            write(offset, data)
        buf.write = counted
        return buf


def test_decode_step_uploads_only_the_new_token():
    cfg = CacheConfig(3, 64, 1, 16)
    max_len = 400
    dev = CountingDevice()
    kv = DeviceKVCache(dev, [cfg], [budget_for_width(cfg, 2, max_len)], [budget_for_width(cfg, 2, max_len)],
                       max_len, group=3)
    rng = np.random.default_rng(0)
    kv.append(0, rng.normal(size=(3, 300, 64)), rng.normal(size=(3, 300, 64)))
    flushes = kv.device.kernel.launches["COPY"]
    per_token = 2 * 3 * (64 * 2 + 4)  # K and V: 16-bit codes and one metadata word per KV head
    query_bytes = kv.qdt.itemsize * 9
    for _ in range(20):  # crosses window flushes and a shrink: those run on the device, not through uploads
        dev.written = 0
        kv.append(0, rng.normal(size=(3, 1, 64)), rng.normal(size=(3, 1, 64)))
        assert dev.written == per_token
        dev.written = 0
        kv.attention(0, rng.normal(size=(9, 64)), 0.125)
        busy = sum(1 for c in kv.slices(0) if sum(c))
        assert busy == 2 and dev.written == query_bytes * busy   # the query goes to every engine with tokens
    assert kv.device.kernel.launches["COPY"] > flushes
    assert kv.device.kernel.launches["SHRINK"] > 0


def test_budget_too_small_is_a_clear_error():
    cfg = CacheConfig(3, 64, 1, 16)
    small = budget_for_width(cfg, 2, 1000) * 0.9
    with pytest.raises(BudgetError, match="layer 1: budget of .* too small"):
        DeviceKVCache(GoldenDevice(), [cfg, cfg], [1e9, small], [1e9, 1e9], 1000, group=3)


def test_context_longer_than_max_len():
    cfg = CacheConfig(1, 32, 1, 16)
    kv = DeviceKVCache(GoldenDevice(), [cfg], [1e6], [1e6], 10, group=1)
    kv.append(0, np.zeros((1, 10, 32)), np.zeros((1, 10, 32)))
    with pytest.raises(ContextTooLong, match="exceed the cache's max_len 10"):
        kv.append(0, np.zeros((1, 1, 32)), np.zeros((1, 1, 32)))


@pytest.mark.parametrize("kw, msg", [
    (dict(head_dim=48), "head_dim 48"),
    (dict(head_dim=64, window=6), "window 6"),
])
def test_bad_cache_config(kw, msg):
    cfg = CacheConfig(1, kw["head_dim"], 1, kw.get("window", 16))
    with pytest.raises(ValueError, match=msg):
        DeviceKVCache(GoldenDevice(), [cfg], [1e6], [1e6], 100, group=1)


def test_bad_shapes_and_group():
    cfg = CacheConfig(2, 32, 1, 16)
    with pytest.raises(ValueError, match="1..8"):
        DeviceKVCache(GoldenDevice(), [cfg], [1e6], [1e6], 100, group=9)
    kv = DeviceKVCache(GoldenDevice(), [cfg], [1e6], [1e6], 100, group=2)
    with pytest.raises(ValueError, match="n_kv_heads=2"):
        kv.append(0, np.zeros((3, 1, 32)), np.zeros((3, 1, 32)))
    with pytest.raises(ValueError, match="empty cache"):
        kv.attention(0, np.zeros((4, 32)), 0.1)
    kv.append(0, np.ones((2, 1, 32)), np.ones((2, 1, 32)))
    with pytest.raises(ValueError, match=r"query must be \(4, 32\)"):
        kv.attention(0, np.zeros((2, 32)), 0.1)


def test_bad_configurations_are_clear_errors():
    cfg = CacheConfig(3, 64, 1, 16)
    with pytest.raises(ValueError, match="engines must be 1..32"):
        GoldenDevice(engines=33)
    # a slice that does not fit one pseudo-channel (256 MiB): 8 KV heads x 128 dims x 60000 tokens at 16 bits,
    # four layers
    big = CacheConfig(8, 128, 1, 128)
    with pytest.raises(ValueError, match="more than one HBM pseudo-channel"):
        DeviceKVCache(GoldenDevice(engines=1), [big] * 4, [1e12] * 4, [1e12] * 4, 60000, group=4)
    # more tokens in one engine than its buffers hold (regmap.ENGINE_MAX_TOKENS); two engines share them
    with pytest.raises(ValueError, match=f"at most {R.ENGINE_MAX_TOKENS} per engine"):
        DeviceKVCache(GoldenDevice(engines=1), [cfg], [1e12], [1e12], R.ENGINE_MAX_TOKENS + 1, group=3)
    DeviceKVCache(GoldenDevice(engines=2), [cfg], [1e12], [1e12], R.ENGINE_MAX_TOKENS + 1, group=3)
    # a pseudo-channel that does not exist
    with pytest.raises(ValueError, match="pseudo-channel 40 does not exist"):
        GoldenDevice().allocate(64, bank=40)
    with pytest.raises(DeviceError, match="does not fit HBM pseudo-channel"):
        GoldenDevice().allocate(R.PC_BYTES + 64, bank=0)
    # more engines than windows: engines with empty slices sit launches out, results stay exact
    kv = DeviceKVCache(GoldenDevice(engines=8), [cfg], [1e9], [1e9], 100, group=1)
    kv.append(0, np.ones((3, 40, 64)), np.ones((3, 40, 64)))
    assert [sum(c) for c in kv.slices(0)] == [17, 16, 7, 0, 0, 0, 0, 0]
    assert np.allclose(kv.attention(0, np.ones((3, 64)), 0.125), 1.0, atol=1e-3)


class BankDevice(GoldenDevice):
    """Records the HBM pseudo-channel of every buffer the host allocates."""

    def __init__(self, engines, pcs_per_engine):
        super().__init__(engines=engines)
        self.pcs_per_engine, self.banks = pcs_per_engine, {}

    def allocate(self, nbytes, bank=0):
        buf = super().allocate(nbytes, bank)
        self.banks[buf.address] = bank
        return buf


@pytest.mark.parametrize("engines, k", [(2, 4), (3, 1)])
def test_records_live_in_the_engines_second_pc(engines, k):
    """The cache in the engine's first PC, the query/partial records in its second (the first if it has one):
    the records written during a launch do not share the cache PC's bandwidth."""
    cfg = CacheConfig(3, 64, 1, 16)
    dev = BankDevice(engines, k)
    kv = DeviceKVCache(dev, [cfg], [budget_for_width(cfg, 4, 256)], [budget_for_width(cfg, 4, 256)], 256, group=3)
    for e in range(engines):
        pcs = R.engine_pcs(e, engines, k)
        assert dev.banks[kv.bases[R.engine_arg(e, "base")]] == pcs[0]
        assert dev.banks[kv.bases[R.engine_arg(e, "records")]] == (pcs[1] if k > 1 else pcs[0])
        assert kv.record_bufs[e].nbytes == R.RecordLayout.of(3, 3, 64).nbytes
    rng = np.random.default_rng(0)
    kv.append(0, rng.normal(size=(3, 40, 64)), rng.normal(size=(3, 40, 64)))
    q = rng.normal(size=(9, 64))
    out = kv.attention(0, q, 0.125)
    assert np.isfinite(out).all()
