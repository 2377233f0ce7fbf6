#!/usr/bin/env python3
"""Reading an OSCAR bundle without OSCAR's code, and the INT2 KV-cache write/read path in numpy.

This is the example of docs/serving.md ("Python: the write and read path"); scripts/device/pubci.sh runs it against
the C++ reference quantizer's records (`oscar export --format safetensors --golden-kv DUMP`).

    python3 scripts/serving_example.py --bundle model.oscar  --golden DIR/int2_golden.safetensors
    python3 scripts/serving_example.py --export DIR          --golden DIR/int2_golden.safetensors

--bundle reads the .oscar file with h5py (docs/format.md); --export reads `oscar export --format safetensors`
output instead (oscar_rotations.safetensors + manifest.json), for readers without h5py. Needs numpy; torch is
only used, when installed, to show the decoded cache as a torch tensor.

Record of one head vector x (head_dim d) for a layer with rotation R, clip ratio c and segments (b, e, bits):
  y = x . R (fp32, fma in increasing i); clip |y| at sorted(|y|)[min(floor(c*d), d-1)] when c < 1;
  per segment: scale = f16((max - min) / (2^bits - 1)), zero = f16(min),
               code = clamp(rint((y - zero) / scale), 0, 2^bits - 1)  (all codes 0 when scale == 0);
  record = the segments' codes as LSB-first bitstreams (each starting on a byte), then (scale, zero) fp16 LE pairs;
  decode: y' = fma(code, scale, zero), x' = y' . R^T.
A tensor with error-feedback tables (bundle format 1.2: layers/L/{k,v}_ef_order, _ef_weights, root @ef_clip_feedback)
keeps that record format and scale/zero; only the codes are chosen differently (write_records_ef, docs/format.md).
A tensor with a storage transform (bundle format 2.0: layers/L/{k,v}_transform, _transform_inverse, k_mean; the
`oscar calibrate` default) uses, per KV head h, x - mean_h (fp32) in place of x and A_h in place of R on the write
side, and x' = y' . A_h^-1 + mean_h on the read side (docs/format.md, "Storage transforms").
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import struct
import sys

import numpy as np

F32, F64 = np.float32, np.float64


# ---------------------------------------------------------------------------------------------- loading


def load_bundle(path: str) -> dict:
    """Per-layer rotations, clip ratios and segment layouts of a .oscar bundle, read with h5py."""
    import h5py

    with h5py.File(path, "r") as f:
        major = int(f.attrs["format_major"])
        if major not in (1, 2):
            raise SystemExit(f"{path}: bundle format {major}.x, this example reads 1.x and 2.x")

        def dataset(name: str) -> np.ndarray:
            # Every dataset carries the sha256 of its little-endian row-major bytes (docs/format.md).
            d = f[name]
            data = d[()]
            stored = d.attrs["sha256"]
            stored = stored.decode() if isinstance(stored, bytes) else str(stored)
            if hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest() != stored:
                raise SystemExit(f"{path}:{name}: checksum mismatch")
            return data

        def text(attr) -> str:
            return attr.decode() if isinstance(attr, bytes) else str(attr)

        quant = f["quant"]
        spec = {"head_dim": int(quant.attrs["head_dim"]), "sink": int(quant.attrs["sink_tokens"]),
                "recent": int(quant.attrs["recent_tokens"])}
        for kind in ("k", "v"):
            spec[kind] = {"storage": text(quant[kind].attrs["storage"]),
                          "segments": dataset(f"quant/{kind}/segments").astype(np.int64).tolist()}
        groups = int(f["layers"].attrs["rotation_groups"])
        layers = []
        for name in sorted(f["layers"].keys()):
            g = f"layers/{name}"
            clips = dataset(f"{g}/clip_ratios")
            layer = {"k_rotation": dataset(f"{g}/k_rotation").astype(F32),
                     "v_rotation": dataset(f"{g}/v_rotation").astype(F32),
                     "k_clip": F32(clips[0]), "v_clip": F32(clips[1])}
            for kind in ("k", "v"):  # format 1.1: a layer's own layout overrides /quant/{k,v}/segments
                own = f"{g}/{kind}_segments"
                layer[f"{kind}_segments"] = (dataset(own).astype(np.int64).tolist() if own in f
                                             else spec[kind]["segments"])
                # format 1.2: error-feedback tables, [kv_heads, d] order and [kv_heads, d, d] weights
                if f"{g}/{kind}_ef_order" in f:
                    layer[f"{kind}_ef"] = (dataset(f"{g}/{kind}_ef_order").astype(np.int64),
                                           dataset(f"{g}/{kind}_ef_weights").astype(F32))
                # format 2.0: storage transforms, [kv_heads, d, d] A and A^-1, keys' mean [kv_heads, d]
                if f"{g}/{kind}_transform" in f:
                    a = dataset(f"{g}/{kind}_transform").astype(F32)
                    mean = (dataset(f"{g}/k_mean").astype(F32) if kind == "k"
                            else np.zeros(a.shape[:2], dtype=F32))
                    layer[f"{kind}_transform"] = (a, dataset(f"{g}/{kind}_transform_inverse").astype(F32), mean)
            layers.append(layer)
        clip_feedback = bool(int(f.attrs["ef_clip_feedback"])) if "ef_clip_feedback" in f.attrs else True
    return {"spec": spec, "groups": groups, "layers": layers, "ef_clip_feedback": clip_feedback}


def read_safetensors(path: str) -> dict:
    """name -> numpy array; the format is 8 bytes LE header length, a JSON header, then the data."""
    dtypes = {"F32": "<f4", "F64": "<f8", "F16": "<f2", "U8": "u1", "I32": "<i4", "I64": "<i8"}
    with open(path, "rb") as fh:
        raw = fh.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        b, e = t["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + b:8 + n + e], dtype=dtypes[t["dtype"]]).reshape(t["shape"])
    return out


def load_export(directory: str) -> dict:
    """The same as load_bundle, from `oscar export --format safetensors` output (no h5py needed)."""
    with open(os.path.join(directory, "manifest.json"), encoding="utf-8") as fh:
        manifest = json.load(fh)
    path = os.path.join(directory, "oscar_rotations.safetensors")
    with open(path, "rb") as fh:
        if hashlib.sha256(fh.read()).hexdigest() != manifest["files"]["oscar_rotations.safetensors"]["sha256"]:
            raise SystemExit(f"{path}: sha256 does not match manifest.json")
    t = read_safetensors(path)
    q = manifest["quant"]
    spec = {"head_dim": q["head_dim"], "sink": q["sink_tokens"], "recent": q["recent_tokens"]}
    for kind in ("k", "v"):
        spec[kind] = {"storage": q[kind]["storage"],
                      "segments": [[s["begin"], s["end"], s["bits"]] for s in q[kind]["segments"]]}
    layers = []
    for l in range(manifest["num_layers"]):
        layer = {"k_rotation": t[f"layers.{l}.k_rotation"].astype(F32), "v_rotation": t[f"layers.{l}.v_rotation"].astype(F32),
                 "k_clip": F32(t["k_clip_ratio"][l]), "v_clip": F32(t["v_clip_ratio"][l])}
        for kind in ("k", "v"):
            own = t.get(f"layers.{l}.{kind}_segments")
            layer[f"{kind}_segments"] = own.astype(np.int64).tolist() if own is not None else spec[kind]["segments"]
            if f"layers.{l}.{kind}_ef_order" in t:
                layer[f"{kind}_ef"] = (t[f"layers.{l}.{kind}_ef_order"].astype(np.int64),
                                       t[f"layers.{l}.{kind}_ef_weights"].astype(F32))
            if f"layers.{l}.{kind}_transform" in t:
                a = t[f"layers.{l}.{kind}_transform"].astype(F32)
                mean = t[f"layers.{l}.k_mean"].astype(F32) if kind == "k" else np.zeros(a.shape[:2], dtype=F32)
                layer[f"{kind}_transform"] = (a, t[f"layers.{l}.{kind}_transform_inverse"].astype(F32), mean)
        layers.append(layer)
    clip_feedback = bool(t["ef_clip_feedback"][0]) if "ef_clip_feedback" in t else True
    return {"spec": spec, "groups": manifest["rotation_groups"], "layers": layers, "ef_clip_feedback": clip_feedback}


# ---------------------------------------------------------------------------------------------- write / read


def rotate(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    """y = x . R for rows x, accumulated like the C++/CUDA code: fp32 fma over i in increasing order (a product
    of two fp32 is exact in fp64, so fp64 multiply-add then one rounding to fp32 is the fma)."""
    acc = np.zeros(x.shape, dtype=F32)
    for i in range(x.shape[1]):
        acc = (x[:, i:i + 1].astype(F64) * r[i].astype(F64)[None, :] + acc.astype(F64)).astype(F32)
    return acc


def unrotate(y: np.ndarray, r: np.ndarray) -> np.ndarray:
    """x = y . R^T, same accumulation order."""
    acc = np.zeros(y.shape, dtype=F32)
    for i in range(y.shape[1]):
        acc = (y[:, i:i + 1].astype(F64) * r[:, i].astype(F64)[None, :] + acc.astype(F64)).astype(F32)
    return acc


def clip(y: np.ndarray, ratio: np.float32) -> np.ndarray:
    if ratio >= 1:
        return y
    d = y.shape[1]
    k = min(max(math.floor(float(ratio) * d), 0), d - 1)  # the published kernels' _clip_index
    c = np.sort(np.abs(y), axis=1)[:, k:k + 1]
    return np.minimum(np.maximum(y, -c), c)


def record_bytes(segments) -> int:
    return sum((e - b) * bits // 8 + ((e - b) * bits % 8 > 0) for b, e, bits in segments) + \
        4 * sum(bits > 0 for _, _, bits in segments)


def write_records(x: np.ndarray, r: np.ndarray, clip_ratio: np.float32, segments) -> np.ndarray:
    """Head vectors [N, d] (fp32, original basis) -> INT records [N, record_bytes] (uint8)."""
    y = clip(rotate(x.astype(F32), r), clip_ratio)
    codes_out, params_out = [], []
    for b, e, bits in segments:
        seg = y[:, b:e]
        if bits == 0:  # dims the layout drops: no codes, no parameters
            continue
        levels = F32((1 << bits) - 1)
        lo, hi = seg.min(axis=1), seg.max(axis=1)
        scale16 = ((hi - lo) / levels).astype(np.float16)  # fp32 math, then fp16 round-to-nearest-even
        zero16 = lo.astype(np.float16)
        scale, zero = scale16.astype(F32)[:, None], zero16.astype(F32)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.rint((seg - zero) / scale)  # rint: round half to even, like std::rint / __float2int_rn
        codes = np.where(scale == 0, 0, np.clip(q, 0, levels)).astype(np.uint8)
        # LSB-first bitstream: code j at bit offset j*bits of this segment's bytes.
        bitplane = (codes[:, :, None] >> np.arange(bits, dtype=np.uint8)) & 1
        codes_out.append(np.packbits(bitplane.reshape(len(x), -1), axis=1, bitorder="little"))
        params_out.append(np.stack([scale16, zero16], axis=1).astype("<f2").view(np.uint8))
    return np.concatenate(codes_out + params_out, axis=1)


def write_records_ef(x: np.ndarray, r: np.ndarray, clip_ratio: np.float32, order: np.ndarray,
                     weights: np.ndarray, clip_feedback: bool) -> np.ndarray:
    """Whole-head INT2 records [N, d/4 + 4] with error-feedback rounding (bundle format 1.2, docs/format.md): the
    record format, scale and zero of write_records; the codes are chosen one coordinate at a time in `order`, and
    each one's rounding error is pushed onto the coordinates not yet rounded with the stored weights (fp32, fma)."""
    y = rotate(x.astype(F32), r)
    yc = clip(y, clip_ratio)
    lo, hi = yc.min(axis=1), yc.max(axis=1)
    scale16 = ((hi - lo) / F32(3)).astype(np.float16)  # the RTN parameters of the clipped vector
    zero16 = lo.astype(np.float16)
    scale, zero = scale16.astype(F32), zero16.astype(F32)
    w = (y if clip_feedback else yc).copy()  # the running target: clip feedback starts from the unclipped vector
    codes = np.zeros(y.shape, dtype=np.uint8)
    d = y.shape[1]
    for k in range(d):
        i = order[k]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.rint((w[:, i] - zero) / scale)
        code = np.where(scale == 0, 0, np.clip(q, 0, 3)).astype(np.uint8)
        codes[:, i] = code
        e = w[:, i] - (code.astype(F64) * scale.astype(F64) + zero.astype(F64)).astype(F32)  # w - fma(code, s, z)
        rest = order[k + 1:]
        w[:, rest] = ((-e).astype(F64)[:, None] * weights[k, k + 1:].astype(F64)[None, :]
                      + w[:, rest].astype(F64)).astype(F32)  # fma(-e, weight, w), in ascending m
    bitplane = (codes[:, :, None] >> np.arange(2, dtype=np.uint8)) & 1
    packed = np.packbits(bitplane.reshape(len(x), -1), axis=1, bitorder="little")
    return np.concatenate([packed, np.stack([scale16, zero16], axis=1).astype("<f2").view(np.uint8)], axis=1)


def read_records(rec: np.ndarray, r: np.ndarray, segments, head_dim: int, rotated: bool = False) -> np.ndarray:
    """INT records -> fp32 head vectors, in the original basis (or the rotated one)."""
    n = len(rec)
    y = np.zeros((n, head_dim), dtype=F32)
    code_offset = 0
    params = rec[:, sum((e - b) * bits // 8 + ((e - b) * bits % 8 > 0) for b, e, bits in segments):]
    params = params.copy().view("<f2").astype(F32)  # [N, 2 * pairs]: scale, zero per segment with bits > 0
    pair = 0
    for b, e, bits in segments:
        if bits == 0:
            continue
        nbytes = ((e - b) * bits + 7) // 8
        plane = np.unpackbits(rec[:, code_offset:code_offset + nbytes], axis=1, bitorder="little")
        plane = plane[:, :(e - b) * bits].reshape(n, e - b, bits)
        codes = (plane << np.arange(bits, dtype=np.uint8)).sum(axis=2)
        scale, zero = params[:, 2 * pair:2 * pair + 1], params[:, 2 * pair + 1:2 * pair + 2]
        y[:, b:e] = (codes.astype(F64) * scale.astype(F64) + zero.astype(F64)).astype(F32)  # fma(code, scale, zero)
        code_offset += nbytes
        pair += 1
    return y if rotated else unrotate(y, r)


def is_high_precision_token(t: int, seq_len: int, sink: int, recent: int) -> bool:
    """The cache policy around the records: the first `sink` and the last `recent` tokens stay bf16."""
    return t < sink or t >= seq_len - recent


# ---------------------------------------------------------------------------------------------- check


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", help=".oscar bundle (read with h5py)")
    src.add_argument("--export", help="directory of `oscar export --format safetensors`")
    ap.add_argument("--golden", required=True,
                    help="int2_golden.safetensors from `oscar export --format safetensors --golden-kv DUMP`")
    ap.add_argument("--max-code-mismatch", type=float, default=1e-4,
                    help="largest tolerated fraction of codes that differ from the C++ records")
    args = ap.parse_args()

    bundle = load_bundle(args.bundle) if args.bundle else load_export(args.export)
    golden = read_safetensors(args.golden)
    d = bundle["spec"]["head_dim"]
    total_codes = code_mismatch = param_mismatch = 0
    worst_write = worst_read = worst_read_rel = 0.0
    ok = True
    for l, layer in enumerate(bundle["layers"]):
        for kind in ("k", "v"):
            if bundle["spec"][kind]["storage"] != "int":
                print(f"layer {l} {kind}: storage {bundle['spec'][kind]['storage']} is not INT; skipped")
                continue
            name = f"layers.{l}.{kind}"
            x, ref_rec = golden[f"{name}.x"], golden[f"{name}.record"]
            ref_deq = golden[f"{name}.dequant"]
            segs = layer[f"{kind}_segments"]
            heads, tokens = x.shape[0], x.shape[1]
            recs, deqs, deq_of_ref = [], [], []
            for h in range(heads):
                r = layer[f"{kind}_rotation"][0 if bundle["groups"] == 1 else h]
                xh = x[h].astype(F32)
                if f"{kind}_transform" in layer:  # format 2.0: (x - mean) . A_h instead of x . R
                    a, a_inv, mean = (m[h] for m in layer[f"{kind}_transform"])
                    xh, r = (xh - mean[None, :]).astype(F32), a
                if f"{kind}_ef" in layer:  # the table is per KV head, whatever the rotation grouping
                    order, weights = layer[f"{kind}_ef"]
                    rec = write_records_ef(xh, r, layer[f"{kind}_clip"], order[h], weights[h],
                                           bundle["ef_clip_feedback"])
                else:
                    rec = write_records(xh, r, layer[f"{kind}_clip"], segs)
                recs.append(rec)
                if f"{kind}_transform" in layer:  # x' = y' . A^-1 + mean
                    def read(record):
                        y = read_records(record, r, segs, d, rotated=True).astype(F64)
                        return (y @ a_inv.astype(F64) + mean.astype(F64)[None, :]).astype(F32)
                else:
                    def read(record):
                        return read_records(record, r, segs, d)
                deqs.append(read(rec))
                deq_of_ref.append(read(ref_rec[h]))
            rec = np.stack(recs)
            if rec.shape != ref_rec.shape:
                print(f"{name}: record shape {rec.shape} != C++ {ref_rec.shape}")
                ok = False
                continue
            # Codes compared one by one (a byte holds several); params as raw fp16 bits.
            npairs = sum(bits > 0 for _, _, bits in segs)
            cb = rec.shape[2] - 4 * npairs
            mine = np.unpackbits(rec[..., :cb], axis=-1, bitorder="little")
            ref = np.unpackbits(ref_rec[..., :cb], axis=-1, bitorder="little")
            bits_per_code = [bits for _, _, bits in segs if bits > 0]
            n_codes = sum((e - b) for b, e, bits in segs if bits > 0) * heads * tokens
            diff_bits = mine != ref
            # A code differs when any of its bits does; count per code via the bit positions.
            codes_bad = 0
            off = 0
            for b, e, bits in segs:
                if bits == 0:
                    continue
                nbits = ((e - b) * bits + 7) // 8 * 8
                seg_diff = diff_bits[..., off:off + (e - b) * bits].reshape(heads, tokens, e - b, bits).any(-1)
                codes_bad += int(seg_diff.sum())
                off += nbits
            pbad = int((rec[..., cb:].reshape(heads, tokens, -1, 2) != ref_rec[..., cb:].reshape(heads, tokens, -1, 2))
                       .any(-1).sum())
            write_err = float(np.abs(np.stack(deqs) - ref_deq).max())
            read_err = float(np.abs(np.stack(deq_of_ref) - ref_deq).max())
            total_codes += n_codes
            code_mismatch += codes_bad
            param_mismatch += pbad
            worst_write, worst_read = max(worst_write, write_err), max(worst_read, read_err)
            worst_read_rel = max(worst_read_rel, read_err / max(1.0, float(np.abs(ref_deq).max())))
            print(f"{name}: {heads}x{tokens} records of {rec.shape[2]} B ({'/'.join(map(str, bits_per_code))} bit"
                  f"{', error feedback' if f'{kind}_ef' in layer else ''}"
                  f"{', storage transform' if f'{kind}_transform' in layer else ''}), "
                  f"code mismatches {codes_bad}/{n_codes}, fp16 param mismatches {pbad}, "
                  f"write max|d| {write_err:.3g}, read-of-C++-record max|d| {read_err:.3g}")
    frac = code_mismatch / max(total_codes, 1)
    print(f"TOTAL: code mismatches {code_mismatch}/{total_codes} ({frac:.2e}), param mismatches {param_mismatch}, "
          f"write path max|d| {worst_write:.3g}, read path max|d| {worst_read:.3g}")
    try:
        import torch

        print(f"decoded cache as torch: {torch.from_numpy(deqs[-1]).shape} {torch.from_numpy(deqs[-1]).dtype}")
    except ImportError:
        pass
    # The read path is deterministic given the record: it must agree to the last bit up to the unrotation's
    # double rounding (fp32 ulps). The write path may differ where a value sits exactly on a rounding boundary.
    ok = ok and frac <= args.max_code_mismatch and worst_read_rel <= 1e-5
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
