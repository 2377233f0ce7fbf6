#!/usr/bin/env python3
"""Instruction mix of one kernel from an Nsight Compute source-page CSV with SASS (scripts/device/decodesass.sh).

Usage: decode_sass_mix.py FILE.csv[.xz] [--hot FRACTION] [--lines N]

Prints the executed warp instructions and stall samples per opcode (the mnemonic before the first '.') over the
whole kernel and over its hot lines, those executed at least FRACTION (default 0.5) times as often as the most
executed line: in the fused INT2 decode kernel at a long context that is the tile loop. --lines N also lists the N
most executed hot lines with their SASS text, in address order, so a run of them reads as the loop body.
"""
import collections
import csv
import lzma
import sys


def read_rows(path):
    opener = lzma.open if path.endswith(".xz") else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.reader(f))
    # The first row names the kernel; the second is the header.
    start = next(i for i, r in enumerate(rows) if "Source" in r and "Instructions Executed" in r)
    header = rows[start]
    return rows[0], header, rows[start + 1:]


def opcode(sass):
    words = sass.strip().split()
    if not words:
        return "?"
    op = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
    return op.split(".")[0]


def number(text):
    try:
        return int(float(text.replace(",", "")))
    except ValueError:
        return 0


def mix(rows, i_src, i_exec, i_stall):
    executed, stalls = collections.Counter(), collections.Counter()
    for r in rows:
        op = opcode(r[i_src])
        executed[op] += number(r[i_exec])
        stalls[op] += number(r[i_stall])
    return executed, stalls


def print_mix(title, executed, stalls, top=32):
    total = sum(executed.values()) or 1
    total_stalls = sum(stalls.values()) or 1
    print(f"{title}: {total} warp instructions, {total_stalls} stall samples")
    print(f"  {'opcode':10s} {'executed':>12s} {'share':>6s} {'stalls':>7s}")
    for op, count in executed.most_common(top):
        print(f"  {op:10s} {count:12d} {100 * count / total:5.1f}% {100 * stalls[op] / total_stalls:6.1f}%")


def main(argv):
    if not argv:
        print(__doc__)
        return 2
    path = argv[0]
    hot_fraction = float(argv[argv.index("--hot") + 1]) if "--hot" in argv else 0.5
    list_lines = int(argv[argv.index("--lines") + 1]) if "--lines" in argv else 0
    kernel, header, rows = read_rows(path)
    i_src = header.index("Source")
    i_exec = header.index("Instructions Executed")
    i_stall = header.index("Warp Stall Sampling (All Samples)")
    print(" ".join(kernel).strip(", "))
    print_mix("whole kernel", *mix(rows, i_src, i_exec, i_stall))
    most = max(number(r[i_exec]) for r in rows)
    hot = [r for r in rows if number(r[i_exec]) >= hot_fraction * most]
    print(f"hot lines (executed >= {hot_fraction} x the most, {most}): {len(hot)} SASS lines")
    print_mix("hot lines", *mix(hot, i_src, i_exec, i_stall))
    if list_lines:
        chosen = sorted(hot, key=lambda r: -number(r[i_exec]))[:list_lines]
        chosen.sort(key=lambda r: int(r[0], 16) if r[0].startswith("0x") else 0)  # csv has unquoted the field
        for r in chosen:
            print(f"  {r[0]:>18s} {number(r[i_exec]):10d} {number(r[i_stall]):6d}  {r[i_src].strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
