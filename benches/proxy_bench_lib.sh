# Shell pieces shared by the proxy load scripts (proxy_load.sh, proxy_rate.sh,
# proxy_streams.sh, proxy_tls.sh, load_1000.sh, replicas_load.sh); sourced, not run. Everything here stays on 127.0.0.1.

log() { printf '== %s\n' "$*" >&2; }

# Installs nginx, wrk and curl from Debian when missing.
install_missing() {
    local missing=()
    command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
    command -v wrk >/dev/null || missing+=(wrk)
    command -v curl >/dev/null || missing+=(curl)
    if [ ${#missing[@]} -eq 0 ]; then return; fi
    log "installing ${missing[*]}"
    # Keep the package's own nginx service from starting (and taking port 80).
    local policy=/usr/sbin/policy-rc.d placed=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && placed=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if [ -n "$placed" ]; then rm -f "$policy"; fi
}
# Processes started by the sourcing script: add their pids to PIDS; `trap cleanup EXIT INT
# TERM` stops them (only them) on exit.
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}

wait_ready() { # url, what
    local i
    for i in $(seq 1 300); do
        if curl -fsS -o /dev/null --max-time 1 "$1"; then return 0; fi
        sleep 0.1
    done
    echo "$2 did not come up at $1" >&2
    exit 1
}

nginx_conf() { # prefix, port, server block body[, worker processes (default auto)]
    cat <<EOF
daemon off;
master_process on;
worker_processes ${4:-auto};
worker_rlimit_nofile 65536;
user root;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 8192; multi_accept on; }
http {
    access_log off;
    client_body_temp_path $1/body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
    keepalive_requests 1000000;
    $3
}
EOF
}

CHAT='{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"glm-4-flash","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":8,"completion_tokens":9,"total_tokens":17}}'

# The upstream stand-in: nginx answering every request with $CHAT. Args: prefix, port[,
# extra listen parameters].
upstream_nginx_conf() {
    nginx_conf "$1" "$2" "
    server {
        listen 127.0.0.1:$2${3:+ $3};
        location / { default_type application/json; return 200 '$CHAT'; }
    }"
}

# The http-level lines of nginx as the yardstick: the upstream `provider` at 127.0.0.1:PORT
# with keep-alive 256 and no cap on the requests a kept connection carries (nginx's
# default, 1,000, would reconnect once per 1,000 requests: the proxy does not), and
# `$api_key`, one of the keys k1,k2,k3 per request. Arg: upstream port.
nginx_keys_upstream() {
    cat <<EOF
upstream provider { server 127.0.0.1:$1; keepalive 256; keepalive_requests 1000000; }
    split_clients "\${connection}\${connection_requests}" \$api_key {
        33.3% "Bearer k1";
        33.3% "Bearer k2";
        *     "Bearer k3";
    }
EOF
}

# nginx as a key-injecting reverse proxy (the yardstick): one of the keys k1,k2,k3 on
# Authorization per request, upstream keep-alive 256 with no cap on the requests a kept
# connection carries (nginx's default, 1,000, would reconnect once per 1,000 requests:
# the proxy does not). Args: prefix, port, upstream port,
# worker processes.
proxy_nginx_conf() {
    nginx_conf "$1" "$2" "
    $(nginx_keys_upstream "$3")
    server {
        listen 127.0.0.1:$2;
        location / {
            proxy_pass http://provider/api/paas/v4/;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Authorization \$api_key;
        }
    }" "$4"
}

write_post_lua() { # file: a wrk script that POSTs a small chat completion
    cat >"$1" <<'EOF'
wrk.method = "POST"
wrk.body = '{"model":"glm-4-flash","messages":[{"role":"user","content":"Hello"}]}'
wrk.headers["Content-Type"] = "application/json"
EOF
}

# Prints "requests_per_s p50_ms p99_ms errors" from one wrk report.
parse_wrk() {
    awk '
        function ms(v) {
            if (v ~ /us$/) return substr(v, 1, length(v) - 2) / 1000
            if (v ~ /ms$/) return substr(v, 1, length(v) - 2) + 0
            if (v ~ /s$/) return substr(v, 1, length(v) - 1) * 1000
            return v + 0
        }
        $1 == "50%" { p50 = ms($2) }
        $1 == "99%" { p99 = ms($2) }
        $1 == "Requests/sec:" { rps = $2 }
        /Non-2xx or 3xx responses:/ { errors += $NF }
        /Socket errors:/ { gsub(",", ""); errors += $4 + $6 + $8 + $10 }
        END { printf "%s %s %s %d\n", rps, p50, p99, errors }
    ' "$1"
}

cpu_ticks() { # pid and its children: user + system time so far, in clock ticks
    local total=0 pid ticks
    for pid in "$1" $(pgrep -P "$1" || true); do
        # Fields 14 and 15 of stat, counted after the command name's closing parenthesis.
        ticks=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{ print $12 + $13 }' || echo 0)
        total=$((total + ${ticks:-0}))
    done
    echo "$total"
}

rss_kib() { # pid and its children: sum of VmHWM
    local total=0 pid hwm
    for pid in "$1" $(pgrep -P "$1" || true); do
        hwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)
        total=$((total + ${hwm:-0}))
    done
    echo "$total"
}

# The release build of the proxy: PROXY_BIN when set, else built here (into
# CARGO_TARGET_DIR when set). Prints its path.
proxy_bin() {
    if [ -n "${PROXY_BIN:-}" ]; then
        echo "$PROXY_BIN"
        return
    fi
    log "building examples/forward_proxy (release)"
    cargo build --release --quiet -p forward_proxy
    echo "${CARGO_TARGET_DIR:-target}/release/forward_proxy"
}

# The bench helper benches/loadgen.rs (streaming upstream, streams client, open-loop
# client), built with the bench profile. Prints its path.
loadgen_bin() {
    log "building benches/loadgen.rs"
    cargo bench --quiet --bench loadgen --no-run --message-format=json 2>/dev/null |
        python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "loadgen" and m.get("executable"):
        print(m["executable"])'
}

pids_of() { # pid: it and its children, comma-separated (nginx: the master and its workers)
    local list=$1 child
    for child in $(pgrep -P "$1" || true); do list="$list,$child"; done
    echo "$list"
}

# Stops one process this script started (and waits for it), and forgets it.
stop_pid() {
    local pid kept=()
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    for pid in "${PIDS[@]}"; do
        if [ "$pid" != "$1" ]; then kept+=("$pid"); fi
    done
    PIDS=("${kept[@]}")
}

# Raises this script's priority (and so that of everything it starts from now on) when run
# as root, so that the other tenants of a shared machine (builds) neither take the measured
# processes' time nor delay their wake-ups: PRIORITY=rt (the default) puts them in the
# round-robin real-time class at priority 10 (`chrt -r 10`: a woken process runs at once;
# on an EEVDF kernel `nice` alone still lets a build's slice run out first, which added
# milliseconds to every latency measured on 2 busy cores); PRIORITY=nice uses `nice -15`;
# PRIORITY=none leaves it. Call it after the builds.
raise_priority() {
    if [ "$(id -u)" != 0 ]; then return; fi
    case ${PRIORITY:-rt} in
    rt) chrt -r -p 10 $$ >/dev/null && log "running in the real-time class (chrt -r 10)" ;;
    nice) renice -n -15 -p $$ >/dev/null && log "running at nice -15" ;;
    esac
}

# Makes $OUT afresh for a run: its reports, logs and the given subfolders removed (the
# subfolders made again, empty), OUT made absolute, and every process started from now on
# stopped on exit. Args: subfolders.
prepare_out() {
    local dir
    mkdir -p "$OUT"
    rm -rf "$OUT"/*.txt "$OUT"/*.log "$OUT/results.md"
    for dir in "$@"; do
        rm -rf "${OUT:?}/$dir"
        mkdir -p "$OUT/$dir"
    done
    OUT=$(cd "$OUT" && pwd)
    trap cleanup EXIT INT TERM
}

# Starts $PROXY on 127.0.0.1:$PORT_OURS with the keys $KEYS, log level warn, the given flags
# and then $EXTRA_ARGS, its log appended to $OUT/forward_proxy.log, and waits for its
# health page. Args: upstream base URL, further flags. Sets OURS_PID.
start_forward_proxy() {
    local upstream=$1
    shift
    BIGMODEL_API_KEY=$KEYS "$PROXY" --listen "127.0.0.1:$PORT_OURS" --upstream "$upstream" \
        --log-level warn "$@" "${EXTRA_ARGS[@]}" 2>>"$OUT/forward_proxy.log" &
    OURS_PID=$!
    PIDS+=("$OURS_PID")
    wait_ready "http://127.0.0.1:$PORT_OURS/_keyrotation/health" "forward_proxy"
}

# The chat-completions URL of each target: the upstream directly (over
# $UPSTREAM_SCHEME, http unless set), forward_proxy, nginx_proxy.
url_of() {
    case $1 in
    upstream) echo "${UPSTREAM_SCHEME:-http}://127.0.0.1:$PORT_UPSTREAM/api/paas/v4/chat/completions" ;;
    forward_proxy) echo "http://127.0.0.1:$PORT_OURS/chat/completions" ;;
    nginx_proxy) echo "http://127.0.0.1:$PORT_NGINX/chat/completions" ;;
    esac
}

# The report's first line: the machine, and its load average now.
machine_line() {
    echo "Machine: $(nproc) cores, $(lscpu | awk -F: '/Model name/ { gsub(/^ +/, "", $2); print $2; exit }'); load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
}
