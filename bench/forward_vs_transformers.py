#!/usr/bin/env python3
"""Prefill throughput of OSCAR's GPU forward next to transformers bf16 (sdpa) on the same shape, in one run.

For each (config, batch, seq) it times transformers' forward of a random-weight model of that config.json shape
(bf16 weights on the GPU, attn_implementation="sdpa", logits of the last position only, CUDA-event timing of the
median of --iters forwards after --warmup), frees it, and runs OSCAR's `forward_bench` on the same shape, --rounds
times with the order swapped every round (OSCAR first in odd rounds), and prints the median over rounds of each
side with the speedup. The swap matters at the 700 W power cap: whichever side runs second starts on a hot GPU at a
lower clock (one round, transformers first, gave OSCAR 1306 ms at Qwen3-8B 1 x 32K, 1273-1285 ms alone). OSCAR's peak is the device memory in use after its forwards (cudaMemGetInfo: weights,
scratch, cuBLASLt workspace and the CUDA context), transformers' is torch's max_memory_allocated. Both sides build random weights: throughput does not depend on the values.
--gemm-selection heuristic,timed times OSCAR with each cuBLASLt algorithm selection (runtime/lt_gemm.h) and
--attn-kernel auto,v11 with each prefill attention kernel, all in the same forward_bench process; every
(selection, kernel) pair gets its own row, against the same transformers median. --json writes {"environment":
torch / transformers / CUDA versions, device, the SDPA backends torch had enabled; "rows": the table, every round}.

A case may end in :ITERS to time that case with its own number of forwards (both sides): a 0.4 s shape needs more
of them than a 1.3 s one for the same spread of its median (--iters 3 left the 8 x 2048 rows ±4 % apart).

  python3 bench/forward_vs_transformers.py --forward-bench build/bin/forward_bench \
      --case bench/configs/qwen3-8b.json:8x2048:10 --case bench/configs/qwen3-8b.json:1x32768
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


# forward_bench's result line per (kernel, selection): "attn KERNEL[ (timed GEMMs)]: median X ms ... Y TFLOP/s, ...
# memory in use Z GiB".
RESULT_LINE = re.compile(r"^attn \S+(?: \(timed GEMMs\))?: median ([0-9.]+) ms.*?([0-9.]+) TFLOP/s.*?"
                         r"memory in use ([0-9.]+) GiB", re.M)


def combos(selections, kernels):
    """forward_bench's order of its result lines: selections outer, kernels inner."""
    return [(sel, kernel) for sel in selections for kernel in kernels]


def transformers_environment():
    """What the transformers side ran on: versions, device, and which SDPA backends torch had enabled (it picks among
    them per call), for the report."""
    import torch
    import transformers

    return dict(torch=torch.__version__, transformers=transformers.__version__, cuda=torch.version.cuda,
                device=torch.cuda.get_device_name(0),
                sdpa_enabled=dict(flash=torch.backends.cuda.flash_sdp_enabled(),
                                  cudnn=torch.backends.cuda.cudnn_sdp_enabled(),
                                  mem_efficient=torch.backends.cuda.mem_efficient_sdp_enabled(),
                                  math=torch.backends.cuda.math_sdp_enabled()))


def time_oscar(binary, config_path, batch, seq, warmup, iters, kernels, selections):
    """One forward_bench process timing each (GEMM selection, attention kernel) in turn: [(median ms, TFLOP/s,
    peak GiB)] in combos() order, and the raw output."""
    out = subprocess.run([binary, "--config", config_path, "--batch", str(batch), "--seq", str(seq),
                          "--warmup", str(warmup), "--iters", str(iters), "--logits", "last",
                          "--attn-kernel", ",".join(kernels), "--gemm-selection", ",".join(selections)],
                         check=True, capture_output=True, text=True).stdout
    results = [(float(m.group(1)), float(m.group(2)), float(m.group(3))) for m in RESULT_LINE.finditer(out)]
    if len(results) != len(combos(selections, kernels)):
        raise RuntimeError(f"forward_bench printed {len(results)} result lines for selections {selections} x "
                           f"kernels {kernels}:\n{out}")
    return results, out


def parse_case(case, default_iters, ap):
    """CONFIG.json:BATCHxSEQ[:ITERS] -> (config path, (batch, seq), iters); ap.error on a malformed case."""
    parts = case.rsplit(":", 2)
    iters = default_iters
    if len(parts) == 3 and "x" not in parts[2].lower():
        config_path, shape, count = parts
        if not count.isdigit() or int(count) < 1:
            ap.error(f"--case {case}: ITERS must be a positive integer")
        iters = int(count)
    else:
        config_path, shape = case.rsplit(":", 1) if ":" in case else (case, "")
    try:
        batch, seq = (int(x) for x in shape.lower().split("x"))
    except ValueError:
        ap.error(f"--case {case}: expected CONFIG.json:BATCHxSEQ[:ITERS]")
    if batch < 1 or seq < 1:
        ap.error(f"--case {case}: batch and seq must be positive")
    return config_path, (batch, seq), iters


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--forward-bench", required=True, help="path of OSCAR's forward_bench binary")
    ap.add_argument("--case", action="append", required=True,
                    help="CONFIG.json:BATCHxSEQ[:ITERS] (ITERS overrides --iters for this case)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json", help="also write the table as JSON here")
    ap.add_argument("--attn-kernel", default="auto",
                    help="OSCAR prefill attention kernels, comma list (forward_bench --attn-kernel; a row each)")
    ap.add_argument("--gemm-selection", default="heuristic",
                    help="OSCAR's cuBLASLt algorithm selections, comma list of heuristic|timed (a row each)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="measurements of each side per case, the order swapped every round (1 = transformers first)")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    selections = args.gemm_selection.split(",")
    if not selections or any(sel not in ("heuristic", "timed") for sel in selections):
        ap.error("--gemm-selection: a comma list of heuristic, timed")
    kernels = args.attn_kernel.split(",")
    if any(not k for k in kernels):
        ap.error("--attn-kernel: a comma list of kernel names")
    pairs = combos(selections, kernels)

    rows = []
    for case in args.case:
        config_path, shape, iters = parse_case(case, args.iters, ap)
        batch, seq = shape
        t0 = time.time()
        hf_runs, oscar_runs = [], []
        for r in range(args.rounds):
            # Round 1 keeps the old order (transformers first) when there is one round; with more, odd rounds put
            # OSCAR first so that each side runs first as often as the other.
            oscar_first = args.rounds > 1 and r % 2 == 0
            for side in (("oscar", "hf") if oscar_first else ("hf", "oscar")):
                if side == "hf":
                    hf_runs.append(time_transformers(config_path, batch, seq, args.warmup, iters))
                else:
                    results, raw = time_oscar(args.forward_bench, config_path, batch, seq, args.warmup,
                                              iters, kernels, selections)
                    oscar_runs.append(results)
            print(f"{case} round {r + 1}/{args.rounds} ({'oscar' if oscar_first else 'transformers'} first): "
                  f"transformers {hf_runs[-1][0]:.1f} ms, oscar " +
                  ", ".join(f"{sel}/{k} {res[0]:.1f} ms" for (sel, k), res in zip(pairs, oscar_runs[-1])), file=sys.stderr)
        hf_ms = statistics.median(run[0] for run in hf_runs)
        hf_peak = max(run[1] for run in hf_runs)
        tokens = batch * seq
        for i, (selection, kernel) in enumerate(pairs):
            oscar_ms = statistics.median(run[i][0] for run in oscar_runs)
            row = dict(config=config_path, batch=batch, seq=seq, iters=iters, gemm_selection=selection,
                       attn_kernel=kernel, transformers_ms=hf_ms, oscar_ms=oscar_ms,
                       transformers_tok_s=tokens / hf_ms * 1e3, oscar_tok_s=tokens / oscar_ms * 1e3,
                       oscar_tflops=statistics.median(run[i][1] for run in oscar_runs), speedup=hf_ms / oscar_ms,
                       transformers_peak_gib=hf_peak, oscar_peak_gib=max(run[i][2] for run in oscar_runs),
                       seconds=time.time() - t0,
                       rounds=[dict(transformers_ms=h[0], oscar_ms=o[i][0]) for h, o in zip(hf_runs, oscar_runs)])
            rows.append(row)
        print(raw.strip(), file=sys.stderr)
        sys.stdout.flush()
    print(f"{'config':32s} {'shape':>9s} {'GEMMs':>9s} {'attn':>5s} | {'hf ms':>9s} {'hf tok/s':>10s} {'hf GiB':>7s} | "
          f"{'oscar ms':>9s} {'tok/s':>10s} {'TFLOP/s':>8s} {'GiB':>6s} | speedup")
    for r in rows:
        print(f"{r['config']:32s} {r['batch']:>4d}x{r['seq']:<5d} {r['gemm_selection']:>9s} {r['attn_kernel']:>5s}| "
              f"{r['transformers_ms']:9.1f} {r['transformers_tok_s']:10.0f} {r['transformers_peak_gib']:7.1f} | "
              f"{r['oscar_ms']:9.1f} {r['oscar_tok_s']:10.0f} {r['oscar_tflops']:8.1f} {r['oscar_peak_gib']:6.1f} | "
              f"{r['speedup']:.2f}x")
    env = transformers_environment()
    print(f"transformers side: torch {env['torch']}, transformers {env['transformers']}, CUDA {env['cuda']}, "
          f"{env['device']}; SDPA backends enabled: "
          + ", ".join(k for k, on in env["sdpa_enabled"].items() if on))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
