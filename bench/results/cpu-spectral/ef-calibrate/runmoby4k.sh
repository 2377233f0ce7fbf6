# Context 4096, 2 sequences of moby-dick (fiction not in the calibration data), on bundles made by run.sh.
T=../shared/fixtures/text; M=../shared/fixtures/models/qwen3-tiny-trained; O=${O:-/tmp/hE1/oscar}; W=${W:-/tmp/hE1}
for n in "$@"; do
  $O eval --model $M --bundle $W/$n.oscar --data $T/moby-dick.txt --modes bf16,oscar \
    --context 4096 --num-seqs 2 --greedy-prompts 0 --device cpu --oscar-clip 0.96,0.92 --out $W/moby4k-$n > $W/moby4k-$n.log 2>&1 &
done
wait
