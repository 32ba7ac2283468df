#!/usr/bin/env bash
# Latency the proxy adds at a fixed request rate (open loop), against the upstream directly
# and against nginx, on loopback only, bounded in time.
#
#   bash benches/proxy_rate.sh                    # 3 rounds x 10 s at 5,000 requests/s
#   RATES="1000 5000" ROUNDS=1 bash benches/proxy_rate.sh
#   PROXY_BIN=/tmp/forward_proxy bash benches/proxy_rate.sh
#
# The upstream is nginx answering every POST with a fixed chat-completion JSON (as in
# proxy_load.sh). `loadgen rate` (benches/loadgen.rs) sends POSTs at RATE per second over
# CONNECTIONS connections whatever the answers do (request i is due at start + i / rate,
# on connection i % CONNECTIONS; it is timed from its write to the end of its answer, and
# how late the send left is reported beside), the first 2 s not counted, against
#   (a) the upstream directly,
#   (b) forward_proxy (keys k1,k2,k3, round-robin, log level warn, its default workers),
#   (c) nginx as a key-injecting reverse proxy (one worker, upstream keep-alive),
# interleaved per round. Added latency is (b) or (c) minus (a) of the same round, p50 and
# p99; the report gives medians over the rounds (range).
# Raw output goes to $OUT (default target/proxy_rate); the tables to stdout and
# $OUT/results.md. Every process started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
RATES=${RATES:-5000}
CONNECTIONS=${CONNECTIONS:-50}
PORT_UPSTREAM=${PORT_UPSTREAM:-18121}
PORT_OURS=${PORT_OURS:-18122}
PORT_NGINX=${PORT_NGINX:-18123}
NGINX_WORKERS=${NGINX_WORKERS:-1}
read -r -a EXTRA_ARGS <<<"${PROXY_EXTRA_ARGS:-}"
OUT=${OUT:-target/proxy_rate}
KEYS="k1,k2,k3"

# shellcheck source=benches/proxy_bench_lib.sh
source benches/proxy_bench_lib.sh
install_missing
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
PROXY=$(proxy_bin)
LOADGEN=$(loadgen_bin)
[ -x "$LOADGEN" ] || { echo "benches/loadgen.rs did not build" >&2; exit 1; }
raise_priority

prepare_out nginx-upstream nginx-proxy

upstream_nginx_conf "$OUT/nginx-upstream" "$PORT_UPSTREAM" >"$OUT/nginx-upstream/nginx.conf"
proxy_nginx_conf "$OUT/nginx-proxy" "$PORT_NGINX" "$PORT_UPSTREAM" "$NGINX_WORKERS" >"$OUT/nginx-proxy/nginx.conf"

"$NGINX" -p "$OUT/nginx-upstream" -c "$OUT/nginx-upstream/nginx.conf" &
UPSTREAM_PID=$!
PIDS+=($UPSTREAM_PID)
wait_ready "http://127.0.0.1:$PORT_UPSTREAM/api/paas/v4/chat/completions" "upstream nginx"
"$NGINX" -p "$OUT/nginx-proxy" -c "$OUT/nginx-proxy/nginx.conf" &
NGINX_PROXY_PID=$!
PIDS+=($NGINX_PROXY_PID)
wait_ready "http://127.0.0.1:$PORT_NGINX/chat/completions" "nginx reverse proxy"
start_forward_proxy "http://127.0.0.1:$PORT_UPSTREAM/api/paas/v4"

pid_of() {
    case $1 in
    forward_proxy) pids_of "$OURS_PID" ;;
    nginx_proxy) pids_of "$NGINX_PROXY_PID" ;;
    esac
}

: >"$OUT/runs.txt"
for round in $(seq 1 "$ROUNDS"); do
    for rate in $RATES; do
        for target in upstream forward_proxy nginx_proxy; do
            line=$(timeout $((DURATION + 60)) "$LOADGEN" rate --url "$(url_of "$target")" --rate "$rate" \
                --duration "$DURATION" --warmup-ms 2000 --connections "$CONNECTIONS" \
                --pids "$(pid_of "$target")" --also-pids "$(pids_of "$UPSTREAM_PID")" \
                2>>"$OUT/client.log" || echo "failed=1")
            echo "target=$target round=$round $line" >>"$OUT/runs.txt"
            log "$(printf '%-14s rate=%-5s round %s: %s' "$target" "$rate" "$round" "$line")"
        done
    done
done

{
    machine_line
    echo "loadgen rate (open loop), POST, $CONNECTIONS connections, ${DURATION} s per run (the first 2 s not counted), $ROUNDS rounds interleaved; nginx $NGINX_WORKERS worker(s); (b) flags: ${EXTRA_ARGS[*]:-none}"
    echo
    python3 benches/load_report.py rate "$OUT/runs.txt"
} | tee "$OUT/results.md"
