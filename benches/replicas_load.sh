#!/usr/bin/env bash
# Requests/s of proxy replicas sharing their keys' state through Redis, against one proxy,
# on loopback only, bounded in time (BENCHMARKS.md, "Shared state through Redis").
#
#   bash benches/replicas_load.sh                  # 3 rounds x 10 s per setup, 48 connections
#   DURATION=5 ROUNDS=1 bash benches/replicas_load.sh   # a quick look
#   PROXY_BIN=/tmp/forward_proxy bash benches/replicas_load.sh   # that build, no cargo
#
# Starts nginx (Debian's, installed with wrk when missing) as the upstream answering a fixed
# chat-completion JSON, a redis-server (persistence off), and these forward_proxy setups,
# every process with `--workers 1`, keys k1,k2,k3:
#   mem1       1 proxy, no Redis
#   redis1     1 proxy sharing through Redis (alone in its namespace)
#   redis3     3 proxies sharing through Redis (one namespace)
# each with `--max-in-flight-per-key 1000` (CAP), a cap that never binds at these
# connection counts but puts every request through Redis's admission (one round trip);
# and, with NOCAP=1 (default), the same Redis setups without a cap (redis1-nocap,
# redis3-nocap), where only rests and disables are shared and no request waits for Redis.
# The client is the same for every setup: 3 wrk processes (1 thread each), CONNECTIONS/3
# connections each, POST, at the same time; for a 3-replica setup each wrk drives its own
# replica, for a 1-proxy setup all three drive the one proxy. Setups run interleaved
# (mem1, redis1, redis3, ... then the next round). Reported per setup, medians of the
# rounds: requests/s (the three wrk summed), its ratio to mem1 in the same round, p50 and
# p99 (the worst of the three wrk), CPU µs per request of the proxies (all replicas summed)
# and of redis-server, and errors (non-2xx, socket errors).
#
# On a 2-core machine three replicas cannot show scaling (they share the cores with each
# other, Redis, nginx and wrk): what this shows is the cost of sharing.
# Raw wrk output goes to $OUT (default target/replicas_load); the table to stdout and
# $OUT/results.md. Nothing leaves 127.0.0.1; every process started is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-48}
CAP=${CAP:-1000}
NOCAP=${NOCAP:-1}
# A port range of its own, so that proxy_load.sh can run beside it.
BASE_PORT=${BASE_PORT:-18210}
OUT=${OUT:-target/replicas_load}
KEYS="k1,k2,k3"

# shellcheck source=benches/proxy_bench_lib.sh
source benches/proxy_bench_lib.sh
install_missing
command -v redis-server >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
}
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

PROXY_BIN=${PROXY_BIN:-}
if [ -z "$PROXY_BIN" ]; then
    log "building examples/forward_proxy (release)"
    cargo build --release --quiet -p forward_proxy
    PROXY_BIN=target/release/forward_proxy
fi
if [ $((CONNECTIONS % 3)) -ne 0 ]; then
    echo "CONNECTIONS must be a multiple of 3 (spread over 3 wrk)" >&2
    exit 2
fi

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
mkdir -p "$OUT"
rm -rf "$OUT/nginx-upstream" "$OUT"/*.txt "$OUT/post.lua" "$OUT/results.md" "$OUT"/*.log
mkdir -p "$OUT/nginx-upstream"
OUT=$(cd "$OUT" && pwd)
trap cleanup EXIT INT TERM

PORT_UPSTREAM=$BASE_PORT
PORT_REDIS=$((BASE_PORT + 1))
upstream_nginx_conf "$OUT/nginx-upstream" "$PORT_UPSTREAM" >"$OUT/nginx-upstream/nginx.conf"
log "starting upstream nginx on 127.0.0.1:$PORT_UPSTREAM"
"$NGINX" -p "$OUT/nginx-upstream" -c "$OUT/nginx-upstream/nginx.conf" &
PIDS+=($!)
wait_ready "http://127.0.0.1:$PORT_UPSTREAM/api/paas/v4/chat/completions" "upstream nginx"

log "starting redis-server on 127.0.0.1:$PORT_REDIS"
redis-server --port "$PORT_REDIS" --bind 127.0.0.1 --save "" --appendonly no \
    >"$OUT/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=($REDIS_PID)
for _ in $(seq 1 100); do
    if grep -q "Ready to accept connections" "$OUT/redis.log"; then break; fi
    sleep 0.1
done

# --- the setups ------------------------------------------------------------------------
declare -A SETUP_PORTS SETUP_PIDS
next_port=$((BASE_PORT + 2))
start_proxy() { # setup, namespace ("" for none), cap ("" for none)
    local args=(--listen "127.0.0.1:$next_port" --upstream "http://127.0.0.1:$PORT_UPSTREAM/api/paas/v4"
        --log-level warn --workers 1)
    local env=(BIGMODEL_API_KEY=$KEYS)
    if [ -n "$3" ]; then args+=(--max-in-flight-per-key "$3"); fi
    if [ -n "$2" ]; then
        env+=(REDIS_URL="redis://127.0.0.1:$PORT_REDIS" REPLICAS_SECRET=bench-secret)
        args+=(--redis-namespace "$2" --redis-secret-env REPLICAS_SECRET)
    fi
    env "${env[@]}" "$PROXY_BIN" "${args[@]}" 2>>"$OUT/$1.log" &
    PIDS+=($!)
    SETUP_PIDS[$1]="${SETUP_PIDS[$1]:-} $!"
    SETUP_PORTS[$1]="${SETUP_PORTS[$1]:-} $next_port"
    wait_ready "http://127.0.0.1:$next_port/_keyrotation/health" "forward_proxy ($1)"
    next_port=$((next_port + 1))
}

SETUPS="mem1 redis1 redis3"
start_proxy mem1 "" "$CAP"
start_proxy redis1 one "$CAP"
for _ in 1 2 3; do start_proxy redis3 three "$CAP"; done
if [ "$NOCAP" = 1 ]; then
    SETUPS="$SETUPS redis1-nocap redis3-nocap"
    start_proxy redis1-nocap one-nocap ""
    for _ in 1 2 3; do start_proxy redis3-nocap three-nocap ""; done
fi
# Every replica of a setup sees the others before the load starts.
for port in ${SETUP_PORTS[redis3]}; do
    for _ in $(seq 1 50); do
        if curl -fsS "http://127.0.0.1:$port/_keyrotation/backend" | grep -q '"replicas":3'; then break; fi
        sleep 0.2
    done
done

# --- load ------------------------------------------------------------------------------
write_post_lua "$OUT/post.lua"
CLK_TCK=$(getconf CLK_TCK)
ticks_of() { # pids: their user + system ticks so far, summed
    local total=0 pid
    for pid in "$@"; do total=$((total + $(cpu_ticks "$pid"))); done
    echo "$total"
}

run_setup() { # setup, round
    local setup=$1 round=$2 ports=() i port file pids before after redis_before redis_after
    read -r -a ports <<<"${SETUP_PORTS[$setup]}"
    read -r -a pids <<<"${SETUP_PIDS[$setup]}"
    before=$(ticks_of "${pids[@]}")
    redis_before=$(cpu_ticks "$REDIS_PID")
    local wrks=()
    for i in 0 1 2; do
        port=${ports[$((i % ${#ports[@]}))]}
        file="$OUT/$setup-r$round-w$i.txt"
        timeout $((DURATION + 60)) wrk -t1 -c$((CONNECTIONS / 3)) -d"${DURATION}s" --timeout 10s --latency \
            -s "$OUT/post.lua" "http://127.0.0.1:$port/chat/completions" >"$file" 2>&1 &
        wrks+=($!)
    done
    for i in "${wrks[@]}"; do wait "$i" || true; done
    after=$(ticks_of "${pids[@]}")
    redis_after=$(cpu_ticks "$REDIS_PID")
    # Sum of req/s and requests, worst p50/p99, sum of errors over the three wrk.
    local line
    line=$(for i in 0 1 2; do
        f="$OUT/$setup-r$round-w$i.txt"
        echo "$(parse_wrk "$f") $(awk '/requests in/ { print $1 }' "$f")"
    done | awk -v t=$((after - before)) -v rt=$((redis_after - redis_before)) -v hz="$CLK_TCK" '
        { rps += $1; if ($2 > p50) p50 = $2; if ($3 > p99) p99 = $3; errors += $4; n += $5 }
        END {
            cpu = (n > 0) ? t * 1e6 / hz / n : 0
            rcpu = (n > 0) ? rt * 1e6 / hz / n : 0
            printf "%.0f %.3f %.3f %d %.1f %.1f\n", rps, p50, p99, errors, cpu, rcpu
        }')
    echo "$setup $round $line" >>"$OUT/runs.txt"
    log "$(printf '%-13s round %s: req/s %s p50 %s p99 %s errors %s proxy CPU µs/req %s redis %s' "$setup" "$round" $line)"
}

log "warm-up"
for setup in $SETUPS; do
    for port in ${SETUP_PORTS[$setup]}; do
        timeout 30 wrk -t1 -c8 -d1s -s "$OUT/post.lua" "http://127.0.0.1:$port/chat/completions" >/dev/null 2>&1 || true
    done
done
: >"$OUT/runs.txt"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
for round in $(seq 1 "$ROUNDS"); do
    for setup in $SETUPS; do
        run_setup "$setup" "$round"
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report ----------------------------------------------------------------------------
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)]; else print 0 }'; }
field() { # setup, column (3 rps, 4 p50, 5 p99, 6 errors, 7 proxy CPU, 8 redis CPU)
    awk -v s="$1" -v col="$2" '$1 == s { print $col }' "$OUT/runs.txt" | median
}
# req/s ÷ mem1's in the same round, then "median (min-max)".
round_ratio() {
    awk -v s="$1" '
        $1 == s { a[$2] = $3 }
        $1 == "mem1" { b[$2] = $3 }
        END { for (r in a) if (b[r] > 0) printf "%.3f\n", a[r] / b[r] }' "$OUT/runs.txt" |
        sort -g | awk '{ v[NR] = $1 } END {
            if (NR == 0) { print "-"; exit }
            if (NR == 1) { printf "%.2f", v[1]; exit }
            printf "%.2f (%.2f-%.2f)", v[int((NR + 1) / 2)], v[1], v[NR] }'
}
describe() {
    case $1 in
    mem1) echo "1 proxy, no Redis" ;;
    redis1) echo "1 proxy, Redis, cap $CAP (each request admitted by Redis)" ;;
    redis3) echo "3 proxies, Redis, cap $CAP (each request admitted by Redis)" ;;
    redis1-nocap) echo "1 proxy, Redis, no cap (rests shared only)" ;;
    redis3-nocap) echo "3 proxies, Redis, no cap (rests shared only)" ;;
    esac
}
{
    echo "Machine: $(nproc) cores, $(lscpu | awk -F: '/Model name/ { gsub(/^ +/, "", $2); print $2; exit }'); load average $LOAD_BEFORE before the runs, $LOAD_AFTER after"
    echo "$CONNECTIONS connections over 3 wrk (-t1 each), POST, ${DURATION} s per run, $ROUNDS rounds interleaved, medians; every proxy --workers 1; keys: 3; $(redis-server --version | cut -d' ' -f1-3)"
    echo
    echo "| setup | req/s | ÷ 1 proxy without Redis (per round) | p50 ms | p99 ms | proxies' CPU µs/req | Redis CPU µs/req | CPU µs/req in all | ÷ 1 proxy without Redis | errors |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    base_cpu=$(awk -v a="$(field mem1 7)" -v b="$(field mem1 8)" 'BEGIN { print a + b }')
    for setup in $SETUPS; do
        cpu=$(awk -v a="$(field "$setup" 7)" -v b="$(field "$setup" 8)" 'BEGIN { print a + b }')
        printf '| %s | %.0f | %s | %.2f | %.2f | %s | %s | %.1f | %s | %s |\n' "$(describe "$setup")" "$(field "$setup" 3)" \
            "$(round_ratio "$setup")" "$(field "$setup" 4)" "$(field "$setup" 5)" "$(field "$setup" 7)" \
            "$(field "$setup" 8)" "$cpu" "$(awk -v a="$cpu" -v b="$base_cpu" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')" \
            "$(field "$setup" 6)"
    done
    echo
    echo "CPU µs/req in all: the proxies' and Redis's user + system time over the run, per request"
    echo "(medians of each); on a shared machine the CPU a setup gets, and so its req/s, depends on"
    echo "how many runnable threads it has against the other tenants: compare the CPU per request."

} | tee "$OUT/results.md"
