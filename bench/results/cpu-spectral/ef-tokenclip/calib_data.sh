#!/usr/bin/env bash
# Issue #10: does the calibration text mix explain why `oscar calibrate`'s EF bundle (0.69x the Hadamard RTN
# yardstick on docs) is behind error_feedback_bench's tables (0.59x on python + linux docs, refit_pydocs_linux.txt)?
# The bench's tables come from war-and-peace + tiny-shakespeare + code only; calibrate's from those + wikitext-2.
# Same calibrate/eval flags as ../ef-sweep/run.sh otherwise. Run from the repo root.
T=../shared/fixtures/text; M=../shared/fixtures/models/qwen3-tiny-trained; O=${O:-/tmp/hN/oscar}; W=${W:-/tmp/hN}
D=bench/results/cpu-spectral/ef-tokenclip
CAL="--model $M --data $T/war-and-peace.txt $T/tiny-shakespeare.txt $T/code-llamacpp-mit.txt --num-seqs 24 --seq-len 1024 --heldout-seqs 8 --device cpu --method published --rotation hadamard"
EV="--modes bf16,oscar --context 1024 --num-seqs 3 --greedy-prompts 0 --device cpu --oscar-clip 0.96,0.92"
for n in nowiki-kv nowiki-off; do
  ef=kv; [ $n = nowiki-off ] && ef=off
  /usr/bin/time -f "calib $n %e s" $O calibrate $CAL --error-feedback $ef --ef-damp 0.1 --out $W/$n.oscar --json > $W/calib-$n.json 2> $W/calib-$n.log
  $O eval --model $M --bundle $W/$n.oscar --data $T/python-docs-heldout.txt $T/linux-docs-heldout.txt $EV --out $W/eval-$n > $W/eval-$n.log 2>&1
  cp $W/eval-$n.log $D/eval-$n.log
done
