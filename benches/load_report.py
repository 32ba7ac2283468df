#!/usr/bin/env python3
"""Markdown tables from the runs of benches/proxy_streams.sh, proxy_tls.sh and proxy_rate.sh.

    python3 benches/load_report.py streams target/proxy_streams/runs.txt
    python3 benches/load_report.py tls target/proxy_tls/runs.txt
    python3 benches/load_report.py rate target/proxy_rate/runs.txt

Each line of a runs file is one run: `name=value` fields, among them `target` (upstream,
forward_proxy, nginx_proxy) and `round`. Ratios are taken within a round (its runs were
seconds apart, on the same machine state), then the median over the rounds is given with
the range; plain figures are medians over the rounds with their range.
"""

import statistics
import sys
from collections import defaultdict

NAMES = {
    "upstream": "(a) upstream direct",
    "forward_proxy": "(b) forward_proxy",
    "nginx_proxy": "(c) nginx",
}
PROXIES = ["forward_proxy", "nginx_proxy"]


def read(path):
    runs = []
    for line in open(path):
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "target" in fields:
            runs.append(fields)
    return runs


def num(run, name):
    try:
        return float(run[name])
    except (KeyError, ValueError):
        return None


def busy_pct(run):
    busy = num(run, "busy")
    return None if busy is None else 100 * busy


def summary(values, digits=1):
    """'median (min-max)' of the values that exist."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return "-"
    med = statistics.median_low(values)
    if len(values) == 1 or values[0] == values[-1]:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({values[0]:.{digits}f}-{values[-1]:.{digits}f})"


def by_round(runs, key):
    """{group: {round: {target: run}}}"""
    out = defaultdict(lambda: defaultdict(dict))
    for run in runs:
        out[run.get(key, "-")][run["round"]][run["target"]] = run
    return out


def per_round(rounds, target, f, base=None, less=None):
    """f(run of target) per round; f(target) / f(base) when base is given; f(target) -
    f(less) when less is given."""
    values = []
    for runs in rounds.values():
        a = runs.get(target)
        if a is None:
            continue
        va = f(a)
        other = base or less
        if other is None:
            values.append(va)
            continue
        b = runs.get(other)
        vb = None if b is None else f(b)
        if va is None or vb is None:
            values.append(None)
        elif base is not None:
            values.append(va / vb if vb else None)
        else:
            values.append(va - vb)
    return values


def field(name):
    return lambda run: num(run, name)


class Column:
    """One column of a table: its title, the figure it takes of a run, its digits, and
    whether it is that figure as a ratio to another target's (`base`) or as the difference
    to another target's (`less`) in the same round, whether only the proxies have it, and
    a suffix."""

    def __init__(self, title, figure, digits=1, base=None, less=None, proxies=False, suffix=""):
        self.title = title
        self.figure = figure
        self.digits = digits
        self.base = base
        self.less = less
        self.proxies = proxies
        self.suffix = suffix

    def cell(self, rounds, target):
        if self.proxies and target == "upstream":
            return "-"
        values = per_round(rounds, target, self.figure, self.base, self.less)
        return summary(values, self.digits) + self.suffix


def header(columns, lead=()):
    """A table's first two lines; `lead` are the titles of cells after the target's name."""
    titles = ["target", *lead] + [c.title for c in columns]
    return ["| " + " | ".join(titles) + " |", "| --- |" + " ---: |" * (len(titles) - 1)]


def rows(rounds, columns, lead=()):
    """One row per target; `lead` are the cells after the target's name."""
    return [
        "| " + " | ".join([NAMES[t], *lead] + [c.cell(rounds, t) for c in columns]) + " |"
        for t in ["upstream"] + PROXIES
    ]


BUSY = Column("bench CPU share", busy_pct, 0, suffix=" %")
ERRORS = Column("errors", field("errors"), 0)

STREAMS = [
    Column("events/s", lambda r: num(r, "events") / num(r, "seconds"), 0),
    Column("p50 µs", field("p50_us")),
    Column("p99 µs", field("p99_us")),
    Column("added p50 µs", field("p50_us"), less="upstream", proxies=True),
    Column("added p99 µs", field("p99_us"), less="upstream", proxies=True),
    Column("CPU µs/event", field("cpu_us_per_event"), 2, proxies=True),
    Column("CPU ÷ nginx", field("cpu_us_per_event"), 2, base="nginx_proxy", proxies=True),
    Column("RSS KiB/stream", field("rss_per_stream_kib"), 1, proxies=True),
    Column("RSS ÷ nginx", field("rss_per_stream_kib"), 2, base="nginx_proxy", proxies=True),
    BUSY,
    ERRORS,
]

TLS = [
    Column("req/s", field("rps"), 0),
    Column("p99 ms", field("p99_ms"), 2),
    Column("CPU µs/req", field("cpu_us"), 1, proxies=True),
    Column("TLS handshakes per 1,000 req", lambda r: 1000 * num(r, "handshakes") / num(r, "requests"), 2),
    Column("req/s ÷ direct", field("rps"), 2, base="upstream"),
    Column("req/s ÷ nginx", field("rps"), 2, base="nginx_proxy"),
    Column("CPU ÷ nginx", field("cpu_us"), 2, base="nginx_proxy", proxies=True),
    ERRORS,
]

RATE = [
    Column("p50 µs", field("p50_us")),
    Column("p90 µs", field("p90_us")),
    Column("p99 µs", field("p99_us")),
    Column("added p50 µs", field("p50_us"), less="upstream", proxies=True),
    Column("added p99 µs", field("p99_us"), less="upstream", proxies=True),
    Column("sends late p99 µs", field("late_p99_us")),
    BUSY,
    ERRORS,
]


def streams(runs):
    out = []
    groups = by_round(runs, "streams")
    for n in sorted(groups, key=int):
        out += [f"#### {int(n):,} concurrent streams\n"] + header(STREAMS) + rows(groups[n], STREAMS) + [""]
    return out


def tls(runs):
    groups = by_round(runs, "connections")
    out = header(TLS, ["conns"])
    for c in sorted(groups, key=int):
        out += rows(groups[c], TLS, [c])
    return out + [""]


def rate(runs):
    out = []
    groups = by_round(runs, "rate")
    for r in sorted(groups, key=int):
        out += [f"#### {int(r):,} requests/s\n"] + header(RATE) + rows(groups[r], RATE) + [""]
    return out


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("streams", "tls", "rate"):
        sys.exit(__doc__)
    runs = read(sys.argv[2])
    print("\n".join({"streams": streams, "tls": tls, "rate": rate}[sys.argv[1]](runs)))


if __name__ == "__main__":
    main()
