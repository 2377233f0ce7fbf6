#!/bin/bash
# How bench/results/cpu-eval/qwen3-ablation/ was made (CPU, ~15 min on 2 shared cores). Run from the repo root
# with a Release build in build/; bundles and full reports go to a scratch folder, the small reports here.
set -u
O=$PWD/build/bin/oscar; F=$PWD/../shared/fixtures; M=$F/models/qwen3-tiny-trained
R=$PWD/bench/results/cpu-eval/qwen3-ablation; mkdir -p $R
CAL=("$F/text/war-and-peace.txt" "$F/text/tiny-shakespeare.txt" "$F/text/code-llamacpp-mit.txt")
EV=("$F/text/python-docs-heldout.txt" "$F/text/linux-docs-heldout.txt")
S=$(mktemp -d); cd $S
for rot in oscar hadamard eigen none; do
  /usr/bin/time -f "calibrate $rot %e s" $O calibrate --model $M --data "${CAL[@]}" --out q-$rot.oscar --method published --rotation $rot \
    --num-seqs 16 --seq-len 1024 --heldout-seqs 4 --sink 64 --recent 256 --device cpu > $R/calib-$rot.log 2>&1
done
run() { # name rot clip win modes
  local args=()
  [ "$3" = off ] && args+=(--oscar-clip 1,1)
  [ "$3" = published ] && args+=(--oscar-clip 0.96,0.92)
  if [ "$4" = off ]; then args+=(--no-windows); else args+=(--sink 64 --recent 256); fi
  /usr/bin/time -f "eval $1 %e s" $O eval --model $M --bundle q-$2.oscar --data "${EV[@]}" --modes $5 --context 1024 \
    --num-seqs 3 --greedy-prompts 1 --device cpu --strict "${args[@]}" --out run-$1 > $S/$1.log 2>&1
  cp run-$1/report.json $R/$1.json; cp run-$1/report.md $R/$1.md
}
for win in on off; do run base-w$win oscar tuned $win bf16,oscar,int2,kivi2,hadamard2,int4,fp8; done
for win in on off; do for rot in oscar hadamard eigen none; do for clip in tuned published off; do
  [ "$rot/$clip" = oscar/tuned ] && continue
  run abl-$rot-$clip-w$win $rot $clip $win bf16,oscar
done; done; done
# ablation.md: the table part of scripts/device/evalres.sh run on $R
sed -n "/^python3 - \"\$OUT\" <<'PY'/,/^PY$/p" $OLDPWD/scripts/device/evalres.sh | sed '1d;$d' > table.py
python3 table.py $R
echo ALLDONE
