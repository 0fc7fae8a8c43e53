"""`make bench`'s analysis and report: from the saved ``benchmark.json`` to ``benchmark.md`` and ``benchmark.png``.

Owns: the summary over repeats (best throughput under the p99 budget, worker speed-up, CPU per request against its
parts, the one-connection bound, the A/B against another checkout), the admission table and its checks, and the
markdown and plot. ``python -m loadtest.bench --replot`` redraws them without running anything. Does not know: how
the levels were run (``bench.py``, ``levels.py``).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.levels import P99_BUDGET_MS, best_under, peak_2xx
from loadtest.measure import median_known, spread

DEADLINE_S = 0.100  # the service's default deadline: the bodies carry no timeout_ms
# Admission targets (issue 24): where the Little's-law wait (connections / peak model answers/s) fits the deadline,
# refusals <= 1% of answers; where it does not, the door's 429 p99 <= 5 ms and >= 99% of admitted requests are
# answered by the model inside their deadline (not a deadline fallback).
ADMISSION = {"refusals_per_answer": 0.01, "refusal_p99_ms": 5.0, "admitted_on_time": 0.99}
TARGETS = {"workers_speedup": 1.5, "cpu_per_request_vs_parts": 1.2, "c1_p50_vs_bound": 1.3}


def model_cpu_us_per_list(model: list[dict[str, Any]], batch: float) -> float:
    """The wrapper's CPU per list at a (mean) batch size, interpolated in log batch size."""
    sizes = np.log([r["batch"] for r in model])
    return float(np.interp(np.log(max(batch, 1.0)), sizes, [r["rank_cpu_us_per_list"] for r in model]))


def summarise(repeats: list[dict[str, Any]], model: list[dict[str, Any]], workers: int) -> dict[str, Any]:
    """Per repeat, then the spread: best throughput at p99 <= 10 ms per target, N-worker speed-up, CPU per
    request against its parts (ceiling + model at the mean batch the service ran), one-connection p50."""
    names = ["service x1", f"service x{workers}", "ceiling x1", f"ceiling x{workers}"]
    per: dict[str, list[float]] = {}
    b1 = next(r for r in model if r["batch"] == 1)

    def add(key: str, value: float | None) -> None:
        if value is not None:
            per.setdefault(key, []).append(value)

    for rep in repeats:
        by = {n: [lv for lv in rep["closed"] if lv["target"] == n] for n in names}
        best = {n: best_under(by[n]) for n in names}
        # 2xx answers only: a level where admission refused some (429) does not count its refusals as served
        peak = {n: peak_2xx(by[n]) for n in names}
        for n in names:
            add(f"rps {n}", best[n]["throughput_rps"] if best[n] else 0.0)
            add(f"peak rps {n}", peak[n])
        if best[names[0]] and best[names[1]]:
            add("speedup", best[names[1]]["throughput_rps"] / best[names[0]]["throughput_rps"])
        if peak[names[0]] and peak[names[2]]:  # at any latency: what the cores allow, beside the bare HTTP stack's
            add("peak speedup service", peak[names[1]] / peak[names[0]])
            add("peak speedup ceiling", peak[names[3]] / peak[names[2]])
        for n, ceiling in ((names[0], names[2]), (names[1], names[3])):
            b = best[n]
            if b is None or b.get("mean_batch") is None:
                continue
            ceil_level = next(lv for lv in by[ceiling] if lv["connections"] == b["connections"])
            parts = ceil_level["server_cpu_us_per_request"] + model_cpu_us_per_list(model, b["mean_batch"])
            add(f"cpu ratio {n}", b["server_cpu_us_per_request"] / parts)
            add(f"cpu us {n}", b["server_cpu_us_per_request"])
            add(f"cpu parts us {n}", parts)
            add(f"mean batch {n}", b["mean_batch"])
        c1 = {n: next((lv for lv in by[n] if lv["connections"] == 1), None) for n in names}
        if c1[names[0]] and c1[names[2]]:
            bound = c1[names[2]]["p50_ms"] + b1["ort"]["p50_ms"]
            add("c1 p50 service", c1[names[0]]["p50_ms"])
            add("c1 p50 ceiling", c1[names[2]]["p50_ms"])
            add("c1 bound", bound)
            add("c1 ratio", c1[names[0]]["p50_ms"] / bound)
    out = {k: spread(v) for k, v in per.items()}
    get = lambda k: out.get(k, {}).get("median", float("nan"))  # noqa: E731
    out["targets"] = {
        f"{workers} workers >= {TARGETS['workers_speedup']}x one worker's throughput at p99 <= 10 ms":
            get("speedup") >= TARGETS["workers_speedup"],
        f"service CPU/request <= {TARGETS['cpu_per_request_vs_parts']}x (ceiling + model at the mean batch), "
        f"{workers} workers": get(f"cpu ratio {names[1]}") <= TARGETS["cpu_per_request_vs_parts"],
        f"one-connection p50 <= {TARGETS['c1_p50_vs_bound']}x (ceiling p50 + model batch-1 p50)":
            get("c1 ratio") <= TARGETS["c1_p50_vs_bound"],
    }
    out["model_b1_p50_ms"] = b1["ort"]["p50_ms"]
    out.update(compare_ab(repeats, workers))
    return out


def compare_ab(repeats: list[dict[str, Any]], workers: int) -> dict[str, Any]:
    """With --compare: per worker count, the other checkout's (B) best throughput at p99 <= 10 ms and peak 2xx
    rate, and this checkout's (A) over B's, each per repeat, then the spread. Empty without B."""
    per: dict[str, list[float]] = {}
    for rep in repeats:
        for w in sorted({1, workers}):
            a = [lv for lv in rep["closed"] if lv["target"] == f"service x{w}"]
            b = [lv for lv in rep["closed"] if lv["target"] == f"service-B x{w}"]
            if not a or not b:
                continue
            best_a, best_b = best_under(a), best_under(b)
            peak_a, peak_b = peak_2xx(a), peak_2xx(b)
            per.setdefault(f"rps service-B x{w}", []).append(best_b["throughput_rps"] if best_b else 0.0)
            per.setdefault(f"peak rps service-B x{w}", []).append(peak_b)
            if best_a and best_b:
                per.setdefault(f"ab ratio x{w}", []).append(best_a["throughput_rps"] / best_b["throughput_rps"])
            if peak_b:
                per.setdefault(f"ab peak ratio x{w}", []).append(peak_a / peak_b)
    return {k: spread(v) for k, v in per.items()}


def admission(repeats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per service target and connection count, over the repeats: model answers/s, refusals (non-2xx, all 429 from
    admission here) per second and per answer, the door's 429 p99, the share of admitted requests the model answered
    inside the deadline, CPU per answer and per 429, the Little's-law wait at the target's peak, and the checks.

    CPU per 429 is estimated per level as (server CPU - answers x CPU per answer) / refusals, with CPU per answer
    from the same repeat's highest level of that target that refused under 1% of its answers."""
    rows: list[dict[str, Any]] = []
    names = sorted({lv["target"] for rep in repeats for lv in rep["closed"]
                    if lv["target"].startswith("service") and "model_answers_rps" in lv})
    for name in names:
        per_level: dict[int, list[dict[str, Any]]] = {}
        for rep in repeats:
            levels = [lv for lv in rep["closed"] if lv["target"] == name]
            clean = [lv for lv in levels if lv["non_2xx"] <= 0.01 * max(lv["answers"], 1) and lv["answers"]]
            ref = max(clean, key=lambda lv: lv["connections"]) if clean else None
            cpu_answer = ref["server_cpu_s"] / ref["answers"] if ref else None
            for lv in levels:
                cell = {"answers_rps": lv["model_answers_rps"], "refusals_rps": lv["non_2xx"] / lv["wall_s"],
                        "refusals_per_answer": lv["non_2xx"] / max(lv["answers"], 1),
                        "refusal_p99_ms": lv.get("refusal_p99_ms"),
                        "on_time": 1 - lv["fallbacks"] / lv["answers"] if lv["answers"] else None,
                        "cpu_us_per_answer": cpu_answer * 1e6 if cpu_answer else None, "cpu_us_per_refusal": None}
                if cpu_answer and lv["non_2xx"] > 0.1 * max(lv["requests"], 1):  # else noise over few refusals
                    cell["cpu_us_per_refusal"] = (lv["server_cpu_s"] - cpu_answer * lv["answers"]) / lv["non_2xx"] * 1e6
                per_level.setdefault(lv["connections"], []).append(cell)
        peak = max(statistics.median(c["answers_rps"] for c in cells) for cells in per_level.values())
        best_before: list[float] = []  # answers/s of the best earlier level, every repeat
        for conns in sorted(per_level):
            cells = per_level[conns]
            med = lambda key, cells=cells: median_known([c[key] for c in cells])  # noqa: E731
            answers = [c["answers_rps"] for c in cells]
            wait_s = conns / peak if peak else float("inf")
            row = {"target": name, "connections": conns, "answers_rps": spread(answers),
                   "refusals_rps": med("refusals_rps"), "refusals_per_answer": med("refusals_per_answer"),
                   "refusal_p99_ms": med("refusal_p99_ms"), "on_time": med("on_time"),
                   "cpu_us_per_answer": med("cpu_us_per_answer"), "cpu_us_per_refusal": med("cpu_us_per_refusal"),
                   "little_wait_ms": round(wait_s * 1000, 1), "fits": wait_s <= DEADLINE_S}
            row["goodput_held"] = not best_before or max(answers) >= min(best_before)
            if row["fits"]:
                few = (row["refusals_per_answer"] or 0) <= ADMISSION["refusals_per_answer"]
                row["met"] = row["goodput_held"] and few
            else:
                fast = row["refusal_p99_ms"] is not None and row["refusal_p99_ms"] <= ADMISSION["refusal_p99_ms"]
                row["met"] = (row["goodput_held"] and fast and row["on_time"] is not None
                              and row["on_time"] >= ADMISSION["admitted_on_time"])
            if not best_before or statistics.median(answers) > statistics.median(best_before):
                best_before = answers
            rows.append(row)
    return rows


def admission_lines(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    fmt = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
    lines = ["## Admission under load", "",
             f"Per connection count, medians over the repeats (answers: median and range). Model answers: 2xx that "
             f"are not a fallback. Little's-law wait: connections / the target's peak model answers/s; where it "
             f"fits the {DEADLINE_S * 1000:g} ms deadline the target is refusals <= "
             f"{ADMISSION['refusals_per_answer']:.0%} of answers, where it does not, the door's 429 p99 <= "
             f"{ADMISSION['refusal_p99_ms']:g} ms (server side: time in the door plus the event-loop lag before it) "
             f"and >= {ADMISSION['admitted_on_time']:.0%} of admitted requests answered by the model in time; at every "
             "level, model answers/s no lower than the best earlier level's (within the repeats' range). CPU per 429 "
             "is an estimate, where refusals are over 10% of requests: the level's server CPU less its answers at "
             "the CPU per answer of the highest level that refused under 1%, over the refusals.", "",
             "| server | connections | model answers/s | 429/s | 429 per answer | door 429 p99 ms | admitted on time "
             "| CPU µs/answer | CPU µs/429 | Little's-law wait ms | met |", "|---" * 11 + "|"]
    for r in rows:
        a = r["answers_rps"]
        lines.append(f"| {r['target']} | {r['connections']} | {a['median']:,.0f} ({a['min']:,.0f} to {a['max']:,.0f}) "
                     f"| {fmt(r['refusals_rps'], '{:,.0f}')} | {fmt(r['refusals_per_answer'], '{:.3f}')} | "
                     f"{fmt(r['refusal_p99_ms'], '{:.2f}')} | {fmt(r['on_time'], '{:.4f}')} | "
                     f"{fmt(r['cpu_us_per_answer'], '{:,.0f}')} | {fmt(r['cpu_us_per_refusal'], '{:,.0f}')} | "
                     f"{r['little_wait_ms']:g} {'(fits)' if r['fits'] else '(over)'} | "
                     f"{'yes' if r['met'] else '**no**'} |")
    return [*lines, ""]


def plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    names = sorted({lv["target"] for rep in result["repeats"] for lv in rep["closed"]})
    for name in names:
        levels = sorted({lv["connections"] for rep in result["repeats"] for lv in rep["closed"]})
        rows = [[lv for rep in result["repeats"] for lv in rep["closed"]
                 if lv["target"] == name and lv["connections"] == c] for c in levels]
        x = [statistics.median(r["throughput_rps"] for r in rs) for rs in rows]
        y = [statistics.median(r["p99_ms"] for r in rs) for rs in rows]
        ax.plot(x, y, "o-" if name.startswith("service") else "s--", label=f"{name} (client p99)")
        for c, xi, yi in zip(levels, x, y, strict=True):
            ax.annotate(str(c), (xi, yi), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.axhline(P99_BUDGET_MS, color="k", lw=0.8, ls=":", label="p99 budget 10 ms")
    ax.set(xlabel="throughput (requests/s, median of repeats)", ylabel="p99 latency (ms, log)", yscale="log",
           title="wrk closed loop (labels: connections)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


Lines = list[str]


def _cell(s: dict[str, Any]) -> Any:
    """``sv(key, fmt)``: a summary figure as "median (min to max)", or "-" when the run did not measure it."""
    return lambda k, f="{:.3f}": (
        f"{f.format(s[k]['median'])} ({f.format(s[k]['min'])} to {f.format(s[k]['max'])})" if k in s else "-")


def _summary(result: dict[str, Any]) -> Lines:
    m, s, n, sv = result["machine"], result["summary"], result["workers"], _cell(result["summary"])
    lines = [f"# Benchmark: the service with 1 and {n} workers, the HTTP ceiling and the model alone", "",
             f"Generated by `{result['command']}` (`make bench`) on {result['date']} in {result['wall_s']:.0f} s; "
             f"do not edit by hand. {result['repeats_n']} interleaved repeats; figures are the median over repeats "
             "with the range in brackets.", "", "## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in m.items()]
    lines += ["", "## Summary", "",
              f"Best closed-loop throughput with p99 <= {P99_BUDGET_MS:g} ms (client side, wrk; and server side for "
              "the service), only 2xx answers; and the peak rate of 2xx answers at any latency:", "",
              "| server | req/s at p99 <= 10 ms | peak req/s |", "|---|---|---|"]
    for name in ("service x1", f"service x{n}", "ceiling x1", f"ceiling x{n}"):
        lines.append(f"| {name} | {sv(f'rps {name}', '{:,.0f}')} | {sv(f'peak rps {name}', '{:,.0f}')} |")
    if "rps service-B x1" in s:
        for w in sorted({1, n}):
            lines.append(f"| service-B x{w} (`{result.get('compare', '?')}`) | "
                         f"{sv(f'rps service-B x{w}', '{:,.0f}')} | {sv(f'peak rps service-B x{w}', '{:,.0f}')} |")
        lines += ["", "A/B, this checkout's service over service-B's, per repeat then the spread: " + "; ".join(
            f"x{w}: {sv(f'ab ratio x{w}', '{:.2f}')}x at p99 <= 10 ms, {sv(f'ab peak ratio x{w}', '{:.2f}')}x at peak"
            for w in sorted({1, n}))
            + ". A range that holds 1.00 is no difference."]
    return [*lines, "", f"At peak, {n} workers serve {sv('peak speedup service', '{:.2f}')}x one worker's requests; "
            f"the bare HTTP stack with {n} processes serves {sv('peak speedup ceiling', '{:.2f}')}x one process's "
            "(wrk and the servers share the cores)."]


def _targets(result: dict[str, Any], plotted: bool) -> Lines:
    s, n, sv = result["summary"], result["workers"], _cell(result["summary"])
    t = s["targets"]
    yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731
    keys = list(t)
    lines = ["", "| target | measured | met |", "|---|---|---|",
             f"| {keys[0]} | {sv('speedup', '{:.2f}')}x | {yes(t[keys[0]])} |",
             f"| {keys[1]} | {sv(f'cpu ratio service x{n}', '{:.2f}')}x: {sv(f'cpu us service x{n}', '{:.0f}')} "
             f"µs against {sv(f'cpu parts us service x{n}', '{:.0f}')} µs at a mean batch of "
             f"{sv(f'mean batch service x{n}', '{:.1f}')} | {yes(t[keys[1]])} |",
             f"| {keys[2]} | {sv('c1 ratio', '{:.2f}')}x: {sv('c1 p50 service')} ms against "
             f"{sv('c1 bound')} ms (ceiling {sv('c1 p50 ceiling')} + model {s['model_b1_p50_ms']:.3f}) | "
             f"{yes(t[keys[2]])} |",
             "", f"With one worker: CPU/request {sv('cpu us service x1', '{:.0f}')} µs against its parts "
             f"{sv('cpu parts us service x1', '{:.0f}')} µs ({sv('cpu ratio service x1', '{:.2f}')}x).", ""]
    return lines + (["![throughput vs latency](benchmark.png)", ""] if plotted else [])


def _model(result: dict[str, Any]) -> Lines:
    lines = ["## Model alone (one ONNX Runtime thread, in-process)", "",
             "| batch | wrapper p50 ms | wrapper p99 ms | wrapper CPU µs/list | ORT p50 ms | ORT CPU µs/list "
             "| wrapper lists/s |", "|---|---|---|---|---|---|---|"]
    for r in result["model"]:
        lines.append(f"| {r['batch']} | {r['rank']['p50_ms']:.3f} | {r['rank']['p99_ms']:.3f} | "
                     f"{r['rank_cpu_us_per_list']:.0f} | {r['ort']['p50_ms']:.3f} | {r['ort_cpu_us_per_list']:.0f} | "
                     f"{r['rank_lists_per_s']:,.0f} |")
    return lines


def _server(lv: dict[str, Any]) -> str:
    return f"{lv['server_p50_ms']:.3f} / {lv['server_p99_ms']:.3f}" if "server_p50_ms" in lv else "-"


def _levels(result: dict[str, Any]) -> Lines:
    lines = ["", "## Closed loop (wrk), every repeat", "",
             "| repeat | server | connections | req/s | client p50 / p99 / p99.9 ms | server p50 / p99 ms | "
             "server CPU µs/req | server cores | wrk cores | mean batch | non-2xx | socket errors | fallbacks |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, rep in enumerate(result["repeats"], 1):
        lines += [f"| {i} | {lv['target']} | {lv['connections']} | {lv['throughput_rps']:,.0f} | "
                  f"{lv['p50_ms']:.3f} / {lv['p99_ms']:.3f} / {lv['p99.9_ms']:.3f} | {_server(lv)} | "
                  f"{lv['server_cpu_us_per_request']:.0f} | {lv['server_cores_busy']:.2f} | "
                  f"{lv['wrk_cores_busy']:.2f} | {lv.get('mean_batch') or '-'} | {lv['non_2xx']} | "
                  f"{lv['socket_errors']} | {lv.get('fallbacks', '-')} |" for lv in rep["closed"]]
    if any(rep["open"] for rep in result["repeats"]):
        lines += ["", "## Open loop (fixed offered rate), every repeat", "",
                  "| repeat | server | offered req/s | answered req/s | client p50 / p99 ms | server p50 / p99 ms | "
                  "server CPU µs/req | non-2xx | fallbacks |", "|---|---|---|---|---|---|---|---|---|"]
        for i, rep in enumerate(result["repeats"], 1):
            lines += [f"| {i} | {lv['target']} | {lv['offered_rps']:,.0f} | {lv['answered_rps']:,.0f} | "
                      f"{lv['p50_ms']:.3f} / {lv['p99_ms']:.3f} | {_server(lv)} | "
                      f"{lv['server_cpu_us_per_request']:.0f} | {lv['non_2xx']} | {lv['fallbacks']} |"
                      for lv in rep["open"]]
    return lines


def _method(result: dict[str, Any]) -> Lines:
    n = result["workers"]
    return ["", "## How it was measured", "",
            f"- Servers: `python -m service` with `RERANK_WORKERS` 1 and {n} (one ONNX Runtime session, batcher "
            "and event loop per worker; features from a loopback redis-server loaded with the snapshot); the HTTP "
            f"ceiling (`loadtest/servers.py ceiling`: read the body, parse it with the service's parser, answer "
            f"a fixed body) as 1 and {n} processes on one SO_REUSEPORT port, like the workers.",
            f"- Closed loop: `wrk -t1 -cC -d{result['duration_s']:g}s` with `loadtest/levels.py`'s Lua script "
            "cycling through the model's held-out requests; client latency is wrk's. wrk is one process on the "
            "same cores as the servers (its CPU is in the table), so every figure is a lower bound on what the "
            "server does with the machine to itself.",
            "- Open loop: `python -m loadtest.client` (uvloop, 64 connections) at fixed rates, fractions of "
            "the 1-worker service's best closed-loop throughput in the first repeat.",
            "- Server side: the service's own handler histogram (`rerank_request_duration_seconds`, summed over "
            "workers, interpolated within buckets) and mean batch (`rerank_batch_size`). CPU: user + system "
            "seconds of every server process from /proc over the level.",
            "- CPU target: the service's CPU per request at its best level against the ceiling's CPU per request "
            "at the same connection count and worker count, plus the model wrapper's CPU per list at the mean "
            "batch size the service ran (interpolated over the model-alone table).",
            "- One-connection bound: the ceiling's client p50 at one connection plus ONNX Runtime's batch-1 p50.",
            ""]


def write_report(result: dict[str, Any], out: Path, plotted: bool) -> None:
    """``benchmark.md`` in ``out`` from a run's result (``benchmark.json``'s content)."""
    lines = [*_summary(result), *_targets(result, plotted), *admission_lines(result.get("admission", [])),
             *_model(result), *_levels(result), *_method(result)]
    (out / "benchmark.md").write_text("\n".join(lines))
