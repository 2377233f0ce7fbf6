#!/usr/bin/env python3
"""transformers bf16 (sdpa, CUDA) logits of tinystories-llama2c-280k-hf on the 256-token story that
FwdGpuModel.TinyStoriesLlamaWithinBf16NoiseFloor runs: the noise floor of a bf16 forward on this head_dim-8 model.

Writes OUT (a .safetensors file, ≈260 KB; not under tests/data/golden/, whose folders are checkpoints):
  input_ids    I64  [T]        BOS + story ids (from `oscar tokenize`, as the test encodes them)
  logits_bf16  BF16 [T, vocab] transformers bf16 weights + activations, attn_implementation="sdpa", on CUDA
and prints transformers bf16 vs transformers fp32 (same bf16-rounded weights) top-1 / mean |dlogit|.

  python3 scripts/golden/make_tinystories_bf16_golden.py --ids ids.json \
      --model ../shared/fixtures/models/tinystories-llama2c-280k-hf --out tests/data/golden-bf16/tinystories-llama2c-280k-hf.safetensors
  (ids.json: `oscar tokenize --model M --text "$(head -c 16384 ../shared/fixtures/text/tinystories-sample.txt)"`)
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ids", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=256)
    a = ap.parse_args()
    ids = json.load(open(a.ids))[: a.tokens]
    x = torch.tensor([ids], device="cuda")
    with torch.inference_mode():
        m16 = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
        l16 = m16(input_ids=x, use_cache=False).logits[0]
        m32 = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16).float().cuda().eval()
        m32.config._attn_implementation = "eager"
        l32 = m32(input_ids=x, use_cache=False).logits[0].float()
    d = (l16.float() - l32).abs()
    top1 = (l16.float().argmax(-1) == l32.argmax(-1)).float().mean().item()
    print(f"{len(ids)} tokens: transformers bf16 (sdpa) vs fp32 (bf16 weights): top-1 {top1:.4f}, "
          f"mean |dlogit| {d.mean().item():.5f}, max {d.max().item():.4f}")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    save_file({"input_ids": torch.tensor(ids, dtype=torch.int64), "logits_bf16": l16.to(torch.bfloat16).cpu().contiguous()},
              a.out,
              metadata={"made_by": "scripts/golden/make_tinystories_bf16_golden.py", "torch": torch.__version__,
                        "device": torch.cuda.get_device_name(), "top1_vs_fp32": f"{top1:.4f}",
                        "mean_abs_vs_fp32": f"{d.mean().item():.5f}"})


if __name__ == "__main__":
    main()
