# Sourced by the calibrate-then-eval device scripts (cliptune.sh, speccal.sh, spec10.sh): the qwen3-tiny fixture,
# the calibration text (fiction + code) and the held-out evaluation text (docs) they all compare on, and calib().
# The caller sets BIN and OUT, then COMMON=(calibrate flags shared by its runs, including --data "${CAL_DATA[@]}").
FIX=/work/shared/fixtures
[ -d "$FIX" ] || FIX=../shared/fixtures
MODEL=$FIX/models/qwen3-tiny-trained
OSCAR="env LD_LIBRARY_PATH=$BIN/lib $BIN/bin/oscar"
CAL_DATA=("$FIX/text/war-and-peace.txt" "$FIX/text/tiny-shakespeare.txt" "$FIX/text/code-llamacpp-mit.txt")
EVAL_DATA=("$FIX/text/python-docs-heldout.txt" "$FIX/text/linux-docs-heldout.txt")

calib() {  # name, extra flags...: $OUT/<name>.oscar, calib_<name>.json/.log, a line in summary.txt
  local name=$1; shift
  local t0=$SECONDS
  $OSCAR calibrate "${COMMON[@]}" --out "$OUT/$name.oscar" "$@" > "$OUT/calib_$name.json" 2> "$OUT/calib_$name.log"
  echo "calibrate $name rc=$? $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}
