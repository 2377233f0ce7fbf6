# Context 4096, 2 sequences (python + linux docs held-out), on bundles made by run.sh. Run from the repo root.
T=../shared/fixtures/text; M=../shared/fixtures/models/qwen3-tiny-trained; O=${O:-/tmp/hE1/oscar}; W=${W:-/tmp/hE1}
for n in "$@"; do
  $O eval --model $M --bundle $W/$n.oscar --data $T/python-docs-heldout.txt $T/linux-docs-heldout.txt --modes bf16,oscar \
    --context 4096 --num-seqs 2 --greedy-prompts 0 --device cpu --oscar-clip 0.96,0.92 --out $W/eval4k-$n > $W/eval4k-$n.log 2>&1
done
