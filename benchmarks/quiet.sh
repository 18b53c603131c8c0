#!/usr/bin/env bash
# Runs one timing step of a benchmark alone on this machine:
#   benchmarks/quiet.sh python benchmarks/adapt.py --phase ort-truth --tag t1
#
# 1. Takes a machine-wide lock ($ARCHPASS_BENCH_LOCK, default /tmp/archpass-bench.lock),
#    so two steps started through this script never time at the same moment; the second
#    waits for the first to end.
# 2. Then waits until the machine is quiet: other processes (and the hypervisor's steal
#    time) keep at most $QUIET_CORES cores busy (default 0.25) over a $QUIET_SAMPLE_S
#    sample (default 3 s), $QUIET_CHECKS times in a row (default 3). A test suite or a
#    ZigZag run on the other core keeps a full core busy, so the step waits for it.
#    After $QUIET_MAX_WAIT_S seconds (default 1800) it runs anyway and says so on stderr.
# 3. Runs the command with the lock held; its exit code is this script's.
#
# The measuring code waits for quiet moments on its own as well (each timing window,
# archpass.costmodel.adapt_measure.wait_quiet); this script keeps whole steps apart.
set -euo pipefail

if [ "$#" -eq 0 ]; then
    echo "usage: benchmarks/quiet.sh COMMAND [ARGS...]  (runs COMMAND alone, on a quiet machine)" >&2
    exit 2
fi

lock="${ARCHPASS_BENCH_LOCK:-/tmp/archpass-bench.lock}"
threshold="${QUIET_CORES:-0.25}"
sample_s="${QUIET_SAMPLE_S:-3}"
checks="${QUIET_CHECKS:-3}"
max_wait="${QUIET_MAX_WAIT_S:-1800}"

exec 9>>"$lock"
if ! flock -n 9; then
    echo "quiet.sh: another timing step holds $lock; waiting for it to end" >&2
    flock 9
fi

# busy cores over the sample: (non-idle jiffies incl. steal) / (all jiffies) x cores
busy_cores() {
    local a b
    a=($(head -n1 /proc/stat))
    sleep "$sample_s"
    b=($(head -n1 /proc/stat))
    awk -v cores="$(nproc)" \
        -v u="$(( b[1] - a[1] ))" -v n="$(( b[2] - a[2] ))" -v s="$(( b[3] - a[3] ))" \
        -v i="$(( b[4] - a[4] ))" -v w="$(( b[5] - a[5] ))" -v q="$(( b[6] - a[6] ))" \
        -v sq="$(( b[7] - a[7] ))" -v st="$(( b[8] - a[8] ))" \
        'BEGIN { busy = u + n + s + q + sq + st; all = busy + i + w;
                 printf "%.2f", (all > 0 ? busy / all * cores : 0) }'
}

start=$SECONDS
quiet=0
while [ "$quiet" -lt "$checks" ]; do
    cores="$(busy_cores)"
    if awk -v c="$cores" -v t="$threshold" 'BEGIN { exit !(c <= t) }'; then
        quiet=$(( quiet + 1 ))
    else
        quiet=0
        if [ $(( SECONDS - start )) -ge "$max_wait" ]; then
            echo "quiet.sh: the machine stayed busy ($cores cores) for ${max_wait} s; running anyway" >&2
            break
        fi
        echo "quiet.sh: other processes keep $cores cores busy; waiting" >&2
    fi
done
waited=$(( SECONDS - start ))
[ "$waited" -gt $(( sample_s * checks + 1 )) ] && echo "quiet.sh: quiet after ${waited} s" >&2

"$@"
