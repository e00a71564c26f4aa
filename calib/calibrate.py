"""PM-KVQ calibration: key reparameterisation, per-layer sensitivity, MILP width allocation -> bit-width table.

    python calib/calibrate.py                      # default model, default text, writes
                                                   # calib/tables/SmolLM2-135M-Instruct.json (+ .reparam.safetensors)
                                                   # and plots under out/calib/
    python calib/calibrate.py --model /path/to/hf_folder --calib-text my.jsonl --budget-mb 64 --max-len 32768

Steps (docs/calibration.md):
1. calibration samples (seq_len tokens) at interpolated positions arange(0, effective_len, effective_len // seq_len)
   (--no-pos-interp: positions 0..seq_len-1);
2. max |K| per KV head and RoPE channel pair over the samples (keys after RoPE);
3. per layer, alpha on a grid (1, 0.95, ..., 0.05, 0) minimising the MSE of the layer's attention output with
   float KV vs quantised KV (--search-bits, through the progressive path 16 -> shrink); factors
   r = clamp(m^alpha, 1e-4, 1e4) folded into q/k projections (--no-reparam: none);
4. sensitivity S_K,l(b), S_V,l(b) = mean |(Q_b(X) - X) * dL/dX| from one backward pass per sample (K after RoPE,
   of the reparameterised model; Q_b = the hardware path: 16-bit codes shrunk to b);
5. MILP: one width per layer (or per layer and tensor kind with --separate-kv) under the byte budget.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from tqdm.auto import tqdm

from pmkvq_accel.calib import data as D
from pmkvq_accel.calib import table as T
from pmkvq_accel.calib.allocate import AllocationError, allocate, rtn_equivalent_bytes, uniform_budgets
from pmkvq_accel.calib.quantsim import CaptureLayer, FloatLayer, OneTensorLayer, fake_quant, make_cache
from pmkvq_accel.model.cache import CacheConfig, budget_for_width
from pmkvq_accel.model.llm import attention_modules, decoder_layers

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "out" / "calib"
ALPHA_GRID = [round(1 - n / 20, 2) for n in range(21)]   # 1.0 ... 0.05, 0.0 (0 = no smoothing)


@dataclass
class CalibSettings:
    n_samples: int = 4
    seq_len: int = 2048
    effective_len: int = 8192
    pos_interp: bool = True
    reparam: bool = True
    search_samples: int = 1
    search_queries: int = 256
    search_bits: int = 4
    widths: tuple = (4, 2)
    seed: int = 0
    calib_text: str | None = None
    rotation: str = "none"        # KV rotation (host/rotation.py) the search and the sensitivities quantise through
    sensitivity: str = "abs"      # SENSITIVITY_METRICS: how a layer's quantisation error is scored (`sensitivity`)

    def key(self, model_hash: str) -> str:
        d = asdict(self)
        if d["rotation"] == "none":
            del d["rotation"]     # keeps the artifact keys of runs made before the rotation existed
        if d["sensitivity"] == "abs":
            del d["sensitivity"]  # likewise for the metric
        d["widths"] = sorted(self.widths)
        d["model"] = model_hash
        d["v"] = 4   # bump when the default text or the artifact computation changes
        if d["calib_text"]:
            p = Path(d["calib_text"])
            d["calib_text"] = [str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Artifacts:
    factors: list | None          # per layer (n_kv_heads, head_dim) float32, or None
    alphas: list | None
    alpha_mse: list | None        # per layer, MSE for each grid alpha
    max_abs_k: list               # per layer (n_kv_heads, head_dim): max |K| before reparam
    sens_widths: list
    sens_k: np.ndarray            # (n_layers, len(widths))
    sens_v: np.ndarray
    settings: dict = field(default_factory=dict)
    text_desc: str = ""
    seconds: dict = field(default_factory=dict)
    window_mass: dict | None = None   # attention_mass of the search samples: what choose_window weighs windows by


def positions(seq_len: int, effective_len: int, pos_interp: bool) -> torch.Tensor:
    """Positional interpolation as PM-KVQ defines it: arange(0, effective_len, effective_len // seq_len)."""
    if not pos_interp:
        return torch.arange(seq_len)
    step = effective_len // seq_len
    if step < 1:
        raise ValueError(f"effective_len ({effective_len}) must be >= seq_len ({seq_len})")
    return torch.arange(0, effective_len, step)[:seq_len]


def _dims(model):
    fp = T.model_fingerprint(model)
    return fp["num_hidden_layers"], fp["num_attention_heads"], fp["num_key_value_heads"], fp["head_dim"]


def _forward(model, ids, pos, layers, grads=False):
    dev = next(model.parameters()).device
    ids = ids.to(dev)[None]
    out = model(input_ids=ids, position_ids=pos.to(dev)[None], attention_mask=torch.ones_like(ids),
                cache=make_cache(layers), use_cache=True)
    return out.logits


def collect_stats(model, samples, pos, settings: CalibSettings, desc="stats"):
    """max |K| per (kv head, channel) over all samples; Q/K/V of the first search_samples samples per layer, and
    their attention mass profile (attention_mass, the mean over those samples and all layers)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    n_layers, n_heads, n_kv, hd = _dims(model)
    attn = attention_modules(model)
    max_k = [torch.zeros(n_kv, hd, dtype=torch.float64) for _ in range(n_layers)]
    qkv = [[] for _ in range(n_layers)]
    mass = None
    q_out, rope = {}, {}
    hooks = [a.q_proj.register_forward_hook(lambda m, i, o, l=l: q_out.__setitem__(l, o.detach()))
             for l, a in enumerate(attn)]
    inner = getattr(model, "model", model)
    hooks.append(inner.rotary_emb.register_forward_hook(lambda m, i, o: rope.__setitem__("cs", o)))
    try:
        for s, ids in enumerate(tqdm(samples, desc=desc, unit="sample")):
            layers = [CaptureLayer() for _ in range(n_layers)]
            with torch.no_grad():
                _forward(model, ids, pos, layers)
            for l, lay in enumerate(layers):
                k = lay.captured_k[0][0].double().cpu()            # (n_kv, T, hd)
                max_k[l] = torch.maximum(max_k[l], k.abs().amax(dim=1))
                if s < settings.search_samples:
                    q = q_out[l].view(1, -1, n_heads, hd).transpose(1, 2)
                    cos, sin = rope["cs"]
                    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
                    q, k = q[0].float().cpu(), lay.captured_k[0][0].float().cpu()
                    qkv[l].append((q, k, lay.captured_v[0][0].float().cpu()))
                    m = attention_mass(q, k)
                    mass = m if mass is None else {n: mass[n] + m[n] for n in m}
            del layers
    finally:
        for h in hooks:
            h.remove()
    if mass is not None:
        mass = {n: (v / (n_layers * min(settings.search_samples, len(samples)))).numpy() for n, v in mass.items()}
    return max_k, qkv, mass


MASS_RECENT = 128   # recency offsets attention_mass records: the largest window it can weigh (WINDOW_CHOICES)
MASS_FIRST = 4      # first tokens it records: the largest sink it can weigh
MASS_TAIL = 256     # body_mass_share: positions past the profile take the mean of its last MASS_TAIL positions


def attention_mass(q: torch.Tensor, k: torch.Tensor) -> dict:
    """One layer's causal softmax attention (q (n_heads, T, hd) after RoPE, k (n_kv, T, hd)), averaged over heads:
    "recent" (T, MASS_RECENT), the mass query t puts on token t - d (0 where t < d), and "first" (T, MASS_FIRST),
    the mass it puts on token s (0 where t < s). The keys' reparameterisation and rotation leave q.k unchanged."""
    n_heads, t, hd = q.shape
    group = n_heads // k.shape[0]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    recent = torch.zeros(t, MASS_RECENT)
    first = torch.zeros(t, MASS_FIRST)
    for h in range(n_heads):                     # one head at a time: T x T floats, not n_heads of them
        p = (q[h] @ k[h // group].T * hd ** -0.5).masked_fill(~causal, float("-inf")).softmax(-1)
        for d in range(min(MASS_RECENT, t)):
            recent[d:, d] += p.diagonal(-d)
        first[:, :min(MASS_FIRST, t)] += p[:, :MASS_FIRST]
    return {"recent": recent / n_heads, "first": first / n_heads}


def pair_max(m: torch.Tensor) -> torch.Tensor:
    """Share one value per RoPE pair (i, i + hd/2): the max of the two channels."""
    half = m.shape[-1] // 2
    p = torch.maximum(m[..., :half], m[..., half:2 * half])
    return torch.cat([p, p], dim=-1)


def factors_for(max_k: torch.Tensor, alpha: float) -> torch.Tensor:
    return pair_max(max_k).clamp_min(1e-12).pow(alpha).clamp(1e-4, 1e4)


def _attn(q, k, v, mask, group):
    k = k.repeat_interleave(group, dim=0)
    v = v.repeat_interleave(group, dim=0)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def search_alpha(max_k, qkv, settings: CalibSettings, n_heads: int, grid=ALPHA_GRID):
    """Per layer: alpha minimising the MSE between attention output with float KV and quantised KV."""
    alphas, mses = [], []
    bits = settings.search_bits
    for l in tqdm(range(len(max_k)), desc="alpha search", unit="layer"):
        err = np.zeros(len(grid))
        for q, k, v in qkv[l]:
            t = k.shape[1]
            group = n_heads // k.shape[0]
            nq = min(settings.search_queries, t)
            qpos = torch.arange(t - nq, t)
            mask = torch.arange(t)[None, :] <= qpos[:, None]
            qs = q[:, qpos]
            ref = _attn(qs, k, v, mask, group)
            rot = settings.rotation
            vq = fake_quant(v, bits, via16=True, rotation=rot)
            for i, a in enumerate(grid):
                r = factors_for(max_k[l], a).float()[:, None, :]       # (n_kv, 1, hd)
                kq = fake_quant(k / r, bits, via16=True, rotation=rot) * r   # = what Q*r . Q(K/r) sees
                out = _attn(qs, kq, vq, mask, group)
                err[i] += float(((out - ref) ** 2).mean())
        err /= max(len(qkv[l]), 1)
        best = int(np.argmin(err))
        alphas.append(float(grid[best]))
        mses.append(err.tolist())
    return alphas, mses


# How `sensitivity` scores the error E = (Q_b(X) - X) * dL/dX of a layer's K or V (elementwise):
#   abs:    mean |E|   (PM-KVQ's first-order score)
#   fisher: mean E^2   (the diagonal-Fisher second-order estimate of the loss change, additive over layers as
#           the allocation's objective is), scaled by one constant for all layers so the MILP sees O(1) values
#   kl:     not from E: the next-token KL(float || quantised) with only that tensor quantised (kl_sensitivity)
SENSITIVITY_METRICS = ("abs", "fisher", "kl")
KL_WIDTHS = [4, 2]          # the widths kl_sensitivity measures (one forward pass per layer, tensor and width)


def sensitivity(model, samples, pos, widths, desc="sensitivity", rotation="none", metric="abs"):
    """S_K,l(b), S_V,l(b): mean over samples of the `metric` of (Q_b(X) - X) * dL/dX (one backward pass per
    sample). With a rotation, Q_b(X) = R^T Q_b(R X): the error the rotated cache makes, seen in the model's frame."""
    if metric not in SENSITIVITY_METRICS or metric == "kl":
        raise ValueError(f"unknown sensitivity metric {metric!r}: one of {SENSITIVITY_METRICS[:2]} "
                         "(kl: kl_sensitivity)")
    score = (lambda e: float(e.abs().mean())) if metric == "abs" else (lambda e: float(e.pow(2).mean()))
    n_layers = _dims(model)[0]
    sk = np.zeros((n_layers, len(widths)))
    sv = np.zeros((n_layers, len(widths)))
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    emb = model.get_input_embeddings()
    hook = emb.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    try:
        for ids in tqdm(samples, desc=desc, unit="sample"):
            layers = [CaptureLayer(grads=True) for _ in range(n_layers)]
            with torch.enable_grad():
                logits = _forward(model, ids, pos, layers)
                tgt = ids.to(logits.device)[1:]
                loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), tgt)
                loss.backward()
            del logits
            for l, lay in enumerate(layers):           # pair each layer's K/V with its own gradient
                k, v = lay.captured_k[0], lay.captured_v[0]
                for j, b in enumerate(widths):
                    kq = fake_quant(k, b, via16=True, rotation=rotation)
                    vq = fake_quant(v, b, via16=True, rotation=rotation)
                    sk[l, j] += score((kq - k.detach()) * k.grad)
                    sv[l, j] += score((vq - v.detach()) * v.grad)
            del layers
    finally:
        hook.remove()
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
    sk, sv = sk / len(samples), sv / len(samples)
    if metric == "fisher":          # one scale for every layer and width: the allocation only compares them
        top = max(sk.max(), sv.max())
        sk, sv = (sk / top, sv / top) if top > 0 else (sk, sv)
    return sk, sv


def kl_sensitivity(model, samples, pos, widths=KL_WIDTHS, desc="KL sensitivity", rotation="none"):
    """S_K,l(b), S_V,l(b): the mean next-token KL(float || quantised) over the samples' positions with only
    layer l's keys (values) quantised at width b (through `rotation`) and everything else float. The error the
    allocation minimises, measured end to end: it sees a layer whose error the softmax or later layers amplify,
    which the first-order scores of `sensitivity` miss. One forward pass per sample, layer, tensor and width;
    layers before l are float in a probe of layer l, so their outputs are replayed from the reference pass
    (the same tensors, not recomputed: about half the work)."""
    n_layers = _dims(model)[0]
    sk = np.zeros((n_layers, len(widths)))
    sv = np.zeros((n_layers, len(widths)))
    probes = [(l, j, kind) for l in range(n_layers) for j in range(len(widths)) for kind in "kv"]
    blocks = decoder_layers(model)
    with torch.no_grad(), tqdm(total=len(samples) * len(probes), desc=desc, unit="pass") as bar:
        for ids in samples:
            outs = {}
            hooks = [b.register_forward_hook(lambda m, i, o, l=l: outs.__setitem__(l, o))
                     for l, b in enumerate(blocks)]
            try:
                ref = _forward(model, ids, pos, [FloatLayer() for _ in range(n_layers)])
            finally:
                for h in hooks:
                    h.remove()
            ref = torch.log_softmax(ref[0].float(), -1)
            for l, j, kind in probes:
                layers = [FloatLayer() for _ in range(n_layers)]
                layers[l] = OneTensorLayer(kind, widths[j], rotation)
                with _replayed(blocks, outs, l):
                    lp = torch.log_softmax(_forward(model, ids, pos, layers)[0].float(), -1)
                kl = float((ref.exp() * (ref - lp)).sum(-1).mean())
                (sk if kind == "k" else sv)[l, j] += max(kl, 0.0)
                bar.update()
    return sk / len(samples), sv / len(samples)


@contextmanager
def _replayed(blocks, outputs, upto):
    """Decoder layers 0..upto-1 return their recorded outputs instead of computing them (only the output of
    layer upto-1, the input of layer upto, reaches anything)."""
    for l in range(upto):
        blocks[l].forward = (lambda out: lambda *args, **kwargs: out)(outputs[upto - 1])
    try:
        yield
    finally:
        for l in range(upto):
            del blocks[l].forward


def run_calibration(model, tok, settings: CalibSettings, cache_dir: Path | None = None, log=print) -> Artifacts:
    """Reparameterise `model` in place (if settings.reparam) and compute sensitivities. Results are cached in
    cache_dir by settings and model hash; a cache hit still folds the factors into the model."""
    n_layers, n_heads, n_kv, hd = _dims(model)
    key = settings.key(T.config_hash(model))
    cpath = cache_dir / f"artifacts-{key}.pt" if cache_dir else None
    if cpath:
        _wait_for_other_run(cpath.with_suffix(".lock"), log)
    if cpath and cpath.is_file():
        art = Artifacts(**torch.load(cpath, weights_only=False))
        log(f"calibration artifacts reused from {cpath}")
    else:
        if cpath:
            cpath.parent.mkdir(parents=True, exist_ok=True)
            cpath.with_suffix(".lock").write_text(str(os.getpid()))
        t0 = time.time()
        text, desc = D.get_text("calib", settings.calib_text)
        ids = D.tokenize(tok, text)
        samples = D.calibration_samples(ids, settings.n_samples, settings.seq_len, settings.seed)
        pos = positions(settings.seq_len, settings.effective_len, settings.pos_interp)
        log(f"calibration text: {desc}, {ids.numel()} tokens; {len(samples)} samples x {settings.seq_len} tokens, "
            f"positions {pos[0].item()}..{pos[-1].item()} (interpolation {'on' if settings.pos_interp else 'off'})")
        secs = {}
        factors = alphas = mses = None
        max_k, qkv, mass = collect_stats(model, samples, pos, settings)
        secs["stats"] = time.time() - t0
        if settings.reparam:
            t1 = time.time()
            alphas, mses = search_alpha(max_k, qkv, settings, n_heads)
            factors = [factors_for(max_k[l], alphas[l]).float() for l in range(n_layers)]
            secs["alpha_search"] = time.time() - t1
        del qkv
        if factors is not None:
            T.fold_factors(model, factors)
        t2 = time.time()
        if settings.sensitivity == "kl":        # forward passes are costly: the first search_samples samples
            widths = KL_WIDTHS
            sk, sv = kl_sensitivity(model, samples[:settings.search_samples], pos, widths, rotation=settings.rotation)
        else:
            widths = [8, 4, 2]                  # every width an allocation may choose from
            sk, sv = sensitivity(model, samples, pos, widths, rotation=settings.rotation,
                                 metric=settings.sensitivity)
        secs["sensitivity"] = time.time() - t2
        art = Artifacts(factors=factors, alphas=alphas, alpha_mse=mses, max_abs_k=[m.float() for m in max_k],
                        sens_widths=widths, sens_k=sk, sens_v=sv, settings=asdict(settings), text_desc=desc,
                        seconds=secs, window_mass=mass)
        if cpath:
            torch.save(asdict(art), cpath)
            cpath.with_suffix(".lock").unlink(missing_ok=True)
        return art
    if art.factors is not None:
        T.fold_factors(model, art.factors)
    return art


def _wait_for_other_run(lock: Path, log) -> None:
    """If another process is computing the same artifacts (lock file with its pid), wait for it."""
    told = False
    while lock.is_file():
        try:
            pid = int(lock.read_text().strip())
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError, PermissionError, FileNotFoundError):
            lock.unlink(missing_ok=True)   # stale
            return
        if not told:
            log(f"waiting for process {pid}, which is computing the same calibration artifacts ({lock})")
            told = True
        time.sleep(5)


def sens_for(art: Artifacts, widths, key_weight: float = 1.0):
    """The sensitivities at `widths`, the keys' multiplied by key_weight (BEST["key_weight"])."""
    if not key_weight > 0:
        raise ValueError(f"key_weight must be > 0, got {key_weight!r}")
    idx = [art.sens_widths.index(w) for w in widths]
    return art.sens_k[:, idx] * key_weight, art.sens_v[:, idx]


def budget_from_args(args, cfg: CacheConfig, n_layers: int) -> tuple[float, str]:
    given = [x is not None for x in (args.budget_bytes_per_token, args.budget_mb, args.budget_bits)]
    if sum(given) > 1:
        raise SystemExit("error: give at most one of --budget-bytes-per-token, --budget-mb, --budget-bits")
    if args.budget_bytes_per_token is not None:
        return args.budget_bytes_per_token * args.max_len, f"{args.budget_bytes_per_token} bytes/token x {args.max_len}"
    if args.budget_mb is not None:
        return args.budget_mb * 2 ** 20, f"{args.budget_mb} MiB at max_len {args.max_len}"
    bits = DEFAULT_BUDGET_BITS if args.budget_bits is None else args.budget_bits
    return (rtn_equivalent_bytes(cfg, n_layers, bits, args.max_len),
            f"memory of a plain per-token {bits:g}-bit cache (codes{' + scales/zeros' if cfg.count_metadata else ''})"
            f" at max_len {args.max_len}")


WINDOW_CHOICES = (16, 32, 64, 128)   # multiples of 16 tokens: whole 512-bit words on the device (host/layout.py)


def body_mass_share(mass: dict, n_sink: int, window: int, max_len: int) -> float:
    """The share of attention mass that falls on body tokens (neither the n_sink first nor the `window` latest),
    averaged over the decode positions 0..max_len-1, from a calibration mass profile (attention_mass). Only
    body tokens carry quantisation error. Positions past the profile's length take the mean of its last
    MASS_TAIL positions (the sink's and the window's shares have levelled off there)."""
    recent, first = np.asarray(mass["recent"], dtype=np.float64), np.asarray(mass["first"], dtype=np.float64)
    if window > recent.shape[1] or n_sink > first.shape[1]:
        raise ValueError(f"the calibration mass profile covers windows <= {recent.shape[1]} and sinks <= "
                         f"{first.shape[1]} tokens, not window {window}, sink {n_sink}")
    n = recent.shape[0]
    t = np.arange(n)
    body = np.clip(1.0 - first[:, :n_sink].sum(1) - recent[:, :window].sum(1), 0.0, 1.0)
    body[t < n_sink + window] = 0.0          # no body yet: sink and window hold every token
    if max_len <= n:
        return float(body[:max_len].mean())
    return float((body.sum() + body[-MASS_TAIL:].mean() * (max_len - n)) / max_len)


def choose_window(art: Artifacts, widths, cfg: CacheConfig, max_len: int, budget: float, separate_kv: bool,
                  windows=WINDOW_CHOICES, key_weight: float = 1.0):
    """The budget rule for the 16-bit window: for each candidate window size, the MILP allocation with the
    sensitivities scaled by the share of attention mass that falls on the body (body_mass_share: the window's
    and the sink's tokens make no quantisation error, and recent tokens draw more attention than old ones); the
    window whose allocation has the lowest objective wins. Returns (cfg with that window, Allocation,
    {window: objective or None when the budget cannot hold it}, {window: body mass share})."""
    from dataclasses import replace
    if art.window_mass is None:
        raise ValueError("these calibration artifacts have no attention mass profile (window_mass): recompute them")
    sk, sv = sens_for(art, widths, key_weight)
    best, tried, shares = None, {}, {}
    for w in windows:
        c = replace(cfg, window=int(w))
        f = shares[int(w)] = body_mass_share(art.window_mass, c.n_sink, c.window, max_len)
        try:
            a = allocate(sk * f, sv * f, widths, c, max_len, budget, separate_kv)
        except AllocationError:
            tried[int(w)] = None
            continue
        tried[int(w)] = a.objective
        if best is None or a.objective < best[1].objective:
            best = (c, a)
    if best is None:
        raise AllocationError(f"budget of {budget:.0f} bytes is too small for every window in {tuple(windows)}")
    return best[0], best[1], tried, shares


# The default method ("best" in calib/evaluate.py; what `make calib` writes): PM-KVQ's progressive cache,
# reparameterisation and positional interpolation, plus a Hadamard rotation of keys (after RoPE) and values,
# separate key/value widths from {4, 2} (with 8 allowed the MILP buys 8-bit keys with 2-bit tensors elsewhere and
# loses: KL 0.034 vs 0.012 at the RTN-4 memory, docs/calibration.md), the 16-bit window sized under the budget
# (choose_window), and the KL sensitivity (kl_sensitivity: the first-order score misses that layer 0's values
# cannot go to 2 bits and under-rates the keys; KL at the KIVI-2 memory 0.105 -> 0.049 on pydoc, 0.090 -> 0.038
# on Wikipedia, docs/calibration.md).
DEFAULT_MAX_LEN = 2048      # the committed table's context (host/run.py's default run reaches its compressed regime)
DEFAULT_BUDGET_BITS = 4.0   # the committed table's budget: the memory of per-token RTN-4 (4.5 bits/elt with metadata)
BEST = {"rotation": "hadamard", "reparam": True, "sensitivity": "kl", "key_weight": 1.0, "widths": (4, 2),
        "separate_kv": True, "windows": WINDOW_CHOICES}


def best_settings(base: dict | None = None, **over) -> CalibSettings:
    """CalibSettings of the default method over `base` (CalibSettings fields), with levers overridden."""
    kw = dict(base or {})
    kw.update(rotation=BEST["rotation"], reparam=BEST["reparam"], sensitivity=BEST["sensitivity"])
    kw.update(over)
    return CalibSettings(**kw)


def make_table(model, art: Artifacts, *, model_id, cfg: CacheConfig, max_len: int, budget: float, budget_src: str,
               widths, separate_kv: bool, factors_rel: str | None, method: str = "milp", windows=None,
               key_weight: float = 1.0):
    """windows: None keeps cfg.window; a list of candidate sizes lets choose_window pick one (the same for all
    layers) under the budget. key_weight scales the key sensitivities the MILP sees (sens_for)."""
    n_layers = _dims(model)[0]
    window_choice = None
    if method == "milp" and windows:
        cfg, alloc, tried, shares = choose_window(art, widths, cfg, max_len, budget, separate_kv, windows, key_weight)
        kb_, vb_, obj = alloc.key_budgets, alloc.value_budgets, alloc.objective
        window_choice = {"candidates": [int(w) for w in windows], "objective_by_window": tried,
                         "body_mass_share": shares, "chosen": cfg.window,
                         "rule": "lowest MILP objective, sensitivities x the body's share of attention mass"}
    elif method == "milp":
        sk, sv = sens_for(art, widths, key_weight)
        alloc = allocate(sk, sv, widths, cfg, max_len, budget, separate_kv)
        kb_, vb_, obj = alloc.key_budgets, alloc.value_budgets, alloc.objective
    elif method == "uniform-budget":
        kb_, vb_ = uniform_budgets(cfg, n_layers, budget)
        obj = None
    else:
        raise ValueError(method)
    reparam = None
    if art.factors is not None and factors_rel is not None:
        reparam = {"path": factors_rel, "alphas": art.alphas, "alpha_grid": ALPHA_GRID,
                   "search_bits": art.settings["search_bits"]}
    s = art.settings
    calibration = {"text": art.text_desc, "n_samples": s["n_samples"], "seq_len": s["seq_len"],
                   "effective_len": s["effective_len"], "positional_interpolation": s["pos_interp"],
                   "reparameterisation": s["reparam"], "search_samples": s["search_samples"],
                   "search_queries": s["search_queries"], "seed": s["seed"], "seconds": art.seconds,
                   "rotation": s.get("rotation", "none"), "sensitivity": s.get("sensitivity", "abs")}
    return T.build_table_dict(
        model, model_id=model_id, key_budgets=kb_, value_budgets=vb_, max_len=max_len, n_sink=cfg.n_sink,
        window=cfg.window, body_init_bits=cfg.body_init_bits, count_metadata=cfg.count_metadata,
        allocation={"method": method, "widths": sorted(widths, reverse=True), "separate_kv": separate_kv,
                    "budget_bytes": float(budget), "budget_bytes_per_token": float(budget) / max_len,
                    "budget_source": budget_src, "objective": obj, "solver": "scipy.optimize.milp (HiGHS)",
                    "key_weight": float(key_weight),
                    **({"window_choice": window_choice} if window_choice else {})},
        reparam=reparam, calibration=calibration,
        sensitivity={"widths": art.sens_widths, "key": art.sens_k.tolist(), "value": art.sens_v.tolist()},
        alphas=art.alphas, rotation=s.get("rotation", "none"))


def parse_widths(s: str) -> tuple:
    try:
        w = tuple(sorted({int(x) for x in s.replace(",", " ").split()}, reverse=True))
    except ValueError:
        raise argparse.ArgumentTypeError(f"widths must be integers, got {s!r}") from None
    if not w or any(x not in (8, 4, 2) for x in w):
        raise argparse.ArgumentTypeError(f"widths must be from {{8, 4, 2}}, got {s!r}")
    return w


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local HF Llama/Qwen2 folder or .gguf (default SmolLM2-135M-Instruct)")
    p.add_argument("--model-id", default=None, help="name recorded in the table (default: from --model)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if present)")
    p.add_argument("--calib-text", default=None, help="calibration text: .txt or .jsonl (default: offline pydoc text)")
    p.add_argument("--samples", type=int, default=4, help="calibration samples (default 4)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--effective-len", type=int, default=8192, help="positional interpolation target length")
    p.add_argument("--no-pos-interp", action="store_true", help="ablation: plain positions 0..seq_len-1")
    p.add_argument("--no-reparam", action="store_true", help="ablation: no key reparameterisation")
    p.add_argument("--search-samples", type=int, default=1, help="samples used by the alpha search")
    p.add_argument("--search-queries", type=int, default=256, help="query positions (the last ones) per search sample")
    p.add_argument("--search-bits", type=int, default=4, choices=[8, 4, 2])
    p.add_argument("--rotation", default=BEST["rotation"], choices=["none", "hadamard"],
                   help="KV rotation per head, applied on the host (default hadamard; none = the paper's method)")
    p.add_argument("--sensitivity", default=BEST["sensitivity"], choices=SENSITIVITY_METRICS,
                   help=f"how the allocation scores a layer's quantisation error (default {BEST['sensitivity']}; "
                        "abs = PM-KVQ's, kl = each tensor quantised alone, end to end)")
    p.add_argument("--key-weight", type=float, default=BEST["key_weight"],
                   help=f"factor on the key sensitivities before the MILP (default {BEST['key_weight']:g})")
    p.add_argument("--widths", type=parse_widths, default=BEST["widths"],
                   help="allocation widths, e.g. 4,2 (default) or 8,4,2")
    p.add_argument("--separate-kv", action="store_true", default=BEST["separate_kv"],
                   help="separate key and value widths per layer (default)")
    p.add_argument("--tied-kv", dest="separate_kv", action="store_false", help="one width per layer for K and V")
    p.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN,
                   help=f"context length the budget is for (default {DEFAULT_MAX_LEN})")
    p.add_argument("--budget-bytes-per-token", type=float, default=None,
                   help="total KV bytes per token of context (all layers, K+V) at max_len")
    p.add_argument("--budget-mb", type=float, default=None, help="total KV MiB at max_len")
    p.add_argument("--budget-bits", type=float, default=None,
                   help="budget = memory of a plain per-token cache of this many bits, scales/zeros included "
                        f"(default {DEFAULT_BUDGET_BITS:g}: the RTN-4 memory, 4.5 bits per element)")
    p.add_argument("--codes-only", action="store_true",
                   help="charge only codes against the budget (the paper's accounting); default counts scales/zeros")
    p.add_argument("--n-sink", type=int, default=1)
    p.add_argument("--window", type=int, default=None,
                   help=f"fixed 16-bit window (tokens); default: chosen under the budget from {WINDOW_CHOICES}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="table path (default calib/tables/<model-id>.json)")
    p.add_argument("--plots", default=str(DEFAULT_OUT), help="folder for PNG plots (default out/calib)")
    p.add_argument("--cache-dir", default=str(DEFAULT_OUT / "cache"), help="reuse calibration artifacts from here")
    p.add_argument("--no-cache", action="store_true", help="recompute even if cached artifacts exist")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    t_start = time.time()
    from pmkvq_accel.model.llm import DEFAULT_MODEL, load_model
    model_id = args.model_id or (DEFAULT_MODEL if args.model is None else Path(args.model).name.removesuffix(".gguf"))
    model, tok = load_model(args.model, args.device)
    n_layers, n_heads, n_kv, hd = _dims(model)
    print(f"model {model_id}: {n_layers} layers, {n_heads} query heads, {n_kv} KV heads, head_dim {hd}, "
          f"device {next(model.parameters()).device}")
    settings = CalibSettings(n_samples=args.samples, seq_len=args.seq_len, effective_len=args.effective_len,
                             pos_interp=not args.no_pos_interp, reparam=not args.no_reparam,
                             search_samples=args.search_samples, search_queries=args.search_queries,
                             search_bits=args.search_bits, seed=args.seed, calib_text=args.calib_text,
                             rotation=args.rotation, sensitivity=args.sensitivity)
    if not args.key_weight > 0:
        raise SystemExit(f"error: --key-weight must be > 0, got {args.key_weight}")
    windows = None if args.window is not None else WINDOW_CHOICES
    cfg = CacheConfig(n_kv, hd, args.n_sink, args.window or min(WINDOW_CHOICES), 16, not args.codes_only)
    budget, src = budget_from_args(args, cfg, n_layers)
    out = Path(args.out) if args.out else T.default_table_path(model_id)
    need = 2 * n_layers * budget_for_width(cfg, min(args.widths), args.max_len)
    if need > budget:   # fail before the expensive part
        raise SystemExit(f"error: budget of {budget:.0f} bytes ({budget / args.max_len:.1f} B/token, {src}) is too "
                         f"small: every layer at {min(args.widths)} bits needs {need:.0f} bytes "
                         f"({need / args.max_len:.1f} B/token) at max_len {args.max_len}, sink and window included")
    art = run_calibration(model, tok, settings, None if args.no_cache else Path(args.cache_dir))
    factors_rel = None
    if art.factors is not None:
        fpath = out.with_name(out.stem + ".reparam.safetensors")
        T.save_factors(fpath, art.factors, model, model_id)
        factors_rel = fpath.name
    try:
        data = make_table(model, art, model_id=model_id, cfg=cfg, max_len=args.max_len, budget=budget,
                          budget_src=src, widths=args.widths, separate_kv=args.separate_kv, factors_rel=factors_rel,
                          windows=windows, key_weight=args.key_weight)
    except AllocationError as e:
        raise SystemExit(f"error: {e}")
    data["created_by"] = "calib/calibrate.py " + " ".join(sys.argv[1:] if argv is None else argv)
    T.save_table(data, out)
    table = T.load_table(out, model.config)   # round trip through the loader's checks
    a = data["allocation"]
    print(f"table written: {out}")
    print(f"  budget {a['budget_bytes'] / 2**20:.2f} MiB ({a['budget_bytes_per_token']:.1f} B/token at max_len "
          f"{args.max_len}; {src})")
    print(f"  used: codes only {a['used_bytes_codes_only'] / 2**20:.2f} MiB, codes + scales/zeros "
          f"{a['used_bytes_with_metadata'] / 2**20:.2f} MiB")
    print(f"  key bits   {table.key_bits}\n  value bits {table.value_bits}\n  window {table.window}, sink "
          f"{table.n_sink}, rotation {table.rotation}")
    if art.alphas:
        print(f"  alphas     {art.alphas}")
    from pmkvq_accel.calib import plots
    paths = plots.calibration_plots(data, art, Path(args.plots), model_id)
    for p in paths:
        print(f"plot: {p}")
    print(f"calibration done in {time.time() - t_start:.0f} s")
    return table


if __name__ == "__main__":
    main()
