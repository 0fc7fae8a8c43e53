"""The report's two figures, drawn from the saved run files' rows.

Owns: validation N@6 over epochs (mean +- std over seeds) and the real vs synthetic score densities.
Does not know: how the rows were produced, or the report's text (``report.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def valid_curves(epochs: list[dict[str, str]], variants: list[str], path: Path, lambda_e: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for variant in variants:
        rows = [r for r in epochs if r["variant"] == variant]
        by_epoch: dict[int, list[float]] = {}
        for r in rows:
            by_epoch.setdefault(int(r["epoch"]), []).append(float(r["valid_N@6"]))
        xs = sorted(by_epoch)
        mean = np.array([np.mean(by_epoch[e]) for e in xs])
        std = np.array([np.std(by_epoch[e]) for e in xs])
        style = ":" if "-no-" in variant else "-" if variant.startswith("dnr") else "--"
        (line,) = ax.plot(xs, mean, style, marker="o", markersize=3, label=variant)
        ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.12)
    if any(v.startswith("dnr") for v in variants):
        ax.axvline(lambda_e + 0.5, color="grey", lw=0.8, ls=":")
        ax.text(lambda_e + 0.6, ax.get_ylim()[0], " model-based generator starts", color="grey", fontsize=8,
                va="bottom")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation N@6 (%), mean ± std over seeds")
    if variants:
        ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def score_densities(scores: list[dict[str, str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = [s for s in dict.fromkeys(r["source"] for r in scores) if "-no-" not in s]  # ablations: table only
    fig, ax = plt.subplots(figsize=(8, 5))
    for source in sources:
        rows = [r for r in scores if r["source"] == source]
        centres = [(float(r["bin_low"]) + float(r["bin_high"])) / 2 for r in rows]
        lw = 2.2 if source.startswith("real") else 1.2
        ax.plot(centres, [float(r["density"]) for r in rows], lw=lw, label=source,
                ls="-" if source.startswith(("real", "dnr")) else "--")
    ax.set_yscale("log")
    ax.set_xlabel("score")
    ax.set_ylabel("density (log)")
    ax.set_title("real retriever scores vs synthetic scores x' (validation lists, first seed)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
