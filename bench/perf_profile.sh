#!/bin/sh
# Profile pipesd's workers under load with perf (see bench/README.md).
#
#   bench/perf_profile.sh [identity|xor] [WORKLOAD] [SECONDS]
#   e.g. bench/perf_profile.sh xor blast-4streams 10
#
# Uses the "cycles" hardware event when this machine exposes it, else the software event
# "cpu-clock" (virtual machines often have no PMU: `perf stat -e instructions true` then
# prints "<not supported>"). Exits 0 with a message when perf cannot record at all.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
FUNCTION=${1:-identity}
WORKLOAD=${2:-blast-4streams}
SECONDS_=${3:-10}

if ! command -v perf >/dev/null 2>&1; then
    echo "perf_profile: perf is not installed (apt-get install linux-perf); nothing to do"
    exit 0
fi
if perf stat -x, -e cycles true 2>&1 | grep -q -i "not supported\|not counted"; then
    EVENT=cpu-clock
    echo "perf_profile: no hardware counters here (cycles: not supported); sampling cpu-clock"
else
    EVENT=cycles
fi
if ! perf record -e "$EVENT" -o /dev/null -- true >/dev/null 2>&1; then
    echo "perf_profile: perf record does not work here (perf_event_paranoid=$(cat /proc/sys/kernel/perf_event_paranoid)); nothing to do"
    exit 0
fi
exec python3 "$HERE/lab/perfrun.py" --event "$EVENT" --function "$FUNCTION" \
    --workload "$WORKLOAD" --seconds "$SECONDS_"
