#!/usr/bin/env bash
# Lead's device runner: runs the named per-area scripts (scripts/device/<name>.sh) one after another, each with its
# own time limit, and packs each one's outputs into $OUT/<name>.tgz (the device tool returns at most 8 files).
# Usage (on the GPU host, cwd = repo): bash scripts/device/run.sh NAME:SECONDS[:ARG] ...  e.g. segkern:170 streamcal:140:quick
source scripts/device/setup.sh
final_out=$OUT
for spec in "$@"; do
  name=${spec%%:*}; rest=${spec#*:}; limit=${rest%%:*}; arg=; [ "$rest" != "$limit" ] && arg=${rest#*:}
  export OUT=/tmp/devout/$name; mkdir -p "$OUT"
  start=$SECONDS
  timeout "$limit" bash "scripts/device/$name.sh" $arg > "$OUT/$name.console" 2>&1
  rc=$?
  echo "== $name rc=$rc $((SECONDS - start))s"
  grep -hE "FAILED|PASSED|RESULT|differ|rc=|Error|error" "$OUT/$name.console" | tail -12
  tar -C /tmp/devout -czf "$final_out/$name.tgz" "$name"
done
