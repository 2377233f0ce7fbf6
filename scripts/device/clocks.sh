#!/usr/bin/env bash
# clocks (issue #4): is prefill attention power-limited? nvidia-smi samples SM clock, power and temperature every
# 10 ms while forward_bench runs Qwen3-8B 1 x 32K forwards with one attention kernel (default: v7 then v2), and
# the per-op breakdown of the same process says how the time splits. Expected GPU time: ~1 min.
# Look for: clocks_<kernel>.csv (timestamp, clocks.sm, power.draw, temperature) and clocks_summary.txt (clock and
# power histogram per kernel: attention is ~46 % of a v7 forward, the GEMMs ~49 %).
# Argument "attn[:KERNELS]": instead, the attention kernels alone (prefill_attention_bench, 3 s each back to back,
# NVML power and clock sampled in-process): W, MHz and pJ per FLOP per kernel at Qwen3-8B 1 x 32K; ~30 s.
source scripts/device/common.sh
if [[ ${1:-} == attn* ]]; then
  kernels=v7,v6,v2,v7; [[ $1 == attn:* ]] && kernels=${1#attn:}
  timeout 120 "$BIN/bin/prefill_attention_bench" --config bench/configs/qwen3-8b.json --batch 1 --seq 32768 \
    --kernels "$kernels" --seconds 3 2>&1 | tee "$OUT/clocks_attn_power.log"
  exit
fi
for k in ${1:-v7 v2}; do
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
    --format=csv,noheader,nounits -lms 10 > "$OUT/clocks_$k.csv" &
  smi=$!
  timeout 120 "$BIN/bin/forward_bench" --config bench/configs/qwen3-8b.json --batch 1 --seq 32768 --warmup 1 \
    --iters 8 --attn-kernel $k --profile > "$OUT/clocks_fwd_$k.log" 2>&1
  kill $smi; wait $smi 2>/dev/null
  grep -E "^attn|attention |GEMMs" "$OUT/clocks_fwd_$k.log"
done
python3 - "$OUT" ${1:-v7 v2} <<'PY' | tee "$OUT/clocks_summary.txt"
import sys, collections
out = sys.argv[1]
for k in sys.argv[2:]:
    rows = [l.split(', ') for l in open(f'{out}/clocks_{k}.csv') if l.count(',') >= 4]
    busy = [r for r in rows if float(r[2]) > 200]  # power above idle: a forward is running
    clk = collections.Counter(int(float(r[1])) // 50 * 50 for r in busy)
    pw = [float(r[2]) for r in busy]
    reasons = collections.Counter(r[4].strip() for r in busy)
    print(f'{k}: {len(busy)} busy samples; power mean {sum(pw)/max(1,len(pw)):.0f} W, max {max(pw, default=0):.0f} W')
    print('  SM clock histogram (MHz bin: samples):', ' '.join(f'{c}:{n}' for c, n in sorted(clk.items())))
    print('  throttle reasons:', dict(reasons.most_common(4)))
PY
