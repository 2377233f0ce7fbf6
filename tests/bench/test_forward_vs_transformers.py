#!/usr/bin/env python3
"""bench/forward_vs_transformers.py's protocol, without a GPU: both timers are replaced by stubs that record the
order they ran in and return fixed numbers, so the test checks that rounds swap the order (OSCAR first in odd
rounds, transformers first with one round), that each side's result is the median over rounds, that every GEMM
(selection, kernel) pair gets its own row against the same transformers median, in forward_bench's order, and that
the JSON keeps every round and the transformers side's environment; and that
the parser reads forward_bench's result lines (copied from a real run) in order. Run by ctest (label unit); needs
only python3."""
import importlib.util
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("fvt", os.path.join(HERE, "..", "..", "bench", "forward_vs_transformers.py"))
fvt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fvt)


# forward_bench --gemm-selection heuristic,timed (--profile lines left out), Qwen3-8B 1 x 32768 on the H100
# (bench/results/2026-12-07c, call 2).
REAL_OUTPUT = """attention kernel auto = v7 here
batch 1 x seq 32768 (32768 tokens), logits last, 771.87 TFLOP per forward
attn auto: median 1294.86 ms (min 1290.80, max 1296.44) over 3 iters, 25306 tokens/s, 596.1 TFLOP/s, device memory in use 20.2 GiB
  GEMMs 627.57 ms (48.6%) at 725.3 TFLOP/s; attention 600.52 ms (46.5%) at 527.3 TFLOP/s; the rest 63.67 ms (4.9%)
timed GEMM selection: 5 shapes tuned, 5 kept another algorithm than the heuristic's first
attn auto (timed GEMMs): median 1270.13 ms (min 1269.53, max 1274.70) over 3 iters, 25799 tokens/s, 607.7 TFLOP/s, device memory in use 20.2 GiB
"""


def run(rounds, hf_ms, oscar_ms, selections="heuristic", kernels="auto", case="c.json:1x32768", iters_seen=None):
    """oscar_ms: per round, the medians of the (selection, kernel) pairs in order. iters_seen collects the iteration
    count each timer was called with."""
    order = []
    seen = iters_seen if iters_seen is not None else []
    hf, osc = iter(hf_ms), iter(oscar_ms)
    # time_transformers(config, batch, seq, warmup, iters); time_oscar(binary, config, batch, seq, warmup, iters, ...)
    fvt.time_transformers = lambda *a: (order.append("hf"), seen.append(("hf", a[4])), (next(hf), 18.0))[2]
    fvt.time_oscar = lambda *a: (order.append("oscar"), seen.append(("oscar", a[5])),
                                 ([(ms, 600.0, 20.0) for ms in next(osc)], "attn auto: median"))[2]
    fvt.transformers_environment = lambda: dict(torch="t", transformers="x", cuda="c", device="d",
                                                sdpa_enabled=dict(flash=True, cudnn=False))
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "t.json")
        sys.argv = ["fvt", "--forward-bench", "fb", "--case", case, "--rounds", str(rounds), "--json", out,
                    "--gemm-selection", selections, "--attn-kernel", kernels]
        fvt.main()
        with open(out) as f:
            report = json.load(f)
    assert report["environment"]["sdpa_enabled"] == dict(flash=True, cudnn=False), report["environment"]
    return order, report["rows"]


def main():
    order, rows = run(3, [1580.0, 1570.0, 1600.0], [[1280.0], [1310.0], [1290.0]])
    assert order == ["oscar", "hf", "hf", "oscar", "oscar", "hf"], order
    assert len(rows) == 1, rows
    row = rows[0]
    assert row["transformers_ms"] == 1580.0 and row["oscar_ms"] == 1290.0, row
    assert abs(row["speedup"] - 1580.0 / 1290.0) < 1e-12, row
    assert [r["oscar_ms"] for r in row["rounds"]] == [1280.0, 1310.0, 1290.0], row
    order, rows = run(1, [1579.8], [[1306.0]])
    assert order == ["hf", "oscar"], order
    assert rows[0]["oscar_ms"] == 1306.0 and len(rows[0]["rounds"]) == 1, rows
    # Two selections: one forward_bench process per round, a row per selection, each with its own median.
    order, rows = run(2, [1580.0, 1560.0], [[1290.0, 1270.0], [1300.0, 1250.0]], "heuristic,timed")
    assert order == ["oscar", "hf", "hf", "oscar"], order
    assert [r["gemm_selection"] for r in rows] == ["heuristic", "timed"], rows
    assert rows[0]["transformers_ms"] == rows[1]["transformers_ms"] == 1570.0, rows
    assert rows[0]["oscar_ms"] == 1295.0 and rows[1]["oscar_ms"] == 1260.0, rows
    assert [r["oscar_ms"] for r in rows[1]["rounds"]] == [1270.0, 1250.0], rows
    # Selections outer, kernels inner (forward_bench's loop order).
    order, rows = run(1, [1580.0], [[1290.0, 1280.0, 1270.0, 1260.0]], "heuristic,timed", "auto,v11")
    assert [(r["gemm_selection"], r["attn_kernel"], r["oscar_ms"]) for r in rows] == [
        ("heuristic", "auto", 1290.0), ("heuristic", "v11", 1280.0), ("timed", "auto", 1270.0),
        ("timed", "v11", 1260.0)], rows
    # A case's own iteration count reaches both timers and the row; without one, --iters (default 5).
    seen = []
    order, rows = run(2, [480.0, 490.0], [[380.0], [370.0]], case="c.json:8x2048:12", iters_seen=seen)
    assert seen == [("oscar", 12), ("hf", 12), ("hf", 12), ("oscar", 12)], seen
    assert rows[0]["iters"] == 12 and (rows[0]["batch"], rows[0]["seq"]) == (8, 2048), rows
    seen = []
    order, rows = run(1, [1580.0], [[1290.0]], case="dir:with:colons/c.json:1x32768", iters_seen=seen)
    assert seen == [("hf", 5), ("oscar", 5)] and rows[0]["config"] == "dir:with:colons/c.json", (seen, rows)
    for bad in ("c.json:8x2048:0", "c.json:8x2048:ten", "c.json:8by2048", "c.json:0x2048:3"):
        try:
            run(1, [1.0], [[1.0]], case=bad)
        except SystemExit as e:
            assert e.code == 2, (bad, e.code)
        else:
            raise AssertionError(f"--case {bad} was accepted")
    # The parser on real forward_bench output: both result lines, in order, with their memory.
    got = [(float(m.group(1)), float(m.group(2)), float(m.group(3))) for m in fvt.RESULT_LINE.finditer(REAL_OUTPUT)]
    assert got == [(1294.86, 596.1, 20.2), (1270.13, 607.7, 20.2)], got
    print("PASS")


if __name__ == "__main__":
    main()
