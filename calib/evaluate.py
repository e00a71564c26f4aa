"""Teacher-forced evaluation of KV-cache quantisation methods against the float model, at matched memory.

    python calib/evaluate.py                 # default: SmolLM2-135M-Instruct, 4096 evaluation tokens
    python calib/evaluate.py --length 8192 --eval-text my.txt --samples 8

Every method's KV goes through the golden quantizer (pmkvq_accel.model.quant: bf16 scales/zeros, integer
shrink). Stateful caches (KIVI residual, PM-KVQ progressive) are fed in chunks that start at every flush and
shrink event, so each query sees exactly the cache of token-by-token decoding (calib/quantsim.py).

Metrics over the evaluation text (positions 0..L-2 predicting tokens 1..L-1): mean next-token KL(float || method),
perplexity, top-1 agreement with the float model, and the KL over the last quarter of the context. Memory:
bytes stored at the end of the text (all layers, K+V), with scales/zeros and codes only; PM-KVQ also its peak.
Writes results.md, results.json and kl_vs_bytes.png into --out (default out/eval).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # idle torch threads sleep: no collapse on a busy machine

import torch
from tqdm.auto import tqdm

from pmkvq_accel.calib import data as D
from pmkvq_accel.calib.allocate import rtn_equivalent_bytes
from pmkvq_accel.calib.allocate import AllocationError
from pmkvq_accel.calib.calibrate import (BEST, CalibSettings, _dims, best_settings, make_table,
                                         run_calibration)
from pmkvq_accel.calib.quantsim import (FloatLayer, KIVILayer, ProgressiveLayer, RTNLayer, chunk_plan, kivi_bytes,
                                        make_cache)
from pmkvq_accel.model.cache import CacheConfig

REPO = Path(__file__).resolve().parent.parent
ALL_STEPS = ("rtn4", "kivi2", "best", "pm", "pm+", "rtn8", "rtn2", "kivi4", "uniform", "noprog", "no-PI", "no-reparam",
             "rtn4-rot", "best-norot", "best-w128", "best-noreparam", "best-w42", "best-w842", "best-abs",
             "best-fisher", "best-kw4")
BUDGET_NAMES = ("RTN-4", "KIVI-2", "3.3b")   # matched memories every PM-KVQ/best step runs at


def _step(short: str) -> str:
    """The --only step that produced a results row ('PM+@KIVI-2' -> 'pm+', 'RTN-4' -> 'rtn4', ...)."""
    name = short.split("@")[0]
    return {"PM": "pm", "PM+": "pm+", "uni": "uniform"}.get(name, name.replace("-", "").lower()
                                                              if name[:3] in ("RTN", "KIV") else name)


class Reference:
    """Float model log-probs over the evaluation text."""

    def __init__(self, logp: torch.Tensor, ids: torch.Tensor):
        self.logp = logp                     # (L-1, V) float32, positions 0..L-2
        self.top1 = logp.argmax(-1)
        self.ids = ids


def run_chunks(model, ids, layers, ref: Reference | None, desc: str, max_chunk: int = 512):
    """Feed ids through the model with the given cache layers; return metrics against ref (or ref itself)."""
    dev = next(model.parameters()).device
    L = ids.numel()
    cache = make_cache(layers)
    plan = chunk_plan(L, layers, max_chunk)
    kl = torch.zeros(L - 1, dtype=torch.float64)
    nll = torch.zeros(L - 1, dtype=torch.float64)
    agree = torch.zeros(L - 1, dtype=torch.bool)
    logps = []
    with torch.no_grad():
        for a, b in tqdm(plan, desc=desc, unit="chunk", leave=False):
            x = ids[a:b].to(dev)[None]
            out = model(input_ids=x, position_ids=torch.arange(a, b, device=dev)[None],
                        attention_mask=torch.ones(1, b, dtype=torch.long, device=dev), cache=cache,
                        use_cache=True)
            e = min(b, L - 1)
            if e <= a:
                continue
            lp = torch.log_softmax(out.logits[0, : e - a].float(), dim=-1).cpu()
            tgt = ids[a + 1:e + 1]
            nll[a:e] = -lp.gather(1, tgt[:, None])[:, 0].double()
            if ref is None:
                logps.append(lp)
            else:
                rl = ref.logp[a:e]
                kl[a:e] = (rl.exp() * (rl - lp)).sum(-1).double()
                agree[a:e] = lp.argmax(-1) == ref.top1[a:e]
    if ref is None:
        return Reference(torch.cat(logps), ids), {"ppl": math.exp(nll.mean().item())}
    q = (L - 1) * 3 // 4
    return {"kl": kl.mean().item(), "kl_last_quarter": kl[q:].mean().item(), "ppl": math.exp(nll.mean().item()),
            "top1": agree.float().mean().item()}


def progressive_layers(table: dict, n_kv: int, hd: int, progressive: bool = True):
    c = table["cache"]
    rot = c.get("rotation", "none")
    out = []
    for lb in table["layers"]:
        kc = CacheConfig(n_kv, hd, lb["n_sink"], lb["window"], c["body_init_bits"] if progressive else lb["key_bits"],
                         c["count_metadata"])
        vc = CacheConfig(n_kv, hd, lb["n_sink"], lb["window"],
                         c["body_init_bits"] if progressive else lb["value_bits"], c["count_metadata"])
        out.append(ProgressiveLayer(kc, lb["key_budget_bytes"], vc, lb["value_budget_bytes"], rotation=rot))
    return out


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--eval-text", default=None, help=".txt or .jsonl (default: offline pydoc text, eval split)")
    p.add_argument("--calib-text", default=None, help=".txt or .jsonl (default: offline pydoc text, calib split)")
    p.add_argument("--length", type=int, default=4096, help="evaluation tokens (the cache's max_len)")
    p.add_argument("--samples", type=int, default=4, help="calibration samples")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--effective-len", type=int, default=8192)
    p.add_argument("--search-queries", type=int, default=256)
    p.add_argument("--kivi-group", type=int, default=32)
    p.add_argument("--window", type=int, default=128, help="PM-KVQ window and KIVI residual length")
    p.add_argument("--n-sink", type=int, default=1)
    p.add_argument("--skip-ablations", action="store_true")
    p.add_argument("--only", default=None, help=f"comma-separated subset of the steps {ALL_STEPS} (default all)")
    p.add_argument("--ablation-budgets", default="RTN-4", help="budgets the ablations run at: RTN-4 and/or KIVI-2")
    p.add_argument("--budgets", default=",".join(BUDGET_NAMES),
                   help=f"matched memories the PM-KVQ and best steps run at (default all: {','.join(BUDGET_NAMES)})")
    p.add_argument("--out", default=str(REPO / "out" / "eval"))
    p.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON",
                   help="only combine finished results.json files into --out (no model runs)")
    p.add_argument("--cache-dir", default=str(REPO / "out" / "calib" / "cache"))
    return p


def merge_reports(paths, out: Path) -> str:
    """Combine results.json files of runs with the same model/text/length (e.g. a main run and an --only run)."""
    metas, rows, seen = [], [], set()
    for p in paths:
        d = json.loads(Path(p).read_text())
        metas.append(d["meta"])
        for r in d["rows"]:
            if r["method"] not in seen:
                seen.add(r["method"])
                rows.append(r)
    for k in ("model", "eval_text", "length", "kivi_group", "window"):
        if len({json.dumps(m[k]) for m in metas}) != 1:
            raise SystemExit(f"error: the reports differ in {k}; they cannot be merged")
    meta = dict(metas[0])
    meta["command"] = " ; ".join(m["command"] for m in metas)
    meta["seconds"] = sum(m["seconds"] for m in metas)
    # Each row is written once its method has finished, so the merge is complete when its rows cover every step.
    meta["complete"] = all(m.get("complete") for m in metas) or set(ALL_STEPS) <= {_step(r["short"]) for r in rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = results_markdown(rows, meta)
    (out / "results.md").write_text(md)
    from pmkvq_accel.calib.plots import kl_vs_bytes_plot
    kl_vs_bytes_plot([r for r in rows if r["family"] != "float"], out / "kl_vs_bytes.png",
                     f"{meta['model']}, {meta['length']} tokens of {meta['eval_text']}: KL to float vs KV memory")
    return md


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.merge:
        print(merge_reports(args.merge, Path(args.out)))
        return
    t0 = time.time()
    from pmkvq_accel.model.llm import DEFAULT_MODEL, load_model
    model, tok = load_model(args.model, args.device)
    model_id = DEFAULT_MODEL if args.model is None else Path(args.model).name.removesuffix(".gguf")
    n_layers, n_heads, n_kv, hd = _dims(model)
    L = args.length
    text, desc = D.get_text("eval", args.eval_text)
    ids_all = D.tokenize(tok, text)
    if ids_all.numel() < L:
        raise SystemExit(f"error: evaluation text has {ids_all.numel()} tokens, --length {L} needs more")
    ids = ids_all[:L]
    calib_text, _ = D.get_text("calib", args.calib_text)
    ov = D.overlap_fraction(D.tokenize(tok, calib_text), ids)
    if ov > 0.01:
        raise SystemExit(f"error: {ov:.1%} of the evaluation text also occurs in the calibration text")
    print(f"model {model_id}; evaluation text {desc}: {L} tokens (overlap with calibration text {ov:.1%})")

    orig = {n: p.detach().clone() for n, p in model.named_parameters() if ".q_proj." in n or ".k_proj." in n}

    def restore():
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in orig:
                    p.copy_(orig[n])

    rows = []

    def add(name, short, family, metrics, bytes_meta, bytes_codes, notes="", peak=None, budget=None):
        r = {"method": name, "short": short, "family": family, **metrics,
             "bytes_per_token": bytes_meta / L if bytes_meta is not None else None,
             "bytes_per_token_codes": bytes_codes / L if bytes_codes is not None else None,
             "peak_bytes_per_token": peak / L if peak is not None else None,
             "budget_bytes_per_token": budget / L if budget is not None else None, "notes": notes}
        rows.append(r)
        bpt = "" if r["bytes_per_token"] is None else f"{r['bytes_per_token']:.0f} B/token"
        print(f"  {name:48s} KL {r['kl']:.4f}  ppl {r['ppl']:.3f}  top1 {r['top1']:.3f}  {bpt}", flush=True)

    ref, fm = run_chunks(model, ids, [FloatLayer() for _ in range(n_layers)], None, "float")
    float_bytes = 2 * n_layers * L * n_kv * hd * 4  # fp32 K/V as the torch model holds them
    add("float (fp32 KV)", "float", "float", {"kl": 0.0, "kl_last_quarter": 0.0, "ppl": fm["ppl"], "top1": 1.0},
        float_bytes, float_bytes)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python calib/evaluate.py " + " ".join(sys.argv[1:] if argv is None else argv)
    cfg = CacheConfig(n_kv, hd, args.n_sink, args.window, 16, True)
    budgets = {"RTN-4": rtn_equivalent_bytes(cfg, n_layers, 4, L, metadata=True),
               "KIVI-2": n_layers * kivi_bytes(L, n_kv, hd, 2, args.kivi_group, args.window),
               "3.3b": bits_budget(3.3, n_layers, n_kv, hd, L)}
    want = [b.strip() for b in args.budgets.split(",") if b.strip()]
    if set(want) - set(budgets):
        raise SystemExit(f"error: unknown --budgets {sorted(set(want) - set(budgets))}; choose from {BUDGET_NAMES}")
    budgets = {b: budgets[b] for b in BUDGET_NAMES if b in want}
    meta = {"command": cmd.strip(), "model": model_id, "eval_text": desc, "length": L, "kivi_group": args.kivi_group,
            "window": args.window, "n_sink": args.n_sink, "calibration_samples": args.samples,
            "seq_len": args.seq_len, "effective_len": args.effective_len, "budgets_bytes": budgets,
            "elements_per_token": 2 * n_layers * n_kv * hd}

    def write(final=False):
        """Results so far (written after every method, so a long run can be inspected while it goes)."""
        meta["seconds"] = round(time.time() - t0)
        meta["complete"] = final
        (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (out / "results.md").write_text(results_markdown(rows, meta))
        from pmkvq_accel.calib.plots import kl_vs_bytes_plot
        kl_vs_bytes_plot(rows[1:], out / "kl_vs_bytes.png",
                         f"{model_id}, {L} tokens of {desc}: KL to float vs KV memory")

    def rtn(b, rotation="none"):
        layers = [RTNLayer(b, n_kv, hd, rotation=rotation) for _ in range(n_layers)]
        tag = "" if rotation == "none" else "-rot"
        m = run_chunks(model, ids, layers, ref, f"RTN-{b}{tag}")
        add(f"RTN per-token {b}-bit{'' if rotation == 'none' else ' + ' + rotation + ' rotation'}", f"RTN-{b}{tag}",
            "RTN", m, sum(x.memory_bytes(True) for x in layers), sum(x.memory_bytes(False) for x in layers))
        write()

    def kivi(b):
        layers = [KIVILayer(b, args.kivi_group, args.window) for _ in range(n_layers)]
        m = run_chunks(model, ids, layers, ref, f"KIVI-{b}")
        meas = sum(x.memory_bytes(True) for x in layers)
        assert abs(meas - n_layers * kivi_bytes(L, n_kv, hd, b, args.kivi_group, args.window)) < 1e-6
        add(f"KIVI-{b} (K/channel, V/token, g{args.kivi_group}, res {args.window})", f"KIVI-{b}", "KIVI", m, meas,
            sum(x.memory_bytes(False) for x in layers))
        write()

    base = dict(n_samples=args.samples, seq_len=args.seq_len, effective_len=args.effective_len,
                search_queries=args.search_queries, calib_text=args.calib_text)
    abl_budgets = [b.strip() for b in args.ablation_budgets.split(",") if b.strip()]

    def run_pm(label, short, family, tdict, progressive=True, notes=""):
        layers = progressive_layers(tdict, n_kv, hd, progressive)
        m = run_chunks(model, ids, layers, ref, short)
        meas = sum(x.memory_bytes(True) for x in layers)
        peak = sum(x.peak_bytes[True] for x in layers)
        kb = [lb["key_bits"] for lb in tdict["layers"]]
        vb = [lb["value_bits"] for lb in tdict["layers"]]
        nk = {w: kb.count(w) for w in sorted(set(kb), reverse=True)}
        nv = {w: vb.count(w) for w in sorted(set(vb), reverse=True)}
        notes = (notes + "; " if notes else "") + f"final K widths {nk}, V widths {nv}"
        add(label, short, family, m, meas, sum(x.memory_bytes(False) for x in layers), notes, peak,
            tdict["allocation"]["budget_bytes"])
        write()

    def kw(bname):
        return dict(model_id=model_id, cfg=cfg, max_len=L, budget=budgets[bname], budget_src=f"{bname} memory",
                    factors_rel=None)

    def table_or_none(label, short, family, art_, **kwargs):
        """make_table, or a row that says the budget cannot hold the configuration (None is returned)."""
        try:
            return make_table(model, art_, **kwargs)
        except AllocationError as e:
            print(f"  {label}: {e}")
            rows.append({"method": label, "short": short, "family": family, "kl": float("nan"),
                         "kl_last_quarter": float("nan"), "ppl": float("nan"), "top1": float("nan"),
                         "bytes_per_token": None, "bytes_per_token_codes": None, "peak_bytes_per_token": None,
                         "budget_bytes_per_token": kwargs["budget"] / L, "notes": f"does not fit: {e}"})
            write()
            return None

    def best_step(step, label, **over):
        """The default method (calib/calibrate.py BEST), or one lever of it switched off, at every budget."""
        restore()
        st = best_settings(base, **{k: v for k, v in over.items() if k in ("rotation", "reparam", "sensitivity")})
        art_b = run_calibration(model, tok, st, Path(args.cache_dir))
        windows = over.get("windows", BEST["windows"])
        for bname in budgets:
            short = f"{step}@{bname}"
            t = table_or_none(f"{label} @ {bname} budget", short, "best" if step == "best" else "ablation", art_b,
                              widths=over.get("widths", BEST["widths"]), separate_kv=BEST["separate_kv"],
                              windows=windows, key_weight=over.get("key_weight", BEST["key_weight"]), **kw(bname))
            if t is not None:
                w = t["cache"]["window"]
                run_pm(f"{label} @ {bname} budget", short, "best" if step == "best" else "ablation", t,
                       notes=f"window {w}, rotation {t['cache'].get('rotation', 'none')}")
        restore()

    # Most important comparisons first: matched-memory pairs, then the remaining baselines, then ablations.
    only = set(ALL_STEPS) if args.only is None else {x.strip() for x in args.only.split(",") if x.strip()}
    if only - set(ALL_STEPS):
        raise SystemExit(f"error: unknown --only steps {sorted(only - set(ALL_STEPS))}; choose from {ALL_STEPS}")
    if args.skip_ablations:
        only -= {"uniform", "noprog", "no-PI", "no-reparam"}
    if "rtn4" in only:
        rtn(4)
    if "kivi2" in only:
        kivi(2)
    if "best" in only:
        best_step("best", "best: PM-KVQ + Hadamard K/V rotation, {4,2} separate K/V, window by budget, KL sensitivity")
    if "rtn4-rot" in only:
        rtn(4, "hadamard")
    if "best-norot" in only:
        best_step("best-norot", "  ablation: best without rotation", rotation="none")
    if "best-w128" in only:
        best_step("best-w128", "  ablation: best with the fixed 128-token window", windows=None)
    if "best-fisher" in only:
        best_step("best-fisher", "  ablation: best with the diagonal-Fisher sensitivity", sensitivity="fisher")
    if "best-abs" in only:
        best_step("best-abs", "  ablation: best with PM-KVQ's first-order sensitivity", sensitivity="abs")
    if "best-kw4" in only:
        best_step("best-kw4", "  ablation: best with the key sensitivities x 4", key_weight=4.0)
    if "best-noreparam" in only:
        best_step("best-noreparam", "  ablation: best without key reparameterisation", reparam=False)
    if "best-w42" in only:
        best_step("best-w42", "  ablation: best with widths {4,2}", widths=(4, 2))
    if "best-w842" in only:
        best_step("best-w842", "  ablation: best with widths {8,4,2}", widths=(8, 4, 2))
    restore()
    art = (run_calibration(model, tok, CalibSettings(**base), Path(args.cache_dir))
           if only & {"pm", "pm+", "uniform", "noprog"} else None)
    tables = {}
    for bname in (budgets if art is not None else ()):
        try:
            tables[bname] = make_table(model, art, widths=(4, 2), separate_kv=False, **kw(bname))
        except AllocationError:
            tables[bname] = None
    if "pm" in only:
        for bname in budgets:
            label = f"PM-KVQ {{4,2}} @ {bname} budget"
            t = tables[bname] or table_or_none(label, f"PM@{bname}", "PM-KVQ", art, widths=(4, 2),
                                               separate_kv=False, **kw(bname))
            if t is not None:
                run_pm(label, f"PM@{bname}", "PM-KVQ", t)
    if "pm+" in only:
        for bname in budgets:
            label = f"PM-KVQ {{8,4,2}} separate K/V @ {bname} budget"
            t2 = table_or_none(label, f"PM+@{bname}", "PM-KVQ", art, widths=(8, 4, 2), separate_kv=True,
                               **kw(bname))
            if t2 is not None:
                run_pm(label, f"PM+@{bname}", "PM-KVQ", t2)
    for b in (8, 2):
        if f"rtn{b}" in only:
            rtn(b)
    if "kivi4" in only:
        kivi(4)
    for bname in abl_budgets:
        if "uniform" in only:
            tu = make_table(model, art, widths=(4, 2), separate_kv=False, method="uniform-budget", **kw(bname))
            run_pm(f"  ablation: uniform budgets @ {bname}", f"uni@{bname}", "ablation", tu)
        if "noprog" in only and tables.get(bname) is not None:
            run_pm(f"  ablation: no progressive @ {bname}", f"noprog@{bname}", "ablation", tables[bname],
                   progressive=False, notes="body at the final width from the start")
    for vname, extra in (("no-PI", {"pos_interp": False}), ("no-reparam", {"reparam": False})):
        if vname in only:
            restore()
            art_v = run_calibration(model, tok, CalibSettings(**base, **extra), Path(args.cache_dir))
            for bname in abl_budgets:
                t = make_table(model, art_v, widths=(4, 2), separate_kv=False, **kw(bname))
                run_pm(f"  ablation: {vname} @ {bname}", f"{vname}@{bname}", "ablation", t)
    restore()
    write(final=True)
    print(results_markdown(rows, meta))
    print(f"written: {out / 'results.md'}, {out / 'results.json'}, {out / 'kl_vs_bytes.png'} "
          f"({time.time() - t0:.0f} s)")


def bits_budget(bits_per_elt: float, n_layers: int, n_kv: int, hd: int, length: int) -> float:
    """Bytes of `bits_per_elt` bits per stored K/V element, metadata included, for `length` tokens (all layers)."""
    return 2 * n_layers * n_kv * hd * length * bits_per_elt / 8


def results_markdown(rows, meta) -> str:
    lines = [f"Model {meta['model']}, {meta['length']} tokens of {meta['eval_text']}, teacher-forced. "
             f"Command: `{meta['command']}` ({meta['seconds']} s{'' if meta.get('complete') else ', INCOMPLETE'}).",
             "",
             "| method | KV bytes/token (codes+scales/zeros) | bits/elt (incl. metadata) | codes only | budget | "
             "KL mean | KL last 25% | perplexity | top-1 agree | notes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    elts = meta.get("elements_per_token")
    for r in rows:
        def f(x, fmt):
            return "" if x is None else format(x, fmt)
        bpe = None if (r["bytes_per_token"] is None or not elts) else 8 * r["bytes_per_token"] / elts
        lines.append(f"| {r['method'].strip()} | {f(r['bytes_per_token'], '.0f')} | {f(bpe, '.2f')} | "
                     f"{f(r['bytes_per_token_codes'], '.0f')} | {f(r['budget_bytes_per_token'], '.0f')} | "
                     f"{r['kl']:.4f} | {r['kl_last_quarter']:.4f} | {r['ppl']:.3f} | {r['top1']:.4f} | "
                     f"{r['notes']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
