#!/usr/bin/env bash
# Where prefill attention v7 (issue #4) and the EF INT2 writer (issue #6) spend their time: Nsight Compute of one
# launch of each at Qwen3-8B 1 x 32K (full set, and the per-SASS-line stall samples), and the SASS of both kernels
# (cuobjdump exists on the GPU host, not on the development machine). Expected GPU time: ~2.5 min.
# Look for: ncu_v7_32k.txt (tensor pipe %, issue slot %, top stall reasons), v7_source.csv (per SASS line: stall
# samples), v7.sass (wgmma groups, WARPGROUP.DEPBAR/ARRIVES placement, serialization), the same for ef.
source scripts/device/common.sh
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
OBJ=$(command -v cuobjdump || ls /usr/local/cuda*/bin/cuobjdump 2>/dev/null | head -1)
echo "ncu=$NCU cuobjdump=$OBJ"
FB="$BIN/bin/forward_bench --config bench/configs/qwen3-8b.json --batch 1 --seq 32768 --warmup 0 --iters 1"
KB="$BIN/bin/kv_write_bench --config bench/configs/qwen3-8b.json --seq 32768 --skip-prefill --write-iters 2 --impl ef"
if [ -n "$OBJ" ]; then
  # the kernels live in the library the benches link; dump every cubin's SASS once and cut the two functions out
  for f in $BIN/bin/forward_bench $BIN/lib/*.so*; do [ -f "$f" ] && $OBJ -sass "$f" 2>/dev/null; done > /tmp/all.sass
  python3 - <<'PY' "$OUT"
import re, sys
out = sys.argv[1]
text = open('/tmp/all.sass').read()
funcs = re.split(r'\n\s*Function : ', text)
for f in funcs[1:]:
    name = f.split('\n', 1)[0].strip()
    for tag, pat in (('v7', 'attention_prefill_v4_kernelILi7E'), ('v6', 'attention_prefill_v4_kernelILi6E'),
                     ('ef', 'kv_write_int2_ef_kernel')):
        if pat in name:
            with open(f'{out}/{tag}.sass', 'a') as fh:
                fh.write('Function : ' + f)
PY
  ls -la $OUT/*.sass
  for t in v7 ef; do [ -f $OUT/$t.sass ] && echo "$t: $(grep -c 'HGMMA' $OUT/$t.sass) HGMMA, $(grep -cE '^\s+/\*[0-9a-f]{4}\*/' $OUT/$t.sass) instrs"; done
fi
if [ -n "$NCU" ]; then
  prof() {  # name kernel-regex skip cmd...
    local name=$1 k=$2 skip=$3; shift 3
    timeout 200 $NCU --set full --import-source no -k regex:"$k" -c 1 --launch-skip "$skip" -o /tmp/ncu_$name "$@" > $OUT/ncu_${name}_run.txt 2>&1
    echo "ncu $name rc=$?"
    $NCU -i /tmp/ncu_$name.ncu-rep --print-details all > $OUT/ncu_$name.txt 2>&1
    $NCU -i /tmp/ncu_$name.ncu-rep --page source --csv --print-source sass > $OUT/${name}_source.csv 2>&1 || echo "no source page"
    cp /tmp/ncu_$name.ncu-rep $OUT/ 2>/dev/null
    grep -E "Duration|Compute \(SM\) Throughput|Issue Slots Busy|Executed Ipc A|No Eligible|Registers Per|Tensor|Warp Cycles Per Issued" $OUT/ncu_$name.txt | head -16
  }
  prof v7_32k 'attention_prefill_v4_kernel' 3 $FB --attn-kernel v7
  prof ef_32k 'kv_write_int2_ef_kernel' 1 $KB
fi
