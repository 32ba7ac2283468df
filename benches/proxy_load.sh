#!/usr/bin/env bash
# Load test of examples/forward_proxy against nginx, on loopback only, bounded in time.
#
#   bash benches/proxy_load.sh                 # 3 rounds x 10 s per run, c = 16 and 64
#   DURATION=5 ROUNDS=1 bash benches/proxy_load.sh   # a quick look
#
# Starts nginx (Debian's, installed when missing, as is wrk) as a fast upstream that answers
# every request with a fixed chat-completion JSON, then measures with wrk (POST, 2 threads):
#   (a) the upstream directly,
#   (b) our forward_proxy (keys k1,k2,k3 from BIGMODEL_API_KEY, round-robin),
#   (c) nginx as a reverse proxy putting one of the same 3 keys on Authorization, with
#       upstream keep-alive,
# each for the same duration, interleaved (a, b, c for each concurrency, then the next round),
# and reports the medians of the rounds: requests/s, p50 and p99 latency, as ratios to (a)
# and to (c). Then one run at BIG_CONNECTIONS (default 1000) connections against (b) and (c),
# and the peak RSS (VmHWM; nginx: master + workers) of both proxies over the whole session.
# Raw wrk output goes to $OUT (default target/proxy_load); the table to stdout and
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
OUT=${OUT:-target/proxy_load}
KEYS="k1,k2,k3"

# Shared with load_1000.sh: log, install_missing, PIDS/cleanup, wait_ready, nginx_conf,
# CHAT, write_post_lua, parse_wrk, rss_kib.
# shellcheck source=benches/proxy_bench_lib.sh
source benches/proxy_bench_lib.sh
install_missing
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

if [ ! -e examples/forward_proxy/Cargo.toml ]; then
    echo "examples/forward_proxy has not landed yet: nothing to measure for (b)." >&2
    exit 2
fi
log "building examples/forward_proxy (release)"
cargo build --release --quiet -p forward_proxy
PROXY_BIN=target/release/forward_proxy

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
mkdir -p "$OUT"
# Only what this script writes there (OUT may be any directory).
rm -rf "$OUT/nginx-upstream" "$OUT/nginx-proxy" "$OUT"/*.txt "$OUT/post.lua" "$OUT/results.md" "$OUT/forward_proxy.log"
mkdir -p "$OUT/nginx-upstream" "$OUT/nginx-proxy"
OUT=$(cd "$OUT" && pwd)

# --- processes -------------------------------------------------------------------------
trap cleanup EXIT INT TERM

nginx_conf "$OUT/nginx-upstream" "$PORT_UPSTREAM" "
    server {
        listen 127.0.0.1:$PORT_UPSTREAM;
        location / { default_type application/json; return 200 '$CHAT'; }
    }" >"$OUT/nginx-upstream/nginx.conf"

nginx_conf "$OUT/nginx-proxy" "$PORT_NGINX" "
    upstream provider { server 127.0.0.1:$PORT_UPSTREAM; keepalive 256; }
    split_clients \"\${connection}\${connection_requests}\" \$api_key {
        33.3% \"Bearer k1\";
        33.3% \"Bearer k2\";
        *     \"Bearer k3\";
    }
    server {
        listen 127.0.0.1:$PORT_NGINX;
        location / {
            proxy_pass http://provider/api/paas/v4/;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Authorization \$api_key;
        }
    }" >"$OUT/nginx-proxy/nginx.conf"

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
log "starting forward_proxy on 127.0.0.1:$PORT_OURS (${PROXY_ARGS[*]})"
BIGMODEL_API_KEY=$KEYS "$PROXY_BIN" "${PROXY_ARGS[@]}" 2>"$OUT/forward_proxy.log" &
OURS_PID=$!
PIDS+=($OURS_PID)
wait_ready "http://127.0.0.1:$PORT_OURS/_keyrotation/health" "forward_proxy"

# --- load ------------------------------------------------------------------------------
write_post_lua "$OUT/post.lua"

url_of() {
    case $1 in
    upstream) echo "http://127.0.0.1:$PORT_UPSTREAM/api/paas/v4/chat/completions" ;;
    forward_proxy) echo "http://127.0.0.1:$PORT_OURS/chat/completions" ;;
    nginx_proxy) echo "http://127.0.0.1:$PORT_NGINX/chat/completions" ;;
    esac
}

run_wrk() { # target, connections, round
    local file="$OUT/$1-c$2-r$3.txt" threads=$WRK_THREADS
    if [ "$2" -lt "$threads" ]; then threads=$2; fi
    timeout $((DURATION + 60)) wrk -t"$threads" -c"$2" -d"${DURATION}s" --timeout 10s --latency \
        -s "$OUT/post.lua" "$(url_of "$1")" >"$file" 2>&1 || true
    echo "$1 $2 $3 $(parse_wrk "$file")" >>"$OUT/runs.txt"
    log "$(printf '%-14s c=%-5s round %s: %s' "$1" "$2" "$3" "$(parse_wrk "$file")")"
}

log "warm-up"
for target in upstream forward_proxy nginx_proxy; do
    timeout 30 wrk -t2 -c16 -d2s -s "$OUT/post.lua" "$(url_of $target)" >/dev/null 2>&1 || true
done

: >"$OUT/runs.txt"
for round in $(seq 1 "$ROUNDS"); do
    for c in $CONCURRENCY; do
        for target in upstream forward_proxy nginx_proxy; do
            run_wrk "$target" "$c" "$round"
        done
    done
done
for target in forward_proxy nginx_proxy; do
    run_wrk "$target" "$BIG_CONNECTIONS" 1
done

OURS_RSS=$(rss_kib "$OURS_PID")
NGINX_RSS=$(rss_kib "$NGINX_PROXY_PID")

# --- report ----------------------------------------------------------------------------
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)]; else print 0 }'; }
field() { # target, connections, column (4 rps, 5 p50, 6 p99, 7 errors)
    awk -v t="$1" -v c="$2" -v col="$3" '$1 == t && $2 == c { print $col }' "$OUT/runs.txt" | median
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }

{
    echo "Machine: $(nproc) cores, $(lscpu | awk -F: '/Model name/ { gsub(/^ +/, "", $2); print $2; exit }'); load average before the report: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "wrk -t$WRK_THREADS, POST, ${DURATION} s per run, $ROUNDS rounds interleaved, medians; keys: 3"
    echo
    echo "| target | conns | req/s | p50 ms | p99 ms | req/s ÷ (a) | req/s ÷ (c) | p99 ÷ (c) | errors |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for c in $CONCURRENCY; do
        a_rps=$(field upstream "$c" 4)
        c_rps=$(field nginx_proxy "$c" 4)
        c_p99=$(field nginx_proxy "$c" 6)
        for target in upstream forward_proxy nginx_proxy; do
            rps=$(field "$target" "$c" 4)
            p50=$(field "$target" "$c" 5)
            p99=$(field "$target" "$c" 6)
            errors=$(field "$target" "$c" 7)
            case $target in
            upstream) name="(a) upstream direct" ;;
            forward_proxy) name="(b) forward_proxy" ;;
            nginx_proxy) name="(c) nginx proxy" ;;
            esac
            printf '| %s | %s | %.0f | %.3f | %.3f | %s | %s | %s | %s |\n' "$name" "$c" "$rps" "$p50" "$p99" \
                "$(ratio "$rps" "$a_rps")" "$(ratio "$rps" "$c_rps")" "$(ratio "$p99" "$c_p99")" "$errors"
        done
    done
    b_rps=$(field forward_proxy "$BIG_CONNECTIONS" 4)
    n_rps=$(field nginx_proxy "$BIG_CONNECTIONS" 4)
    printf '| (b) forward_proxy | %s | %.0f | %.3f | %.3f | - | %s | %s | %s |\n' "$BIG_CONNECTIONS" "$b_rps" \
        "$(field forward_proxy "$BIG_CONNECTIONS" 5)" "$(field forward_proxy "$BIG_CONNECTIONS" 6)" \
        "$(ratio "$b_rps" "$n_rps")" \
        "$(ratio "$(field forward_proxy "$BIG_CONNECTIONS" 6)" "$(field nginx_proxy "$BIG_CONNECTIONS" 6)")" \
        "$(field forward_proxy "$BIG_CONNECTIONS" 7)"
    printf '| (c) nginx proxy | %s | %.0f | %.3f | %.3f | - | 1.00 | 1.00 | %s |\n' "$BIG_CONNECTIONS" "$n_rps" \
        "$(field nginx_proxy "$BIG_CONNECTIONS" 5)" "$(field nginx_proxy "$BIG_CONNECTIONS" 6)" \
        "$(field nginx_proxy "$BIG_CONNECTIONS" 7)"
    echo
    echo "| proxy | peak RSS (whole session, incl. $BIG_CONNECTIONS connections) | ÷ (c) |"
    echo "| --- | ---: | ---: |"
    printf '| (b) forward_proxy | %.1f MiB | %s |\n' "$(awk -v k="$OURS_RSS" 'BEGIN { print k / 1024 }')" "$(ratio "$OURS_RSS" "$NGINX_RSS")"
    printf '| (c) nginx proxy (master + workers) | %.1f MiB | 1.00 |\n' "$(awk -v k="$NGINX_RSS" 'BEGIN { print k / 1024 }')"
} | tee "$OUT/results.md"
