"""Decode-speed benchmark of the host runtime (docs/host.md records its results).

    python host/bench.py                  # golden backend, 1024-token prompt, 256 new tokens, default model/table

Measures, on the same prompt: the float model's own greedy decode (transformers DynamicCache, SDPA) and the
decode with every attention through the accelerator backend. Reports wall-clock tokens/s and CPU-time tokens/s
(process CPU seconds per token: on a shared machine it shows what an idle one would reach when torch runs one
thread). Goal: >= 5 tokens/s for the golden backend on 2 CPU cores.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch threads sleep: no collapse on a busy machine

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

GOAL_TOKENS_PER_S = 5.0


def float_decode(model, prompt, steps: int):
    import torch
    from transformers import DynamicCache
    cache = DynamicCache()
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits[0, -1]
        t, c = time.perf_counter(), time.process_time()
        for _ in range(steps):
            tok = int(logits.argmax())
            logits = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True).logits[0, -1]
        return time.perf_counter() - t, time.process_time() - c


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python host/bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--float-steps", type=int, default=64, help="decode steps of the float-model baseline")
    p.add_argument("--board", default="golden", choices=("golden", "sim", "u280"))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    p.add_argument("--json", default=None, metavar="PATH")
    a = p.parse_args(argv)

    from pmkvq_accel.host.device import open_device
    device = open_device(a.board)  # fails fast, before torch loads
    import torch

    from pmkvq_accel.host import table as host_table
    from pmkvq_accel.host.decode import greedy_decode
    from pmkvq_accel.host.hf import kv_cache_for
    from pmkvq_accel.host.run import build_prompt, parse_args
    from pmkvq_accel.model.llm import DEFAULT_MODEL, load_model
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = load_model(device="cpu")
    table, label = host_table.load_for_model(model.config, None, DEFAULT_MODEL)
    host_table.apply_reparam(model, table)
    prompt = build_prompt(tok, parse_args(["--prompt-tokens", str(a.prompt_tokens)]))

    fw, fc = float_decode(model, prompt, a.float_steps)
    kv = kv_cache_for(model, table, device)
    res = greedy_decode(model, kv, prompt, a.new_tokens, eos_id=None, progress=False)
    n = res.decode_steps
    out = {
        "command": "python host/bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "board": device.name, "table": label, "prompt_tokens": len(prompt), "new_tokens": len(res.new_ids),
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.processor() or
        platform.machine(), "load_avg_1min": os.getloadavg()[0],
        "float_tokens_per_s": a.float_steps / fw, "float_cpu_tokens_per_s": a.float_steps / fc,
        "tokens_per_s": n / res.decode_s, "cpu_tokens_per_s": n / res.decode_cpu_s,
        "prefill_s": res.prefill_s, "final_widths": [kv.widths(i) for i in range(kv.n_layers)][:1],
    }
    print(f"{out['board']}: {out['prompt_tokens']}-token prompt, {n} decode steps, torch threads "
          f"{out['torch_threads']}, load average {out['load_avg_1min']:.1f} on {out['cpus']} CPUs")
    print(f"float model alone : {out['float_tokens_per_s']:6.2f} tokens/s wall, "
          f"{out['float_cpu_tokens_per_s']:6.2f} per CPU-second")
    print(f"through {out['board']:9s} : {out['tokens_per_s']:6.2f} tokens/s wall, "
          f"{out['cpu_tokens_per_s']:6.2f} per CPU-second   (goal >= {GOAL_TOKENS_PER_S})")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    from pmkvq_accel.host.device import DeviceError, DeviceUnavailable
    try:
        sys.exit(main())
    except (DeviceUnavailable, DeviceError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
