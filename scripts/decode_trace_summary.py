#!/usr/bin/env python3
"""Summarize decode_attention_bench --trace output (DecodeAttentionParams::phase_trace).

Each input line: model batch context block t_entry_ns t_exit_ns q_setup warp0_tiles block_tiles window ticket merge
smid merged (clock64 offsets in cycles from the block's entry; merge is 0 in blocks that did not merge). Accepts
plain or .xz files. Prints, per (model, batch, context): the call's span, block end times, the median cycles of
each phase, and per-SM block counts with their end times (how docs/results.md "Decode: where the per-call floor
went" was made from bench/results/2026-12-06c/h100_trace_round*.txt.xz).
"""
import collections
import lzma
import statistics as st
import sys


def rows_of(path):
    opener = lzma.open if path.endswith(".xz") else open
    with opener(path, "rt") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 14:
                yield (parts[0], int(parts[1]), int(parts[2])), [int(x) for x in parts[4:]]


def main(paths):
    shapes = collections.defaultdict(list)
    for path in paths:
        for key, words in rows_of(path):
            shapes[key].append(words)
    for key, blocks in shapes.items():
        t0 = min(b[0] for b in blocks)
        t1 = max(b[1] for b in blocks)
        ends = [(b[1] - t0) / 1000 for b in blocks]
        merged = [b for b in blocks if b[9]]

        def med(i, j):
            return st.median(b[j] - (b[i] if i >= 2 else 0) for b in blocks)

        print(f"{key[0]} batch {key[1]} context {key[2]}: {len(blocks)} blocks, span {(t1 - t0) / 1000:.1f} us, "
              f"block ends min/median/max {min(ends):.1f}/{st.median(ends):.1f}/{max(ends):.1f} us")
        print(f"  median cycles: query setup {med(0, 2):.0f}, warp-0 tiles {med(2, 3):.0f}, block tiles (barrier) "
              f"{med(3, 4):.0f}, window {med(4, 5):.0f}, ticket {med(5, 6):.0f}"
              + (f", merge {st.median(b[7] - b[6] for b in merged):.0f} (max {max(b[7] - b[6] for b in merged)})"
                 if merged else ""))
        per_sm = collections.defaultdict(list)
        for b in blocks:
            per_sm[b[8]].append(b)
        by_count = collections.defaultdict(list)
        for sm_blocks in per_sm.values():
            by_count[len(sm_blocks)].append(max(b[1] - t0 for b in sm_blocks) / 1000)
        for count, sm_ends in sorted(by_count.items()):
            print(f"  {len(sm_ends)} SMs with {count} blocks end at min/median/max "
                  f"{min(sm_ends):.0f}/{st.median(sm_ends):.0f}/{max(sm_ends):.0f} us")
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__)
        sys.exit(2)
    sys.exit(main(sys.argv[1:]))
