# Second pass of the sweep (after run.sh): (1) the yardstick bundle (Hadamard RTN, --error-feedback off) with this
# binary, so every ratio uses a baseline measured by the same build; (2) every bundle on a third held-out text that
# played no part in choosing anything (tinystories-sample: not in the calibration data, not looked at before the
# damp was read off docs/moby); (3) K-only at the damp that was best for kv on docs/moby.
# Run from the repo root after run.sh: bash bench/results/cpu-spectral/ef-sweep/run2.sh
T=../shared/fixtures/text; M=../shared/fixtures/models/qwen3-tiny-trained; O=${O:-/tmp/hS/oscar}; W=${W:-/tmp/hS}
CAL="--model $M --data $T/war-and-peace.txt $T/tiny-shakespeare.txt $T/code-llamacpp-mit.txt $T/wikitext-2-raw-test.txt --num-seqs 24 --seq-len 1024 --heldout-seqs 8 --device cpu --method published --rotation hadamard"
EV="--modes bf16,oscar --context 1024 --num-seqs 3 --greedy-prompts 0 --device cpu --oscar-clip 0.96,0.92"
one() {  # name, calibrate flags...
  local n=$1; shift
  /usr/bin/time -f "calib $n %e s" $O calibrate $CAL "$@" --out $W/$n.oscar --json > $W/calib-$n.json 2> $W/calib-$n.log
  $O eval --model $M --bundle $W/$n.oscar --data $T/python-docs-heldout.txt $T/linux-docs-heldout.txt $EV --out $W/eval-$n > $W/eval-$n.log 2>&1
  $O eval --model $M --bundle $W/$n.oscar --data $T/moby-dick.txt $EV --out $W/moby-$n > $W/moby-$n.log 2>&1
}
tiny() { $O eval --model $M --bundle $W/$1.oscar --data $T/tinystories-sample.txt $EV --out $W/tiny-$1 > $W/tiny-$1.log 2>&1; }
(
  one off --error-feedback off
  tiny off
  one k-d0.03 --error-feedback k --ef-damp 0.03
  tiny k-d0.03
) > $W/streamA2.log 2>&1 &
(
  for n in kv-d0.03 kv-d0.1 kv-d0.01 kv-d0.3 kv-d1.0 k-d0.1; do tiny $n; done
) > $W/streamB2.log 2>&1 &
wait
echo done
