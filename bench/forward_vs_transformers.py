#!/usr/bin/env python3
"""Prefill throughput of OSCAR's GPU forward next to transformers bf16 (sdpa) on the same shape, in one run.

For each (config, batch, seq) it times transformers' forward of a random-weight model of that config.json shape
(bf16 weights on the GPU, attn_implementation="sdpa", logits of the last position only, CUDA-event timing of the
median of --iters forwards after --warmup), frees it, and runs OSCAR's `forward_bench` on the same shape, --rounds
times with the order swapped every round (OSCAR first in odd rounds), and prints the median over rounds of each
side with the speedup. The swap matters at the 700 W power cap: whichever side runs second starts on a hot GPU at a
lower clock (one round, transformers first, gave OSCAR 1306 ms at Qwen3-8B 1 x 32K, 1273-1285 ms alone). OSCAR's peak is the device memory in use after its forwards (cudaMemGetInfo: weights,
scratch, cuBLASLt workspace and the CUDA context), transformers' is torch's max_memory_allocated. Both sides build random weights: throughput does not depend on the values.

  python3 bench/forward_vs_transformers.py --forward-bench build/bin/forward_bench \
      --case bench/configs/qwen3-8b.json:8x2048 --case bench/configs/qwen3-8b.json:1x32768
"""
import argparse
import gc
import json
import statistics
import re
import subprocess
import sys
import time


def time_transformers(config_path, batch, seq, warmup, iters):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(config_path)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")
    times = []
    with torch.inference_mode():
        for i in range(warmup + iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            end.record()
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end))
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    times.sort()
    return times[len(times) // 2], peak


def time_oscar(binary, config_path, batch, seq, warmup, iters, attn_kernel):
    out = subprocess.run([binary, "--config", config_path, "--batch", str(batch), "--seq", str(seq),
                          "--warmup", str(warmup), "--iters", str(iters), "--logits", "last",
                          "--attn-kernel", attn_kernel],
                         check=True, capture_output=True, text=True).stdout
    median = float(re.search(r"median ([0-9.]+) ms", out).group(1))
    tflops = re.search(r"([0-9.]+) TFLOP/s", out)
    peak = re.search(r"memory in use ([0-9.]+) GiB", out)
    return median, float(tflops.group(1)) if tflops else float("nan"), float(peak.group(1)) if peak else float("nan"), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--forward-bench", required=True, help="path of OSCAR's forward_bench binary")
    ap.add_argument("--case", action="append", required=True, help="CONFIG.json:BATCHxSEQ")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json", help="also write the table as JSON here")
    ap.add_argument("--attn-kernel", default="auto", help="OSCAR prefill attention kernel (forward_bench --attn-kernel)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="measurements of each side per case, the order swapped every round (1 = transformers first)")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")

    rows = []
    for case in args.case:
        config_path, shape = case.rsplit(":", 1)
        batch, seq = (int(x) for x in shape.lower().split("x"))
        t0 = time.time()
        hf_runs, oscar_runs = [], []
        for r in range(args.rounds):
            # Round 1 keeps the old order (transformers first) when there is one round; with more, odd rounds put
            # OSCAR first so that each side runs first as often as the other.
            oscar_first = args.rounds > 1 and r % 2 == 0
            for side in (("oscar", "hf") if oscar_first else ("hf", "oscar")):
                if side == "hf":
                    hf_runs.append(time_transformers(config_path, batch, seq, args.warmup, args.iters))
                else:
                    oscar_runs.append(time_oscar(args.forward_bench, config_path, batch, seq, args.warmup,
                                                 args.iters, args.attn_kernel))
            print(f"{case} round {r + 1}/{args.rounds} ({'oscar' if oscar_first else 'transformers'} first): "
                  f"transformers {hf_runs[-1][0]:.1f} ms, oscar {oscar_runs[-1][0]:.1f} ms", file=sys.stderr)
        hf_ms = statistics.median(run[0] for run in hf_runs)
        hf_peak = max(run[1] for run in hf_runs)
        oscar_ms = statistics.median(run[0] for run in oscar_runs)
        oscar_tflops = statistics.median(run[1] for run in oscar_runs)
        oscar_peak = max(run[2] for run in oscar_runs)
        raw = oscar_runs[-1][3]
        tokens = batch * seq
        row = dict(config=config_path, batch=batch, seq=seq, transformers_ms=hf_ms, oscar_ms=oscar_ms,
                   transformers_tok_s=tokens / hf_ms * 1e3, oscar_tok_s=tokens / oscar_ms * 1e3,
                   oscar_tflops=oscar_tflops, speedup=hf_ms / oscar_ms, transformers_peak_gib=hf_peak,
                   oscar_peak_gib=oscar_peak, seconds=time.time() - t0,
                   rounds=[dict(transformers_ms=h[0], oscar_ms=o[0]) for h, o in zip(hf_runs, oscar_runs)])
        rows.append(row)
        print(raw.strip(), file=sys.stderr)
        sys.stdout.flush()
    print(f"{'config':32s} {'shape':>9s} | {'hf ms':>9s} {'hf tok/s':>10s} {'hf GiB':>7s} | "
          f"{'oscar ms':>9s} {'tok/s':>10s} {'TFLOP/s':>8s} {'GiB':>6s} | speedup")
    for r in rows:
        print(f"{r['config']:32s} {r['batch']:>4d}x{r['seq']:<5d}| {r['transformers_ms']:9.1f} "
              f"{r['transformers_tok_s']:10.0f} {r['transformers_peak_gib']:7.1f} | {r['oscar_ms']:9.1f} "
              f"{r['oscar_tok_s']:10.0f} {r['oscar_tflops']:8.1f} {r['oscar_peak_gib']:6.1f} | {r['speedup']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
