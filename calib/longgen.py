"""Long free-running generation: greedy decoding with the quantized KV cache against the float model.

    python calib/longgen.py --prompt-tokens 1024 --new-tokens 1024 --budgets RTN-4,KIVI-2,3.3b

The prompt is the first --prompt-tokens tokens of the evaluation text (default: the pydoc evaluation split;
--eval-text wiki for the Wikipedia leads). The float model decodes --new-tokens greedily; then, for each budget,
the default method ("best", calib/calibrate.py BEST; calibrated with max_len = prompt + new tokens) decodes the
same prompt greedily with its cache simulated through the golden quantizer (calib/quantsim.py: the prompt in the
chunk plan, then token by token). Reported per budget: the first generated position where the two token streams
differ, the token match rate (same token at the same position), and the KV bytes at the end. Writes JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # idle torch threads sleep: no collapse on a busy machine

import torch

from pmkvq_accel.calib import data as D
from pmkvq_accel.calib.allocate import rtn_equivalent_bytes
from pmkvq_accel.calib.calibrate import BEST, _dims, best_settings, make_table, run_calibration
from pmkvq_accel.calib.quantsim import FloatLayer, chunk_plan, kivi_bytes, make_cache
from pmkvq_accel.model.cache import CacheConfig

REPO = Path(__file__).resolve().parent.parent


def greedy(model, prompt: torch.Tensor, layers, n_new: int, desc: str) -> list[int]:
    """Greedy decode n_new tokens after prompt with the given cache layers (prefill in the chunk plan)."""
    from tqdm.auto import tqdm
    cache = make_cache(layers)
    P = prompt.numel()
    plan = [(a, b) for a, b in chunk_plan(P + n_new, layers) if a < P]
    out, logits = [], None
    with torch.no_grad():
        for a, b in plan:
            b = min(b, P)
            logits = model(input_ids=prompt[a:b][None], position_ids=torch.arange(a, b)[None],
                           attention_mask=torch.ones(1, b, dtype=torch.long), cache=cache,
                           use_cache=True).logits
        nxt = int(logits[0, -1].argmax())
        for i in tqdm(range(n_new), desc=desc, unit="tok", leave=False):
            out.append(nxt)
            if i == n_new - 1:
                break
            pos = P + i
            logits = model(input_ids=torch.tensor([[nxt]]), position_ids=torch.tensor([[pos]]),
                           attention_mask=torch.ones(1, pos + 1, dtype=torch.long), cache=cache,
                           use_cache=True).logits
            nxt = int(logits[0, -1].argmax())
    return out


def compare(ref: list[int], got: list[int]) -> dict:
    diff = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
    match = sum(a == b for a, b in zip(ref, got)) / max(len(ref), 1)
    return {"first_divergence": diff, "token_match_rate": match}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--eval-text", default=None)
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=1024)
    p.add_argument("--budgets", default="RTN-4,KIVI-2,3.3b")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--cache-dir", default=str(REPO / "out" / "calib" / "cache"))
    p.add_argument("--out", default=str(REPO / "out" / "longgen.json"))
    args = p.parse_args(argv)
    t0 = time.time()
    from pmkvq_accel.model.llm import DEFAULT_MODEL, load_model
    from pmkvq_accel.calib.evaluate import bits_budget, progressive_layers
    model, tok = load_model(args.model, "cpu")
    model_id = DEFAULT_MODEL if args.model is None else Path(args.model).name.removesuffix(".gguf")
    n_layers, _, n_kv, hd = _dims(model)
    text, desc = D.get_text("eval", args.eval_text)
    prompt = D.tokenize(tok, text)[: args.prompt_tokens]
    L = args.prompt_tokens + args.new_tokens
    cfg = CacheConfig(n_kv, hd, 1, 16, 16, True)
    all_budgets = {"RTN-4": rtn_equivalent_bytes(cfg, n_layers, 4, L, metadata=True),
                   "KIVI-2": n_layers * kivi_bytes(L, n_kv, hd, 2, 32, 128),
                   "3.3b": bits_budget(3.3, n_layers, n_kv, hd, L)}
    names = [b.strip() for b in args.budgets.split(",") if b.strip()]
    if set(names) - set(all_budgets):
        raise SystemExit(f"error: unknown budgets {sorted(set(names) - set(all_budgets))}; choose from "
                         f"{sorted(all_budgets)}")
    ref = greedy(model, prompt, [FloatLayer() for _ in range(n_layers)], args.new_tokens, "float")
    res = {"command": "python calib/longgen.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "model": model_id, "text": desc, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
           "method": "best", "float_tokens": ref, "rows": []}
    art = run_calibration(model, tok, best_settings({"n_samples": args.samples}), Path(args.cache_dir))
    for bname in names:
        t = make_table(model, art, model_id=model_id, cfg=cfg, max_len=L, budget=all_budgets[bname],
                       budget_src=f"{bname} memory", widths=BEST["widths"], separate_kv=BEST["separate_kv"],
                       factors_rel=None, windows=BEST["windows"], key_weight=BEST["key_weight"])
        layers = progressive_layers(t, n_kv, hd)
        got = greedy(model, prompt, layers, args.new_tokens, f"best@{bname}")
        row = {"budget": bname, **compare(ref, got), "bits_per_elt": 8 * sum(x.memory_bytes(True) for x in layers)
               / (L * 2 * n_layers * n_kv * hd), "window": t["cache"]["window"], "tokens": got,
               "distinct_float_tokens": len(set(ref))}
        res["rows"].append(row)
        print(f"best@{bname}: first divergence at generated token {row['first_divergence']}, token match "
              f"{row['token_match_rate']:.3f}, {row['bits_per_elt']:.2f} bits/elt", flush=True)
    res["seconds"] = round(time.time() - t0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"written {args.out} ({res['seconds']} s)")


if __name__ == "__main__":
    main()
