#!/usr/bin/env python3
"""Convert an `oscar export --format sglang-oscar` directory into the rotation files the OSCAR SGLang server
loads (FutureMLS-Lab/OSCAR: SGLANG_OSCAR_K_ROTATION_PATH / SGLANG_OSCAR_V_ROTATION_PATH), plus the launch
settings. Spec: docs/serving.md.

    python3 scripts/export/to_sglang_oscar.py EXPORT_DIR --out OUT_DIR      # needs numpy and torch
    python3 scripts/export/to_sglang_oscar.py EXPORT_DIR --check-only       # validation only, numpy

Writes (atomically: temp file in OUT_DIR, then os.replace):
    OUT_DIR/k_rotation_qqt_r_h_pbr.pt   {"format_version": 1, "objective": "qqt_r_h_pbr", "source_grouping": ...,
    OUT_DIR/v_rotation_sst_r_h_pbr.pt    "calibration": {...}, "layers": {layer_id: {"layer_id", "rotation",
                                         "eigenvalues", "clip_ratio"}}, "clip_ratios": [...]}
    OUT_DIR/server_flags.env            KEY=VALUE lines for the server's environment
    OUT_DIR/server_flags.json           the same plus the launch arguments
"rotation" is float32 [head_dim, head_dim] (one rotation per layer, the published loader's shape) or
[kv_heads, head_dim, head_dim] for per-head bundles (which the published loader does not accept; we say so).
"eigenvalues" are float32 in ascending order, as torch.linalg.eigh returns them and the published calibrator stores.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile

import numpy as np

# The published server rejects rotations further than this from orthogonal; ours are built in fp64 and rounded
# to fp32, so anything near this bound means a damaged export.
ORTHOGONALITY_TOLERANCE = 1e-5
DTYPES = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8")}


def fail(msg: str) -> None:
    print(f"to_sglang_oscar: error: {msg}", file=sys.stderr)
    sys.exit(1)


def load_tensor(export_dir: str, name: str, spec: dict) -> np.ndarray:
    path = os.path.join(export_dir, spec["file"])
    if os.path.basename(spec["file"]) != spec["file"]:
        fail(f"{name}: file name {spec['file']!r} must not contain a directory")
    with open(path, "rb") as f:
        raw = f.read()
    if hashlib.sha256(raw).hexdigest() != spec["sha256"]:
        fail(f"{path}: sha256 does not match manifest.json (corrupt or edited export)")
    dtype = DTYPES.get(spec["dtype"])
    if dtype is None:
        fail(f"{name}: unsupported dtype {spec['dtype']!r}")
    shape = tuple(int(x) for x in spec["shape"])
    if len(raw) != int(np.prod(shape)) * dtype.itemsize:
        fail(f"{path}: {len(raw)} bytes but shape {list(shape)} of {spec['dtype']} needs "
             f"{int(np.prod(shape)) * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def load_export(export_dir: str) -> tuple[dict, dict]:
    with open(os.path.join(export_dir, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != "oscar-sglang-export" or manifest.get("format_version") != 1:
        fail(f"{export_dir}: not an oscar-sglang-export version 1 manifest")
    tensors = {name: load_tensor(export_dir, name, spec) for name, spec in manifest["tensors"].items()}
    num_layers, groups, d = manifest["num_layers"], manifest["rotation_groups"], manifest["head_dim"]
    for name in ("k_rotation", "v_rotation"):
        r = tensors[name].astype(np.float64)
        if r.shape != (num_layers, groups, d, d):
            fail(f"{name}: shape {r.shape} != {(num_layers, groups, d, d)}")
        if not np.isfinite(r).all():
            fail(f"{name}: non-finite values")
        err = np.abs(np.einsum("lgij,lgik->lgjk", r, r) - np.eye(d)).max()
        if err > ORTHOGONALITY_TOLERANCE:
            fail(f"{name}: max |R^T R - I| = {err:.3g} > {ORTHOGONALITY_TOLERANCE}")
    for name in ("k_eigenvalues", "v_eigenvalues"):
        if tensors[name].shape != (num_layers, groups, d):
            fail(f"{name}: shape {tensors[name].shape} != {(num_layers, groups, d)}")
    if tensors["clip_ratios"].shape != (num_layers, 2):
        fail(f"clip_ratios: shape {tensors['clip_ratios'].shape} != {(num_layers, 2)}")
    return manifest, tensors


def objective_name(manifest: dict, which: str) -> str:
    base = manifest["objectives"][which]
    return f"{base}_r_h_pbr" if manifest["rotation_composition"] == "eigen*hadamard*bitrev" else f"{base}_eigen"


def build_state(manifest: dict, tensors: dict, which: str):
    import torch  # only the writing step needs torch

    rot = tensors[f"{which}_rotation"]
    eig = tensors[f"{which}_eigenvalues"][..., ::-1]  # descending -> ascending (torch.linalg.eigh order)
    clips = tensors["clip_ratios"][:, 0 if which == "k" else 1]
    groups = manifest["rotation_groups"]
    layers = {}
    for layer in range(manifest["num_layers"]):
        r = rot[layer, 0] if groups == 1 else rot[layer]
        e = eig[layer, 0] if groups == 1 else eig[layer]
        layers[layer] = {
            "layer_id": layer,
            "rotation": torch.from_numpy(np.ascontiguousarray(r, dtype=np.float32)),
            "eigenvalues": torch.from_numpy(np.ascontiguousarray(e, dtype=np.float32)),
            "clip_ratio": float(clips[layer]),
        }
    return {
        "format_version": 1,
        "objective": objective_name(manifest, which),
        "source_grouping": "layer" if groups == 1 else "kv_head",
        "calibration": {
            "producer": manifest["producer"],
            "bundle_sha256": manifest["bundle"]["sha256"],
            "model": manifest["model"],
            "tokens": manifest["calibration"]["num_tokens"],
            "global_kv_heads": manifest["model"]["num_kv_heads"],
            "global_q_heads": manifest["model"]["num_heads"],
            "post_rope": True,
            "accumulator_dtype": "float64",
        },
        "clip_ratios": [float(c) for c in clips],
        "layers": layers,
    }


def atomic_write(path: str, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are shared like any other file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(text: str):
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export_dir")
    ap.add_argument("--out", help="directory for the .pt files and server flags (created if absent)")
    ap.add_argument("--check-only", action="store_true", help="validate the export; write nothing (no torch needed)")
    args = ap.parse_args()
    manifest, tensors = load_export(args.export_dir)
    server = manifest["server"]
    if args.check_only:
        print(f"ok: {manifest['num_layers']} layers, head_dim {manifest['head_dim']}, "
              f"{manifest['rotation_groups']} rotation group(s), server supported: {server['supported']}")
        return
    if not args.out:
        fail("--out DIR is required unless --check-only")
    import torch

    os.makedirs(args.out, exist_ok=True)
    paths = {}
    for which in ("k", "v"):
        state = build_state(manifest, tensors, which)
        path = os.path.join(args.out, f"{which}_rotation_{state['objective']}.pt")
        atomic_write(path, lambda tmp, s=state: torch.save(s, tmp))
        paths[which] = os.path.abspath(path)
    env = dict(server["env"])
    env["SGLANG_OSCAR_K_ROTATION_PATH"] = paths["k"]
    env["SGLANG_OSCAR_V_ROTATION_PATH"] = paths["v"]
    atomic_write(os.path.join(args.out, "server_flags.env"),
                 write_text("".join(f"{k}={v}\n" for k, v in sorted(env.items()))))
    atomic_write(os.path.join(args.out, "server_flags.json"),
                 write_text(json.dumps({"env": env, "args": server["args"], "supported": server["supported"],
                                        "reason": server.get("reason")}, indent=2) + "\n"))
    if not server["supported"]:
        print(f"warning: {server['reason']}", file=sys.stderr)
    print(f"wrote {paths['k']}\nwrote {paths['v']}\nwrote {os.path.join(args.out, 'server_flags.env')}")


if __name__ == "__main__":
    main()
