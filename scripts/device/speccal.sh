#!/usr/bin/env bash
# speccal: `oscar calibrate --method spectral` on the GPU path, and whether its automatic --k-weight choice (made on
# held-out CALIBRATION sequences by the attention-output proxy) agrees with the KL ranking on evaluation text.
# Expected runtime on one H100: ~5-8 min wall (7 calibrations of 64 x 1024 tokens, each ~20-40 s of which the
# spectral fit on the CPU is most; 7 evals at contexts 1024 and 4096, 8 sequences). GPU busy time ~2-3 min.
#
#   BIN=<packed bin+lib> OUT=<dir> scripts/device/speccal.sh     (cwd: the repo checkout)
#
# Writes to $OUT: calib_<name>.json (calibrate --json), calib_<name>.log, eval_<name>.json/.md (oscar eval reports),
# summary.txt (one line per bundle: chosen k_weight, proxy, eval KL). Look for:
#   * calib_spectral_cuda.json: "method": "spectral", a k_weight, "k_weight_proxy" with the published baseline last;
#   * summary.txt / eval_*_report.md: compare the oscar-mode KL (positions beyond the window) of spectral_cuda (auto
#     k_weight) with spectral_k1..k8 (does the proxy pick the KL-best weight?), with published_cuda, and with the
#     int2 row. On the CPU quickstart scale (24 x 512, 3 fit seqs, prose only) spectral LOST to published in KL; this
#     run (more and more varied fit data) says whether that was the data size/diversity or the method.
set -u
BIN=${BIN:?set BIN}
OUT=${OUT:?set OUT}
source "$(dirname "$0")/calib_common.sh"  # FIX, MODEL, OSCAR, CAL_DATA, EVAL_DATA, calib()
COMMON=(--model "$MODEL" --data "${CAL_DATA[@]}" --num-seqs 64 --seq-len 1024 --heldout-seqs 8 --json)
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1

evalb() {  # name
  local name=$1
  [ -f "$OUT/$name.oscar" ] || return
  $OSCAR eval --model "$MODEL" --bundle "$OUT/$name.oscar" --data "${EVAL_DATA[@]}" --modes bf16,oscar,int2 \
    --context 1024,4096 --num-seqs 8 --device cuda --out "$OUT/eval_$name" > "$OUT/eval_$name.log" 2>&1
  echo "eval $name rc=$?" >> "$OUT/summary.txt"
  for f in report.json report.md; do [ -f "$OUT/eval_$name/$f" ] && cp "$OUT/eval_$name/$f" "$OUT/eval_${name}_$f"; done
  rm -rf "$OUT/eval_$name"
}

calib spectral_cuda --device cuda                      # default method: spectral, k_weight auto over 1,2,4,8
calib published_cuda --device cuda --method published
if [ "${1:-}" = full ]; then  # the k_weight sweep and the 3-bit variant: ~2 min each (the spectral fit runs on the CPU)
  for w in 1 2 4 8; do calib "spectral_k$w" --device cuda --k-weight "$w"; done
  calib spectral_nodrop --device cuda --widths 1,2,3,4
fi

for n in spectral_cuda published_cuda spectral_k1 spectral_k2 spectral_k4 spectral_k8 spectral_nodrop; do evalb "$n"; done
$OSCAR inspect "$OUT/spectral_cuda.oscar" > "$OUT/inspect_spectral_cuda.txt" 2>&1

python3 - "$OUT" <<'PY' >> "$OUT/summary.txt" 2>&1
import json, sys, os
out = sys.argv[1]
for n in ["spectral_cuda", "published_cuda", "spectral_k1", "spectral_k2", "spectral_k4", "spectral_k8", "spectral_nodrop"]:
    try:
        c = json.load(open(f"{out}/calib_{n}.json"))
    except Exception as e:
        print(n, "no calibrate json", e); continue
    line = f"{n}: k_weight={c.get('k_weight')} proxy={c.get('k_weight_proxy')} seconds={c.get('seconds'):.1f}"
    p = f"{out}/eval_{n}_report.json"
    if os.path.exists(p):
        r = json.load(open(p))
        line += " eval=" + json.dumps(r.get("summary", r))[:600]
    print(line)
PY
cat "$OUT/summary.txt"
