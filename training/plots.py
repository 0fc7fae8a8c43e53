"""The report's figures, drawn from the saved run files' rows.

Owns: validation N@6 over epochs (mean +- std over seeds), the synthetic against the true noise densities (the
paper's Figure 5), and DNR's per-epoch losses and x' AUC.
Does not know: how the rows were produced, or the report's text (``report.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def noise_densities(noise: list[dict[str, str]], path: Path) -> None:
    """The paper's Figure 5: one panel per synthetic variant, its noise x' - z against the true noise x - z."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = list(dict.fromkeys(r["source"] for r in noise))
    true = next((s for s in sources if s.startswith("true")), None)
    synthetic = [s for s in sources if s != true and "-no-" not in s]  # ablations: table only
    cols = max(1, min(3, len(synthetic)))
    rows = max(1, -(-len(synthetic) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)

    def curve(ax: Any, source: str, **style: Any) -> None:
        part = [r for r in noise if r["source"] == source]
        centres = [(float(r["bin_low"]) + float(r["bin_high"])) / 2 for r in part]
        ax.plot(centres, [float(r["density"]) for r in part], label=source, **style)

    for ax, source in zip(axes.flat, synthetic, strict=False):
        if true is not None:
            curve(ax, true, lw=2.0, color="black")
        curve(ax, source, lw=1.4, color="tab:red")
        ax.set_yscale("log")
        ax.set_xlabel("noise")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(synthetic):]:
        ax.axis("off")
    fig.suptitle("synthetic noise x' - z against the true noise x - z (validation lists, first seed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dnr_curves(epochs: list[dict[str, str]], variants: list[str], path: Path) -> None:
    """Per epoch, mean over seeds: L_z, L_adv and L_x, and the list AUC of x' against z beside the real x's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["L_z", "L_adv", "L_x", "xprime_auc"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=True):
        for variant in variants:
            by_epoch: dict[int, list[float]] = {}
            for r in epochs:
                if r["variant"] == variant and r.get(key):
                    by_epoch.setdefault(int(r["epoch"]), []).append(float(r[key]))
            if by_epoch:
                xs = sorted(by_epoch)
                ax.plot(xs, [np.mean(by_epoch[e]) for e in xs], marker="o", markersize=2, label=variant)
        if key == "xprime_auc":
            real = [float(r["x_auc"]) for r in epochs if r.get("x_auc")]
            if real:
                ax.axhline(float(np.mean(real)), color="black", lw=1.5, label="real x")
            ax.set_title("list AUC of x' against z (%)", fontsize=9)
        else:
            ax.set_title(key, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def controlled(rows: list[dict[str, Any]], path: Path) -> None:
    """DNR minus PRM and minus the best score pathway (test N@6, mean ± std over seeds) against the list AUC of
    the controlled regimes' test lists, one line per DNR variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    for ax, key, title in zip(axes.flat, ("prm", "pathway"), ("DNR - PRM", "DNR - best score pathway"), strict=True):
        for variant in dict.fromkeys(r["variant"] for r in rows):
            part = sorted((r for r in rows if r["variant"] == variant and key in r), key=lambda r: r["auc_test"])
            if part:
                ax.errorbar([r["auc_test"] for r in part], [r[key]["diff"] for r in part],
                            yerr=[r[key]["std"] for r in part], marker="o", capsize=3, label=variant)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xlabel("retriever list AUC on the test lists (%)")
        ax.set_ylabel("Δ test N@6 (points)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

