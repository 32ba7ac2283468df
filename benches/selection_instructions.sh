#!/usr/bin/env bash
# Instructions per selection (reserve a key and drop the lease) of each row of
# benches/selection.rs's `side_by_side` group, counted by callgrind: repeatable where
# wall-clock timings on a shared machine are not.
#
#   bash benches/selection_instructions.sh             # every row, ~1 minute
#   bash benches/selection_instructions.sh 'affinity/3 round_robin/3'
#   SELECTION_BIN=/tmp/selection-prev bash benches/selection_instructions.sh   # another build
#
# Runs the bench binary in criterion's --profile-time mode under valgrind, counts only inside
# `one_route` (one selection and its release; never inlined) and divides by its calls.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }

BIN=${SELECTION_BIN:-}
if [ -z "$BIN" ]; then
    cargo bench --no-run --bench selection --quiet 2>/dev/null
    BIN=$(cargo bench --no-run --bench selection --message-format=json 2>/dev/null |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

ROWS=${1:-"round_robin/3 least_in_flight/3 bucketed/3 affinity/3 affinity_least_in_flight/3
    round_robin_route_without_session/3 round_robin/16 least_in_flight/16 bucketed/16 affinity/16
    affinity_least_in_flight/16 round_robin_route_without_session/16"}

printf '| row | instructions/selection |\n| --- | ---: |\n'
for row in $ROWS; do
    file="$OUT/$(echo "$row" | tr / _).out"
    valgrind --tool=callgrind --callgrind-out-file="$file" --toggle-collect='selection::one_route' \
        "$BIN" --bench --profile-time 1 "^side_by_side/$row\$" >/dev/null 2>&1
    awk '
        /^totals:/ { total = $2 }
        /^c?fn=\([0-9]+\)/ {
            match($0, /\([0-9]+\)/); id = substr($0, RSTART, RLENGTH)
            name = substr($0, RSTART + RLENGTH + 1)
            if (name != "") names[id] = name
            if ($0 ~ /^cfn=/) callee = names[id]
        }
        /^calls=/ && callee == "selection::one_route" { split($1, c, "="); calls += c[2] }
        END { if (calls) printf "%.0f\n", total / calls; else print "-" }
    ' "$file" | xargs printf "| \`%s\` | %s |\n" "$row"
done
