#!/usr/bin/env bash
# Instructions per request of the proxies themselves, counted by callgrind (user space only):
# repeatable where the wall-clock figures of proxy_load.sh on a shared machine are not.
#
#   bash benches/proxy_instructions.sh                      # forward_proxy and nginx
#   PREV_BIN=/tmp/forward_proxy.prev bash benches/proxy_instructions.sh   # and another build
#   PROXY_EXTRA_ARGS="--workers 1" bash benches/proxy_instructions.sh
#   PROXY_BIN=/tmp/forward_proxy bash benches/proxy_instructions.sh   # that build, no cargo
#   SYSCALLS=perf bash benches/proxy_instructions.sh        # syscalls per request instead
#
# Runs each proxy under valgrind in front of the same upstream (nginx answering a fixed
# chat-completion JSON, not under valgrind), warms it up, zeroes callgrind's counters, sends
# POSTs with wrk for SECONDS (default 10) at CONNECTIONS (default 8), dumps the counters and
# divides them by the requests wrk counted. nginx runs as one process (master_process off,
# one worker), the key-injecting configuration of proxy_load.sh. Loopback only; every
# process started here is stopped on exit.
#
# SYSCALLS=strace: runs each proxy natively and, after the warm-up, attaches `strace -f -c`
# to it for the measured run instead; prints the syscalls per request by name, with the
# failed ones (EAGAIN). The counts are exact but strace slows each syscall many times over,
# so the proxy batches more events per epoll_wait than it would. SYSCALLS=perf counts the
# main syscalls with `perf stat` on their tracepoints instead: no failures shown, but little
# slowdown, and the user and system CPU time per request from /proc (PERF_EVENTS=
# context-switches for those without the tracepoints' cost). The tables land in
# $OUT/<proxy>.{strace,perf}.txt.
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
SYSCALLS=${SYSCALLS:-}
if [ -z "${PERF_EVENTS:-}" ]; then
    PERF_EVENTS=raw_syscalls:sys_enter,context-switches
    for call in read recvfrom readv write sendto writev epoll_wait epoll_pwait epoll_ctl \
        futex getsockopt sched_yield; do
        PERF_EVENTS+=",syscalls:sys_enter_$call"
    done
fi
if [ "$SYSCALLS" = perf ]; then
    command -v perf >/dev/null || { echo "perf is missing" >&2; exit 1; }
elif [ -n "$SYSCALLS" ]; then
    command -v strace >/dev/null || { apt-get update -qq && apt-get install -y -qq strace >/dev/null; }
else
    command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

PROXY_BIN=${PROXY_BIN:-}
if [ -z "$PROXY_BIN" ]; then
    cargo build --release --quiet -p forward_proxy
    PROXY_BIN=${CARGO_TARGET_DIR:-target}/release/forward_proxy
fi

mkdir -p "$OUT"
rm -rf "$OUT/nginx-upstream" "$OUT/nginx-proxy" "$OUT"/cg.* "$OUT"/*.txt "$OUT/post.lua"
mkdir -p "$OUT/nginx-upstream" "$OUT/nginx-proxy"
OUT=$(cd "$OUT" && pwd)
trap cleanup EXIT INT TERM

upstream_nginx_conf "$OUT/nginx-upstream" "$PORT_UPSTREAM" >"$OUT/nginx-upstream/nginx.conf"
"$NGINX" -p "$OUT/nginx-upstream" -c "$OUT/nginx-upstream/nginx.conf" &
PIDS+=($!)
wait_ready "http://127.0.0.1:$PORT_UPSTREAM/api/paas/v4/chat/completions" "upstream nginx"

proxy_nginx_conf "$OUT/nginx-proxy" "$PORT_PROXY" "$PORT_UPSTREAM" 1 | sed 's/^master_process on;/master_process off;/' >"$OUT/nginx-proxy/nginx.conf"
write_post_lua "$OUT/post.lua"

cpu_ticks() { # pid: its user and system time in clock ticks, all threads
    awk '{ sub(/^.*\) /, ""); print $12, $13 }' "/proc/$1/stat"
}

measure() { # name, command...
    local name=$1 pid file requests total tracer=""
    shift
    if [ -n "$SYSCALLS" ]; then
        "$@" 2>"$OUT/$name.log" &
    else
        valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.$name" "$@" 2>"$OUT/$name.log" &
    fi
    pid=$!
    PIDS+=($pid)
    local url="http://127.0.0.1:$PORT_PROXY/chat/completions"
    for _ in $(seq 1 600); do
        if curl -fsS -o /dev/null --max-time 2 -X POST -d '{}' "$url" 2>/dev/null; then break; fi
        sleep 0.2
    done
    timeout 120 wrk -t1 -c"$CONNECTIONS" -d3s -s "$OUT/post.lua" "$url" >/dev/null 2>&1 || true
    if [ "$SYSCALLS" = perf ]; then
        perf stat -x, -o "$OUT/$name.perf.txt" -e "$PERF_EVENTS" -p "$pid" &
        tracer=$!
        sleep 1
    elif [ -n "$SYSCALLS" ]; then
        strace -f -c -o "$OUT/$name.strace.txt" -p "$pid" 2>/dev/null &
        tracer=$!
        sleep 1 # strace attaches to every thread before the measured run starts
    else
        callgrind_control --zero "$pid" >/dev/null
    fi
    cpu_ticks "$pid" >"$OUT/$name.cpu.txt"
    timeout $((SECONDS_ + 120)) wrk -t1 -c"$CONNECTIONS" -d"${SECONDS_}s" --timeout 30s \
        -s "$OUT/post.lua" "$url" >"$OUT/$name.wrk.txt" 2>&1 || true
    cpu_ticks "$pid" >>"$OUT/$name.cpu.txt"
    requests=$(awk '/requests in/ { print $1 }' "$OUT/$name.wrk.txt")
    if [ -n "$SYSCALLS" ]; then
        if [ "$SYSCALLS" = perf ]; then
            # User and system CPU per request (all threads). Wall-clock figures: only a ratio
            # between the proxies of one run means anything, and only with PERF_EVENTS
            # reduced to a software event (the tracepoints add to the system time).
            awk -v n="$requests" -v who="$name" -v hz="$(getconf CLK_TCK)" '
                NR == 1 { u = $1; s = $2 }
                NR == 2 {
                    printf "| %s | user µs | %.2f |\n", who, ($1 - u) / hz * 1e6 / n
                    printf "| %s | system µs | %.2f |\n", who, ($2 - s) / hz * 1e6 / n
                }' "$OUT/$name.cpu.txt"
        fi
        kill -INT "$tracer" && wait "$tracer" 2>/dev/null || true
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        if [ "$SYSCALLS" = perf ]; then
            # perf stat -x,: count,unit,event,...
            awk -F, -v n="$requests" -v who="$name" '$1 ~ /^[0-9]+$/ {
                sub(/^(raw_)?syscalls:sys_enter_?/, "", $3)
                printf "| %s | %s | %.2f |\n", who, ($3 == "" ? "all" : $3), $1 / n
            }' "$OUT/$name.perf.txt"
            return
        fi
        # strace -c's table: percent, seconds, usecs/call, calls, [errors,] name.
        awk -v n="$requests" -v who="$name" '
            $NF == "total" {
                printf "| %s | total | %.2f (%d of %d calls failed) |\n", who, $4 / n, $5, $4
                next
            }
            NF >= 5 && $4 ~ /^[0-9]+$/ && $4 / n >= 0.01 {
                err = (NF == 6 ? sprintf(" (%d failed)", $5) : "")
                printf "| %s | %s | %.2f%s |\n", who, $NF, $4 / n, err
            }' "$OUT/$name.strace.txt"
        return
    fi
    callgrind_control --dump "$pid" >/dev/null
    file=$(ls -t "$OUT"/cg."$name"* | head -1)
    total=$(awk '/^summary:|^totals:/ { print $2; exit }' "$file")
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    printf '| %s | %s | %s | %.0f |\n' "$name" "$requests" "$total" \
        "$(awk -v t="$total" -v n="$requests" 'BEGIN { print (n > 0 ? t / n : 0) }')"
}

if [ -n "$SYSCALLS" ]; then
    echo "| proxy | syscall | calls/request |"
    echo "| --- | --- | ---: |"
else
    echo "| proxy | requests | instructions | instructions/request |"
    echo "| --- | ---: | ---: | ---: |"
fi
UP="http://127.0.0.1:$PORT_UPSTREAM/api/paas/v4"
measure nginx "$NGINX" -p "$OUT/nginx-proxy" -c "$OUT/nginx-proxy/nginx.conf"
BIGMODEL_API_KEY=k1,k2,k3 measure forward_proxy "$PROXY_BIN" --listen "127.0.0.1:$PORT_PROXY" \
    --upstream "$UP" --log-level warn "${EXTRA_ARGS[@]}"
if [ -n "$PREV_BIN" ]; then
    BIGMODEL_API_KEY=k1,k2,k3 measure forward_proxy_prev "$PREV_BIN" --listen "127.0.0.1:$PORT_PROXY" \
        --upstream "$UP" --log-level warn
fi
