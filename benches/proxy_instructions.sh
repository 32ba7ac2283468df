#!/usr/bin/env bash
# Instructions per request of the proxies themselves, counted by callgrind (user space only):
# repeatable where the wall-clock figures of proxy_load.sh on a shared machine are not.
#
#   bash benches/proxy_instructions.sh                      # forward_proxy and nginx
#   PREV_BIN=/tmp/forward_proxy.prev bash benches/proxy_instructions.sh   # and another build
#   PROXY_EXTRA_ARGS="--workers 1" bash benches/proxy_instructions.sh
#   PROXY_BIN=/tmp/forward_proxy bash benches/proxy_instructions.sh   # that build, no cargo
#
# Runs each proxy under valgrind in front of the same upstream (nginx answering a fixed
# chat-completion JSON, not under valgrind), warms it up, zeroes callgrind's counters, sends
# POSTs with wrk for SECONDS (default 10) at CONNECTIONS (default 8), dumps the counters and
# divides them by the requests wrk counted. nginx runs as one process (master_process off,
# one worker), the key-injecting configuration of proxy_load.sh. Loopback only; every
# process started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_=${SECONDS_:-10}
CONNECTIONS=${CONNECTIONS:-8}
PORT_UPSTREAM=${PORT_UPSTREAM:-18181}
PORT_PROXY=${PORT_PROXY:-18182}
PREV_BIN=${PREV_BIN:-}
read -r -a EXTRA_ARGS <<<"${PROXY_EXTRA_ARGS:-}"
OUT=${OUT:-target/proxy_instructions}

# shellcheck source=benches/proxy_bench_lib.sh
source benches/proxy_bench_lib.sh
install_missing
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

PROXY_BIN=${PROXY_BIN:-}
if [ -z "$PROXY_BIN" ]; then
    cargo build --release --quiet -p forward_proxy
    PROXY_BIN=target/release/forward_proxy
fi

mkdir -p "$OUT"
rm -rf "$OUT/nginx-upstream" "$OUT/nginx-proxy" "$OUT"/cg.* "$OUT"/*.txt "$OUT/post.lua"
mkdir -p "$OUT/nginx-upstream" "$OUT/nginx-proxy"
OUT=$(cd "$OUT" && pwd)
trap cleanup EXIT INT TERM

nginx_conf "$OUT/nginx-upstream" "$PORT_UPSTREAM" "
    server {
        listen 127.0.0.1:$PORT_UPSTREAM;
        location / { default_type application/json; return 200 '$CHAT'; }
    }" >"$OUT/nginx-upstream/nginx.conf"
"$NGINX" -p "$OUT/nginx-upstream" -c "$OUT/nginx-upstream/nginx.conf" &
PIDS+=($!)
wait_ready "http://127.0.0.1:$PORT_UPSTREAM/api/paas/v4/chat/completions" "upstream nginx"

nginx_conf "$OUT/nginx-proxy" "$PORT_PROXY" "
    upstream provider { server 127.0.0.1:$PORT_UPSTREAM; keepalive 256; }
    split_clients \"\${connection}\${connection_requests}\" \$api_key {
        33.3% \"Bearer k1\";
        33.3% \"Bearer k2\";
        *     \"Bearer k3\";
    }
    server {
        listen 127.0.0.1:$PORT_PROXY;
        location / {
            proxy_pass http://provider/api/paas/v4/;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Authorization \$api_key;
        }
    }" 1 | sed 's/^master_process on;/master_process off;/' >"$OUT/nginx-proxy/nginx.conf"
write_post_lua "$OUT/post.lua"

measure() { # name, command...
    local name=$1 pid file requests total
    shift
    valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.$name" "$@" 2>"$OUT/$name.log" &
    pid=$!
    PIDS+=($pid)
    local url="http://127.0.0.1:$PORT_PROXY/chat/completions"
    for _ in $(seq 1 600); do
        if curl -fsS -o /dev/null --max-time 2 -X POST -d '{}' "$url" 2>/dev/null; then break; fi
        sleep 0.2
    done
    timeout 120 wrk -t1 -c"$CONNECTIONS" -d3s -s "$OUT/post.lua" "$url" >/dev/null 2>&1 || true
    callgrind_control --zero "$pid" >/dev/null
    timeout $((SECONDS_ + 120)) wrk -t1 -c"$CONNECTIONS" -d"${SECONDS_}s" --timeout 30s \
        -s "$OUT/post.lua" "$url" >"$OUT/$name.wrk.txt" 2>&1 || true
    callgrind_control --dump "$pid" >/dev/null
    requests=$(awk '/requests in/ { print $1 }' "$OUT/$name.wrk.txt")
    file=$(ls -t "$OUT"/cg."$name"* | head -1)
    total=$(awk '/^summary:|^totals:/ { print $2; exit }' "$file")
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    printf '| %s | %s | %s | %.0f |\n' "$name" "$requests" "$total" \
        "$(awk -v t="$total" -v n="$requests" 'BEGIN { print (n > 0 ? t / n : 0) }')"
}

echo "| proxy | requests | instructions | instructions/request |"
echo "| --- | ---: | ---: | ---: |"
UP="http://127.0.0.1:$PORT_UPSTREAM/api/paas/v4"
measure nginx "$NGINX" -p "$OUT/nginx-proxy" -c "$OUT/nginx-proxy/nginx.conf"
BIGMODEL_API_KEY=k1,k2,k3 measure forward_proxy "$PROXY_BIN" --listen "127.0.0.1:$PORT_PROXY" \
    --upstream "$UP" --log-level warn "${EXTRA_ARGS[@]}"
if [ -n "$PREV_BIN" ]; then
    BIGMODEL_API_KEY=k1,k2,k3 measure forward_proxy_prev "$PREV_BIN" --listen "127.0.0.1:$PORT_PROXY" \
        --upstream "$UP" --log-level warn
fi
