#!/usr/bin/env bash
# kvwab (issue #6): A/B of two kv_write_bench binaries on one GPU, alternated, so that a change in the INT2 writers'
# speed between commits is told apart from a change of machine. Argument: the other binary (path relative to the
# repo, e.g. .devcarry/old_kv_write_bench.xz, built from an earlier commit against the same system libraries).
# Each binary times kv_write alone at Qwen3-8B 32K (--skip-prefill: no model, ~10 s), twice in the order new, old,
# new, old. Expected GPU time: ~1 min.
# Look for: kvwab_summary.txt, "one INT2 call" per writer for each binary and round.
source scripts/device/common.sh
other=${1:?kvwab.sh needs the other kv_write_bench binary}
# An .xz binary (the device tool's carry limit) is unpacked beside itself first.
if [[ $other == *.xz ]]; then xz -dkf "$other" && other=${other%.xz}; fi
chmod +x "$other"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/kvwab_device.txt"
status=0
: > "$OUT/kvwab_summary.txt"
for round in 1 2; do
  for which in new old; do
    bin=$BIN/bin/kv_write_bench; [ $which = old ] && bin=$other
    timeout 60 "$bin" --config bench/configs/qwen3-8b.json --seq 32768 --skip-prefill --impl all \
      > "$OUT/kvwab_${which}_$round.log" 2>&1 || status=1
    grep -E "^kv_write alone" "$OUT/kvwab_${which}_$round.log" | sed -E "s/^kv_write alone \[([a-z]+)\].*: ([0-9.]+) us, ([0-9.]+) GB\/s \| one INT2 call \(K\/V mean\): ([0-9.]+) us/$which round $round \1: all \2 us, one call \4 us/" >> "$OUT/kvwab_summary.txt"
  done
done
cat "$OUT/kvwab_summary.txt"
exit $status
