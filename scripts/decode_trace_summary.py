#!/usr/bin/env python3
"""Summarize decode_attention_bench --trace output (DecodeAttentionParams::phase_trace).

Each input line: model batch context block t_entry_ns t_exit_ns q_setup warp0_tiles block_tiles window ticket merge
smid merged (clock64 offsets in cycles from the block's entry; merge is 0 in blocks that did not merge). Accepts
plain or .xz files. Prints, per (model, batch, context): the call's span, block end times, the median cycles of
each phase, and per-SM block counts with their end times (how docs/results.md "Decode: where the per-call floor
went" was made from bench/results/2026-12-06c/h100_trace_round*.txt.xz).

Then the SMs' speed for the same work: among the SMs holding the most common block count, each SM's mean tile
cycles per block (warp 0's tile phase; every block of a launch has the same tiles), the runs of consecutive SM ids
that are more than 5 % faster than the median, and what the tile phase would take if every SM got work in
proportion to its speed (the harmonic mean over those SMs) against the slowest SM. How the
per-SM-group note of the nineteenth session (docs/results.md, "SM groups") was made from
bench/results/2026-12-07e/call3/decodetrace.txt.xz.
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
        print_sm_speed(per_sm)
    return 0


def fast_runs(ids):
    """Consecutive integers of a sorted list as 'a-b' runs."""
    runs, start, prev = [], None, None
    for i in ids:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            runs.append((start, prev))
            start = prev = i
    if start is not None:
        runs.append((start, prev))
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs)


def print_sm_speed(per_sm):
    counts = collections.Counter(len(v) for v in per_sm.values())
    modal = counts.most_common(1)[0][0]
    # Warp 0's tile phase per block: the offset at the end of the tiles minus the one at the end of the setup.
    tiles = {sm: st.mean(b[3] - b[2] for b in v) for sm, v in per_sm.items() if len(v) == modal}
    med = st.median(tiles.values())
    fast = sorted(sm for sm, t in tiles.items() if t < 0.95 * med)
    print(f"  tile cycles per block on SMs with {modal} blocks: min/median/max {min(tiles.values()):.0f}/{med:.0f}/"
          f"{max(tiles.values()):.0f}; {len(fast)} SMs > 5 % faster than the median: {fast_runs(fast) or 'none'}")
    # Harmonic mean: the per-block time if the modal SMs' work were dealt in proportion to their speed.
    balanced = len(tiles) / sum(1 / t for t in tiles.values())
    slowest = max(tiles.values())
    print(f"  with that work dealt in proportion to SM speed: ~{balanced:.0f} cycles, against the slowest SM's "
          f"{slowest:.0f} ({slowest / balanced:.2f}x)")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__)
        sys.exit(2)
    sys.exit(main(sys.argv[1:]))
