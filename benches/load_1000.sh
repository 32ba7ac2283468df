#!/usr/bin/env bash
# Holds 1,000 concurrent connections through examples/forward_proxy for 60 s against a fast
# local upstream (nginx answering a fixed chat-completion JSON), on loopback only.
#
#   bash benches/load_1000.sh                  # 1,000 connections, 60 s
#   bash benches/load_1000.sh --duration 10    # shorter
#   CONNECTIONS=2000 bash benches/load_1000.sh
#
# Reports requests/s, p50/p99 latency (wrk --latency), errors (socket errors and non-2xx
# answers: must be 0, else the script exits 1), the proxy's peak RSS (VmHWM), and checks
# that no key is left in flight afterwards (/_keyrotation/keys). nginx and wrk come from
# Debian and are installed when missing. Raw output goes to $OUT (default
# target/load_1000); the summary to stdout and $OUT/results.md. Every process started
# here is stopped on exit; wrk is bounded by `timeout`.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-60}
CONNECTIONS=${CONNECTIONS:-1000}
WRK_THREADS=${WRK_THREADS:-2}
PORT_UPSTREAM=${PORT_UPSTREAM:-18091}
PORT_PROXY=${PORT_PROXY:-18092}
OUT=${OUT:-target/load_1000}
while [ $# -gt 0 ]; do
    case $1 in
    --duration) DURATION=$2; shift 2 ;;
    --connections) CONNECTIONS=$2; shift 2 ;;
    -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

# shellcheck source=benches/proxy_bench_lib.sh
source benches/proxy_bench_lib.sh
install_missing
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

PROXY_BIN=$(proxy_bin)

# 1,000 client sockets, 1,000 proxy sockets and the proxy's upstream connections.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" -lt $((CONNECTIONS * 3 + 100)) ]; then
    echo "open files limit $(ulimit -n) is too low for $CONNECTIONS connections" >&2
    exit 1
fi
mkdir -p "$OUT"
rm -rf "$OUT/nginx-upstream" "$OUT/wrk.txt" "$OUT/post.lua" "$OUT/results.md" "$OUT/forward_proxy.log"
mkdir -p "$OUT/nginx-upstream"
OUT=$(cd "$OUT" && pwd)
trap cleanup EXIT INT TERM

upstream_nginx_conf "$OUT/nginx-upstream" "$PORT_UPSTREAM" "backlog=4096" >"$OUT/nginx-upstream/nginx.conf"
log "starting upstream nginx on 127.0.0.1:$PORT_UPSTREAM"
"$NGINX" -p "$OUT/nginx-upstream" -c "$OUT/nginx-upstream/nginx.conf" &
PIDS+=($!)
wait_ready "http://127.0.0.1:$PORT_UPSTREAM/api/paas/v4/chat/completions" "upstream nginx"

KEYS="load-key-1,load-key-2,load-key-3"
log "starting forward_proxy on 127.0.0.1:$PORT_PROXY (3 keys, log level warn)"
BIGMODEL_API_KEY=$KEYS "$PROXY_BIN" --listen "127.0.0.1:$PORT_PROXY" \
    --upstream "http://127.0.0.1:$PORT_UPSTREAM/api/paas/v4" --log-level warn \
    2>"$OUT/forward_proxy.log" &
PROXY_PID=$!
PIDS+=($PROXY_PID)
wait_ready "http://127.0.0.1:$PORT_PROXY/_keyrotation/health" "forward_proxy"

write_post_lua "$OUT/post.lua"
log "wrk: $CONNECTIONS connections for ${DURATION} s through the proxy"
timeout $((DURATION + 60)) wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --timeout 10s --latency \
    -s "$OUT/post.lua" "http://127.0.0.1:$PORT_PROXY/chat/completions" >"$OUT/wrk.txt" 2>&1 || true
read -r RPS P50 P99 ERRORS < <(parse_wrk "$OUT/wrk.txt")
REQUESTS=$(awk '/requests in/ { print $1 }' "$OUT/wrk.txt")
RSS_KIB=$(rss_kib "$PROXY_PID")
IN_FLIGHT=$(curl -fsS --max-time 5 "http://127.0.0.1:$PORT_PROXY/_keyrotation/keys" |
    grep -o '"in_flight":[0-9]*' | awk -F: '{ s += $2 } END { print s + 0 }')
ALIVE=$(curl -fsS --max-time 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT_PROXY/_keyrotation/health" || echo down)
LEAKED=0
for key in ${KEYS//,/ }; do
    if grep -q -- "$key" "$OUT/forward_proxy.log" "$OUT/wrk.txt"; then LEAKED=1; fi
done

{
    echo "Machine: $(nproc) cores, $(lscpu | awk -F: '/Model name/ { gsub(/^ +/, "", $2); print $2; exit }'); load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "wrk -t$WRK_THREADS -c$CONNECTIONS -d${DURATION}s, POST through forward_proxy (3 keys, round-robin) to nginx, all on 127.0.0.1"
    echo
    echo "| connections | duration | requests | req/s | p50 ms | p99 ms | errors | proxy peak RSS | in flight after | health after |"
    echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    printf '| %s | %s s | %s | %.0f | %.2f | %.2f | %s | %.1f MiB | %s | %s |\n' "$CONNECTIONS" "$DURATION" \
        "$REQUESTS" "$RPS" "$P50" "$P99" "$ERRORS" "$(awk -v k="$RSS_KIB" 'BEGIN { print k / 1024 }')" \
        "$IN_FLIGHT" "$ALIVE"
} | tee "$OUT/results.md"

status=0
if [ "$ERRORS" != 0 ]; then echo "FAIL: $ERRORS errors (see $OUT/wrk.txt)" >&2; status=1; fi
if [ "$IN_FLIGHT" != 0 ]; then echo "FAIL: $IN_FLIGHT requests still in flight" >&2; status=1; fi
if [ "$ALIVE" != 200 ]; then echo "FAIL: the proxy's health route answered $ALIVE" >&2; status=1; fi
if [ "$LEAKED" != 0 ]; then echo "FAIL: a key value appears in the output" >&2; status=1; fi
if ! grep -q "Requests/sec" "$OUT/wrk.txt"; then echo "FAIL: wrk did not finish" >&2; status=1; fi
exit $status
