#!/usr/bin/env bash
# Runs one capjax command as N processes on this machine, M CPU devices each,
# joined by JAX's distributed runtime on localhost: a multi-host run in
# miniature. Every process's output is shown, prefixed with its index.
#
#   launch/local.sh N M COMMAND [ARGS...]
#   launch/local.sh 2 4 train --config configs/demo.py --workdir runs/local
set -euo pipefail

if [[ $# -lt 3 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
  [[ $# -ge 1 && ( "$1" == "-h" || "$1" == "--help" ) ]] && exit 0 || exit 2
fi
n=$1 m=$2
shift 2
[[ "$n" =~ ^[1-9][0-9]*$ && "$m" =~ ^[1-9][0-9]*$ ]] || {
  echo "launch/local.sh: N and M must be positive integers, got '$n' and '$m'" >&2; exit 2; }

here=$(cd "$(dirname "$0")/.." && pwd)
python=${CAPJAX_PYTHON:-$( [[ -x "$here/.venv/bin/python" ]] && echo "$here/.venv/bin/python" || echo python3)}
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

pids=()
for ((i = 0; i < n; i++)); do
  (
    export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$m ${XLA_FLAGS:-}"
    rc=0
    # The group's stderr takes bash's own report of a killed job: the line
    # below says it instead.
    { "$python" -m trainer.cli "$@" --coordinator "127.0.0.1:$port" \
        --num-processes "$n" --process-id "$i" 2>&1 | sed -u "s/^/[$i] /"; } 2>/dev/null || rc=$?
    if ((rc > 128)); then
      echo "launch/local.sh: process $i was killed by SIG$(kill -l $((rc - 128)))" >&2
    elif ((rc)); then
      echo "launch/local.sh: process $i exited with status $rc" >&2
    fi
    exit $rc
  ) &
  pids+=($!)
done
# Non-zero when any process failed: the last such status.
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit $status
