"""The offline report ``reports/<dataset>.md``, rendered from the findings of the saved run files.

Owns: the markdown of each section (the leakage audit first, the main table against the best non-learned
ranking, the significance tests, the regimes, epoch times, targets, diagnostics, the deviations from the paper
with every setting in them taken from the run's own config), the summary ``<dataset>.csv``, the plots' file
names, and ``<dataset>_choices.md``. ``python -m training report`` redraws it without training. Does not know:
how the figures are worked out (``findings.py``), how runs were produced (``evaluate.py``) or how figures are
drawn (``plots.py``).
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from training import audit, data, generator, metrics, plots
from training.evaluate import BASELINES, PATHWAY_VARIANTS, RETRIEVER
from training.findings import Findings, RunFiles, epoch_seconds, find, mean_at, significance, values, variants_of
from training.model import EARLY_PATHWAYS
from training.train import VARIANTS, TrainConfig, feature_range

# The paper's ML-1M test N@6 (%), as quoted in DESIGN.md section 2; the paper's other cells are not copied here.
PAPER_ML1M_N6 = {"prm": 72.85, "prm-concat": 76.73, "dnr-g": 77.67, "dnr-b": 77.12}
DATASET_NAMES = {"ml100k": "MovieLens-100K", "ml1m": "MovieLens-1M", "table": "a ratings table"}
Lines = list[str]


def _table(rows: list[dict[str, Any]], paper: bool = False, bar: tuple[str, float] | None = None) -> Lines:
    """Mean ± std per metric; ``paper`` adds the paper's ML-1M N@6, ``bar`` the N@6 margin over the best
    non-learned ranking (name, N@6)."""
    head = "| variant | " + " | ".join(metrics.METRICS) + " | seeds |"
    head += f" N@6 − {bar[0]} order ({bar[1]:.2f}) |" if bar else ""
    head += " paper ML-1M N@6 |" if paper else ""
    lines = [head, "|---" * (len(metrics.METRICS) + 2 + paper + (bar is not None)) + "|"]
    for variant in dict.fromkeys(str(r["variant"]) for r in rows):
        cells = {str(r["metric"]): r for r in rows if r["variant"] == variant}
        n = cells[metrics.METRICS[0]]["n_seeds"]
        means = [f"{cells[m]['mean']:.2f} ± {cells[m]['std']:.2f}" for m in metrics.METRICS]
        line = f"| {variant} | " + " | ".join(means) + f" | {n} |"
        if bar:
            line += " |" if variant == RETRIEVER else f" {float(cells['N@6']['mean']) - bar[1]:+.2f} |"
        if paper:
            line += f" {PAPER_ML1M_N6[variant]:.2f} |" if variant in PAPER_ML1M_N6 else " |"
        lines.append(line)
    return lines


def _significance_head(by_sampler: bool = False) -> Lines:
    """The head of a table of (variant, against) tests; ``by_sampler`` adds a first column naming the regime."""
    return [("| sampler " if by_sampler else "") + "| variant | vs | Δ test N@6" + ("" if by_sampler else
            " (mean over seeds)") + " | seeds won | paired t-test p | lists won / lost | Wilcoxon p (lists) |",
            "|---" * (7 + by_sampler) + "|"]


def _significance_row(v: str, against: str, s: dict[str, float], sampler: str | None = None) -> str:
    lead = f"| {sampler} " if sampler is not None else ""
    return (lead + f"| {v} | {against} | {s['diff']:+.2f} | {s['wins']}/{s['seeds']} | {s['t_p']:.3g} | "
            f"{s['list_wins']} / {s['list_losses']} | {s['wilcoxon_p']:.3g} |")


def _epoch_times(epochs: list[dict[str, str]], lambda_e: int) -> Lines:
    prm = epoch_seconds(epochs, "prm")
    lines = ["| variant | s / epoch (all epochs) | x PRM | s / epoch with the generator (epochs > lambda_e) | x PRM |",
             "|---|---|---|---|---|"]
    for v in variants_of(epochs):
        s = epoch_seconds(epochs, v)
        if VARIANTS[v].generator:
            g = epoch_seconds(epochs, v, lambda_e)
            lines.append(f"| {v} | {s:.2f} | {s / prm:.2f} | {g:.2f} | {g / prm:.2f} |")
        else:
            lines.append(f"| {v} | {s:.2f} | {s / prm:.2f} | | |")
    return lines


def _targets(f: Findings) -> Lines:
    """The targets: PRM at least 5 points above the retriever order; DNR above PRM and above the best score
    pathway on test N@6 with p < 0.05; DNR's epoch time with the generator at most 1.3x PRM's."""
    runs, per_list, epochs = f.files.runs, f.files.per_list, f.files.epochs
    ran = {r["variant"] for r in runs}
    lines = ["| target | measured | met |", "|---|---|---|"]
    if "prm" in ran and RETRIEVER in ran:
        s = significance(runs, per_list, "prm", RETRIEVER)
        lines.append(f"| prm >= 5 points above the retriever order on test N@6 | Δ {s['diff']:+.2f}, t-test p "
                     f"{s['t_p']:.3g} | {'yes' if s['diff'] >= 5 else 'no'} |")
    for v in (v for v in ("dnr-g", "dnr-b", "dnr-m") if v in ran):
        for against in dict.fromkeys(a for a in ("prm", f.best_pathway) if a in ran):
            s = significance(runs, per_list, v, against)
            met = s["diff"] > 0 and s["wilcoxon_p"] < 0.05 and s["t_p"] < 0.05
            lines.append(f"| {v} above {against} on test N@6, p < 0.05 | Δ {s['diff']:+.2f}, t-test p "
                         f"{s['t_p']:.3g}, Wilcoxon p {s['wilcoxon_p']:.3g} | {'yes' if met else 'no'} |")
        if "prm" in ran:
            ratio = epoch_seconds(epochs, v, f.lambda_e) / epoch_seconds(epochs, "prm")
            lines.append(f"| {v} s / epoch with the generator <= 1.3 x prm | {ratio:.2f} x | "
                         f"{'yes' if ratio <= 1.3 else 'no'} |")
    return lines


def _ablation(runs: list[dict[str, str]], per_list: list[dict[str, str]]) -> Lines:
    """What PRM learns from: each ablation variant (and each score pathway) against prm, validation and test."""
    variants = variants_of(runs)
    if "prm" not in variants:
        return []
    rows = [v for v in variants if v in VARIANTS and (VARIANTS[v].without or v in PATHWAY_VARIANTS)]
    prm_valid = np.mean(list(values(runs, "prm", "valid", "N@6").values()))
    lines = ["| variant | what changes | valid N@6 | Δ valid vs prm | Δ test vs prm | paired t-test p | "
             "Wilcoxon p (lists) |", "|---|---|---|---|---|---|---|"]
    for v in rows:
        spec = VARIANTS[v]
        change = f"without {spec.without.replace('_', ' ')}" if spec.without else f"reads the score ({spec.pathway})"
        valid = np.mean(list(values(runs, v, "valid", "N@6").values()))
        s = significance(runs, per_list, v, "prm")
        lines.append(f"| {v} | {change} | {valid:.2f} | {valid - prm_valid:+.2f} | {s['diff']:+.2f} | "
                     f"{s['t_p']:.3g} | {s['wilcoxon_p']:.3g} |")
    return lines


def _audit_table(audit_doc: dict[str, Any]) -> Lines:
    """The leakage audit of every sampler: non-learned rankings' test N@6, retriever list AUCs, verdict."""
    default = audit_doc["default"]
    rankings = list(next(iter(audit_doc["samplers"].values()))["n6"])
    lines = ["| sampler | " + " | ".join(rankings) + " | retriever list AUC train / valid / test | verdict |",
             "|---" * (len(rankings) + 3) + "|"]
    for sampler, a in audit_doc["samplers"].items():
        auc = a["list_auc"]
        label = f"**{sampler}** (default)" if sampler == default else sampler
        verdict = "VALID" if a["valid"] else "**INVALID**"
        lines.append(f"| {label} | " + " | ".join(f"{a['n6'][r]:.2f}" for r in rankings) +
                     f" | {auc['train']:.1f} / {auc['valid']:.1f} / {auc['test']:.1f} | {verdict} |")
    n_lists = next(iter(audit_doc["samplers"].values()))["lists"]
    lines += ["", f"Test N@6 (%) of rankings that learn nothing, on the {n_lists} test lists of each sampler. A "
              "protocol is valid when reversed retriever order is below retriever order, memorisation (per user, "
              "items labelled 0 in that user's training lists go last) is no "
              "better than random order plus noise (max(1 point, 3 standard errors of the per-list difference)), "
              f"and the retriever's list AUC on training lists is within {audit.MAX_AUC_GAP:g} points of its AUC on "
              "validation lists (the score must mean the same on the lists a reranker learns from as on those it is "
              "served)."]
    for sampler, a in audit_doc["samplers"].items():
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


def _sampler_note(audit_doc: dict[str, Any]) -> Lines:
    """Which samplers pass, how far popularity alone gets under each, and why the default is the default."""
    samplers = audit_doc["samplers"]
    margin = ", ".join(f"{s} {a['n6']['popularity'] - a['n6']['random']:+.2f}" for s, a in samplers.items())
    passing = [s for s, a in samplers.items() if a["valid"]]
    default = audit_doc["default"]
    lines = [f"Samplers that pass the audit: {', '.join(passing) or 'none'}. Popularity order minus random order "
             f"(test N@6 points): {margin}."]
    if default in SAMPLER_RATIONALE:
        lines.append(f"The default sampler is `{default}` (`--sampler`): {SAMPLER_RATIONALE[default]}")
    return [" ".join(lines)]


def _regimes_table(f: Findings) -> Lines:
    """Test N@6 of the key variants under each sampler, and DNR against PRM and the best pathway there."""
    regimes, audit_doc = f.files.regimes, f.files.audit
    samplers = list(dict.fromkeys(r["sampler"] for r in regimes))
    variants = variants_of(regimes)
    lines = ["| sampler | audit | " + " | ".join(variants) + " |", "|---" * (len(variants) + 2) + "|"]
    for sampler in samplers:
        runs = [r for r in regimes if r["sampler"] == sampler]
        cells = []
        for v in variants:
            xs = np.array(list(values(runs, v, "test", "N@6").values()))
            std = f" ± {xs.std(ddof=1):.2f}" if len(xs) > 1 else ""
            cells.append(f"{xs.mean():.2f}{std} ({len(xs)})" if len(xs) else "")
        valid = audit_doc["samplers"].get(sampler, {}).get("valid")
        verdict = "VALID" if valid else "INVALID" if valid is not None else "?"
        default = " (default)" if sampler == audit_doc["default"] else ""
        lines.append(f"| {sampler}{default} | {verdict} | " + " | ".join(cells) + " |")
    return [*lines, "", "Test N@6 (%), mean ± sample std over seeds (number of seeds). The default sampler's row "
            "reuses the main table's runs.", ""]


def _regimes_tests(f: Findings) -> Lines:
    regimes = f.files.regimes
    variants = variants_of(regimes)
    dnr = [v for v in variants if v in VARIANTS and VARIANTS[v].synthetic]
    pairs = [(v, RETRIEVER) for v in variants if v != RETRIEVER and RETRIEVER in variants]
    pairs += [(v, against) for v in dnr for against in variants if against in BASELINES]
    lines = _significance_head(by_sampler=True)
    for sampler in dict.fromkeys(r["sampler"] for r in regimes):
        runs = [r for r in regimes if r["sampler"] == sampler]
        per_list = [r for r in f.files.regime_lists if r["sampler"] == sampler]
        lines += [_significance_row(v, against, significance(runs, per_list, v, against), sampler)
                  for v, against in pairs]
    return lines


def _controlled_table(rows: list[dict[str, Any]]) -> Lines:
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


def _bar_lines(f: Findings) -> Lines:
    """Which learned variants clear the best non-learned ranking on test N@6 (mean over seeds)."""
    name, level = f.bar
    n6 = {str(r["variant"]): float(r["mean"]) for r in f.test_rows
          if r["metric"] == "N@6" and r["variant"] != RETRIEVER}
    below = [v for v, x in n6.items() if x <= level]
    if not n6:
        return []
    if not below:
        return [f"Every learned variant beats the best ranking that learns nothing ({name} order, "
                f"{level:.2f}) on mean test N@6."]
    return [f"**Not above the best ranking that learns nothing** ({name} order, {level:.2f}) on mean test "
            f"N@6: {', '.join(below)}."]


def _diagnostics_table(epochs: list[dict[str, str]], variants: list[str], switch: int) -> Lines:
    """Per synthetic variant: list AUC of x' against z (first epoch, last heuristic epoch, last epoch) beside the
    real scores' list AUC, and the losses of the last epoch (means over seeds)."""
    keys = ["L_direct", "L_z", "L_adv", "L_x"]
    lines = ["| variant | real x AUC | x' AUC, epoch 1 | x' AUC, epoch lambda_e | x' AUC, last epoch | "
             + " | ".join(f"{k}, last epoch" for k in keys) + " |", "|---" * (5 + len(keys)) + "|"]
    for v in variants:
        rows = [r for r in epochs if r["variant"] == v]
        cells = [mean_at(rows, "x_auc", "last"), mean_at(rows, "xprime_auc", "first"),
                 mean_at(rows, "xprime_auc", "switch", switch) if VARIANTS[v].generator else float("nan"),
                 mean_at(rows, "xprime_auc", "last")]
        losses = [mean_at(rows, k, "last") for k in keys]
        lines.append(f"| {v} | " + " | ".join("" if np.isnan(c) else f"{c:.1f}" for c in cells) + " | "
                     + " | ".join("" if np.isnan(c) else f"{c:.4f}" for c in losses) + " |")
    return lines


# ---- the deviations from the paper, each setting in them read from the run's own config ------------------


def _default(fn: Callable[..., Any], name: str) -> Any:
    """The code's default for ``fn``'s parameter ``name``: a constant the run config does not carry."""
    return inspect.signature(fn).parameters[name].default


def run_config(info: dict[str, Any]) -> TrainConfig:
    """The reranker settings that ran (``_info.json``); a key an older run did not save takes the code's default."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in info.get("reranker", {}).items() if k in names})


def _data_deviations(info: dict[str, Any]) -> Lines:
    dataset = info.get("data", {}).get("dataset", "ml100k")
    if "source" in info.get("retriever", {}):
        return [f"**Data: a candidate log, not ML-1M** ({info.get('lists', {}).get('source', '?')}). The paper's "
                "ML-1M numbers are beside ours for orientation only.",
                "**Candidate lists** are the logged requests with the production retriever's scores and the logged "
                "feedback, as in the paper's own setting (a retriever's exposure log); no negatives are drawn and no "
                "MF of ours scores them, so the sampler regimes and the paper's protocol are not run."]
    slate, candidates = _default(data.prepare, "slate_size"), info.get("lists", {}).get("candidates", "?")
    negatives = candidates - slate if isinstance(candidates, int) else "?"
    folds = info.get("retriever", {}).get("folds", "?")
    head = (f"**Data: {DATASET_NAMES.get(dataset, dataset)}, not ML-1M.** ML-1M cannot be downloaded here "
            "(`--dataset ml1m --path DIR` runs the same pipeline on it). The paper's ML-1M numbers are beside ours "
            "for orientation only; they are not comparable in level (different data, different candidate "
            "generation).") if dataset != "ml1m" else (
            "**Data: ML-1M, as the paper**, but not its candidate lists: the paper's numbers are beside ours for "
            "orientation only.")
    return [head,
            "**Candidate lists.** The paper's lists come from a production retriever's exposure logs; MovieLens has "
            f"no exposure, so each list is a {slate}-item slate plus {negatives} negatives drawn for that list alone, "
            f"scored by an MF that did not see the slate (out of fold over {folds} folds for training lists, fitted "
            "before validation for validation and test lists). The default sampler and the evidence for it are in "
            "the audit section; the regimes table shows the others. A training list's MF has seen the user's later "
            "training slates (it leaves out only its own fold), so no item the user meets before validation is a "
            f"negative of any list: labelled 0, such items had filled 49% of the retriever's top {slate} on training "
            "lists (0% on test lists) and taught the reranker that a high score means a "
            "negative. The list AUC on training lists is reported beside the test one."]


def _schedule_deviations(c: TrainConfig) -> Lines:
    share = f" of {c.epochs}" if c.lambda_e < 1 else ""
    schedule = "constant" if c.schedule == "constant" else f"cosine down to {c.lr_min:g} x lr at the last epoch"
    return [f"**Model size and schedule.** Hidden {c.hidden}, {c.heads} attention heads and {c.layers} "
            f"candidate-transformer layer(s) (paper: hidden 128), batch {c.batch_size} lists (paper: 2048), AdamW at "
            f"lr {c.lr:g} with weight decay {c.weight_decay:g}, a {c.warmup:g}-epoch linear warm-up then a {schedule} "
            f"learning rate, dropout {c.dropout:g}; at most {c.epochs} epochs, of which the first {c.switch_epoch} "
            f"(lambda_e {c.lambda_e:g}{share}) use heuristic noise (paper: lambda_e 40 epochs on ML-1M).",
            f"**Early stopping** on validation N@6 with patience {c.patience}; generator variants never stop before "
            f"the generator has trained {c.patience} epochs. The reported model is the epoch with the best validation "
            "N@6. A run whose best epoch is 0 or 1 is flagged in the diagnostics section."]


def _score_deviations(c: TrainConfig) -> Lines:
    reads = ("the score's logit standardised within the list" if c.score_input == "list"
             else "the score as the retriever sent it")
    where = ("enters before the candidate encoder, so the real and the synthetic scores each take an encoder pass"
             if c.dnr_pathway in EARLY_PATHWAYS else
             "joins after the candidate encoder" + (", the paper's fusion point" if c.dnr_pathway == "late" else "")
             + ", so one encoder pass serves the real and the synthetic scores of a reranker step")
    return [f"**Score pathways** read {reads} (`score_input` {c.score_input}), and on {c.score_dropout:.0%} of the "
            "training lists not at all (`score_dropout`; the real scores only: DNR's synthetic scores are never "
            f"blanked). DNR's pathway is `{c.dnr_pathway}` (`dnr_pathway`): the score {where}.",
            "**Positions under synthetic scores.** The L_z pass keeps the real retriever positions and feeds x' to "
            "the score pathway only (the paper does not say); re-deriving positions from x' would hand the position "
            "embedding the labels."]


def _generator_deviations(c: TrainConfig) -> Lines:
    lam = c.gen_lambda_c
    output = "so it outputs x' itself" if lam == 1 else f"so x' = {1 - lam:g} z + {lam:g} x its output"
    reads = "the reranker's user state and candidate embedding (detached), z and" if c.gen_condition else "z and"
    noise_dim = _default(generator.NoiseGenerator.__init__, "noise_dim")
    start = ("During the heuristic epochs it is fitted to L_x alone (`gen_warmup`; Algorithm 1 leaves it untrained "
             "until lambda_e), so that it starts from realistic scores, then" if c.gen_warmup else
             "It is left untrained during the heuristic epochs, as in Algorithm 1, then")
    every = "after each reranker step" if c.gen_every == 1 else f"after every {c.gen_every} reranker steps"
    return [f"**Model-based generator** (section 3.3): lambda_c {lam:g}, {output} (`gen_lambda_c`); a 2-layer MLP "
            f"(hidden {c.gen_hidden}) on {reads} {noise_dim} standard-normal inputs per candidate, through "
            f"Linear-ReLU-Linear-sigmoid, trained by Adam at lr {c.gen_lr:g}. {start} Algorithm 1: per batch a "
            f"reranker step on x' from the generator, and {every} a generator step against the frozen reranker "
            f"in eval mode (`gen_every` {c.gen_every})."]


def _loss_deviations(c: TrainConfig) -> Lines:
    eq7 = ", ".join(f"`{v}`" for v, spec in VARIANTS.items() if spec.generator and not spec.calibrated)
    lo, hi = feature_range(c.score_input)
    feature = "the standardised score logit" if c.score_input == "list" else "the raw score"
    bins = _default(generator.soft_histogram, "bins")
    distance = (f"KL between soft histograms ({bins} Gaussian-kernel bins on [{lo:g}, {hi:g}])"
                if c.lx_estimator == "kl" else "the 1-Wasserstein distance between them")
    per = ("per label (x'|z against x|z, summed; `--no-lx-conditional`: the marginal, as the paper)"
           if c.lx_conditional else "on the marginal, as the paper (`--lx-conditional`: per label)")
    return [f"**L_adv** is Eq. 5's E[log q(z|x') - log p(z|x')], with p(z|x) estimated by a logistic fit of z on the "
            "score feature of the real training lists. The paper minimises log q(z|x') alone (Eq. 7), which rewards a "
            f"generator for scores that invert the label (variant {eq7 or 'none'} keeps it, to show what it does).",
            f"**L_x** (paper: a KL between synthetic and real scores), weighted lambda_x {c.lambda_x:g}, is computed "
            f"on what the reranker reads: {feature} of x' against that of the real scores, {distance}, {per}. "
            f"`--lx-estimator {'w1' if c.lx_estimator == 'kl' else 'kl'}` is the other estimator."]


def _noise_deviations(c: TrainConfig) -> Lines:
    clipped = "eps" if c.noise_clip else "x'"
    draws = _default(audit.audit, "draws")
    return [f"**Heuristic noise.** Gaussian (paper silent on parameters and clipping): eps ~ N({c.noise_mu:g}, "
            f"{c.noise_sigma:g}^2), {clipped} clipped to [0, 1]; Beta({c.beta_alpha:g}, {c.beta_beta:g}) (paper: "
            f"Beta(0.5, 0.5)); both at lambda_c {c.lambda_c:g} (paper: 0.4), with L_z weighted lambda_m "
            f"{c.lambda_m:g} (paper: 0.4). `m` / `dnr-m`: x'|z ~ a Beta fitted by moments to the real training "
            "scores of label z, i.e. noise x' - z distributed like the observed x - z (lambda_c 1), the 'align with "
            "the observed noise' option of section 3.3.",
            "**Significance**: a paired t-test over seeds (one pair per seed: few pairs, weak) and a Wilcoxon "
            "signed-rank test over the test lists (each list's N@6 averaged over seeds). The paper does not say "
            "which test it used.",
            "**Memorisation** in the audit orders each group (items the user had labelled 0 in a training list, the "
            f"others) at random, so it measures memory alone; random and memorisation are averaged over {draws} "
            "draws."]


def deviations(info: dict[str, Any]) -> Lines:
    """The deviations from the paper, one bullet each, every setting in them from ``info`` (the run's config)."""
    c = run_config(info)
    return [*_data_deviations(info), *_schedule_deviations(c), *_score_deviations(c), *_generator_deviations(c),
            *_loss_deviations(c), *_noise_deviations(c)]


# ---- the report, section by section ------------------------------------------------------------------------


def _header(f: Findings, name: str) -> Lines:
    info, da = f.files.info, f.default_audit
    wall = info.get("wall_seconds")
    banner = [] if da["valid"] else [
        f"> **INVALID PROTOCOL.** The default sampler `{f.default}` fails the leakage audit: "
        + "; ".join(da["reasons"]) + ". No figure below measures the reranker.", ""]
    return [
        f"# {name}: PRM baselines and the Denoising Neural Reranker on the retriever's candidate lists", "",
        f"Generated by `{info.get('command', 'python -m training pipeline')}` on {info.get('date', '?')} "
        f"(redraw from the saved runs: `python -m training report --name {name}`); do not edit by hand. "
        f"{info.get('jobs', 1)} training process(es) at once with {f.reranker.get('threads', '?')} "
        f"torch thread(s) each, torch {info.get('torch', '?')}, device {info.get('device', 'cpu')}"
        + (f"; the pipeline ran {wall / 60:.1f} minutes to this report" if wall else "")
        + (f", training {info['runs_trained']} runs and reusing {info['runs_cached']} from the run cache (trained "
           "by an earlier invocation that was interrupted; their minutes are not in that figure)."
           if info.get("runs_cached") else "."),
        "", *banner]


def _audit(f: Findings, name: str) -> Lines:
    return ["## Leakage audit", "", *_audit_table(f.files.audit), "", *_sampler_note(f.files.audit), ""]


def _data(f: Findings, name: str) -> Lines:
    info, auc = f.files.info, f.default_audit["list_auc"]
    if "source" in info.get("retriever", {}):  # a candidate log: the lists and their scores are the log's own
        return [
            "## Data", "", info.get("stats_table", ""), "", "## Retriever", "",
            f"- The lists are the logged requests of {info.get('lists', {}).get('source', 'a candidate log')}, "
            "scored by the production retriever; each user's last request is a test list, the one before a "
            "validation list, the rest training lists (`training/candidate_log.py`).",
            f"- List AUC of the logged scores: train {auc['train']:.2f}, valid {auc['valid']:.2f}, "
            f"test {auc['test']:.2f}.", ""]
    return [
        "## Data", "", info.get("stats_table", ""), "", "## Retriever", "",
        f"- Held-out AUC of the pre-validation MF (validation and test slate items against every item the user "
        f"never rated): {info.get('retriever_heldout_auc', float('nan')):.4f}",
        f"- Training lists are scored out of fold ({info.get('retriever', {}).get('folds', '?')} folds: a list's "
        "MF never saw its slate); validation and test lists by the MF fitted before each user's validation slate. "
        f"List AUC under the default sampler: train {auc['train']:.2f}, valid {auc['valid']:.2f}, "
        f"test {auc['test']:.2f}.", ""]


def _metrics(f: Findings, name: str) -> Lines:
    return [
        f"## Test metrics under the default sampler `{f.default}` (%, mean ± sample std over seeds)", "",
        *_table(f.test_rows, paper=True, bar=f.bar), "", *_bar_lines(f), "",
        "The paper's column is its ML-1M test N@6, for reference only (see deviations).", "",
        "## Validation metrics (%, best epoch by validation N@6)", "", *_table(f.valid_rows), "",
        f"Best variant on validation N@6: **{f.best}**. Best baseline on validation N@6: **{f.best_base}**; best score "
        f"pathway: **{f.best_pathway}**.", "",
        f"Ships (the exported default, what `make model` builds): **{f.shipped}**, {f.shipped_because}.", "",
        "## Significance (test N@6, two-sided)", "", *_significance_head(),
        *(_significance_row(v, against, s) for v, against, s in f.significance), ""]


def _ablations(f: Findings, name: str) -> Lines:
    return [
        "## What PRM learns from (ablations, one input at a time)", "", *_ablation(f.files.runs, f.files.per_list), "",
        "Each `prm-no-*` variant is PRM without one input (the exported graph keeps every input); each `prm-<pathway>` "
        "is PRM that also reads the retriever score. Validation N@6 decides; test is shown beside it.", ""]


def _regimes(f: Findings, name: str) -> Lines:
    return ["## Regimes: the key variants under each negative sampler", "", *_regimes_table(f), *_regimes_tests(f), ""]


def _controlled(f: Findings, name: str) -> Lines:
    alt = "DNR minus PRM and minus the best score pathway against the retriever's list AUC"
    figure = [f"![{alt}]({name}_controlled.png)", ""] if f.controlled else []
    return [
        "## Where the premise should hold: controlled retriever informativeness (semi-synthetic)", "",
        "**Semi-synthetic.** The retriever scores of these regimes are not a retriever's: x = sigmoid(logit(MF "
        "score) + gamma (2z - 1) + sigma n), n ~ N(0, 1), with gamma found by bisection so that the training lists' "
        "list AUC is the target; the lists are re-sorted by x. They set how much the score knows about the label, "
        "which real data does not let us vary, to show where denoising the score pays.", "",
        *_controlled_table(f.controlled), "", *figure]


def _epochs(f: Findings, name: str) -> Lines:
    jobs = f.files.info.get("jobs", 1)
    shared = [f"{jobs} runs trained at once, each sharing the machine with the others: compare the ratios to PRM, "
              "not the seconds, with a run that had the machine to itself.", ""] if jobs > 1 else []
    return ["## Seconds per epoch (training only, validation excluded; median over every epoch of every seed)", "",
            *shared, *_epoch_times(f.files.epochs, f.lambda_e), "",
            "## The paper's claims as targets", "", *_targets(f), "",
            "## Validation N@6 over epochs", "", f"![validation N@6 over epochs]({name}_valid_n6.png)", ""]


def _diagnostics(f: Findings, name: str) -> Lines:
    return [
        "## DNR diagnostics", "",
        "Is x' a hard but honest version of the real score? The list AUC of x' against z on the validation lists "
        "(mean over seeds), beside the real scores' list AUC on the same lists, and each loss in the last epoch. "
        "An x' AUC near 100 means the reranker can read the label off x' (nothing to denoise); near 50, x' carries "
        "nothing; below 50, x' lies about the label.", "",
        *_diagnostics_table(f.files.epochs, f.challengers, f.lambda_e), "",
        f"![DNR losses and x' AUC per epoch]({name}_dnr.png)", "",
        f"![synthetic against true noise]({name}_noise.png)", "",
        "The noise plot is on the raw score scale. The reranker reads each score as its logit standardised within the "
        "list, and L_x matches x' to the real scores there (per label), so a learned x' may sit at another raw "
        "calibration than the real scores without the reranker seeing any difference; the x' AUC above is what it "
        "does see.", "",
        "Runs that did not learn (best epoch 0 or 1, or validation N@6 not above the retriever order's): "
        + ("; ".join(f.stalled) if f.stalled else "none") + ".", ""]


SETTINGS_HIDDEN = {"command", "stats_table", "best_variant", "shipped_variant", "shipped_because"}


def _deviations_and_settings(f: Findings, name: str) -> Lines:
    settings = {k: v for k, v in f.files.info.items() if k not in SETTINGS_HIDDEN}
    return ["## Deviations from the paper", "", *(f"- {d}" for d in deviations(f.files.info)), "",
            "## Settings", "", "```", *(f"{k}: {v}" for k, v in settings.items()), "```", ""]


SECTIONS: tuple[Callable[[Findings, str], Lines], ...] = (
    _header, _audit, _data, _metrics, _ablations, _regimes, _controlled, _epochs, _diagnostics,
    _deviations_and_settings)


def render(f: Findings, name: str) -> str:
    """The markdown of ``<name>.md``."""
    return "\n".join(line for section in SECTIONS for line in section(f, name))


def write_report(out_dir: Path, name: str) -> Path:
    """``<name>.md`` and ``<name>.csv`` (test summary) and the plots, from the saved run files."""
    f = find(RunFiles.read(out_dir, name))
    with open(out_dir / f"{name}.csv", "w", newline="") as out:
        summary = csv.DictWriter(out, fieldnames=["variant", "metric", "mean", "std", "n_seeds"])
        summary.writeheader()
        summary.writerows(f.test_rows)
    plots.valid_curves(f.files.epochs, f.curve_variants, out_dir / f"{name}_valid_n6.png", f.lambda_e)
    plots.noise_densities(f.files.noise, out_dir / f"{name}_noise.png")
    plots.dnr_curves(f.files.epochs, f.challengers, out_dir / f"{name}_dnr.png")
    if f.controlled:
        plots.controlled(f.controlled, out_dir / f"{name}_controlled.png")
    path = out_dir / f"{name}.md"
    path.write_text(render(f, name))
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
