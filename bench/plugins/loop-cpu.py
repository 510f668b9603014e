#!/usr/bin/env python3
"""What the loops of a clamped plugin really used, from an edge built with
bench/plugins/clamp-experiments.patch and run with EXP_LOGLOOPS=1 (one
`EXPLOOP` line per loop cut on its stderr). The first loop of each run
(its whole configured deadline, before the clamp) is left out.

    python3 bench/plugins/loop-cpu.py /tmp/meridian-chaos-logs/plugin-edge.log
"""
import re
import sys

LINE = re.compile(
    r"EXPLOOP \d+ (\d+) Some\((\d+)\) real Some\((\d+)\) wall Some\((\d+)\) armed (\d)"
)


def pct(xs):
    xs = sorted(xs)
    n = len(xs)
    if not n:
        return "n=0"
    return (
        f"n={n} p10={xs[n // 10]} p50={xs[n // 2]} p90={xs[int(n * .9)]} "
        f"p99={xs[int(n * .99)]} mean={sum(xs) / n:.0f}"
    )


rows = []
with open(sys.argv[1], encoding="utf-8", errors="replace") as f:
    for line in f:
        m = LINE.search(line)
        if m:
            budget, charged, real, wall, armed = map(int, m.groups())
            if budget < 50_000:
                rows.append((charged, real, wall, armed))
print("µs of CPU charged:", pct([r[0] for r in rows]))
print("µs of CPU used:   ", pct([r[1] for r in rows]))
print("µs of wall time:  ", pct([r[2] for r in rows]))
for armed, name in ((1, "set its thread's timer"), (2, "kept a timer")):
    print(f"used, loops that {name}:", pct([r[1] for r in rows if r[3] == armed]))
