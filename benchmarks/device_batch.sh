#!/usr/bin/env bash
# Several benchmarks in one lent-GPU call (device time is counted per call, start included).
#
#   benchmarks/device_batch.sh NAME:SECONDS:'COMMAND' ...
#
# Installs the carried .whl/ (the plugin's own packages from the working tree), then runs each
# COMMAND with its own time limit so one slow benchmark cannot eat the others' time, logs it to
# $OUT/NAME.log, and prints the last 40 lines of every log at the end (each benchmark prints its
# table last). Exit status: the number of
# commands that failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
  2>/tmp/pip-install.log || { cat /tmp/pip-install.log; exit 99; }
# The plugin itself from this working tree, not from .whl: a wheel built before the last edit
# (or a warm machine's first install, which pip --target does not replace) would run stale
# code — it did once: a fix measured on the device was not in the program that ran.
rm -rf /tmp/site/tpu_plugin /tmp/site/tpu_kernels
cp -r tpu_plugin /tmp/site/tpu_plugin
cp -r kernels /tmp/site/tpu_kernels
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
failed=0
names=()
for spec in "$@"; do
  name=${spec%%:*}
  rest=${spec#*:}
  limit=${rest%%:*}
  command=${rest#*:}
  names+=("$name")
  echo "=== $name (limit ${limit}s): $command"
  start=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" bash -c "$command" >"$OUT/$name.log" 2>&1
  status=$?
  echo "=== $name: exit $status after $((SECONDS - start)) s"
  echo "exit $status after $((SECONDS - start)) s" >>"$OUT/$name.log"
  [ "$status" = 0 ] || failed=$((failed + 1))
done
for name in "${names[@]}"; do
  echo
  echo "################ $name"
  tail -n 40 "$OUT/$name.log"
done
exit "$failed"
