#!/usr/bin/env bash
# The proxy against nginx with the upstream over TLS 1.3, on loopback only, bounded in time.
#
#   bash benches/proxy_tls.sh                        # 3 rounds x 10 s, c = 16 and 64
#   DURATION=5 ROUNDS=1 bash benches/proxy_tls.sh    # a quick look
#   PROXY_BIN=/tmp/forward_proxy bash benches/proxy_tls.sh   # a build without cargo
#
# Makes a local CA and a certificate for localhost / 127.0.0.1 signed by it (openssl,
# ECDSA P-256), and starts nginx as the upstream answering every POST with a fixed
# chat-completion JSON over TLS 1.3 only (HTTP/1.1, session tickets and a session cache on).
# Then wrk (POST, 2 threads) measures, interleaved, for each concurrency and round:
#   (a) the upstream directly (wrk over TLS: its handshakes are wrk's connections),
#   (b) forward_proxy with `--upstream https://127.0.0.1:PORT/api/paas/v4 --upstream-ca
#       ca.pem` (keys k1,k2,k3, round-robin, log level warn, its default workers),
#   (c) nginx as a reverse proxy putting one of the 3 keys on Authorization, with
#       `proxy_ssl_session_reuse on`, the certificate verified against ca.pem, TLS 1.3,
#       upstream keep-alive 256 with no cap on a kept connection's requests (nginx's default
#       `keepalive_requests 1000` would add one handshake per 1,000 requests),
#       NGINX_WORKERS worker processes (1).
# Per run: requests/s, p99, the proxy's CPU per request (user + system; nginx's master and
# workers summed) and the TLS handshakes the upstream saw per 1,000 requests (connections
# it accepted during the run, from its stub_status: each one began with a handshake).
# The report gives medians over the rounds (range) and ratios to nginx taken per round.
# Raw output goes to $OUT (default target/proxy_tls); the tables to stdout and
# $OUT/results.md. Every process started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONCURRENCY=${CONCURRENCY:-"16 64"}
WRK_THREADS=${WRK_THREADS:-2}
PORT_UPSTREAM=${PORT_UPSTREAM:-18111}
PORT_STATUS=${PORT_STATUS:-18114}
PORT_OURS=${PORT_OURS:-18112}
PORT_NGINX=${PORT_NGINX:-18113}
NGINX_WORKERS=${NGINX_WORKERS:-1}
read -r -a EXTRA_ARGS <<<"${PROXY_EXTRA_ARGS:-}"
OUT=${OUT:-target/proxy_tls}
KEYS="k1,k2,k3"
UPSTREAM_SCHEME=https

# shellcheck source=benches/proxy_bench_lib.sh
source benches/proxy_bench_lib.sh
install_missing
command -v openssl >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
PROXY=$(proxy_bin)
raise_priority

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
prepare_out nginx-upstream nginx-proxy tls
rm -f "$OUT/post.lua"

# --- certificates: a CA, and a server certificate it signed -----------------------------
(
    cd "$OUT/tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj "/CN=bench local CA" -keyout ca.key -out ca.pem 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -subj "/CN=localhost" -keyout server.key -out server.csr 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >ext.cnf
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
        -extfile ext.cnf -out server.pem 2>/dev/null
)

# --- processes -------------------------------------------------------------------------
nginx_conf "$OUT/nginx-upstream" "$PORT_UPSTREAM" "
    server {
        listen 127.0.0.1:$PORT_UPSTREAM ssl;
        ssl_certificate $OUT/tls/server.pem;
        ssl_certificate_key $OUT/tls/server.key;
        ssl_protocols TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        ssl_session_tickets on;
        location / { default_type application/json; return 200 '$CHAT'; }
    }
    server {
        listen 127.0.0.1:$PORT_STATUS;
        location / { stub_status; }
    }" >"$OUT/nginx-upstream/nginx.conf"

nginx_conf "$OUT/nginx-proxy" "$PORT_NGINX" "
    $(nginx_keys_upstream "$PORT_UPSTREAM")
    server {
        listen 127.0.0.1:$PORT_NGINX;
        location / {
            proxy_pass https://provider/api/paas/v4/;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Authorization \$api_key;
            proxy_ssl_protocols TLSv1.3;
            proxy_ssl_session_reuse on;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate $OUT/tls/ca.pem;
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
        }
    }" "$NGINX_WORKERS" >"$OUT/nginx-proxy/nginx.conf"

log "starting the TLS upstream (nginx) on 127.0.0.1:$PORT_UPSTREAM"
"$NGINX" -p "$OUT/nginx-upstream" -c "$OUT/nginx-upstream/nginx.conf" &
PIDS+=($!)
wait_ready "http://127.0.0.1:$PORT_STATUS/" "upstream nginx's stub_status"

log "starting nginx reverse proxy on 127.0.0.1:$PORT_NGINX"
"$NGINX" -p "$OUT/nginx-proxy" -c "$OUT/nginx-proxy/nginx.conf" &
NGINX_PROXY_PID=$!
PIDS+=($NGINX_PROXY_PID)
wait_ready "http://127.0.0.1:$PORT_NGINX/chat/completions" "nginx reverse proxy"

log "starting forward_proxy on 127.0.0.1:$PORT_OURS"
start_forward_proxy "https://127.0.0.1:$PORT_UPSTREAM/api/paas/v4" --upstream-ca "$OUT/tls/ca.pem"
# One request each way, to see the TLS path works before measuring it.
curl -fsS -o /dev/null -X POST "http://127.0.0.1:$PORT_OURS/chat/completions" ||
    { echo "forward_proxy cannot reach the TLS upstream (see $OUT/forward_proxy.log)" >&2; exit 1; }
curl -fsS -o /dev/null -X POST "http://127.0.0.1:$PORT_NGINX/chat/completions" ||
    { echo "nginx cannot reach the TLS upstream (see $OUT/nginx-proxy/error.log)" >&2; exit 1; }

# --- load ------------------------------------------------------------------------------
write_post_lua "$OUT/post.lua"
pid_of() {
    case $1 in
    forward_proxy) echo "$OURS_PID" ;;
    nginx_proxy) echo "$NGINX_PROXY_PID" ;;
    *) echo "" ;;
    esac
}
accepts() { curl -fsS "http://127.0.0.1:$PORT_STATUS/" | awk 'NR == 3 { print $1 }'; }

CLK_TCK=$(getconf CLK_TCK)
run_wrk() { # target, connections, round
    local file="$OUT/$1-c$2-r$3.txt" pid before after requests cpu_us a0 a1
    pid=$(pid_of "$1")
    a0=$(accepts)
    before=0
    if [ -n "$pid" ]; then before=$(cpu_ticks "$pid"); fi
    timeout $((DURATION + 60)) wrk -t"$WRK_THREADS" -c"$2" -d"${DURATION}s" --timeout 10s --latency \
        -s "$OUT/post.lua" "$(url_of "$1")" >"$file" 2>&1 || true
    after=0
    if [ -n "$pid" ]; then after=$(cpu_ticks "$pid"); fi
    a1=$(accepts)
    requests=$(awk '/requests in/ { print $1 }' "$file")
    cpu_us=$(awk -v t=$((after - before)) -v hz="$CLK_TCK" -v n="${requests:-0}" \
        'BEGIN { if (n > 0 && t > 0) printf "%.2f", t * 1e6 / hz / n; else print 0 }')
    # The second reading's own connection is one of the accepted ones.
    read -r rps p50 p99 errors <<<"$(parse_wrk "$file")"
    echo "target=$1 connections=$2 round=$3 rps=$rps p50_ms=$p50 p99_ms=$p99 errors=$errors requests=${requests:-0} cpu_us=$cpu_us handshakes=$((a1 - a0 - 1))" >>"$OUT/runs.txt"
    log "$(tail -1 "$OUT/runs.txt")"
}

log "warm-up"
for target in forward_proxy nginx_proxy; do
    timeout 30 wrk -t2 -c64 -d2s -s "$OUT/post.lua" "$(url_of $target)" >/dev/null 2>&1 || true
done

: >"$OUT/runs.txt"
for round in $(seq 1 "$ROUNDS"); do
    for c in $CONCURRENCY; do
        for target in upstream forward_proxy nginx_proxy; do
            run_wrk "$target" "$c" "$round"
        done
    done
done

{
    machine_line
    echo "wrk -t$WRK_THREADS, POST, ${DURATION} s per run, $ROUNDS rounds interleaved; upstream over TLS 1.3 (ECDSA P-256); nginx $NGINX_WORKERS worker(s); (b) flags: ${EXTRA_ARGS[*]:-none}"
    echo
    python3 benches/load_report.py tls "$OUT/runs.txt"
} | tee "$OUT/results.md"
