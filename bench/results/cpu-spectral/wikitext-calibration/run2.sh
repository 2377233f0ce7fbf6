T=../shared/fixtures/text; M=../shared/fixtures/models/qwen3-tiny-trained; O=build/bin/oscar
$O eval --model $M --bundle /tmp/wx/wiki-proxy.oscar --data $T/python-docs-heldout.txt $T/linux-docs-heldout.txt --modes bf16,oscar \
    --context 4096 --num-seqs 2 --greedy-prompts 0 --device cpu --oscar-clip 0.96,0.92 --out /tmp/wx/eval4k-proxy > /tmp/wx/eval4k-proxy.log 2>&1
$O calibrate --model $M --data $T/war-and-peace.txt $T/tiny-shakespeare.txt $T/code-llamacpp-mit.txt $T/wikitext-2-raw-test.txt \
    --num-seqs 24 --seq-len 1024 --heldout-seqs 8 --device cpu --candidates spectral --out /tmp/wx/wiki-sponly.oscar --json > /tmp/wx/calib-sponly.json 2> /tmp/wx/calib-sponly.log
$O eval --model $M --bundle /tmp/wx/wiki-sponly.oscar --data $T/python-docs-heldout.txt $T/linux-docs-heldout.txt --modes bf16,oscar \
    --context 1024 --num-seqs 3 --greedy-prompts 0 --device cpu --oscar-clip 0.96,0.92 --out /tmp/wx/eval-sponly > /tmp/wx/eval-sponly.log 2>&1
$O calibrate --model $M --data $T/war-and-peace.txt $T/tiny-shakespeare.txt $T/code-llamacpp-mit.txt $T/wikitext-2-raw-test.txt \
    --num-seqs 24 --seq-len 1024 --heldout-seqs 8 --device cpu --method published --rotation hadamard --out /tmp/wx/wiki-had.oscar > /dev/null 2> /tmp/wx/calib-had.log
$O eval --model $M --bundle /tmp/wx/wiki-had.oscar --data $T/python-docs-heldout.txt $T/linux-docs-heldout.txt --modes bf16,oscar \
    --context 1024 --num-seqs 3 --greedy-prompts 0 --device cpu --oscar-clip 0.96,0.92 --out /tmp/wx/eval-had > /tmp/wx/eval-had.log 2>&1
echo done
