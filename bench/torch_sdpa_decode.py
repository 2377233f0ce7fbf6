#!/usr/bin/env python3
"""torch scaled_dot_product_attention decode baseline, same shapes as bench/decode_attention_bench.cu.

One query token per sequence, bf16 K/V cache [batch, kv_heads, context, 128], GQA through enable_gqa (the K/V
of a group are read once, as in our kernels), the flash backend by default. CUDA-event timing over --iters calls
after warm-up, captured into one CUDA graph as the C++ bench does (--eager: plain calls, which at small sizes
times Python's launch rate); bytes = K + V + q + out, GB/s against the cudaMemcpy-style D2D bandwidth measured in-process
(read + write of a 1 GiB copy, as the C++ bench does). Prints one table row per shape, same columns as the C++
bench's bf16 part, so "OSCAR INT2 vs torch" is int2_us there / torch_us here.

  python3 bench/torch_sdpa_decode.py [--iters 20] [--max-context 131072] [--backend flash|efficient|cudnn|math]
                                     [--eager]
"""
import argparse
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
MODELS = [("qwen3-8b", 32, 8), ("llama3-70b", 64, 8)]


def d2d_gbps() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 10
    e0.record()
    for _ in range(reps):
        b.copy_(a)
    e1.record()
    e1.synchronize()
    ms = e0.elapsed_time(e1)
    return 2.0 * a.numel() * reps / (ms * 1e-3) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--max-context", type=int, default=131072)
    ap.add_argument("--backend", choices=sorted(BACKENDS), default="flash")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--eager", action="store_true", help="time plain calls instead of a CUDA graph of them")
    ap.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    ap.add_argument("--contexts", default="",
                    help="comma-separated contexts (default: 4096, 8192, ... up to --max-context)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    dev = torch.cuda.get_device_properties(0)
    bw = d2d_gbps()
    print(f"device {dev.name}, {dev.multi_processor_count} SMs, torch {torch.__version__}, backend {args.backend}, "
          f"D2D copy {bw:.0f} GB/s, timing {'eager calls' if args.eager else 'CUDA graph of the calls'}")
    print(f"{'model':<12} {'batch':>5} {'context':>7} | {'torch_us':>9} {'MB':>9} {'GB/s':>8} {'%d2d':>6}")
    d = args.head_dim
    try:
        batches = [int(b) for b in args.batches.split(",")]
        contexts = [int(c) for c in args.contexts.split(",")] if args.contexts else []
    except ValueError:
        print(f"--batches / --contexts take comma-separated integers, got {args.batches!r} / {args.contexts!r}",
              file=sys.stderr)
        return 2
    if not contexts:
        ctx = 4096
        while ctx <= args.max_context:
            contexts.append(ctx)
            ctx *= 2
    if any(v <= 0 for v in batches + contexts):
        print("--batches / --contexts take positive values", file=sys.stderr)
        return 2
    for name, hq, hkv in MODELS:
        for batch in batches:
            for ctx in contexts:
                kv_bytes = 2 * batch * hkv * ctx * d * 2
                free, _ = torch.cuda.mem_get_info()
                if kv_bytes + (1 << 30) > free:
                    print(f"{name:<12} {batch:>5} {ctx:>7}  (skipped: needs {kv_bytes / 2**30:.1f} GiB)")
                    continue
                q = torch.randn(batch, hq, 1, d, device="cuda", dtype=torch.bfloat16)
                k = torch.randn(batch, hkv, ctx, d, device="cuda", dtype=torch.bfloat16)
                v = torch.randn(batch, hkv, ctx, d, device="cuda", dtype=torch.bfloat16)

                def call():
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

                try:
                    with sdpa_kernel(BACKENDS[args.backend]):
                        for _ in range(3):
                            call()
                        torch.cuda.synchronize()
                        graph = None
                        if not args.eager:
                            graph = torch.cuda.CUDAGraph()
                            with torch.cuda.graph(graph):
                                for _ in range(args.iters):
                                    call()
                            graph.replay()
                            torch.cuda.synchronize()
                        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        e0.record()
                        if graph is not None:
                            graph.replay()
                        else:
                            for _ in range(args.iters):
                                call()
                        e1.record()
                        e1.synchronize()
                        del graph
                except RuntimeError as err:  # backend cannot run this shape
                    print(f"{name:<12} {batch:>5} {ctx:>7}  (backend {args.backend} failed: {str(err).splitlines()[0]})")
                    del q, k, v
                    continue
                us = 1e3 * e0.elapsed_time(e1) / args.iters
                moved = kv_bytes + 2 * batch * hq * d * 2
                gbps = moved / (us * 1e-6) / 1e9
                print(f"{name:<12} {batch:>5} {ctx:>7} | {us:>9.1f} {moved / 1e6:>9.2f} {gbps:>8.0f} {100 * gbps / bw:>5.0f}%",
                      flush=True)
                del q, k, v
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
