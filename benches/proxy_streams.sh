#!/usr/bin/env bash
# Server-sent event streams through examples/forward_proxy and through nginx, side by side,
# on loopback only, bounded in time.
#
#   bash benches/proxy_streams.sh                       # 3 rounds, 200, 1,000 and 5,000 streams, 10 s each
#   STREAMS="1000" ROUNDS=1 DURATION=6 bash benches/proxy_streams.sh   # a quick look
#   PROXY_BIN=/tmp/forward_proxy bash benches/proxy_streams.sh         # a build without cargo
#
# The upstream is `loadgen sse-upstream` (benches/loadgen.rs): every request gets 100
# events of ~60 bytes, 20 ms apart, each stamped with the time it was written. `loadgen
# sse-client` holds STREAMS connections, each asking for one stream after another, for
# DURATION seconds, against
#   (a) the upstream directly,
#   (b) forward_proxy (keys k1,k2,k3, round-robin, log level warn, its default workers),
#   (c) nginx as one would set it for SSE: `proxy_buffering off`, HTTP/1.1 and keep-alive
#       to the upstream, one of the 3 keys on Authorization, NGINX_WORKERS workers (1),
# interleaved (a, b, c for each stream count, then the next round). Each proxy is started
# afresh for each run, so its RSS at the start is its idle size. Per run: the latency each
# event took from the upstream's write to the client's read (p50, p99), the proxy's CPU
# (user + system, nginx's master and workers summed) per event delivered, and its RSS with
# every stream open (the middle of the run) minus its RSS before, per open stream. Added
# latency is (b) or (c) minus (a) of the same round. The report gives each figure's median
# over the rounds with its range, and the ratios to nginx taken per round.
# Raw output goes to $OUT (default target/proxy_streams); the tables to stdout and
# $OUT/results.md. Every process started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
STREAMS=${STREAMS:-"200 1000 5000"}
CHUNKS=${CHUNKS:-100}
INTERVAL_MS=${INTERVAL_MS:-20}
PORT_UPSTREAM=${PORT_UPSTREAM:-18101}
PORT_OURS=${PORT_OURS:-18102}
PORT_NGINX=${PORT_NGINX:-18103}
NGINX_WORKERS=${NGINX_WORKERS:-1}
read -r -a EXTRA_ARGS <<<"${PROXY_EXTRA_ARGS:-}"
OUT=${OUT:-target/proxy_streams}
KEYS="k1,k2,k3"

# shellcheck source=benches/proxy_bench_lib.sh
source benches/proxy_bench_lib.sh
install_missing
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
PROXY=$(proxy_bin)
LOADGEN=$(loadgen_bin)
[ -x "$LOADGEN" ] || { echo "benches/loadgen.rs did not build" >&2; exit 1; }
raise_priority

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
prepare_out nginx-proxy
export CLK_TCK
CLK_TCK=$(getconf CLK_TCK)

# nginx for SSE: no buffering of the answer, keep-alive to the upstream; room for 2
# connections per stream.
nginx_conf "$OUT/nginx-proxy" "$PORT_NGINX" "
    $(nginx_keys_upstream "$PORT_UPSTREAM")
    server {
        listen 127.0.0.1:$PORT_NGINX backlog=8192;
        location / {
            proxy_pass http://provider/api/paas/v4/;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Authorization \$api_key;
            proxy_buffering off;
            proxy_read_timeout 300s;
        }
    }" "$NGINX_WORKERS" | sed 's/worker_connections 8192/worker_connections 16384/' >"$OUT/nginx-proxy/nginx.conf"

log "starting the SSE upstream on 127.0.0.1:$PORT_UPSTREAM"
"$LOADGEN" sse-upstream --listen "127.0.0.1:$PORT_UPSTREAM" --chunks "$CHUNKS" \
    --interval-ms "$INTERVAL_MS" 2>"$OUT/upstream.log" &
UPSTREAM_PID=$!
PIDS+=($UPSTREAM_PID)
for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT_UPSTREAM") 2>/dev/null; then break; fi
    sleep 0.1
done

RUNNING_PID=""
start_proxy() { # target: starts it, sets RUNNING_PID
    case $1 in
    forward_proxy)
        start_forward_proxy "http://127.0.0.1:$PORT_UPSTREAM/api/paas/v4"
        RUNNING_PID=$OURS_PID
        ;;
    nginx_proxy)
        "$NGINX" -p "$OUT/nginx-proxy" -c "$OUT/nginx-proxy/nginx.conf" 2>>"$OUT/nginx.log" &
        RUNNING_PID=$!
        for _ in $(seq 1 100); do
            if (exec 3<>"/dev/tcp/127.0.0.1/$PORT_NGINX") 2>/dev/null; then break; fi
            sleep 0.1
        done
        ;;
    *) RUNNING_PID="" ;;
    esac
    if [ "$1" = nginx_proxy ]; then PIDS+=("$RUNNING_PID"); fi
}

run() { # target, streams, round
    local pids="" line
    start_proxy "$1"
    if [ -n "$RUNNING_PID" ]; then pids=$(pids_of "$RUNNING_PID"); fi
    line=$(timeout $((DURATION + 120)) "$LOADGEN" sse-client --url "$(url_of "$1")" --streams "$2" \
        --duration "$DURATION" --ramp-ms 1000 --warmup-ms 2000 --pids "$pids" --also-pids "$UPSTREAM_PID" \
        2>>"$OUT/client.log" || echo "failed=1")
    if [ -n "$RUNNING_PID" ]; then stop_pid "$RUNNING_PID"; fi
    echo "target=$1 round=$3 $line" >>"$OUT/runs.txt"
    log "$(printf '%-14s streams=%-5s round %s: %s' "$1" "$2" "$3" "$line")"
}

: >"$OUT/runs.txt"
for round in $(seq 1 "$ROUNDS"); do
    for n in $STREAMS; do
        for target in upstream forward_proxy nginx_proxy; do
            run "$target" "$n" "$round"
        done
    done
done

{
    machine_line
    echo "$ROUNDS rounds × ${DURATION} s per run, interleaved; $CHUNKS events per stream, ${INTERVAL_MS} ms apart; nginx $NGINX_WORKERS worker(s); (b) flags: ${EXTRA_ARGS[*]:-none}"
    echo
    python3 benches/load_report.py streams "$OUT/runs.txt"
} | tee "$OUT/results.md"
