# Issue #10: error-feedback tables from `oscar calibrate` (bundle 1.2), CPU, the yardstick of docs/results.md
# ("More varied calibration text"). Run from the repo root: bash bench/results/cpu-spectral/ef-calibrate/run.sh
# O = the hE1 build of oscar (build-hE1/bin/oscar copied to /tmp/hE1/oscar so rebuilds do not disturb the runs).
# Two streams in parallel on the 2 shared cores: EF on (a, b, c) and EF off (d).
T=../shared/fixtures/text; M=../shared/fixtures/models/qwen3-tiny-trained; O=${O:-/tmp/hE1/oscar}; W=${W:-/tmp/hE1}
CAL="--model $M --data $T/war-and-peace.txt $T/tiny-shakespeare.txt $T/code-llamacpp-mit.txt $T/wikitext-2-raw-test.txt --num-seqs 24 --seq-len 1024 --heldout-seqs 8 --device cpu"
EV="--modes bf16,oscar --context 1024 --num-seqs 3 --greedy-prompts 0 --device cpu --oscar-clip 0.96,0.92"
one() {  # name, calibrate flags...
  local n=$1; shift
  /usr/bin/time -f "calib $n %e s" $O calibrate $CAL "$@" --out $W/$n.oscar --json > $W/calib-$n.json 2> $W/calib-$n.log
  $O eval --model $M --bundle $W/$n.oscar --data $T/python-docs-heldout.txt $T/linux-docs-heldout.txt $EV --out $W/eval-$n > $W/eval-$n.log 2>&1
  $O eval --model $M --bundle $W/$n.oscar --data $T/moby-dick.txt $EV --out $W/moby-$n > $W/moby-$n.log 2>&1
}
(
  one spectral-ef
  one hadamard-ef --method published --rotation hadamard
  one published-ef --method published
) > $W/streamA.log 2>&1 &
(
  one hadamard-off --method published --rotation hadamard --error-feedback off
  one spectral-off --error-feedback off
  one published-off --method published --error-feedback off
) > $W/streamB.log 2>&1 &
wait
echo done
