#!/usr/bin/env bash
# Run the test suite with two busy loops competing for the CPU (a 2-core CI machine shared with other work), three
# times in a row by default; stops at the first red run. The busy loops end with this script, however it ends.
#
#     tests/under_load.sh            # 3 runs
#     tests/under_load.sh 1 -x -q    # 1 run, extra pytest arguments after the count
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-3}"
shift || true

busy=()
trap 'kill "${busy[@]}" 2>/dev/null || true' EXIT
for _ in 1 2; do
    python3 -c "while True: pass" &
    busy+=("$!")
done

for run in $(seq 1 "$runs"); do
    echo "== run $run of $runs, with ${#busy[@]} busy loops =="
    start=$(date +%s)
    python -m pytest "$@"
    echo "== run $run green in $(( $(date +%s) - start )) s =="
done
