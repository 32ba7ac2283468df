#!/usr/bin/env bash
# Requests naming no session through the proxy with its default flags (affinity on: each
# body is looked into for a session id, none found, the key chosen round-robin) beside the
# proxy with `--affinity off --strategy least-in-flight`: the same load (wrk POSTs of a
# small chat completion without `prompt_cache_key`, `metadata.user_id`, `user` or an
# `x-session-id` header), the same upstream (nginx answering a fixed JSON), both proxies
# running, rounds interleaved (the order alternating), medians with the range.
#
#   bash benches/affinity_load.sh                       # 5 rounds x 8 s per proxy, ~2 min
#   ROUNDS=3 DURATION=5 bash benches/affinity_load.sh
#   PROXY_BIN=/tmp/forward_proxy bash benches/affinity_load.sh   # a build, no cargo
#
# Prints per round and then the medians: requests/s, p99, the proxy's CPU per request
# (user + system time of the process over the run, divided by wrk's requests), and the
# ratio of the default proxy's requests/s to the least-in-flight one's, taken within each
# round. Everything on 127.0.0.1; installs nginx, wrk, curl when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-8}
CONNECTIONS=${CONNECTIONS:-32}
WRK_THREADS=${WRK_THREADS:-2}
OUT=${OUT:-${CARGO_TARGET_DIR:-target}/affinity_load}
PORT_UPSTREAM=${PORT_UPSTREAM:-18390}
PORT_DEFAULT=${PORT_DEFAULT:-18391}
PORT_LIF=${PORT_LIF:-18392}
KEYS=k1,k2,k3

# shellcheck source=benches/proxy_bench_lib.sh
source benches/proxy_bench_lib.sh
install_missing
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
PROXY_BIN=$(proxy_bin)
raise_priority

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
mkdir -p "$OUT"
rm -rf "$OUT/nginx-upstream" "$OUT"/*.txt "$OUT/post.lua" "$OUT"/*.log
mkdir -p "$OUT/nginx-upstream"
OUT=$(cd "$OUT" && pwd)
trap cleanup EXIT INT TERM

upstream_nginx_conf "$OUT/nginx-upstream" "$PORT_UPSTREAM" >"$OUT/nginx-upstream/nginx.conf"
"$NGINX" -p "$OUT/nginx-upstream" -c "$OUT/nginx-upstream/nginx.conf" &
PIDS+=($!)
wait_ready "http://127.0.0.1:$PORT_UPSTREAM/api/paas/v4/chat/completions" "upstream nginx"

start_proxy() { # name, port, extra flags...
    local name=$1 port=$2
    shift 2
    log "starting $name on 127.0.0.1:$port (${*:-default flags})"
    BIGMODEL_API_KEY=$KEYS "$PROXY_BIN" --listen "127.0.0.1:$port" \
        --upstream "http://127.0.0.1:$PORT_UPSTREAM/api/paas/v4" --log-level warn "$@" \
        2>"$OUT/$name.log" &
    PIDS+=($!)
    wait_ready "http://127.0.0.1:$port/_keyrotation/health" "$name"
}
start_proxy default "$PORT_DEFAULT"
DEFAULT_PID=${PIDS[-1]}
start_proxy least_in_flight "$PORT_LIF" --affinity off --strategy least-in-flight
LIF_PID=${PIDS[-1]}

write_post_lua "$OUT/post.lua"
CLK_TCK=$(getconf CLK_TCK)

run() { # name, port, pid, round
    local file="$OUT/$1-$4.txt" before after requests
    before=$(cpu_ticks "$3")
    timeout $((DURATION + 60)) wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"${DURATION}s" \
        --timeout 10s --latency -s "$OUT/post.lua" \
        "http://127.0.0.1:$2/chat/completions" >"$file" 2>&1 || true
    after=$(cpu_ticks "$3")
    read -r rps p50 p99 errors <<<"$(parse_wrk "$file")"
    requests=$(awk '/requests in/ { print $1 }' "$file")
    cpu_us=$(awk -v t=$((after - before)) -v hz="$CLK_TCK" -v n="$requests" \
        'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
    echo "$1 $4 $rps $p50 $p99 $errors $cpu_us" >>"$OUT/runs.txt"
    log "$(printf '%-16s round %s: %s req/s, p99 %s ms, errors %s, CPU %s us/req' \
        "$1" "$4" "$rps" "$p99" "$errors" "$cpu_us")"
}

# Warm both (connections to the upstream, learned state) before counting.
for port in "$PORT_DEFAULT" "$PORT_LIF"; do
    timeout 30 wrk -t2 -c16 -d2s -s "$OUT/post.lua" "http://127.0.0.1:$port/chat/completions" \
        >/dev/null 2>&1 || true
done
for round in $(seq 1 "$ROUNDS"); do
    if [ $((round % 2)) = 1 ]; then
        run default "$PORT_DEFAULT" "$DEFAULT_PID" "$round"
        run least_in_flight "$PORT_LIF" "$LIF_PID" "$round"
    else
        run least_in_flight "$PORT_LIF" "$LIF_PID" "$round"
        run default "$PORT_DEFAULT" "$DEFAULT_PID" "$round"
    fi
done

# Affinity counted nothing: no request named a session.
hits=$(curl -fsS "http://127.0.0.1:$PORT_DEFAULT/_keyrotation/metrics" |
    awk '/^[a-z_]*affinity_hits/ { s += $NF; n++ } END { print s + 0 " (over " n + 0 " series)" }' || true)

python3 - "$OUT/runs.txt" "$hits" <<'EOF'
import statistics, sys
runs = [line.split() for line in open(sys.argv[1])]
by = {}
for name, rnd, rps, p50, p99, errors, cpu in runs:
    by.setdefault(name, {})[int(rnd)] = (float(rps), float(p99), int(errors), float(cpu))
d, l = by["default"], by["least_in_flight"]
rounds = sorted(d)
def med(xs):
    return f"{statistics.median(xs):,.1f} ({min(xs):,.1f}-{max(xs):,.1f})"
print(f"| proxy | req/s | p99 ms | CPU us/req | errors |")
print("| --- | ---: | ---: | ---: | ---: |")
for name, row in (("default flags (affinity on, round-robin)", d),
                  ("--affinity off --strategy least-in-flight", l)):
    print(f"| {name} | {med([row[r][0] for r in rounds])} | {med([row[r][1] for r in rounds])}"
          f" | {med([row[r][3] for r in rounds])} | {sum(row[r][2] for r in rounds)} |")
ratio = [d[r][0] / l[r][0] for r in rounds]
cpu = [d[r][3] / l[r][3] for r in rounds]
print()
print("default / least-in-flight, within each round: req/s "
      + ", ".join(f"{x:.3f}" for x in ratio) + f" (median {statistics.median(ratio):.3f});"
      + " CPU/req " + ", ".join(f"{x:.3f}" for x in cpu) + f" (median {statistics.median(cpu):.3f})")
print(f"affinity hits counted by the default proxy: {sys.argv[2]}")
EOF
