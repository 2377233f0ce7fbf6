#!/usr/bin/env bash
# Device checks of bundle publishing (issue 8). Expected runtime: about 1 minute (15 s CPU measured on the dev
# machine), all of it CPU: two `calibrate --device cpu` on qwen3-tiny-trained with 4 x 256 tokens, a CPU forward,
# numpy. The GPU is not used (torch only loads files), so any warm GPU machine will do.
# Needs: $BIN (packed Release build with this tree's `oscar`), $OUT, fixtures at /work/shared/fixtures,
# python3 with torch + numpy (h5py optional: without it the bundle loader of the example is skipped, see below).
#   (a) `oscar export --format sglang-oscar` + scripts/export/to_sglang_oscar.py, then torch.load of the two .pt
#       files and the checks the published loader (FutureMLS-Lab/OSCAR python/sglang/srt/mem_cache/
#       oscar_calibration.py, _validate_checkpoint) makes: layer set == model layers, rotation [d, d], finite,
#       max|R R^T - I| <= 5e-3; plus format_version 1, file names the server expects, weights_only loading,
#       ascending eigenvalues [d]. A damaged copy (one layer dropped) must be rejected by the same checks.
#   (b) scripts/serving_example.py (the docs/serving.md example) against the C++ reference quantizer's records
#       (`oscar export --format safetensors --golden-kv DUMP`), through both of its loaders.
# What to look for in $OUT/pubci.log: "CHECK (a) PASS", "CHECK (b) PASS" lines, each example run ending in "PASS"
# with "code mismatches N/M" (expected 0 or a handful out of ~86k) and read path max|d| ~1e-7, and "DOC: PASS".
set -uo pipefail
: "${BIN:?set BIN to the packed build}" "${OUT:?set OUT}"
export LD_LIBRARY_PATH=$BIN/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
OSCAR="$BIN/bin/oscar"
FX=/work/shared/fixtures
MODEL=$FX/models/qwen3-tiny-trained
W=$(mktemp -d /tmp/pubci.XXXXXX)
LOG=$OUT/pubci.log
mkdir -p "$OUT"
exec > >(tee "$LOG") 2>&1
status=0
step() { echo; echo "== $*"; }
fail() { echo "FAIL: $*"; status=1; }

step "environment"
python3 -c "import sys, torch, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'numpy', numpy.__version__)"
HAVE_H5PY=0
if python3 -c "import h5py; print('h5py', h5py.__version__)"; then HAVE_H5PY=1; else echo "h5py: not installed"; fi

step "calibrate two bundles on the CPU: published (uniform INT2, what the server serves) and spectral (segments; --candidates spectral keeps the segmented layouts the per-layer choice could replace)"
# --transform none: the published server runs one orthogonal R per layer, so the bundles stay 1.x (the 2.0 default's
# per-KV-head transforms are refused by the sglang export).
for method in published spectral; do
  "$OSCAR" calibrate --model "$MODEL" --data "$FX/text/tiny-shakespeare.txt" --out "$W/$method.oscar" --device cpu \
    --method $method --num-seqs 4 --seq-len 256 --heldout-seqs 2 --sink 16 --recent 32 --transform none \
    $([ $method = spectral ] && echo --candidates spectral) | tail -2 || fail "calibrate $method"
  "$OSCAR" verify "$W/$method.oscar" --model "$MODEL" | tail -1 || fail "verify $method"
done

step "(a) sglang-oscar export, converter, published loader checks"
"$OSCAR" export "$W/published.oscar" --format sglang-oscar --out "$W/sg" || fail "export sglang-oscar"
grep -q '"supported": true' "$W/sg/manifest.json" || fail "the published-method bundle is not marked server-supported"
python3 scripts/export/to_sglang_oscar.py "$W/sg" --out "$W/pt" || fail "to_sglang_oscar.py"
cp "$W/pt/server_flags.env" "$W/pt/server_flags.json" "$W/sg/manifest.json" "$OUT/" 2>/dev/null
python3 - "$W/pt" "$MODEL/config.json" <<'EOF' || fail "(a) published loader checks"
import json, os, shutil, sys, tempfile
import torch

pt_dir, config = sys.argv[1], json.load(open(sys.argv[2]))
layers = set(range(config["num_hidden_layers"]))
d = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
TOL = 5e-3  # the published _ORTHOGONALITY_TOLERANCE

def check(path, objective):
    # torch >= 2.6 loads with weights_only=True by default, as the published loader's torch.load does.
    state = torch.load(path, map_location="cpu")
    problems = []
    if state.get("format_version") != 1:
        problems.append(f"format_version {state.get('format_version')}")
    if state.get("objective") != objective:
        problems.append(f"objective {state.get('objective')} != {objective}")
    entries = state.get("layers", {})
    if set(map(int, entries.keys())) != layers:
        problems.append(f"layer set {sorted(map(int, entries.keys()))} != {sorted(layers)}")
    eye = torch.eye(d, dtype=torch.float32)
    worst = 0.0
    for layer_id in sorted(layers & set(map(int, entries.keys()))):
        e = entries.get(layer_id, entries.get(str(layer_id)))
        r = e["rotation"]
        if tuple(r.shape) != (d, d):
            problems.append(f"layer {layer_id} rotation shape {tuple(r.shape)}")
            continue
        if not bool(torch.isfinite(r).all()):
            problems.append(f"layer {layer_id} non-finite rotation")
        err = (r.float() @ r.float().T - eye).abs().max().item()
        worst = max(worst, err)
        if err > TOL:
            problems.append(f"layer {layer_id} not orthogonal ({err:.3e})")
        ev = e["eigenvalues"]
        if tuple(ev.shape) != (d,) or not bool((ev[1:] >= ev[:-1]).all()):
            problems.append(f"layer {layer_id} eigenvalues shape {tuple(ev.shape)} or not ascending")
    return problems, worst

ok = True
for name, objective in (("k_rotation_qqt_r_h_pbr.pt", "qqt_r_h_pbr"), ("v_rotation_sst_r_h_pbr.pt", "sst_r_h_pbr")):
    path = os.path.join(pt_dir, name)
    if not os.path.exists(path):
        print(f"{name}: missing (the server looks for exactly this name)"); ok = False; continue
    problems, worst = check(path, objective)
    print(f"{name}: {len(layers)} layers expected, max|R R^T - I| = {worst:.3e}, problems: {problems or 'none'}")
    ok = ok and not problems
# Negative control: the same checks must reject a file with one layer missing.
tmp = tempfile.mkdtemp()
state = torch.load(os.path.join(pt_dir, "k_rotation_qqt_r_h_pbr.pt"), map_location="cpu")
state["layers"].pop(max(layers))
torch.save(state, os.path.join(tmp, "bad.pt"))
problems, _ = check(os.path.join(tmp, "bad.pt"), "qqt_r_h_pbr")
print(f"negative control (layer {max(layers)} dropped): rejected = {bool(problems)} ({problems})")
ok = ok and bool(problems)
shutil.rmtree(tmp)
print("CHECK (a)", "PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
EOF

step "(b) serving example vs the C++ reference quantizer"
"$OSCAR" forward --model "$MODEL" --prompt "$(head -c 2000 "$FX/text/moby-dick.txt" | tail -c 1200)" \
  --dump "$W/kv.safetensors" > /dev/null || fail "forward --dump"
b_ok=1
for method in published spectral; do
  "$OSCAR" export "$W/$method.oscar" --format safetensors --golden-kv "$W/kv.safetensors" --golden-tokens 128 \
    --out "$W/st-$method" || fail "export --golden-kv ($method)"
  echo "-- $method bundle, safetensors export loader"
  python3 scripts/serving_example.py --export "$W/st-$method" --golden "$W/st-$method/int2_golden.safetensors" \
    > "$OUT/example_${method}_export.txt" || { b_ok=0; fail "serving_example --export ($method)"; }
  tail -2 "$OUT/example_${method}_export.txt"
  if [ "$HAVE_H5PY" = 1 ]; then
    echo "-- $method bundle, h5py loader"
    python3 scripts/serving_example.py --bundle "$W/$method.oscar" --golden "$W/st-$method/int2_golden.safetensors" \
      > "$OUT/example_${method}_bundle.txt" || { b_ok=0; fail "serving_example --bundle ($method)"; }
    tail -2 "$OUT/example_${method}_bundle.txt"
  else
    echo "serving_example --bundle: SKIPPED (no h5py on this machine; the h5py loader is checked on the dev machine)"
  fi
done
echo "CHECK (b)" "$([ $b_ok = 1 ] && echo PASS || echo FAIL)"

step "docs/serving.md shows the example as it is"
python3 - <<'EOF' || fail "docs/serving.md excerpt differs from scripts/serving_example.py"
import re, sys
doc = open("docs/serving.md", encoding="utf-8").read()
src = open("scripts/serving_example.py", encoding="utf-8").read()
blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
bad = [b for b in blocks if b not in src]
print(f"{len(blocks)} python block(s) in docs/serving.md, {len(bad)} not verbatim in scripts/serving_example.py")
print("DOC:", "PASS" if blocks and not bad else "FAIL")
sys.exit(0 if blocks and not bad else 1)
EOF

rm -rf "$W"
echo
echo "pubci: $([ $status = 0 ] && echo ALL PASS || echo FAILURES) (log: $LOG)"
sleep 1  # let tee flush the log
exit $status
