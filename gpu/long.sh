#!/usr/bin/env bash
# A measurement longer than one device call (10 minutes at most): start it in the background, where it outlives the
# call (setsid), then wait for it over as many calls as it needs, each made within the machine's idle release
# (30 s on nvidia-h200) so that the machine, and the run, stay.
#   bash gpu/long.sh start NAME COMMAND...   # e.g. start finqa python -m perf.evaluate_speed --benchmark-items real
#   bash gpu/long.sh wait NAME [SECONDS]     # up to SECONDS (default 570); exit 0 once it ended, 3 while it runs
# The command runs in this folder with the environment given to `start`; its output goes to $LONG_RUNS/NAME.log
# (default /tmp/long) and its exit status to $LONG_RUNS/NAME.rc. `wait` prints the log's last lines and copies the
# log to $OUT when set.
set -euo pipefail
action=${1:?start or wait}
name=${2:?a name for the run}
folder=${LONG_RUNS:-/tmp/long}  # where the logs and exit statuses go
mkdir -p "$folder"
log=$folder/$name.log
status=$folder/$name.rc
case $action in
  start)
    shift 2
    [ $# -gt 0 ] || { echo "long.sh start $name: no command given" >&2; exit 2; }
    [ ! -e "$log" ] || { echo "long.sh start $name: it ran already here ($log)" >&2; exit 2; }
    printf -v command '%q ' "$@"
    : > "$log"  # here, not in the background: a `wait` right after finds it
    setsid bash -c "SECONDS=0; $command >> '$log' 2>&1; rc=\$?; echo \"ended with \$rc after \$SECONDS s\" >> '$log'; \
echo \$rc > '$status'" < /dev/null > /dev/null 2>&1 &
    echo "started $name (process group $!): $command"
    ;;
  wait)
    [ -e "$log" ] || { echo "long.sh wait $name: never started here (no $log)" >&2; exit 2; }
    deadline=$((SECONDS + ${3:-570}))
    while [ ! -e "$status" ] && [ $SECONDS -lt $deadline ]; do sleep 1; done  # seen within a second of its end
    tail -n 40 "$log"
    if [ -n "${OUT:-}" ]; then cp "$log" "$OUT/$name.log"; fi
    if [ -e "$status" ]; then exit 0; fi
    echo "long.sh wait $name: still running; call wait again within the machine's idle release"
    exit 3
    ;;
  *)
    echo "long.sh: unknown action $action (start or wait)" >&2
    exit 2
    ;;
esac
