"""Decode-speed benchmark of the host runtime (docs/host.md records its results).

    python host/bench.py                  # golden backend, 1024-token prompt, 256 new tokens, default model/table

Measures, on the same prompt: the float model's own greedy decode (transformers DynamicCache, SDPA) and the
decode with every attention through the accelerator backend. Reports wall-clock tokens/s and CPU-time tokens/s
(process CPU seconds per token: on a shared machine it shows what an idle one would reach when torch runs one
thread). Goal: >= 5 tokens/s for the golden backend on 2 CPU cores. Both runs are transformers' `model.generate`
(the accelerated one through `pmkvq_accel.accelerate`), timed per forward by the same hooks. Installed:
`pmkvq-bench`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch threads sleep: no collapse on a busy machine

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402

GOAL_TOKENS_PER_S = 5.0


def float_decode(model, prompt, steps: int):
    """The float model's own greedy decode (transformers' default DynamicCache): (wall s, CPU s) of `steps`
    decode steps after the prefill."""
    import torch

    from pmkvq_accel.host.accel import StepRecorder
    ids = torch.tensor([prompt])
    rec = StepRecorder()
    generate = type(model).generate.__get__(model)   # transformers' own, even while an Accelerator is active
    with rec.attached(model):
        generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=steps + 1,
                 eos_token_id=None)
    return rec.decode_s, rec.decode_cpu_s


def parse_args(argv=None):
    from pmkvq_accel.host.device import BOARDS
    from pmkvq_accel.host.run import at_least, check_output_path
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-tokens", type=at_least(1), default=1024)
    p.add_argument("--new-tokens", type=at_least(2), default=256)
    p.add_argument("--float-steps", type=at_least(1), default=64, help="decode steps of the float-model baseline")
    p.add_argument("--board", default="golden", choices=BOARDS)
    p.add_argument("--threads", type=at_least(1), default=None, help="torch threads (default: one per core)")
    p.add_argument("--json", default=None, metavar="PATH")
    a = p.parse_args(argv)
    check_output_path(p, "--json", a.json)
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    from pmkvq_accel.host.device import open_device
    device = open_device(a.board)  # fails fast, before torch loads
    try:
        import torch

        import pmkvq_accel
        from pmkvq_accel.host import run
        from pmkvq_accel.model.llm import load_model
        if a.threads:
            torch.set_num_threads(a.threads)
        model, tok = load_model(device="cpu")
        prompt = run.build_prompt(tok, run.parse_args(["--prompt-tokens", str(a.prompt_tokens)]))
        with pmkvq_accel.accelerate(model, tok, board=device) as acc:
            fw, fc = float_decode(model, prompt, a.float_steps)
            ids = torch.tensor([prompt])
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=a.new_tokens,
                           eos_token_id=None)
            st = acc.stats
        n = st.decode_steps
        out = {
            "command": "python host/bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "board": device.name, "table": acc.table_label, "prompt_tokens": st.prompt_tokens,
            "new_tokens": st.new_tokens, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "load_avg_1min": os.getloadavg()[0],
            "float_tokens_per_s": a.float_steps / fw, "float_cpu_tokens_per_s": a.float_steps / fc,
            "tokens_per_s": n / st.decode_s, "cpu_tokens_per_s": n / st.decode_cpu_s,
            "prefill_s": st.prefill_s, "final_widths": st.widths[:1], "launches": st.launches,
        }
    finally:
        device.close()
    print(f"{out['board']}: {out['prompt_tokens']}-token prompt, {n} decode steps, torch threads "
          f"{out['torch_threads']}, load average {out['load_avg_1min']:.1f} on {out['cpus']} CPUs")
    print(f"float model alone : {out['float_tokens_per_s']:6.2f} tokens/s wall, "
          f"{out['float_cpu_tokens_per_s']:6.2f} per CPU-second")
    print(f"through {out['board']:9s} : {out['tokens_per_s']:6.2f} tokens/s wall, "
          f"{out['cpu_tokens_per_s']:6.2f} per CPU-second   (goal >= {GOAL_TOKENS_PER_S})")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


def cli(argv=None) -> int:
    """`python host/bench.py` / `pmkvq-bench`."""
    from pmkvq_accel.host.run import run_main
    return run_main(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
