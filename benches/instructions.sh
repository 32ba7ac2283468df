#!/usr/bin/env bash
# Instructions per request of each path of benches/layer.rs, counted by callgrind: repeatable
# where wall-clock timings on a shared machine are not. (Instructions are not time: a locked
# atomic read-modify-write is one instruction that costs 15-20 cycles.)
#
#   bash benches/instructions.sh            # every path, ~1 minute
#   bash benches/instructions.sh 'key_rotation_round_robin/3'
#   LAYER_BIN=/tmp/layer-prev bash benches/instructions.sh   # another build of the bench
#
# Runs the bench binary in criterion's --profile-time mode under valgrind, counts only inside
# `one_request` (poll_ready, call, response, body to its end) and in the Buffer worker's
# task, and divides by the calls of `one_request`.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }

BIN=${LAYER_BIN:-}
if [ -z "$BIN" ]; then
    cargo bench --no-run --bench layer --quiet 2>/dev/null
    BIN=$(cargo bench --no-run --bench layer --message-format=json 2>/dev/null |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

PATHS=${1:-"bare_inner/0 set_request_header/1 key_rotation_round_robin/3 key_rotation_least_in_flight/3
    key_rotation_learned_limit/3 key_rotation_limit_headers/3 key_rotation_retry/3
    tower_p2c/3 tower_p2c_buffered/3 key_rotation_round_robin/256 key_rotation_least_in_flight/256
    key_rotation_learned_limit/256 key_rotation_limit_headers/256 key_rotation_retry/256 tower_p2c/256 tower_p2c_buffered/256"}

printf '| path | instructions/request |\n| --- | ---: |\n'
for path in $PATHS; do
    file="$OUT/$(echo "$path" | tr / _).out"
    # The Buffer's worker task runs beside one_request, not inside it: count it too. The
    # patterns must match nothing inside: entering a function that matches toggles counting
    # off again (`*one_request*` matched the retry policy's `clone_request`, whose cost went
    # uncounted).
    valgrind --tool=callgrind --callgrind-out-file="$file" --toggle-collect='layer::one_request*' \
        --toggle-collect='*buffer::worker::Worker*' \
        "$BIN" --bench --profile-time 1 "^layer/$path\$" >/dev/null 2>&1
    # Total instructions counted, over the calls of the one_request future's poll.
    awk '
        /^totals:/ { total = $2 }
        /^c?fn=\([0-9]+\)/ {
            match($0, /\([0-9]+\)/); id = substr($0, RSTART, RLENGTH)
            name = substr($0, RSTART + RLENGTH + 1)
            if (name != "") names[id] = name
            if ($0 ~ /^cfn=/) callee = names[id]
        }
        /^calls=/ && callee ~ /^layer::one_request::\{\{closure\}\}/ { split($1, c, "="); calls += c[2] }
        END { if (calls) printf "%.0f\n", total / calls; else print "-" }
    ' "$file" | xargs printf "| \`%s\` | %s |\n" "$path"
done
