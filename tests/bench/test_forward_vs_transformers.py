#!/usr/bin/env python3
"""bench/forward_vs_transformers.py's protocol, without a GPU: both timers are replaced by stubs that record the
order they ran in and return fixed numbers, so the test checks that rounds swap the order (OSCAR first in odd
rounds, transformers first with one round), that each side's result is the median over rounds, and that the JSON
keeps every round. Run by ctest (label unit); needs only python3."""
import importlib.util
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("fvt", os.path.join(HERE, "..", "..", "bench", "forward_vs_transformers.py"))
fvt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fvt)


def run(rounds, hf_ms, oscar_ms):
    order = []
    hf, osc = iter(hf_ms), iter(oscar_ms)
    fvt.time_transformers = lambda *a: (order.append("hf"), (next(hf), 18.0))[1]
    fvt.time_oscar = lambda *a: (order.append("oscar"), (next(osc), 600.0, 20.0, "attn auto: median"))[1]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "t.json")
        sys.argv = ["fvt", "--forward-bench", "fb", "--case", "c.json:1x32768", "--rounds", str(rounds), "--json", out]
        fvt.main()
        with open(out) as f:
            return order, json.load(f)[0]


def main():
    order, row = run(3, [1580.0, 1570.0, 1600.0], [1280.0, 1310.0, 1290.0])
    assert order == ["oscar", "hf", "hf", "oscar", "oscar", "hf"], order
    assert row["transformers_ms"] == 1580.0 and row["oscar_ms"] == 1290.0, row
    assert abs(row["speedup"] - 1580.0 / 1290.0) < 1e-12, row
    assert [r["oscar_ms"] for r in row["rounds"]] == [1280.0, 1310.0, 1290.0], row
    order, row = run(1, [1579.8], [1306.0])
    assert order == ["hf", "oscar"], order
    assert row["oscar_ms"] == 1306.0 and len(row["rounds"]) == 1, row
    print("PASS")


if __name__ == "__main__":
    main()
