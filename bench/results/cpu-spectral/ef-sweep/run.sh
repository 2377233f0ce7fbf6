# Issue #10: error-feedback damping / K-only sweep through `oscar calibrate`, CPU, bundle (b) of docs/results.md's
# "Error-feedback tables in the bundle" (--method published --rotation hadamard). Same data, sizes and eval as
# ../ef-calibrate/run.sh. Run from the repo root: bash bench/results/cpu-spectral/ef-sweep/run.sh
# O = the lead's main build (build/bin/oscar copied to /tmp/hS/oscar so a rebuild cannot change it mid-sweep).
# Two streams on the 2 shared cores; each stream runs its bundles one after another.
T=../shared/fixtures/text; M=../shared/fixtures/models/qwen3-tiny-trained; O=${O:-/tmp/hS/oscar}; W=${W:-/tmp/hS}
CAL="--model $M --data $T/war-and-peace.txt $T/tiny-shakespeare.txt $T/code-llamacpp-mit.txt $T/wikitext-2-raw-test.txt --num-seqs 24 --seq-len 1024 --heldout-seqs 8 --device cpu --method published --rotation hadamard"
EV="--modes bf16,oscar --context 1024 --num-seqs 3 --greedy-prompts 0 --device cpu --oscar-clip 0.96,0.92"
one() {  # name, calibrate flags...
  local n=$1; shift
  /usr/bin/time -f "calib $n %e s" $O calibrate $CAL "$@" --out $W/$n.oscar --json > $W/calib-$n.json 2> $W/calib-$n.log
  $O eval --model $M --bundle $W/$n.oscar --data $T/python-docs-heldout.txt $T/linux-docs-heldout.txt $EV --out $W/eval-$n > $W/eval-$n.log 2>&1
  $O eval --model $M --bundle $W/$n.oscar --data $T/moby-dick.txt $EV --out $W/moby-$n > $W/moby-$n.log 2>&1
}
(
  one kv-d0.01 --error-feedback kv --ef-damp 0.01
  one kv-d0.3  --error-feedback kv --ef-damp 0.3
  one kv-d0.1  --error-feedback kv --ef-damp 0.1   # rerun of the measured point with this binary
) > $W/streamA.log 2>&1 &
(
  one kv-d1.0  --error-feedback kv --ef-damp 1.0
  one k-d0.1   --error-feedback k  --ef-damp 0.1
  one kv-d0.03 --error-feedback kv --ef-damp 0.03
) > $W/streamB.log 2>&1 &
wait
echo done
