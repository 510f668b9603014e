#!/usr/bin/env python3
"""Plots a soak's CSV (bench/soak/run.sh): one panel per figure over time.

usage: plot.py SOAK.CSV OUT.PNG [TITLE]
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    src, dst = sys.argv[1], sys.argv[2]
    title = sys.argv[3] if len(sys.argv) > 3 else "meridian soak"
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        sys.exit(f"{src}: no samples")

    def col(name):
        out = []
        for r in rows:
            try:
                out.append(float(r[name]))
            except (KeyError, ValueError):
                out.append(float("nan"))
        return out

    t = [x / 60.0 for x in col("t_s")]
    panels = [
        ("RSS (MiB)", [("edge", [v / 1024 for v in col("edge_rss_kb")]),
                       ("edge heap allocated", [v / 1048576 for v in col("edge_heap_allocated_bytes")]),
                       ("dns", [v / 1024 for v in col("dns_rss_kb")])]),
        ("open file descriptors", [("edge", col("edge_fds")), ("dns", col("dns_fds"))]),
        ("edge threads (tokio tasks are not exported)", [("threads", col("edge_threads"))]),
        ("cache", [("entries", col("cache_entries")),
                   ("memory tier (KiB)", [v / 1024 for v in col("cache_memory_bytes")])]),
        ("latency (ms)", [("HTTP p50", col("http_p50_ms")), ("HTTP p99", col("http_p99_ms")),
                          ("DNS p50", col("dns_p50_ms")), ("DNS p99", col("dns_p99_ms"))]),
        ("CPU per request (µs)", [("edge, user + system", col("edge_cpu_us_per_req")),
                                  ("edge, system", col("edge_sys_us_per_req")),
                                  ("load clients (per HTTP request)", col("load_cpu_us_per_req")),
                                  ("dns (per query)", col("dns_cpu_us_per_query"))]),
        ("machine CPU (%)", [("busy", col("machine_busy_pct")), ("steal", col("machine_steal_pct"))]),
        ("load and errors", [("HTTP req/s", col("http_rps")), ("DNS q/s", col("dns_qps")),
                             ("errors (cumulative)", col("errors_total"))]),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.6 * len(panels)), sharex=True)
    for ax, (label, series) in zip(axes, panels):
        for name, ys in series:
            ax.plot(t, ys, label=name, linewidth=1.2)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    axes[-1].set_xlabel("minutes")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(dst, dpi=90)


if __name__ == "__main__":
    main()
