#!/usr/bin/env bash
# spec10 (issue #10): `oscar calibrate --method spectral` with its per-layer choice between the spectral layout and
# whole-head INT2 rotations (--candidates), on the GPU path, at the scale of speccal.sh (64 x 1024 calibration tokens,
# 8 held-out = 6 fit + 2 selection), evaluated at 1K and 4K through the CUDA runtime on held-out docs text.
# Expected runtime on one H100: ~4-6 min wall (4 calibrations of ~30-60 s each, most of it the spectral fit on the
# CPU; 4 evals at contexts 1024 and 4096, 8 sequences, ~20 s each). GPU busy time ~2 min. `full` adds the published
# (eigen x H x bitrev) bundle: +1 calibration and eval (~1 min).
#
#   BIN=<packed bin+lib> OUT=<dir> scripts/device/spec10.sh [full]     (cwd: the repo checkout)
#
# Bundles: default (the CLI default --candidates spectral,hadamard), spectral_only (--candidates spectral = the
# bundle of before), all3 (--candidates spectral,published,hadamard), hadamard (--method published --rotation
# hadamard: the single-segment yardstick), [published].
# Writes to $OUT: calib_<name>.json (calibrate --json: layer_choice, layer_proxy, k_weight), calib_<name>.log,
# eval_<name>_report.json/.md, inspect_default.txt, summary.txt (one line per bundle: choice, proxy, KL beyond the
# window and top-1 at 1K / 4K). Look for:
#   * every calibrate rc=0, and layer_choice in calib_default.json / calib_all3.json;
#   * summary.txt: KL>win of default vs spectral_only vs hadamard at 1K and 4K. On the CPU (24 x 1024 calibration,
#     3 eval sequences at 1K) it was default 4.89e-3, spectral_only 4.93e-3, all3 5.57e-3, hadamard 4.60e-3. The
#     question: does the per-layer choice close the 4K gap (spectral was 1.13-1.22x Hadamard at 4K on the CPU)?
#   * whether default's layer_choice makes every layer whole-head INT2 (inspect_default.txt: no "segments" lines),
#     in which case the runtime decodes it with the INT2 kernels.
set -u
BIN=${BIN:?set BIN}
OUT=${OUT:?set OUT}
source "$(dirname "$0")/calib_common.sh"  # FIX, MODEL, OSCAR, CAL_DATA, EVAL_DATA, calib()
COMMON=(--model "$MODEL" --data "${CAL_DATA[@]}" --num-seqs 64 --seq-len 1024 --heldout-seqs 8 --json --device cuda)
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1

evalb() {  # name
  local name=$1
  [ -f "$OUT/$name.oscar" ] || return
  local t0=$SECONDS
  $OSCAR eval --model "$MODEL" --bundle "$OUT/$name.oscar" --data "${EVAL_DATA[@]}" --modes bf16,oscar \
    --context 1024,4096 --num-seqs 8 --greedy-prompts 0 --device cuda --out "$OUT/eval_$name" > "$OUT/eval_$name.log" 2>&1
  echo "eval $name rc=$? $((SECONDS - t0)) s" >> "$OUT/summary.txt"
  for f in report.json report.md; do [ -f "$OUT/eval_$name/$f" ] && cp "$OUT/eval_$name/$f" "$OUT/eval_${name}_$f"; done
  rm -rf "$OUT/eval_$name"
}

NAMES=(default spectral_only all3 hadamard)
calib default
calib spectral_only --candidates spectral
calib all3 --candidates spectral,published,hadamard
calib hadamard --method published --rotation hadamard
if [ "${1:-}" = full ]; then
  calib published --method published
  NAMES+=(published)
fi
for n in "${NAMES[@]}"; do evalb "$n"; done
$OSCAR inspect "$OUT/default.oscar" > "$OUT/inspect_default.txt" 2>&1

python3 - "$OUT" "${NAMES[@]}" <<'PY' >> "$OUT/summary.txt" 2>&1
import json, sys, os
out, names = sys.argv[1], sys.argv[2:]
for n in names:
    line = n + ":"
    try:
        c = json.load(open(f"{out}/calib_{n}.json"))
        line += f" k_weight={c.get('k_weight')} layer_choice={c.get('layer_choice')} layer_proxy={c.get('layer_proxy')}"
    except Exception as e:
        line += f" no calibrate json ({e})"
    p = f"{out}/eval_{n}_report.json"
    if os.path.exists(p):
        for r in json.load(open(p)).get("results", []):
            if r.get("mode") == "oscar":
                b = r["beyond_windows"]
                line += f" | ctx {r['context']}: KL>win {b['kl_mean']:.3e} top1>win {100 * b['top1_agreement']:.1f}% PPL>win {b['perplexity']:.3f}"
    print(line)
PY
cat "$OUT/summary.txt"
