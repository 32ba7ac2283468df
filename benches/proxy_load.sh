#!/usr/bin/env bash
# Load test of examples/forward_proxy against nginx, on loopback only, bounded in time.
#
#   bash benches/proxy_load.sh                 # 3 rounds x 10 s per run, c = 16 and 64
#   DURATION=5 ROUNDS=1 bash benches/proxy_load.sh   # a quick look
#   PREV_BIN=/tmp/forward_proxy.prev bash benches/proxy_load.sh   # also (b0): another build
#   PROXY_EXTRA_ARGS="--workers 1" bash benches/proxy_load.sh     # flags for (b)
#   PROXY_BIN=/tmp/forward_proxy bash benches/proxy_load.sh       # (b): that build, no cargo
#
# Starts nginx (Debian's, installed when missing, as is wrk) as a fast upstream that answers
# every request with a fixed chat-completion JSON, then measures with wrk (POST, 2 threads):
#   (a) the upstream directly,
#   (b) our forward_proxy (keys k1,k2,k3 from BIGMODEL_API_KEY, round-robin),
#   (b0) when PREV_BIN names a binary: that build of forward_proxy, the same way (before and
#       after in one run),
#   (c) nginx as a reverse proxy putting one of the same 3 keys on Authorization, with
#       upstream keep-alive and NGINX_WORKERS worker processes (default 1),
# each for the same duration, interleaved (a, b, [b0,] c for each concurrency, then the next
# round), and reports the medians of the rounds: requests/s, p50 and p99 latency and the
# proxy's CPU time per request (user + system of the process, nginx's master and workers
# summed, over the run, divided by the requests wrk counted), as ratios to (a) and to (c).
# Then one run at BIG_CONNECTIONS (default 1000) connections against (b)[, (b0)] and (c),
# and the peak RSS (VmHWM; nginx: master + workers) of each proxy over the whole session.
# Last, the ratios the proxy's targets are stated in (BENCHMARKS.md, "Targets"): req/s ÷ nginx at
# each concurrency, CPU/request ÷ nginx, p99 ÷ nginx, peak RSS ÷ nginx.
# Raw wrk output goes to $OUT (default target/proxy_load); the tables to stdout and
# $OUT/results.md.
#
# Nothing leaves 127.0.0.1; every process the script starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONCURRENCY=${CONCURRENCY:-"16 64"}
BIG_CONNECTIONS=${BIG_CONNECTIONS:-1000}
WRK_THREADS=${WRK_THREADS:-2}
PORT_UPSTREAM=${PORT_UPSTREAM:-18081}
PORT_OURS=${PORT_OURS:-18082}
PORT_NGINX=${PORT_NGINX:-18083}
PORT_PREV=${PORT_PREV:-18084}
NGINX_WORKERS=${NGINX_WORKERS:-1}
PREV_BIN=${PREV_BIN:-}
read -r -a EXTRA_ARGS <<<"${PROXY_EXTRA_ARGS:-}"
OUT=${OUT:-target/proxy_load}
KEYS="k1,k2,k3"

# Shared with the other proxy scripts: log, install_missing, PIDS/cleanup, wait_ready,
# nginx_conf, CHAT, write_post_lua, parse_wrk, cpu_ticks, rss_kib, proxy_bin,
# raise_priority.
# shellcheck source=benches/proxy_bench_lib.sh
source benches/proxy_bench_lib.sh
install_missing
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

if [ ! -e examples/forward_proxy/Cargo.toml ]; then
    echo "examples/forward_proxy has not landed yet: nothing to measure for (b)." >&2
    exit 2
fi
PROXY_BIN=$(proxy_bin)
raise_priority

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
mkdir -p "$OUT"
# Only what this script writes there (OUT may be any directory).
rm -rf "$OUT/nginx-upstream" "$OUT/nginx-proxy" "$OUT"/*.txt "$OUT/post.lua" "$OUT/results.md" "$OUT/forward_proxy.log"
mkdir -p "$OUT/nginx-upstream" "$OUT/nginx-proxy"
OUT=$(cd "$OUT" && pwd)

# --- processes -------------------------------------------------------------------------
trap cleanup EXIT INT TERM

upstream_nginx_conf "$OUT/nginx-upstream" "$PORT_UPSTREAM" >"$OUT/nginx-upstream/nginx.conf"

proxy_nginx_conf "$OUT/nginx-proxy" "$PORT_NGINX" "$PORT_UPSTREAM" "$NGINX_WORKERS" >"$OUT/nginx-proxy/nginx.conf"

log "starting upstream nginx on 127.0.0.1:$PORT_UPSTREAM"
"$NGINX" -p "$OUT/nginx-upstream" -c "$OUT/nginx-upstream/nginx.conf" &
PIDS+=($!)
wait_ready "http://127.0.0.1:$PORT_UPSTREAM/api/paas/v4/chat/completions" "upstream nginx"

log "starting nginx reverse proxy on 127.0.0.1:$PORT_NGINX"
"$NGINX" -p "$OUT/nginx-proxy" -c "$OUT/nginx-proxy/nginx.conf" &
NGINX_PROXY_PID=$!
PIDS+=($NGINX_PROXY_PID)
wait_ready "http://127.0.0.1:$PORT_NGINX/chat/completions" "nginx reverse proxy"

PROXY_ARGS=(--listen "127.0.0.1:$PORT_OURS" --upstream "http://127.0.0.1:$PORT_UPSTREAM/api/paas/v4")
# One log line per request would measure the terminal, not the proxy.
if "$PROXY_BIN" --help 2>/dev/null | grep -q -- '--log-level'; then
    PROXY_ARGS+=(--log-level warn)
fi
PROXY_ARGS+=("${EXTRA_ARGS[@]}")
log "starting forward_proxy on 127.0.0.1:$PORT_OURS (${PROXY_ARGS[*]})"
BIGMODEL_API_KEY=$KEYS "$PROXY_BIN" "${PROXY_ARGS[@]}" 2>"$OUT/forward_proxy.log" &
OURS_PID=$!
PIDS+=($OURS_PID)
wait_ready "http://127.0.0.1:$PORT_OURS/_keyrotation/health" "forward_proxy"

TARGETS="upstream forward_proxy nginx_proxy"
PROXIES="forward_proxy nginx_proxy"
PREV_PID=""
if [ -n "$PREV_BIN" ]; then
    PREV_ARGS=(--listen "127.0.0.1:$PORT_PREV" --upstream "http://127.0.0.1:$PORT_UPSTREAM/api/paas/v4" --log-level warn)
    log "starting (b0) $PREV_BIN on 127.0.0.1:$PORT_PREV"
    BIGMODEL_API_KEY=$KEYS "$PREV_BIN" "${PREV_ARGS[@]}" 2>"$OUT/forward_proxy_prev.log" &
    PREV_PID=$!
    PIDS+=($PREV_PID)
    wait_ready "http://127.0.0.1:$PORT_PREV/_keyrotation/health" "forward_proxy (b0)"
    TARGETS="upstream forward_proxy forward_proxy_prev nginx_proxy"
    PROXIES="forward_proxy forward_proxy_prev nginx_proxy"
fi

# --- load ------------------------------------------------------------------------------
write_post_lua "$OUT/post.lua"

url_of() {
    case $1 in
    upstream) echo "http://127.0.0.1:$PORT_UPSTREAM/api/paas/v4/chat/completions" ;;
    forward_proxy) echo "http://127.0.0.1:$PORT_OURS/chat/completions" ;;
    nginx_proxy) echo "http://127.0.0.1:$PORT_NGINX/chat/completions" ;;
    forward_proxy_prev) echo "http://127.0.0.1:$PORT_PREV/chat/completions" ;;
    esac
}

pid_of() {
    case $1 in
    forward_proxy) echo "$OURS_PID" ;;
    forward_proxy_prev) echo "$PREV_PID" ;;
    nginx_proxy) echo "$NGINX_PROXY_PID" ;;
    *) echo "" ;;
    esac
}

CLK_TCK=$(getconf CLK_TCK)
run_wrk() { # target, connections, round
    local file="$OUT/$1-c$2-r$3.txt" threads=$WRK_THREADS pid before=0 after=0 requests cpu_us=0
    if [ "$2" -lt "$threads" ]; then threads=$2; fi
    pid=$(pid_of "$1")
    if [ -n "$pid" ]; then before=$(cpu_ticks "$pid"); fi
    timeout $((DURATION + 60)) wrk -t"$threads" -c"$2" -d"${DURATION}s" --timeout 10s --latency \
        -s "$OUT/post.lua" "$(url_of "$1")" >"$file" 2>&1 || true
    if [ -n "$pid" ]; then after=$(cpu_ticks "$pid"); fi
    requests=$(awk '/requests in/ { print $1 }' "$file")
    # CPU microseconds per request (whole process, the same stretch as wrk's).
    cpu_us=$(awk -v t=$((after - before)) -v hz="$CLK_TCK" -v n="${requests:-0}" \
        'BEGIN { if (n > 0 && t > 0) printf "%.1f", t * 1e6 / hz / n; else print 0 }')
    echo "$1 $2 $3 $(parse_wrk "$file") $cpu_us" >>"$OUT/runs.txt"
    log "$(printf '%-18s c=%-5s round %s: %s cpu_us/req %s' "$1" "$2" "$3" "$(parse_wrk "$file")" "$cpu_us")"
}

log "warm-up"
for target in $TARGETS; do
    timeout 30 wrk -t2 -c16 -d2s -s "$OUT/post.lua" "$(url_of $target)" >/dev/null 2>&1 || true
done

: >"$OUT/runs.txt"
for round in $(seq 1 "$ROUNDS"); do
    for c in $CONCURRENCY; do
        for target in $TARGETS; do
            run_wrk "$target" "$c" "$round"
        done
    done
done
for target in $PROXIES; do
    run_wrk "$target" "$BIG_CONNECTIONS" 1
done

declare -A RSS
for target in $PROXIES; do RSS[$target]=$(rss_kib "$(pid_of "$target")"); done

# --- report ----------------------------------------------------------------------------
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)]; else print 0 }'; }
field() { # target, connections, column (4 rps, 5 p50, 6 p99, 7 errors, 8 cpu µs/request)
    awk -v t="$1" -v c="$2" -v col="$3" '$1 == t && $2 == c { print $col }' "$OUT/runs.txt" | median
}
spread() { # target, connections, column: "min-max" over the rounds
    awk -v t="$1" -v c="$2" -v col="$3" '$1 == t && $2 == c { print $col }' "$OUT/runs.txt" | sort -g |
        awk 'NR == 1 { lo = $1 } { hi = $1 } END { if (NR > 1) printf "%.0f-%.0f", lo, hi; else printf "%.0f", lo }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0 && a > 0) printf "%.2f", a / b; else print "-" }'; }
# Ratio per round (the same round's runs were seconds apart), then "median (min-max)".
round_ratios() { # target, connections, column
    awk -v t="$1" -v c="$2" -v col="$3" '
        $2 == c && $1 == t { a[$3] = $col }
        $2 == c && $1 == "nginx_proxy" { b[$3] = $col }
        END { for (r in a) if (b[r] > 0 && a[r] > 0) printf "%.3f\n", a[r] / b[r] }' "$OUT/runs.txt" |
        sort -g | awk '{ v[NR] = $1 } END {
            if (NR == 0) { print "-"; exit }
            if (NR == 1) { printf "%.2f", v[1]; exit }
            printf "%.2f (%.2f-%.2f)", v[int((NR + 1) / 2)], v[1], v[NR] }'
}
name_of() {
    case $1 in
    upstream) echo "(a) upstream direct" ;;
    forward_proxy) echo "(b) forward_proxy" ;;
    forward_proxy_prev) echo "(b0) forward_proxy, PREV_BIN" ;;
    nginx_proxy) echo "(c) nginx proxy, $NGINX_WORKERS worker(s)" ;;
    esac
}

{
    echo "Machine: $(nproc) cores, $(lscpu | awk -F: '/Model name/ { gsub(/^ +/, "", $2); print $2; exit }'); load average before the report: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "wrk -t$WRK_THREADS, POST, ${DURATION} s per run, $ROUNDS rounds interleaved, medians (req/s range over the rounds); keys: 3; (b) flags: ${EXTRA_ARGS[*]:-none}"
    echo
    echo "| target | conns | req/s | req/s range | p50 ms | p99 ms | CPU µs/req | req/s ÷ (a) | req/s ÷ (c) | p99 ÷ (c) | CPU ÷ (c) | errors |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for c in $CONCURRENCY $BIG_CONNECTIONS; do
        a_rps=$(field upstream "$c" 4)
        c_rps=$(field nginx_proxy "$c" 4)
        c_p99=$(field nginx_proxy "$c" 6)
        c_cpu=$(field nginx_proxy "$c" 8)
        targets=$TARGETS
        if [ "$c" = "$BIG_CONNECTIONS" ]; then targets=$PROXIES; fi
        for target in $targets; do
            rps=$(field "$target" "$c" 4)
            p99=$(field "$target" "$c" 6)
            cpu=$(field "$target" "$c" 8)
            cpu_cell=$cpu
            if [ "$target" = upstream ]; then cpu_cell="-"; fi
            printf '| %s | %s | %.0f | %s | %.3f | %.3f | %s | %s | %s | %s | %s | %s |\n' "$(name_of "$target")" "$c" \
                "$rps" "$(spread "$target" "$c" 4)" "$(field "$target" "$c" 5)" "$p99" "$cpu_cell" \
                "$(ratio "$rps" "$a_rps")" "$(ratio "$rps" "$c_rps")" "$(ratio "$p99" "$c_p99")" \
                "$(ratio "$cpu" "$c_cpu")" "$(field "$target" "$c" 7)"
        done
    done
    echo
    echo "| proxy | peak RSS (whole session, incl. $BIG_CONNECTIONS connections) | ÷ (c) |"
    echo "| --- | ---: | ---: |"
    for target in $PROXIES; do
        printf '| %s | %.1f MiB | %s |\n' "$(name_of "$target")" \
            "$(awk -v k="${RSS[$target]}" 'BEGIN { print k / 1024 }')" "$(ratio "${RSS[$target]}" "${RSS[nginx_proxy]}")"
    done
    echo
    echo "Targets (issue 14), each ratio ÷ nginx per round, median (range):"
    echo
    echo "| proxy | target | ratio | met |"
    echo "| --- | --- | ---: | --- |"
    for target in ${PROXIES% nginx_proxy}; do
        met() { awk -v r="${1%% *}" -v lim="$2" -v dir="$3" 'BEGIN {
            if (r == "-") print "-"; else if ((dir == "ge" && r >= lim) || (dir == "le" && r <= lim)) print "yes"; else print "no" }'; }
        for c in $CONCURRENCY; do
            r=$(round_ratios "$target" "$c" 4)
            echo "| $(name_of "$target") | req/s ÷ nginx at c=$c ≥ 1.0 | $r | $(met "$r" 1.0 ge) |"
        done
        for c in $CONCURRENCY; do
            r=$(round_ratios "$target" "$c" 8)
            echo "| $(name_of "$target") | CPU/request ÷ nginx at c=$c ≤ 1.0 | $r | $(met "$r" 1.0 le) |"
        done
        last_c=${CONCURRENCY##* }
        r=$(round_ratios "$target" "$last_c" 6)
        echo "| $(name_of "$target") | p99 ÷ nginx at c=$last_c ≤ 1.0 | $r | $(met "$r" 1.0 le) |"
        r=$(ratio "${RSS[$target]}" "${RSS[nginx_proxy]}")
        echo "| $(name_of "$target") | peak RSS ($BIG_CONNECTIONS connections) ÷ nginx ≤ 1.2 | $r | $(met "$r" 1.2 le) |"
    done
} | tee "$OUT/results.md"
