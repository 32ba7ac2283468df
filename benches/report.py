#!/usr/bin/env python3
"""Markdown tables with ratios from one criterion run of benches/selection.rs and layer.rs.

    cargo bench --bench selection
    cargo bench --bench layer | tee target/layer.log
    python3 benches/report.py --allocations target/layer.log > target/bench-tables.md

Reads the median of each benchmark from target/criterion/<group>/<function>/<param>/new/
estimates.json (the median, not the mean: the machine is shared and the median shrugs off
a stolen time slice). Times are per element: per selection, or per request.
"""

import argparse
import json
import re
from pathlib import Path

KEYS = [1, 3, 16, 256, 4096]
SELECTION_ROWS = [
    "atomic_fetch_add",
    "mutex_rotation",
    "tower_p2c",
    "round_robin_cooling_0%",
    "round_robin_cooling_50%",
    "round_robin_cooling_90%",
    "least_in_flight_cooling_0%",
    "least_in_flight_cooling_50%",
    "least_in_flight_cooling_90%",
]
LAYER_ROWS = [
    ("bare_inner", 0),
    ("set_request_header", 1),
    ("key_rotation_round_robin", 3),
    ("key_rotation_least_in_flight", 3),
    ("key_rotation_learned_limit", 3),
    ("tower_p2c", 3),
    ("tower_p2c_buffered", 3),
    ("key_rotation_round_robin", 256),
    ("key_rotation_least_in_flight", 256),
    ("key_rotation_learned_limit", 256),
    ("tower_p2c", 256),
    ("tower_p2c_buffered", 256),
]


def median_ns(root: Path, group: str, function: str, param) -> float | None:
    """Median time of one iteration in ns, or None if the benchmark did not run."""
    path = root / group / function / str(param) / "new" / "estimates.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())["median"]["point_estimate"]


def fmt(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}×"


def selection_tables(root: Path) -> list[str]:
    out = []
    per = {}
    for threads, group in [(1, "selection_1_thread"), (2, "selection_2_threads")]:
        # Aggregate ns per selection: one iteration is one selection on each thread.
        per[threads] = {
            (row, n): (lambda t: None if t is None else t / threads)(median_ns(root, group, row, n))
            for row in SELECTION_ROWS
            for n in KEYS
        }
        label = "1 thread" if threads == 1 else f"{threads} threads contending (aggregate)"
        out.append(f"#### Selection, {label}: ns per choose + release (× the atomic floor)\n")
        out.append("| | " + " | ".join(f"{n} keys" for n in KEYS) + " |")
        out.append("| --- |" + " ---: |" * len(KEYS))
        for row in SELECTION_ROWS:
            cells = []
            for n in KEYS:
                t = per[threads][(row, n)]
                floor = per[threads][("atomic_fetch_add", n)]
                cells.append("-" if t is None else f"{t:.1f} ({ratio(t, floor)})")
            out.append(f"| `{row}` | " + " | ".join(cells) + " |")
        out.append("")
    out.append("#### Contention: throughput of 2 threads ÷ throughput of 1 thread (≥ 1.00 = no collapse)\n")
    out.append("| | " + " | ".join(f"{n} keys" for n in KEYS) + " |")
    out.append("| --- |" + " ---: |" * len(KEYS))
    for row in SELECTION_ROWS:
        cells = []
        for n in KEYS:
            one, two = per[1][(row, n)], per[2][(row, n)]
            cells.append("-" if one is None or two is None else f"{one / two:.2f}")
        out.append(f"| `{row}` | " + " | ".join(cells) + " |")
    out.append("")
    return out


def read_allocations(log: Path | None) -> dict:
    allocations = {}
    if log is None or not log.exists():
        return allocations
    pattern = re.compile(r"^layer/(\S+)/(\d+): allocations per request: ([0-9.]+)")
    for line in log.read_text().splitlines():
        match = pattern.match(line)
        if match:
            allocations[(match[1], int(match[2]))] = float(match[3])
    return allocations


def layer_table(root: Path, allocations: dict) -> list[str]:
    times = {(f, n): median_ns(root, "layer", f, n) for f, n in LAYER_ROWS}
    bare = times[("bare_inner", 0)]
    static = times[("set_request_header", 1)]
    out = [
        "#### Whole layer: one request (poll_ready, call, response, body end)\n",
        "| path | keys | ns/request | × bare inner | × SetRequestHeader | tower p2c ÷ this | p2c+Buffer ÷ this | allocations/request |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for f, n in LAYER_ROWS:
        t = times[(f, n)]
        p2c = times.get(("tower_p2c", n))
        buffered = times.get(("tower_p2c_buffered", n))
        ours = f.startswith("key_rotation")
        alloc = allocations.get((f, n))
        out.append(
            f"| `{f}` | {n if n else '-'} | {fmt(t)} | {ratio(t, bare)} | {ratio(t, static)} | "
            f"{ratio(p2c, t) if ours else ''} | {ratio(buffered, t) if ours else ''} | "
            f"{fmt(alloc, 2)} |"
        )
    out.append("")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--criterion", type=Path, default=Path("target/criterion"))
    parser.add_argument("--allocations", type=Path, help="saved stdout of the layer bench")
    args = parser.parse_args()
    lines = selection_tables(args.criterion) + layer_table(
        args.criterion, read_allocations(args.allocations)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
