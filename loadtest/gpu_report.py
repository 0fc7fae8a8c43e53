"""`make bench-gpu`'s report: ``gpu.md`` from the run's result (``gpu.json``).

Owns: the model-alone timing table, the agreement table, GPU memory, and the service's table (median and range over
the repeats per target and connection count). Does not know: how anything was run (``gpu.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loadtest.measure import spread

Lines = list[str]


def service_summary(stage: dict[str, Any]) -> list[dict[str, Any]]:
    """Per target and connection count: 2xx req/s and latency as median (range) over the repeats."""
    rows = []
    for cfg in stage["configs"]:
        for c in stage["levels"]:
            runs = [lv for lv in stage["closed"] if lv["target"] == cfg["target"] and lv["connections"] == c]
            if not runs:
                continue
            rows.append({"target": cfg["target"], "connections": c,
                         "ok_rps": spread([lv["ok_rps"] for lv in runs]),
                         "p50_ms": spread([lv["p50_ms"] for lv in runs]),
                         "p99_ms": spread([lv["p99_ms"] for lv in runs]),
                         "server_p99_ms": spread([lv.get("server_p99_ms", float("nan")) for lv in runs]),
                         "mean_batch": spread([lv.get("mean_batch") or 0.0 for lv in runs]),
                         "server_cores_busy": spread([lv["server_cores_busy"] for lv in runs]),
                         "wrk_cores_busy": spread([lv["wrk_cores_busy"] for lv in runs]),
                         "non_2xx": sum(lv["non_2xx"] for lv in runs),
                         "fallbacks": sum(lv.get("fallbacks", 0) for lv in runs),
                         "socket_errors": sum(lv["socket_errors"] for lv in runs)})
    return rows


def fmt(s: dict[str, float], digits: int = 0) -> str:
    f = f"{{:,.{digits}f}}"
    return f"{f.format(s['median'])} ({f.format(s['min'])}-{f.format(s['max'])})"


def _model(result: dict[str, Any]) -> Lines:
    lines: Lines = []
    model = result.get("model")
    if not model:
        return lines
    names = list(model["providers"])
    lines += ["## Model alone: one `run` per batch, host copies included", "",
              "Providers that ran: " + "; ".join(f"{n}: {', '.join(p)}" for n, p in model["providers"].items()),
              "", "| batch | " + " | ".join(f"{n} p50 / p99 ms | {n} lists/s" for n in names) + " |",
              "|---:|" + "---:|---:|" * len(names)]
    for row in model["timing"]:
        cells = []
        for n in names:
            r = row.get(n)
            cells += [f"{r['p50_ms']:.3f} / {r['p99_ms']:.3f}", f"{r['lists_per_s']:,.0f}"] if r else ["-", "-"]
        lines.append(f"| {row['batch']} | " + " | ".join(cells) + " |")
    lines += ["", f"## Agreement over the {model['lists']} held-out lists", "",
              "| session | NDCG@6 | top 6 as exported | compared with | same top-6 order | same top-6 set | "
              "mean top-6 overlap | max abs logit diff | non-finite logits |",
              "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for name, q in model["quality"].items():
        pairs = [(k[3:], v) for k, v in q.items() if k.startswith("vs ")] or [("-", None)]
        for other, a in pairs:
            tail = (f"{a['same_top6_order']:.4f} | {a['same_top6_set']:.4f} | {a['mean_top6_overlap']:.4f} | "
                    f"{a['max_abs_logit_diff']:.2e} | {a['non_finite_logits']}") if a else "- | - | - | - | -"
            lines.append(f"| {name} | {q['ndcg@6']:.4f} | {q['same_top6_as_export']:.4f} | {other} | {tail} |")
    g = model["gpu_memory"]
    lines += ["", f"GPU memory of this process holding {', '.join(g['sessions']) or 'no CUDA session'} after "
              f"batches up to {g['largest_batch']}: {g['this_process_mib']} MiB (device used "
              f"{g['used_before_mib']} → {g['used_after_mib']} MiB).", ""]
    return lines


def _service(result: dict[str, Any]) -> Lines:
    lines: Lines = []
    svc = result.get("service")
    if not svc:
        return lines
    lines += ["## The service", "",
              f"wrk closed loop, {svc['wrk_threads']} threads, {svc['duration_s']:g} s per level, "
              f"{svc['repeats_n']} interleaved repeats, median (range); no Redis (features from the model's "
              f"snapshot); {', '.join(f'{k}={v}' for k, v in svc['env'].items())}.", "",
              "| target | providers running | start s | GPU MiB per worker (after the run) |", "|---|---|---:|---|"]
    for cfg in svc["configs"]:
        lines.append(f"| {cfg['target']} | {cfg['providers']} | {cfg['start_s']} | "
                     f"{cfg.get('gpu_mib_per_worker_after', cfg['gpu_mib_per_worker'])} |")
    lines += ["", "| target | connections | 2xx req/s | client p50 ms | client p99 ms | server p99 ms | mean batch "
              "| server cores | wrk cores | non-2xx | fallbacks |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in service_summary(svc):
        lines.append(f"| {r['target']} | {r['connections']} | {fmt(r['ok_rps'])} | {fmt(r['p50_ms'], 2)} | "
                     f"{fmt(r['p99_ms'], 2)} | {fmt(r['server_p99_ms'], 2)} | {r['mean_batch']['median']:.1f} | "
                     f"{r['server_cores_busy']['median']:.1f} | {r['wrk_cores_busy']['median']:.2f} | "
                     f"{r['non_2xx']} | {r['fallbacks']} |")
    return lines


def write_report(result: dict[str, Any], out: Path) -> None:
    """``gpu.md`` in ``out`` from a run's result (``gpu.json``'s content)."""
    m = result["machine"]
    lines = ["# GPU benchmark", "",
             f"`{result['command']}`, {result['date']}, {result.get('wall_s', '?')} s. "
             f"Model `{result['model_version']}`.",
             f"Machine: {m.get('gpu', '?')} (driver {m.get('driver', '?')}, {m.get('memory_total_mib', '?')} MiB), "
             f"{m['cpu']}, {m['cores']} cores; onnxruntime {m.get('onnxruntime', '?')}, Python {m['python']}.", "",
             *_model(result), *_service(result)]
    (out / "gpu.md").write_text("\n".join(lines) + "\n")
