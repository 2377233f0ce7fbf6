#!/usr/bin/env bash
# Lead's device runner: runs the named per-area scripts (scripts/device/<name>.sh) one after another, each with its
# own time limit, and packs each one's outputs into $OUT/<name>.tgz (the device tool returns at most 8 files).
# Usage (on the GPU host, cwd = repo): bash scripts/device/run.sh NAME[@LABEL]:SECONDS[:ARG] ...
#   e.g. segkern:170 streamcal:140:quick; LABEL names the output (default NAME), so that two runs of one script
#   started side by side (memcheck@mc1:300:EvalGpu & memcheck@mc2:300:EvalGpuHadamard2) keep apart.
source scripts/device/setup.sh
final_out=$OUT
for spec in "$@"; do
  name=${spec%%:*}; rest=${spec#*:}; limit=${rest%%:*}; arg=; [ "$rest" != "$limit" ] && arg=${rest#*:}
  label=${name#*@}; name=${name%%@*}
  export OUT=/tmp/devout/$label; mkdir -p "$OUT"
  start=$SECONDS
  timeout "$limit" bash "scripts/device/$name.sh" $arg > "$OUT/$label.console" 2>&1
  rc=$?
  echo "== $label rc=$rc $((SECONDS - start))s"
  grep -hE "FAILED|PASSED|RESULT|differ|rc=|Error|error" "$OUT/$label.console" | tail -12
  tar -C /tmp/devout -czf "$final_out/$label.tgz" "$label"
done
