set -x
T=../shared/fixtures/text; M=../shared/fixtures/models/qwen3-tiny-trained; O=build/bin/oscar
for metric in proxy kl; do
  /usr/bin/time -f "calib $metric %e s" $O calibrate --model $M --data $T/war-and-peace.txt $T/tiny-shakespeare.txt $T/code-llamacpp-mit.txt $T/wikitext-2-raw-test.txt \
    --num-seqs 24 --seq-len 1024 --heldout-seqs 8 --device cpu --candidate-metric $metric --out /tmp/wx/wiki-$metric.oscar --json > /tmp/wx/calib-$metric.json 2> /tmp/wx/calib-$metric.log
  $O eval --model $M --bundle /tmp/wx/wiki-$metric.oscar --data $T/python-docs-heldout.txt $T/linux-docs-heldout.txt --modes bf16,oscar \
    --context 1024 --num-seqs 3 --greedy-prompts 0 --device cpu --oscar-clip 0.96,0.92 --out /tmp/wx/eval-$metric > /tmp/wx/eval-$metric.log 2>&1
done
echo done
