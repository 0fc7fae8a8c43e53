"""The offline report ``reports/<dataset>.md``, written from the saved run files alone.

Owns: reading ``<dataset>_{runs,epochs,lists,noise}.csv``, ``_audit.json``, ``_regimes.csv``,
``_regime_lists.csv`` and ``_info.json``; the leakage audit (first), the main table against the best
non-learned ranking, the significance tests, the regimes table, epoch times, the deviations from the paper;
the summary ``<dataset>.csv``; and ``<dataset>_choices.md``. ``python -m training report`` redraws it without
training. Does not know: how runs were produced (``evaluate.py``) or how figures are drawn (``plots.py``).
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from training import metrics, plots
from training.evaluate import BASELINES, PATHWAYS, RETRIEVER
from training.train import VARIANTS, TrainConfig

# The paper's ML-1M test N@6 (%), as quoted in DESIGN.md section 2; the paper's other cells are not copied here.
PAPER_ML1M_N6 = {"prm": 72.85, "prm-concat": 76.73, "dnr-g": 77.67, "dnr-b": 77.12}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _values(runs: list[dict[str, str]], variant: str, split: str, metric: str) -> dict[int, float]:
    return {int(r["seed"]): float(r["value"]) for r in runs
            if r["variant"] == variant and r["split"] == split and r["metric"] == metric}


def summarise(runs: list[dict[str, str]], split: str = "test") -> list[dict[str, object]]:
    """Rows (variant, metric, mean, std, n_seeds); std is the sample std (ddof=1), 0 for one seed."""
    rows: list[dict[str, object]] = []
    for variant in dict.fromkeys(r["variant"] for r in runs):
        for metric in metrics.METRICS:
            values = np.array(list(_values(runs, variant, split, metric).values()))
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            rows.append({"variant": variant, "metric": metric, "mean": round(float(values.mean()), 4),
                         "std": round(std, 4), "n_seeds": len(values)})
    return rows


def _table(rows: list[dict[str, object]], paper: bool = False, bar: tuple[str, float] | None = None) -> list[str]:
    """Mean ± std per metric; ``paper`` adds the paper's ML-1M N@6, ``bar`` the N@6 margin over the best
    non-learned ranking (name, N@6)."""
    head = "| variant | " + " | ".join(metrics.METRICS) + " | seeds |"
    head += f" N@6 − {bar[0]} order ({bar[1]:.2f}) |" if bar else ""
    head += " paper ML-1M N@6 |" if paper else ""
    lines = [head, "|---" * (len(metrics.METRICS) + 2 + paper + (bar is not None)) + "|"]
    for variant in dict.fromkeys(str(r["variant"]) for r in rows):
        cells = {str(r["metric"]): r for r in rows if r["variant"] == variant}
        n = cells[metrics.METRICS[0]]["n_seeds"]
        values = [f"{cells[m]['mean']:.2f} ± {cells[m]['std']:.2f}" for m in metrics.METRICS]
        line = f"| {variant} | " + " | ".join(values) + f" | {n} |"
        if bar:
            line += " |" if variant == RETRIEVER else f" {float(cells['N@6']['mean']) - bar[1]:+.2f} |"  # type: ignore[arg-type]
        if paper:
            line += f" {PAPER_ML1M_N6[variant]:.2f} |" if variant in PAPER_ML1M_N6 else " |"
        lines.append(line)
    return lines


def significance(runs: list[dict[str, str]], per_list: list[dict[str, str]], variant: str, against: str
                 ) -> dict[str, float]:
    """Test N@6 of ``variant`` minus ``against``: paired t-test over seeds (same seed, both variants) and a
    Wilcoxon signed-rank test over test lists (each list's N@6 averaged over seeds); two-sided p-values.

    Against the retriever order (one deterministic run) every seed of ``variant`` is paired with that run, so
    the t-test is a one-sample test of the seeds' differences."""
    a, b = _values(runs, variant, "test", "N@6"), _values(runs, against, "test", "N@6")
    if against == RETRIEVER and len(b) == 1:
        b = dict.fromkeys(a, next(iter(b.values())))
    seeds = sorted(set(a) & set(b))
    x, y = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
    t_p = float(stats.ttest_rel(x, y).pvalue) if len(seeds) > 1 and np.any(x != y) else float("nan")
    la = np.array([float(r[variant]) for r in per_list])
    lb = np.array([float(r[against]) for r in per_list])
    w_p = float(stats.wilcoxon(la, lb).pvalue) if np.any(la != lb) else float("nan")
    return {"diff": float((x - y).mean()), "seeds": len(seeds), "wins": int((x > y).sum()), "t_p": t_p,
            "lists": len(la), "list_wins": int((la > lb).sum()), "list_losses": int((la < lb).sum()),
            "wilcoxon_p": w_p}


def epoch_seconds(epochs: list[dict[str, str]], variant: str, after: int = 0) -> float:
    """Median training seconds per epoch of ``variant`` over its seeds' epochs after epoch ``after``. The
    median, not the mean: an epoch that shared the CPU with something else should not move the figure."""
    xs = [float(r["seconds"]) for r in epochs if r["variant"] == variant and int(r["epoch"]) > after]
    return float(np.median(xs)) if xs else float("nan")


def _epoch_times(epochs: list[dict[str, str]], lambda_e: int) -> list[str]:
    variants = list(dict.fromkeys(r["variant"] for r in epochs))

    prm = epoch_seconds(epochs, "prm")
    lines = ["| variant | s / epoch (all epochs) | x PRM | s / epoch with the generator (epochs > lambda_e) | x PRM |",
             "|---|---|---|---|---|"]
    for v in variants:
        s = epoch_seconds(epochs, v)
        if VARIANTS[v].generator:
            g = epoch_seconds(epochs, v, lambda_e)
            lines.append(f"| {v} | {s:.2f} | {s / prm:.2f} | {g:.2f} | {g / prm:.2f} |")
        else:
            lines.append(f"| {v} | {s:.2f} | {s / prm:.2f} | | |")
    return lines


DEVIATIONS = [
    "**Data: MovieLens-100K, not ML-1M.** ML-1M cannot be downloaded here (`--dataset ml1m --path DIR` runs the "
    "same pipeline on it). The paper's ML-1M numbers are beside ours for orientation only; they are not "
    "comparable in level (different data, different candidate generation).",
    "**Candidate lists.** The paper's lists come from a production retriever's exposure logs; MovieLens has no "
    "exposure, so each list is a 6-item slate plus 44 negatives drawn for that list alone, scored by an MF that "
    "did not see the slate (out of fold for training lists, fitted before validation for validation and test "
    "lists). The default sampler and the evidence for it are in the audit section; the regimes table shows "
    "the other two. A training list's MF has seen the user's later training slates (it leaves out only its "
    "own fold), so no item the user meets before validation is a negative of any list: labelled 0, such items "
    "had filled 49% of the retriever's top 6 on training lists (0% on test lists) and taught the reranker that a "
    "high score means a negative. The list AUC on training lists is reported beside the test one.",
    "**Model size and schedule.** Hidden 64 and one candidate-transformer layer (paper: 128), batch 512 (paper: "
    "2048), AdamW at lr 1e-2, at most `epochs` epochs of which the first `lambda_e` (a share of the epochs when "
    "below 1) use heuristic noise (paper: lambda_e 40 epochs). The settings below are the ones that ran.",
    "**Score pathways** read the score's logit standardised within the list (`score_input` list), and on "
    "`score_dropout` of the training lists not at all (the real scores only: DNR's synthetic scores are never "
    "blanked). DNR's pathway is `late` (the score joins after the candidate encoder, the paper's fusion point), so "
    "one encoder pass serves the real and the synthetic scores of a reranker step.",
    "**Early stopping** on validation N@6 with `patience`, after a one-epoch linear learning-rate warm-up; generator "
    "variants never stop before the generator has trained `patience` epochs. The reported model is the epoch with "
    "the best validation N@6. A run whose best epoch is 0 or 1 is flagged in the diagnostics section.",
    "**Positions under synthetic scores.** The L_z pass keeps the real retriever positions and feeds x' to the "
    "score pathway only (the paper does not say); re-deriving positions from x' would hand the position "
    "embedding the labels.",
    "**Model-based generator** (section 3.3): lambda_c 1, so it outputs x' itself (`gen_lambda_c`); a 2-layer MLP "
    "on the reranker's user state and candidate embedding (detached), z and 8 standard-normal inputs per "
    "candidate, through Linear-ReLU-Linear-sigmoid. During the heuristic epochs it is fitted to L_x alone "
    "(`gen_warmup`; Algorithm 1 leaves it untrained until lambda_e), so that it starts from realistic scores, "
    "then Algorithm 1: per batch a reranker step on x' from the generator, then a generator step against the "
    "frozen reranker in eval mode (`gen_every` 1).",
    "**L_adv** is Eq. 5's E[log q(z|x') - log p(z|x')], with p(z|x) estimated by a logistic fit of z on the "
    "score feature of the real training lists. The paper minimises log q(z|x') alone (Eq. 7), which rewards a "
    "generator for scores that invert the label (variant `dnr-b-eq7` keeps it, to show what it does).",
    "**L_x** (paper: a KL between synthetic and real scores) is computed on what the reranker reads: the "
    "standardised score logit of x' against that of the real scores, KL between soft histograms (20 "
    "Gaussian-kernel bins on [-4, 4]); `--lx-estimator w1` is the 1-Wasserstein alternative and "
    "`--lx-conditional` matches x'|z to x|z per label instead of the marginal.",
    "**Heuristic noise.** Gaussian (paper silent on parameters and clipping): eps ~ N(noise_mu, noise_sigma^2), x' "
    "clipped to [0, 1]; Beta(0.5, 0.5) (paper); both at lambda_c 0.4. `m` / `dnr-m`: x'|z ~ a Beta fitted by "
    "moments to the real training scores of label z, i.e. noise x' - z distributed like the observed x - z "
    "(lambda_c 1), the 'align with the observed noise' option of section 3.3.",
    "**Significance**: a paired t-test over seeds (one pair per seed: few pairs, weak) and a Wilcoxon "
    "signed-rank test over the test lists (each list's N@6 averaged over seeds). The paper does not say which "
    "test it used.",
    "**Memorisation** in the audit orders each group (items the user had labelled 0 in a training list, the "
    "others) at random, so it measures memory alone; random and memorisation are averaged over 20 draws.",
]


def _targets(runs: list[dict[str, str]], per_list: list[dict[str, str]], epochs: list[dict[str, str]],
             lambda_e: int, best_pathway: str | None) -> list[str]:
    """The targets: PRM at least 5 points above the retriever order; DNR above PRM and above the best score
    pathway on test N@6 with p < 0.05; DNR's epoch time with the generator at most 1.3x PRM's."""
    variants = {r["variant"] for r in runs}
    lines = ["| target | measured | met |", "|---|---|---|"]
    if "prm" in variants and RETRIEVER in variants:
        s = significance(runs, per_list, "prm", RETRIEVER)
        lines.append(f"| prm >= 5 points above the retriever order on test N@6 | Δ {s['diff']:+.2f}, t-test p "
                     f"{s['t_p']:.3g} | {'yes' if s['diff'] >= 5 else 'no'} |")
    for v in ("dnr-g", "dnr-b", "dnr-m"):
        if v not in variants:
            continue
        for against in dict.fromkeys(a for a in ("prm", best_pathway) if a in variants):
            s = significance(runs, per_list, v, against)
            met = s["diff"] > 0 and s["wilcoxon_p"] < 0.05 and s["t_p"] < 0.05
            lines.append(f"| {v} above {against} on test N@6, p < 0.05 | Δ {s['diff']:+.2f}, t-test p "
                         f"{s['t_p']:.3g}, Wilcoxon p {s['wilcoxon_p']:.3g} | {'yes' if met else 'no'} |")
        if "prm" in variants:
            ratio = epoch_seconds(epochs, v, lambda_e) / epoch_seconds(epochs, "prm")
            lines.append(f"| {v} s / epoch with the generator <= 1.3 x prm | {ratio:.2f} x | "
                         f"{'yes' if ratio <= 1.3 else 'no'} |")
    return lines


def _ablation(runs: list[dict[str, str]], per_list: list[dict[str, str]]) -> list[str]:
    """What PRM learns from: each ablation variant (and each score pathway) against prm, validation and test."""
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    if "prm" not in variants:
        return []
    rows = [v for v in variants if v in VARIANTS and (VARIANTS[v].without or v in PATHWAYS)]
    prm_valid = np.mean(list(_values(runs, "prm", "valid", "N@6").values()))
    lines = ["| variant | what changes | valid N@6 | Δ valid vs prm | Δ test vs prm | paired t-test p | "
             "Wilcoxon p (lists) |", "|---|---|---|---|---|---|---|"]
    for v in rows:
        spec = VARIANTS[v]
        change = f"without {spec.without.replace('_', ' ')}" if spec.without else f"reads the score ({spec.pathway})"
        valid = np.mean(list(_values(runs, v, "valid", "N@6").values()))
        s = significance(runs, per_list, v, "prm")
        lines.append(f"| {v} | {change} | {valid:.2f} | {valid - prm_valid:+.2f} | {s['diff']:+.2f} | "
                     f"{s['t_p']:.3g} | {s['wilcoxon_p']:.3g} |")
    return lines


def _audit_section(audit: dict[str, Any]) -> list[str]:
    """The leakage audit of every sampler: non-learned rankings' test N@6, retriever list AUCs, verdict."""
    default = audit["default"]
    rankings = list(next(iter(audit["samplers"].values()))["n6"])
    lines = ["| sampler | " + " | ".join(rankings) + " | retriever list AUC train / valid / test | verdict |",
             "|---" * (len(rankings) + 3) + "|"]
    for sampler, a in audit["samplers"].items():
        auc = a["list_auc"]
        label = f"**{sampler}** (default)" if sampler == default else sampler
        verdict = "VALID" if a["valid"] else "**INVALID**"
        lines.append(f"| {label} | " + " | ".join(f"{a['n6'][r]:.2f}" for r in rankings) +
                     f" | {auc['train']:.1f} / {auc['valid']:.1f} / {auc['test']:.1f} | {verdict} |")
    n_lists = next(iter(audit["samplers"].values()))["lists"]
    lines += ["", f"Test N@6 (%) of rankings that learn nothing, on the {n_lists} test lists of each sampler. A "
              "protocol is valid when reversed retriever order is below retriever order, memorisation (per user, "
              "items labelled 0 in that user's training lists go last) is no "
              "better than random order plus noise (max(1 point, 3 standard errors of the per-list difference)), "
              "and the retriever's list AUC on training lists is within 5 points of its AUC on validation lists "
              "(the score must mean the same on the lists a reranker learns from as on those it is served)."]
    for sampler, a in audit["samplers"].items():
        if not a["valid"]:
            lines += ["", f"**{sampler}: INVALID** — " + "; ".join(a["reasons"]) + "."]
    return lines


# Why a sampler is (or is not) a realistic default; the figures beside it come from the audit itself.
SAMPLER_RATIONALE = {
    "popularity": "negatives drawn like exposures (interaction count^0.75) make the items a user did not pick as "
                  "popular as the ones they did, as in a real exposure log, so a reranker cannot score by item "
                  "popularity alone, and the retriever's order is noisier than under uniform: the regime DNR is "
                  "about.",
    "uniform": "negatives drawn uniformly from the catalogue are mostly obscure items, so item popularity alone "
               "separates them from the slate's items.",
    "retrieved": "negatives from the retriever's own top items: the hardest negatives, but the slate is forced in "
                 "among them, which inverts the retriever's order on held-out lists.",
}


def _sampler_note(audit: dict[str, Any]) -> list[str]:
    """Which samplers pass, how far popularity alone gets under each, and why the default is the default."""
    samplers = audit["samplers"]
    margin = ", ".join(f"{s} {a['n6']['popularity'] - a['n6']['random']:+.2f}" for s, a in samplers.items())
    passing = [s for s, a in samplers.items() if a["valid"]]
    default = audit["default"]
    lines = [f"Samplers that pass the audit: {', '.join(passing) or 'none'}. Popularity order minus random order "
             f"(test N@6 points): {margin}."]
    if default in SAMPLER_RATIONALE:
        lines.append(f"The default sampler is `{default}` (`--sampler`): {SAMPLER_RATIONALE[default]}")
    return [" ".join(lines)]


def _regimes_section(regimes: list[dict[str, str]], regime_lists: list[dict[str, str]], audit: dict[str, Any]
                     ) -> list[str]:
    """Test N@6 of the key variants under each sampler, and DNR against PRM and the best pathway there."""
    samplers = list(dict.fromkeys(r["sampler"] for r in regimes))
    variants = list(dict.fromkeys(r["variant"] for r in regimes))
    lines = ["| sampler | audit | " + " | ".join(variants) + " |", "|---" * (len(variants) + 2) + "|"]
    for sampler in samplers:
        runs = [r for r in regimes if r["sampler"] == sampler]
        cells = []
        for v in variants:
            xs = np.array(list(_values(runs, v, "test", "N@6").values()))
            std = f" ± {xs.std(ddof=1):.2f}" if len(xs) > 1 else ""
            cells.append(f"{xs.mean():.2f}{std} ({len(xs)})" if len(xs) else "")
        valid = audit["samplers"].get(sampler, {}).get("valid")
        verdict = "VALID" if valid else "INVALID" if valid is not None else "?"
        default = " (default)" if sampler == audit["default"] else ""
        lines.append(f"| {sampler}{default} | {verdict} | " + " | ".join(cells) + " |")
    lines += ["", "Test N@6 (%), mean ± sample std over seeds (number of seeds). The default sampler's row reuses "
              "the main table's runs.", ""]
    dnr = [v for v in variants if v in VARIANTS and VARIANTS[v].synthetic]
    bases = [v for v in variants if v in BASELINES]
    pairs = [(v, RETRIEVER) for v in variants if v != RETRIEVER and RETRIEVER in variants]
    pairs += [(v, against) for v in dnr for against in bases]
    lines += ["| sampler | variant | vs | Δ test N@6 | seeds won | paired t-test p | lists won / lost | "
              "Wilcoxon p (lists) |", "|---|---|---|---|---|---|---|---|"]
    for sampler in samplers:
        runs = [r for r in regimes if r["sampler"] == sampler]
        per_list = [r for r in regime_lists if r["sampler"] == sampler]
        for v, against in pairs:
            s = significance(runs, per_list, v, against)
            lines.append(f"| {sampler} | {v} | {against} | {s['diff']:+.2f} | {s['wins']}/{s['seeds']} | "
                         f"{s['t_p']:.3g} | {s['list_wins']} / {s['list_losses']} | {s['wilcoxon_p']:.3g} |")
    return lines


CONTROLLED = "controlled"  # the name prefix of the semi-synthetic regimes


def controlled_rows(regimes: list[dict[str, str]], regime_lists: list[dict[str, str]], audit: dict[str, Any]
                    ) -> list[dict[str, Any]]:
    """Per controlled regime and DNR variant: the training and test lists' list AUC (%) and DNR's test N@6 minus
    PRM's and minus the best score pathway's there (paired by seed), with the spread and the two tests."""
    out = []
    for regime in dict.fromkeys(r["sampler"] for r in regimes if r["sampler"].startswith(CONTROLLED)):
        runs = [r for r in regimes if r["sampler"] == regime]
        per_list = [r for r in regime_lists if r["sampler"] == regime]
        variants = list(dict.fromkeys(r["variant"] for r in runs))
        dnr = [v for v in variants if v in VARIANTS and VARIANTS[v].synthetic]
        pathways = [v for v in variants if v in PATHWAYS]
        aucs = audit["samplers"].get(regime, {}).get("list_auc", {})
        for v in dnr:
            row: dict[str, Any] = {"regime": regime, "variant": v, "auc_train": aucs.get("train", float("nan")),
                                   "auc_test": aucs.get("test", float("nan"))}
            for name, against in (("prm", "prm"), ("pathway", pathways[0] if pathways else None)):
                if against is None or against not in variants:
                    continue
                a, b = _values(runs, v, "test", "N@6"), _values(runs, against, "test", "N@6")
                diffs = np.array([a[k] - b[k] for k in sorted(set(a) & set(b))])
                sig = significance(runs, per_list, v, against)
                row[name] = {"against": against, "diff": float(diffs.mean()),
                             "std": float(diffs.std(ddof=1)) if len(diffs) > 1 else 0.0, "seeds": len(diffs),
                             "t_p": sig["t_p"], "wilcoxon_p": sig["wilcoxon_p"]}
            out.append(row)
    return out


def _controlled_section(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["No controlled regime ran (`--controlled-aucs`)."]
    lines = ["| regime | variant | list AUC train / test | Δ N@6 vs prm (t-test p, Wilcoxon p) | "
             "Δ N@6 vs best score pathway (t-test p, Wilcoxon p) |", "|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for key in ("prm", "pathway"):
            d = r.get(key)
            cells.append(f"{d['diff']:+.2f} ± {d['std']:.2f} over {d['seeds']} seeds vs {d['against']} "
                         f"({d['t_p']:.3g}, {d['wilcoxon_p']:.3g})" if d else "")
        lines.append(f"| {r['regime']} | {r['variant']} | {r['auc_train']:.1f} / {r['auc_test']:.1f} | "
                     + " | ".join(cells) + " |")
    return lines


def _bar_lines(test_rows: list[dict[str, object]], bar: tuple[str, float]) -> list[str]:
    """Which learned variants clear the best non-learned ranking on test N@6 (mean over seeds)."""
    n6 = {str(r["variant"]): float(r["mean"]) for r in test_rows  # type: ignore[arg-type]
          if r["metric"] == "N@6" and r["variant"] != RETRIEVER}
    below = [v for v, x in n6.items() if x <= bar[1]]
    if not n6:
        return []
    if not below:
        return [f"Every learned variant beats the best ranking that learns nothing ({bar[0]} order, "
                f"{bar[1]:.2f}) on mean test N@6."]
    return [f"**Not above the best ranking that learns nothing** ({bar[0]} order, {bar[1]:.2f}) on mean test "
            f"N@6: {', '.join(below)}."]


def switch_epoch(reranker: dict[str, Any]) -> int:
    """The last heuristic epoch of the settings that ran (``TrainConfig.switch_epoch``)."""
    return TrainConfig(epochs=int(reranker.get("epochs", 0)), lambda_e=float(reranker.get("lambda_e", 0))).switch_epoch


def _mean_at(rows: list[dict[str, str]], key: str, pick: str, switch: int = 0) -> float:
    """Mean over seeds of ``key`` at each seed's first epoch, its last heuristic epoch (``switch``) or its last."""
    by_seed: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        if r.get(key):
            by_seed.setdefault(r["seed"], []).append(r)
    picked = []
    for seq in by_seed.values():
        if pick == "first":
            picked.append(seq[0])
        elif pick == "switch":
            picked += [r for r in seq if int(r["epoch"]) == switch]
        else:
            picked.append(seq[-1])
    return float(np.mean([float(r[key]) for r in picked])) if picked else float("nan")


def _diagnostics(epochs: list[dict[str, str]], variants: list[str], switch: int) -> list[str]:
    """Per synthetic variant: list AUC of x' against z (first epoch, last heuristic epoch, last epoch) beside the
    real scores' list AUC, and the losses of the last epoch (means over seeds)."""
    keys = ["L_direct", "L_z", "L_adv", "L_x"]
    lines = ["| variant | real x AUC | x' AUC, epoch 1 | x' AUC, epoch lambda_e | x' AUC, last epoch | "
             + " | ".join(f"{k}, last epoch" for k in keys) + " |", "|---" * (5 + len(keys)) + "|"]
    for v in variants:
        rows = [r for r in epochs if r["variant"] == v]
        cells = [_mean_at(rows, "x_auc", "last"), _mean_at(rows, "xprime_auc", "first"),
                 _mean_at(rows, "xprime_auc", "switch", switch) if VARIANTS[v].generator else float("nan"),
                 _mean_at(rows, "xprime_auc", "last")]
        losses = [_mean_at(rows, k, "last") for k in keys]
        lines.append(f"| {v} | " + " | ".join("" if np.isnan(c) else f"{c:.1f}" for c in cells) + " | "
                     + " | ".join("" if np.isnan(c) else f"{c:.4f}" for c in losses) + " |")
    return lines


def _stalled(runs: list[dict[str, str]]) -> list[str]:
    """Runs that never learned: best epoch 0 or 1, or validation N@6 not above the retriever order's."""
    retriever = _values(runs, RETRIEVER, "valid", "N@6").get(0)
    flagged = []
    for r in runs:
        if r["variant"] == RETRIEVER or r["split"] != "valid" or r["metric"] != "N@6":
            continue
        epoch, value = int(r["best_epoch"]), float(r["value"])
        if epoch <= 1 or (retriever is not None and value <= retriever):
            flagged.append(f"{r['variant']} seed {r['seed']} (best epoch {epoch}, valid N@6 {value:.2f})")
    return flagged


def write_report(out_dir: Path, name: str) -> Path:
    """``<name>.md`` and ``<name>.csv`` (test summary) and the two plots, from the saved run files."""
    runs = _read_csv(out_dir / f"{name}_runs.csv")
    epochs = _read_csv(out_dir / f"{name}_epochs.csv")
    per_list = _read_csv(out_dir / f"{name}_lists.csv")
    noise = _read_csv(out_dir / f"{name}_noise.csv")
    audit = json.loads((out_dir / f"{name}_audit.json").read_text())
    regimes = _read_csv(out_dir / f"{name}_regimes.csv")
    regime_lists = _read_csv(out_dir / f"{name}_regime_lists.csv")
    info = json.loads((out_dir / f"{name}_info.json").read_text())
    reranker = info.get("reranker", {})
    lambda_e = switch_epoch(reranker)
    default = audit["default"]
    default_audit = audit["samplers"][default]
    bar_name = max(default_audit["n6"], key=lambda r: default_audit["n6"][r])
    bar = (bar_name, float(default_audit["n6"][bar_name]))

    test_rows = summarise(runs, "test")
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        summary = csv.DictWriter(f, fieldnames=["variant", "metric", "mean", "std", "n_seeds"])
        summary.writeheader()
        summary.writerows(test_rows)

    variants = list(dict.fromkeys(r["variant"] for r in runs))
    valid_n6 = {v: np.mean(list(_values(runs, v, "valid", "N@6").values())) for v in variants if v != RETRIEVER}
    baselines = [v for v in BASELINES if v in valid_n6]
    best_base = max(baselines, key=lambda v: valid_n6[v]) if baselines else None
    challengers = [v for v in variants if v in VARIANTS and VARIANTS[v].synthetic]
    sig = ["| variant | vs | Δ test N@6 (mean over seeds) | seeds won | paired t-test p | lists won / lost | "
           "Wilcoxon p (lists) |", "|---|---|---|---|---|---|---|"]
    pathways = [v for v in PATHWAYS if v in valid_n6]
    best_pathway = max(pathways, key=lambda v: valid_n6[v]) if pathways else None
    pairs = [(v, RETRIEVER) for v in valid_n6 if RETRIEVER in variants]
    pairs += [(v, against) for against in dict.fromkeys(b for b in ("prm", best_pathway) if b in valid_n6)
              for v in challengers]
    for v, against in pairs:
        s = significance(runs, per_list, v, against)
        sig.append(f"| {v} | {against} | {s['diff']:+.2f} | {s['wins']}/{s['seeds']} | {s['t_p']:.3g} | "
                   f"{s['list_wins']} / {s['list_losses']} | {s['wilcoxon_p']:.3g} |")

    curve_variants = [v for v in variants if v in ("prm", "prm-concat", best_base) or
                      (v in VARIANTS and VARIANTS[v].generator)]
    plots.valid_curves(epochs, curve_variants, out_dir / f"{name}_valid_n6.png", lambda_e)
    plots.noise_densities(noise, out_dir / f"{name}_noise.png")
    plots.dnr_curves(epochs, challengers, out_dir / f"{name}_dnr.png")
    stalled = _stalled(runs)
    controlled = controlled_rows(regimes, regime_lists, audit)
    if controlled:
        plots.controlled(controlled, out_dir / f"{name}_controlled.png")

    best = info.get("best_variant") or (max(valid_n6, key=lambda v: valid_n6[v]) if valid_n6 else "")
    shipped = info.get("shipped_variant", best)
    because = info.get("shipped_because", "the best variant on validation N@6")
    settings = {k: v for k, v in info.items()
                if k not in {"command", "stats_table", "best_variant", "shipped_variant", "shipped_because"}}
    banner = [] if default_audit["valid"] else [
        f"> **INVALID PROTOCOL.** The default sampler `{default}` fails the leakage audit: "
        + "; ".join(default_audit["reasons"]) + ". No figure below measures the reranker.", ""]
    wall = info.get("wall_seconds")
    lines = [
        f"# {name}: PRM baselines and the Denoising Neural Reranker on the retriever's candidate lists",
        "",
        f"Generated by `{info.get('command', 'python -m training pipeline')}` on {info.get('date', '?')} "
        f"(redraw from the saved runs: `python -m training report --name {name}`); do not edit by hand. "
        f"{info.get('jobs', 1)} training process(es) at once with {info.get('reranker', {}).get('threads', '?')} "
        f"torch thread(s) each, torch {info.get('torch', '?')}, device {info.get('device', 'cpu')}"
        + (f"; the pipeline ran {wall / 60:.1f} minutes to this report" if wall else "")
        + (f", training {info['runs_trained']} runs and reusing {info['runs_cached']} from the run cache (trained "
           "by an earlier invocation that was interrupted; their minutes are not in that figure)."
           if info.get("runs_cached") else "."),
        "",
        *banner,
        "## Leakage audit",
        "",
        *_audit_section(audit),
        "",
        *_sampler_note(audit),
        "",
        "## Data",
        "",
        info.get("stats_table", ""),
        "",
        "## Retriever",
        "",
        f"- Held-out AUC of the pre-validation MF (validation and test slate items against every item the user "
        f"never rated): {info.get('retriever_heldout_auc', float('nan')):.4f}",
        f"- Training lists are scored out of fold ({info.get('retriever', {}).get('folds', '?')} folds: a list's "
        "MF never saw its slate); validation and test lists by the MF fitted before each user's validation slate. "
        f"List AUC under the default sampler: train {default_audit['list_auc']['train']:.2f}, "
        f"valid {default_audit['list_auc']['valid']:.2f}, test {default_audit['list_auc']['test']:.2f}.",
        "",
        f"## Test metrics under the default sampler `{default}` (%, mean ± sample std over seeds)",
        "",
        *_table(test_rows, paper=True, bar=bar),
        "",
        *_bar_lines(test_rows, bar),
        "",
        "The paper's column is its ML-1M test N@6, for reference only (see deviations).",
        "",
        "## Validation metrics (%, best epoch by validation N@6)",
        "",
        *_table(summarise(runs, "valid")),
        "",
        f"Best variant on validation N@6: **{best}**. Best baseline on validation N@6: **{best_base}**; best score "
        f"pathway: **{best_pathway}**.",
        "",
        f"Ships (the exported default, what `make model` builds): **{shipped}**, {because}.",
        "",
        "## Significance (test N@6, two-sided)",
        "",
        *sig,
        "",
        "## What PRM learns from (ablations, one input at a time)",
        "",
        *_ablation(runs, per_list),
        "",
        "Each `prm-no-*` variant is PRM without one input (the exported graph keeps every input); each `prm-<pathway>` "
        "is PRM that also reads the retriever score. Validation N@6 decides; test is shown beside it.",
        "",
        "## Regimes: the key variants under each negative sampler",
        "",
        *_regimes_section(regimes, regime_lists, audit),
        "",
        "## Where the premise should hold: controlled retriever informativeness (semi-synthetic)",
        "",
        "**Semi-synthetic.** The retriever scores of these regimes are not a retriever's: x = sigmoid(logit(MF "
        "score) + gamma (2z - 1) + sigma n), n ~ N(0, 1), with gamma found by bisection so that the training lists' "
        "list AUC is the target; the lists are re-sorted by x. They set how much the score knows about the label, "
        "which real data does not let us vary, to show where denoising the score pays.",
        "",
        *_controlled_section(controlled),
        "",
        *([f"![DNR minus PRM and minus the best score pathway against the retriever's list AUC]({name}_controlled.png)",
           ""] if controlled else []),
        "## Seconds per epoch (training only, validation excluded; median over every epoch of every seed)",
        "",
        *([f"{info['jobs']} runs trained at once, each sharing the machine with the others: compare the ratios "
           "to PRM, not the seconds, with a run that had the machine to itself.", ""]
          if info.get("jobs", 1) > 1 else []),
        *_epoch_times(epochs, lambda_e),
        "",
        "## The paper's claims as targets",
        "",
        *_targets(runs, per_list, epochs, lambda_e, best_pathway),
        "",
        "## Validation N@6 over epochs",
        "",
        f"![validation N@6 over epochs]({name}_valid_n6.png)",
        "",
        "## DNR diagnostics",
        "",
        "Is x' a hard but honest version of the real score? The list AUC of x' against z on the validation lists "
        "(mean over seeds), beside the real scores' list AUC on the same lists, and each loss in the last epoch. "
        "An x' AUC near 100 means the reranker can read the label off x' (nothing to denoise); near 50, x' carries "
        "nothing; below 50, x' lies about the label.",
        "",
        *_diagnostics(epochs, challengers, lambda_e),
        "",
        f"![DNR losses and x' AUC per epoch]({name}_dnr.png)",
        "",
        f"![synthetic against true noise]({name}_noise.png)",
        "",
        "The noise plot is on the raw score scale. The reranker reads each score as its logit standardised within the "
        "list, and L_x matches x' to the real scores there (per label), so a learned x' may sit at another raw "
        "calibration than the real scores without the reranker seeing any difference; the x' AUC above is what it "
        "does see.",
        "",
        "Runs that did not learn (best epoch 0 or 1, or validation N@6 not above the retriever order's): "
        + ("; ".join(stalled) if stalled else "none") + ".",
        "",
        "## Deviations from the paper",
        "",
        *(f"- {d}" for d in DEVIATIONS),
        "",
        "## Settings",
        "",
        "```",
        *(f"{k}: {v}" for k, v in settings.items()),
        "```",
        "",
    ]
    path = out_dir / f"{name}.md"
    path.write_text("\n".join(lines))
    return path


def write_choices(out_dir: Path, name: str, variant: str, rows: list[dict[str, Any]], command: str) -> Path:
    """``<name>_choices.md``: one row per choice with its spread over seeds and its paired difference from the
    defaults; the pick is by validation N@6 only, among the rows that train ``variant``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    best = max((r for r in rows if r["variant"] == variant), key=lambda r: r["valid_N@6"])
    seeds = max(r["seeds"] for r in rows)
    lines = [f"# {name}: the choices the paper leaves open, for {variant}", "",
             f"Generated by `{command}` on {time.strftime('%Y-%m-%d')}; do not edit by hand. Each row changes one "
             "knob from the defaults; the choice is made on validation N@6 (test shown for reference only). "
             f"Δ is the mean over seeds of (choice − defaults) on the same seed, ± its std over seeds; wins counts "
             f"the seeds where the choice is above the defaults. With {seeds} seeds a Δ inside about two of its "
             "stds is noise.", "",
             "| choice | overrides | seeds | valid N@6 | Δ valid vs defaults | wins | best epochs | test N@6 "
             "| s/epoch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " **(best on validation)**" if r is best else ""
        overrides = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "-"
        epochs = ", ".join(str(e) for e in r["best_epochs"])
        lines.append(f"| {r['choice']}{mark} | {overrides} | {r['seeds']} | "
                     f"{r['valid_N@6']:.2f} ± {r['valid_std']:.2f} | {r['delta_valid']:+.2f} ± {r['delta_std']:.2f} | "
                     f"{r['wins']}/{r['seeds']} | {epochs} | "
                     f"{r['test_N@6']:.2f} | {r['seconds_per_epoch']:.1f} |")
    path = out_dir / f"{name}_choices.md"
    path.write_text("\n".join(lines) + "\n")
    return path
