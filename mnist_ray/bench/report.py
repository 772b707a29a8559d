"""bench's report: the machine, the table of bench.md, and the check that every figure is sane."""

from __future__ import annotations

import os
import platform

from mnist_ray.errors import MnistRayError


def machine() -> dict:
    import psutil

    return {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / (1 << 30), 1),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version()}


def format_report(report: dict) -> str:
    m = report["machine"]
    lines = [f"# mnist-ray bench ({report['created_at']})", "",
             f"Machine: {m['cpus']} CPUs, {m['memory_gb']} GiB, {m['platform']}, no GPU" if not report.get("gpus")
             else f"Machine: {m['cpus']} CPUs, {m['memory_gb']} GiB, {m['platform']}", "",
             f"Command: `{report['command']}`", ""]
    for name, r in report["models"].items():
        mi = r.get("micro")
        lines.append(f"## {name}")
        lines.append("")
        if r.get("gpu"):
            g = r["gpu"]
            lines += [f"GPU ({g['gpus']} GPUs): compiled forward pass on the GPU (uint8 in) "
                      f"**{g['ceiling_images_per_s']:,} images/s**", "",
                      "| actors per GPU | N | images/s (whole command) | c/b |", "|---:|---:|---:|---:|"]
            lines += [f"| {j['actors_per_gpu']} | {j['n']:,} | {j['images_per_s']:,.0f} | {j['c_over_b']} |"
                      for j in g["jobs"]]
            lines.append("")
        if mi:
            lines.append(f"(a) naive loop (Pillow one by one, predict batch 32): "
                         f"**{mi['naive_images_per_s']:,} images/s**; (b) compiled forward pass (batch "
                         f"{mi['batch_sizes']['tf']}, decoded tensors): **{mi['ceiling_images_per_s']:,} images/s**")
            lines.append("")
            lines.append(f"| runtime | batch | forward pass images/s | top-1 on the first {mi['images']:,} test images |")
            lines.append("|---|---:|---:|---:|")
            for rt, rate in mi["forward_images_per_s"].items():
                lines.append(f"| {rt} | {mi['batch_sizes'][rt]} | {rate:,} | {100 * mi['accuracy'][rt]:.2f} % |")
            lines.append("")
        if r.get("jobs"):
            lines.append("(c) the whole `mnist-ray infer` command, Ray start-up included:")
            lines.append("")
            lines.append("| runtime | N | wall s | Ray start s | c images/s | scoring images/s | c/a | c/b | "
                         "accuracy | driver MB RSS/USS | largest worker MB RSS/USS | workers USS MB |")
            lines.append("|---|" + "---:|" * 11)
            for j in r["jobs"]:
                lines.append(f"| {j['runtime']} | {j['n']:,} | {j['wall_seconds']:.1f} | {j['ray_startup_seconds']:.1f} | "
                             f"{j['images_per_s']:,.0f} | {j['scoring_images_per_s']:,.0f} | "
                             f"{j.get('c_over_a', float('nan')):.1f} | {j.get('c_over_b', float('nan')):.2f} | "
                             f"{100 * j['accuracy']:.2f} % | {j['driver_rss_peak_mb']:,}/{j['driver_uss_peak_mb']:,} | "
                             f"{j['worker_rss_peak_mb']:,}/{j['worker_uss_peak_mb']:,} | {j['workers_total_uss_peak_mb']:,} |")
            lines.append("")
            lines.append("CPU per scored image, µs (Ray Data's per-operator task CPU; the model calls are part of "
                         "the predictor operator's):")
            lines.append("")
            lines.append("| runtime | N | " + " | ".join(OPS) + " |")
            lines.append("|---|---:|" + "---:|" * len(OPS))
            for j in r["jobs"]:
                lines.append(f"| {j['runtime']} | {j['n']:,} | " + " | ".join(
                    op_cpu(j.get("cpu_us_per_image", {}), key) for key in OPS) + " |")
            lines.append("")
    if report.get("serving"):
        from mnist_ray.serving import loadtest

        lines += loadtest.format_table(report["serving"])
    if report.get("submit"):
        from mnist_ray.bench import fixedcost

        lines += fixedcost.format_table(report["submit"])
    if report.get("resume"):
        from mnist_ray.bench import resumecost

        lines += resumecost.format_table(report["resume"])
    lines += training_tables(report)
    return "\n".join(lines)


def training_tables(report: dict) -> list[str]:
    """The feed-memory and training-throughput tables (``--parts feed``, ``--parts train``)."""
    lines: list[str] = []
    if report.get("feed"):
        lines += ["## training feed memory (cnn, 2 epochs; the same budget)", "",
                  "| rows | feed | budget MB | training worker MB USS | largest worker MB RSS/USS | wall s |",
                  "|---:|---|---:|---:|---:|---:|"]
        lines += [f"| {r['rows']:,} | {r['feed']} | {r['budget_mb']:g} | {r['train_worker_uss_peak_mb']:,} | "
                  f"{r['worker_rss_peak_mb']:,}/{r['worker_uss_peak_mb']:,} | {r['wall_seconds']} |"
                  for r in report["feed"]["runs"]]
        lines += ["", f"4x the rows, streamed: the training worker's peak USS "
                  f"{report['feed']['runs'][1]['train_worker_uss_vs_1x']:.2f} x the in-memory run's", ""]
    if report.get("training"):
        t = report["training"]
        lines += [f"## training throughput ({t['epochs']} epochs of {t['model']}, {t.get('recipe_epochs', '-')} of default; "
                  "images/s in the steady state: the epochs after the first half)", "",
                  "| how | images/s | x plain fit | wall s | beyond epochs s | layout |", "|---|---:|---:|---:|---:|---|"]
        lines += [f"| {r['how']} | {r['images_per_s']:,.0f} | {r.get('vs_plain_fit', 1.0):.2f} | "
                  f"{r.get('wall_seconds', '-')} | {r.get('beyond_epochs_seconds', '-')} | {r.get('layout', '-')} |"
                  for r in t["runs"]]
        lines.append("")
    return lines


# Columns of the CPU table: a prefix of Ray Data's operator names, or infer's own figures.
OPS = ("Read", "MapBatches(prepare_rows)", "model calls", "Write", "driver")


def op_cpu(figures: dict, prefix: str) -> str:
    values = [v for k, v in figures.items() if k.startswith(prefix)]
    return f"{sum(values):.1f}" if values else "-"

def sig(x: float) -> float:
    """Four significant digits: ratios span 0.0003 (a tiny quick run) to 100."""
    return float(f"{x:.4g}")


def check_sane(report: dict) -> None:
    """Every figure positive and every job complete, or the bench fails (it is CI's smoke test)."""
    bad = []
    for name, entry in report["models"].items():
        mi = entry.get("micro") or {}
        rates = {k: v for k, v in mi.items() if k.endswith("images_per_s") and not isinstance(v, dict)}
        rates.update({f"forward {k}": v for k, v in mi.get("forward_images_per_s", {}).items()})
        bad += [f"{name} {k}={v}" for k, v in rates.items() if not v > 0]
        for job in entry.get("jobs", []):
            for key in ("images_per_s", "scoring_images_per_s", "driver_uss_peak_mb", "worker_uss_peak_mb"):
                if not job[key] > 0:
                    bad.append(f"{name} {job['runtime']} N={job['n']} {key}={job[key]}")
    for r in (report.get("serving") or {}).get("rows", []):
        if not (r["requests_per_s"] > 0 and r["p50_ms"] > 0) or r["failed"]:
            bad.append(f"serving {r['server']} c={r['concurrency']}: {r['requests_per_s']} requests/s, "
                       f"{r['failed']} failed {r['errors']}")
    for which, row in (report.get("submit") or {}).items():
        if isinstance(row, dict) and not (row["first_prediction_after_submit_s"] > 0
                                          and all(v >= 0 for v in row["parts"].values())):
            bad.append(f"submit {which}: {row}")
    resumed = report.get("resume")
    if resumed and not (0 < resumed["resumed_rows"] <= resumed["n"]
                        and resumed["resumed_rows"] + resumed["scored_rows"] == resumed["n"]):
        bad.append(f"resume: {resumed['resumed_rows']} resumed + {resumed['scored_rows']} scored rows of {resumed['n']}")
    for r in (report.get("training") or {}).get("runs", []):
        if not r["images_per_s"] > 0:
            bad.append(f"training {r['how']} images_per_s={r['images_per_s']}")
    if bad:
        raise MnistRayError("bench figures are not sane: " + "; ".join(bad))
