#!/bin/bash
# evalres: the qwen3-tiny-trained ablation (rotation none / hadamard / eigen / oscar × clip off / published / tuned ×
# windows on / off) and passkey/needle retrieval through the GPU engine (`oscar eval --device cuda`).
#
# Expected runtime on one H100: about 5 minutes wall (4 calibrations of 16 × 1024 tokens ≈ 1–1.5 min, 26 eval runs
# of 8 sequences at 1K + 4K ≈ 3 min, one retrieval run ≈ 0.5 min). A guard skips (and logs) the remaining eval runs
# once 280 s have passed (windows-on grid first), so the script stays under about 6 minutes.
#
# Run (lead): BIN=<packed bin/+lib/> OUT=<dir> bash scripts/device/evalres.sh      (cwd: the repo checkout)
# Output in $OUT: ablation.md (the table for docs/results.md), passkey.md, <run>.json/<run>.md per eval run,
# calib-<rotation>.log, timing.log. Everything deterministic except the timings.
set -euo pipefail
: "${BIN:?set BIN to the packed binaries}" "${OUT:?set OUT to the output folder}"
oscar() { LD_LIBRARY_PATH="$BIN/lib" "$BIN/bin/oscar" "$@"; }
F=/work/shared/fixtures
M=$F/models/qwen3-tiny-trained
# Calibration: training text of the model (PROVENANCE.md: the first 95% of these files were trained on). Eval: the
# documentation hold-outs, never part of calibration (eval --strict checks the sha256s).
CAL=("$F/text/war-and-peace.txt" "$F/text/tiny-shakespeare.txt" "$F/text/code-llamacpp-mit.txt")
EV=("$F/text/python-docs-heldout.txt" "$F/text/linux-docs-heldout.txt")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS
BUDGET=280
log() { echo "[$((SECONDS - START))s] $*" | tee -a "$OUT/timing.log"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt" || true
oscar --version | tee -a "$OUT/device.txt" || true

# 1. One bundle per rotation (clip tuned per layer); clip off / published come from eval --oscar-clip, which
#    replaces the bundle's ratios (the rotation does not depend on them).
for rot in oscar hadamard eigen none; do
  t0=$SECONDS
  for dev in cuda cpu; do  # the CPU path (16 cores there) only if the GPU calibration refuses an option
    if oscar calibrate --model "$M" --data "${CAL[@]}" --out "$WORK/$rot.oscar" --method published --rotation "$rot" \
        --num-seqs 16 --seq-len 1024 --heldout-seqs 4 --sink 64 --recent 256 --device $dev >"$OUT/calib-$rot.log" 2>&1
    then
      log "calibrate --rotation $rot --device $dev: $((SECONDS - t0)) s"
      break
    fi
    log "calibrate --rotation $rot --device $dev FAILED: $(tail -n 1 "$OUT/calib-$rot.log")"
  done
done

# 2. Eval runs: name, bundle, extra flags. First the headline (OSCAR tuned clip with the INT2 baselines), then the grid.
run_eval() {  # name rot clip windows modes
  local name=$1 rot=$2 clip=$3 win=$4 modes=$5 args=()
  if ((SECONDS - START > BUDGET)); then log "SKIPPED $name (time budget)"; return; fi
  [ "$clip" = off ] && args+=(--oscar-clip 1,1)
  [ "$clip" = published ] && args+=(--oscar-clip 0.96,0.92)
  [ "$win" = off ] && args+=(--no-windows) || args+=(--sink 64 --recent 256)
  local t0=$SECONDS
  if oscar eval --model "$M" --bundle "$WORK/$rot.oscar" --data "${EV[@]}" --modes "$modes" --context 1024,4096 \
      --num-seqs 8 --greedy-prompts 2 --gpu-batch 16 --device cuda --strict "${args[@]}" --out "$WORK/$name" \
      >"$OUT/$name.log" 2>&1; then
    cp "$WORK/$name/report.json" "$OUT/$name.json"
    cp "$WORK/$name/report.md" "$OUT/$name.md"
    log "eval $name: $((SECONDS - t0)) s"
  else
    log "eval $name FAILED (rc $?), see $name.log"
  fi
}
# hadamard2 is a GPU engine mode only in newer builds: fall back to bf16,oscar,int2 if the engine refuses it.
for win in on off; do
  run_eval "base-w$win" oscar tuned $win bf16,oscar,int2,hadamard2
  [ -f "$OUT/base-w$win.json" ] || run_eval "base-w$win" oscar tuned $win bf16,oscar,int2
done
for win in on off; do
  for rot in oscar hadamard eigen none; do
    for clip in tuned published off; do
      [ "$rot/$clip" = oscar/tuned ] && continue  # the base run has it
      run_eval "abl-$rot-$clip-w$win" $rot $clip $win bf16,oscar
    done
  done
done

# 3. Retrieval: passkey + needle at 1K/2K/4000 tokens (4096 + 12 answer tokens would pass the model's positions).
if ((SECONDS - START <= BUDGET + 60)); then
  t0=$SECONDS
  oscar eval --model "$M" --bundle "$WORK/oscar.oscar" --data "${EV[@]}" --modes bf16,oscar,int2 --context 1024 \
    --num-seqs 1 --greedy-prompts 0 --passkey --passkey-lengths 1024,2048,4000 --passkey-depths 0,25,50,75,100 \
    --passkey-trials 2 --sink 64 --recent 256 --device cuda --out "$WORK/passkey" >"$OUT/passkey.log" 2>&1 &&
    cp "$WORK/passkey/report.json" "$OUT/passkey.json" && cp "$WORK/passkey/report.md" "$OUT/passkey-report.md" ||
    log "passkey run FAILED, see passkey.log"
  log "passkey: $((SECONDS - t0)) s"
fi

# 4. Tables.
python3 - "$OUT" <<'PY'
import json, os, sys, glob
out = sys.argv[1]
def load(name):
    p = os.path.join(out, name + ".json")
    return json.load(open(p)) if os.path.exists(p) else None
def f(x, p=3):
    return "n/a" if x is None or x != x else (f"{x:.{p}e}" if abs(x) < 1e-2 and x != 0 else f"{x:.{p}f}")
rows = ["| rotation | clip | windows | context | PPL | PPL >win | KL mean | KL >win | KL p99 >win | top-1 >win | greedy |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
def add(label_rot, clip, win, r):
    b, a = r["beyond_windows"], r["all_positions"]
    rows.append(f"| {label_rot} | {clip} | {win} | {r['context']} | {a['perplexity']:.3f} | {b['perplexity']:.3f} | "
                f"{f(a['kl_mean'])} | {f(b['kl_mean'])} | {f(b['kl_p99'])} | {100*b['top1_agreement']:.1f} % | "
                f"{r['greedy']['mean_tokens_until_divergence']:.1f}/{r['greedy']['new_tokens']} |")
for win in ("on", "off"):
    base = load(f"base-w{win}")
    if base:
        for r in base["results"]:
            if r["mode"] != "oscar":
                add(f"({r['mode']} mode)", "-", win, r)
    for rot in ("oscar", "hadamard", "eigen", "none"):
        for clip in ("off", "published", "tuned"):
            rep = base if (rot, clip) == ("oscar", "tuned") else load(f"abl-{rot}-{clip}-w{win}")
            if not rep:
                rows.append(f"| {rot} | {clip} | {win} | missing | | | | | | | |"); continue
            for r in rep["results"]:
                if r["mode"] == "oscar":
                    add(rot, clip, win, r)
open(os.path.join(out, "ablation.md"), "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
pk = load("passkey")
if pk:
    cells = {}
    for c in pk["retrieval"]:
        k = (c["task"], c["mode"], c["length"])
        s, t = cells.get(k, (0, 0))
        cells[k] = (s + c["successes"], t + c["trials"])
    lines = ["| task | mode | length | retrieved |", "|---|---|---|---|"]
    for (task, mode, length), (s, t) in sorted(cells.items()):
        lines.append(f"| {task} | {mode} | {length} | {s}/{t} |")
    open(os.path.join(out, "passkey.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))
PY
log "total $((SECONDS - START)) s"
