"""PNG plots of a calibration: sensitivity, allocation, progressive schedule; and the evaluation's KL vs bytes."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def calibration_plots(table: dict, art, out_dir: Path, model_id: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    layers = table["layers"]
    n = len(layers)
    x = np.arange(n)

    # 1. sensitivity per layer and width
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for j, b in enumerate(art.sens_widths):
        ax.semilogy(x, art.sens_k[:, j], "o-", ms=3, label=f"K, {b}-bit")
        ax.semilogy(x, art.sens_v[:, j], "s--", ms=3, label=f"V, {b}-bit")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean |(Q_b(X) - X) * dL/dX|")
    ax.set_title(f"{model_id}: sensitivity per layer and width")
    ax.legend(ncol=3, fontsize=8)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out_dir / f"{model_id}-sensitivity.png"))

    # 2. allocation: widths and budgets per layer
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    kb = [lb["key_bits"] for lb in layers]
    vb = [lb["value_bits"] for lb in layers]
    a1.bar(x - 0.2, kb, 0.4, label="keys")
    a1.bar(x + 0.2, vb, 0.4, label="values")
    a1.set_ylabel("final width (bits)")
    a1.set_yticks([2, 4, 8, 16])
    al = table["allocation"]
    a1.set_title(f"{model_id}: allocation ({al['method']}, widths {al['widths']}, "
                 f"{al['budget_bytes_per_token']:.0f} B/token at {table['cache']['max_len']} tokens)")
    a1.legend(fontsize=8)
    a2.bar(x - 0.2, [lb["key_budget_bytes"] / 2**10 for lb in layers], 0.4, label="key budget")
    a2.bar(x + 0.2, [lb["value_budget_bytes"] / 2**10 for lb in layers], 0.4, label="value budget")
    a2.set_ylabel("budget (KiB)")
    a2.set_xlabel("layer")
    a2.legend(fontsize=8)
    paths.append(_save(fig, out_dir / f"{model_id}-allocation.png"))

    # 3. progressive schedule: body bits vs tokens, per layer (keys; values dashed where different)
    max_len = table["cache"]["max_len"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    cmap = plt.get_cmap("viridis")
    for lb in layers:
        for kind, style in (("key", "-"), ("value", ":")):
            ts, bs = [0], [table["cache"]["body_init_bits"]]
            for e in lb[f"{kind}_schedule"]:
                ts.append(e["tokens"])
                bs.append(e["bits"])
            ts.append(max_len)
            bs.append(bs[-1])
            off = 0.08 * (lb["layer"] / n - 0.5)
            ax.step(ts, np.array(bs) + off, where="post", ls=style, color=cmap(lb["layer"] / max(n - 1, 1)),
                    lw=1, label=None)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, n - 1))
    fig.colorbar(sm, ax=ax, label="layer")
    ax.set_yscale("log", base=2)
    ax.set_yticks([2, 4, 8, 16], ["2", "4", "8", "16"])
    ax.set_xlabel("tokens in the cache")
    ax.set_ylabel("body width (bits)")
    ax.set_title(f"{model_id}: progressive schedule (keys solid, values dotted)")
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out_dir / f"{model_id}-schedule.png"))

    if art.alpha_mse:
        fig, ax = plt.subplots(figsize=(9, 3.5))
        ax.bar(x, art.alphas)
        ax.set_xlabel("layer")
        ax.set_ylabel("alpha")
        ax.set_title(f"{model_id}: reparameterisation alpha per layer (search at {art.settings['search_bits']} bits)")
        paths.append(_save(fig, out_dir / f"{model_id}-alpha.png"))
    return paths


def kl_vs_bytes_plot(rows: list[dict], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    families = {}
    for r in rows:
        if r["kl"] is None or r["bytes_per_token"] is None:
            continue
        families.setdefault(r["family"], []).append(r)
    markers = {"float": "*", "RTN": "o", "KIVI": "s", "PM-KVQ": "D", "ablation": "x"}
    for fam, rs in families.items():
        rs = sorted(rs, key=lambda r: r["bytes_per_token"])
        xs = [r["bytes_per_token"] for r in rs]
        ys = [max(r["kl"], 1e-5) for r in rs]
        ax.plot(xs, ys, markers.get(fam, "o") + ("-" if fam in ("RTN", "KIVI") else ""), label=fam, ms=7)
        for r, xv, yv in zip(rs, xs, ys):
            ax.annotate(r["short"], (xv, yv), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("KV bytes per token (all layers, K+V, codes + scales/zeros, at the evaluated length)")
    ax.set_ylabel("mean next-token KL to the float model (nats)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
