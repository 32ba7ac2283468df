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


def per_round(rounds, target, f, base=None, g=None):
    """f(run of target) per round, or f(target) / g(base) when base is given."""
    values = []
    for runs in rounds.values():
        a = runs.get(target)
        if a is None:
            continue
        va = f(a)
        if base is None:
            values.append(va)
            continue
        b = runs.get(base)
        vb = None if b is None else (g or f)(b)
        values.append(va / vb if va is not None and vb else None)
    return values


def streams(runs):
    out = []
    groups = by_round(runs, "streams")
    for n in sorted(groups, key=int):
        rounds = groups[n]
        out.append(f"#### {int(n):,} concurrent streams\n")
        out.append(
            "| target | events/s | p50 µs | p99 µs | added p50 µs | added p99 µs | CPU µs/event "
            "| CPU ÷ nginx | RSS KiB/stream | RSS ÷ nginx | bench CPU share | errors |"
        )
        out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for target in ["upstream"] + PROXIES:
            def added(name):
                return lambda r: (
                    None
                    if num(r, name) is None or num(rounds_of[id(r)]["upstream"], name) is None
                    else num(r, name) - num(rounds_of[id(r)]["upstream"], name)
                )

            rounds_of = {id(r): rs for rs in rounds.values() for r in rs.values()}
            rate = per_round(rounds, target, lambda r: num(r, "events") / num(r, "seconds"))
            proxy = target != "upstream"
            out.append(
                "| "
                + " | ".join(
                    [
                        NAMES[target],
                        summary(rate, 0),
                        summary(per_round(rounds, target, lambda r: num(r, "p50_us"))),
                        summary(per_round(rounds, target, lambda r: num(r, "p99_us"))),
                        summary(per_round(rounds, target, added("p50_us"))) if proxy else "-",
                        summary(per_round(rounds, target, added("p99_us"))) if proxy else "-",
                        summary(per_round(rounds, target, lambda r: num(r, "cpu_us_per_event")), 2)
                        if proxy
                        else "-",
                        summary(
                            per_round(rounds, target, lambda r: num(r, "cpu_us_per_event"), "nginx_proxy"), 2
                        )
                        if proxy
                        else "-",
                        summary(per_round(rounds, target, lambda r: num(r, "rss_per_stream_kib")), 1)
                        if proxy
                        else "-",
                        summary(
                            per_round(rounds, target, lambda r: num(r, "rss_per_stream_kib"), "nginx_proxy"), 2
                        )
                        if proxy
                        else "-",
                        summary(per_round(rounds, target, busy_pct), 0) + " %",
                        summary(per_round(rounds, target, lambda r: num(r, "errors")), 0),
                    ]
                )
                + " |"
            )
        out.append("")
    return out


def tls(runs):
    out = []
    groups = by_round(runs, "connections")
    out.append(
        "| target | conns | req/s | p99 ms | CPU µs/req | TLS handshakes per 1,000 req "
        "| req/s ÷ direct | req/s ÷ nginx | CPU ÷ nginx | errors |"
    )
    out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in sorted(groups, key=int):
        rounds = groups[c]
        for target in ["upstream"] + PROXIES:
            proxy = target != "upstream"
            out.append(
                "| "
                + " | ".join(
                    [
                        NAMES[target],
                        c,
                        summary(per_round(rounds, target, lambda r: num(r, "rps")), 0),
                        summary(per_round(rounds, target, lambda r: num(r, "p99_ms")), 2),
                        summary(per_round(rounds, target, lambda r: num(r, "cpu_us")), 1) if proxy else "-",
                        summary(per_round(rounds, target, lambda r: 1000 * num(r, "handshakes") / num(r, "requests")), 2),
                        summary(per_round(rounds, target, lambda r: num(r, "rps"), "upstream"), 2),
                        summary(per_round(rounds, target, lambda r: num(r, "rps"), "nginx_proxy"), 2),
                        summary(per_round(rounds, target, lambda r: num(r, "cpu_us"), "nginx_proxy"), 2)
                        if proxy
                        else "-",
                        summary(per_round(rounds, target, lambda r: num(r, "errors")), 0),
                    ]
                )
                + " |"
            )
    out.append("")
    return out


def rate(runs):
    out = []
    groups = by_round(runs, "rate")
    for r in sorted(groups, key=int):
        rounds = groups[r]
        out.append(f"#### {int(r):,} requests/s\n")
        out.append(
            "| target | p50 µs | p90 µs | p99 µs | added p50 µs | added p99 µs | sends late p99 µs "
            "| bench CPU share | errors |"
        )
        out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        rounds_of = {id(x): rs for rs in rounds.values() for x in rs.values()}

        def added(name):
            def f(x):
                base = rounds_of[id(x)].get("upstream")
                if base is None or num(x, name) is None or num(base, name) is None:
                    return None
                return num(x, name) - num(base, name)

            return f

        for target in ["upstream"] + PROXIES:
            proxy = target != "upstream"
            out.append(
                "| "
                + " | ".join(
                    [
                        NAMES[target],
                        summary(per_round(rounds, target, lambda x: num(x, "p50_us"))),
                        summary(per_round(rounds, target, lambda x: num(x, "p90_us"))),
                        summary(per_round(rounds, target, lambda x: num(x, "p99_us"))),
                        summary(per_round(rounds, target, added("p50_us"))) if proxy else "-",
                        summary(per_round(rounds, target, added("p99_us"))) if proxy else "-",
                        summary(per_round(rounds, target, lambda x: num(x, "late_p99_us"))),
                        summary(per_round(rounds, target, busy_pct), 0) + " %",
                        summary(per_round(rounds, target, lambda x: num(x, "errors")), 0),
                    ]
                )
                + " |"
            )
        out.append("")
    return out


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("streams", "tls", "rate"):
        sys.exit(__doc__)
    runs = read(sys.argv[2])
    print("\n".join({"streams": streams, "tls": tls, "rate": rate}[sys.argv[1]](runs)))


if __name__ == "__main__":
    main()
