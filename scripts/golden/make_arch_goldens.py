#!/usr/bin/env python3
"""Golden checkpoints of every architecture the C++ CPU forward supports, made with Hugging Face transformers.

For each model in MODELS this script
  1. builds a small random-init model (fixed seed, weights re-drawn by this script so the logits spread over
     several units and every norm / bias is non-trivial) and saves it with save_pretrained into OUT/<name>/;
  2. reloads that folder from disk as float32 with attn_implementation="eager" (so the reference sees exactly the
     bf16/fp16-rounded weights the C++ loader will see, and the saved config.json round-trips in transformers);
  3. runs deterministic token ids (BOS first) through it and writes OUT/<name>/golden.safetensors:
       input_ids      I64 [T]
       logits         F32 [T, vocab]
       layers.N.key   F32 [num_kv_heads, T, head_dim]   post-RoPE, as stored in the DynamicCache
       layers.N.value F32 [num_kv_heads, T, head_dim]
       rope_inv_freq  F32 [head_dim / 2]                the rotary embedding's inv_freq buffer
     with __metadata__ saying how it was made;
  4. prints sanity lines: eager vs sdpa max |d|, transformers' own incremental decode vs the full forward,
     inv_freq vs an independent formula, logit spread, file sizes.
The llama3 checkpoint is also written a second time with the other config.json layout (classic rope_theta +
rope_scaling + torch_dtype vs transformers-5 rope_parameters + dtype); transformers must give bit-identical logits
for both, and the golden file is shared.

OUT/MANIFEST.json lists every file with its sha256, the command, the versions and all sanity numbers.
The exit status is non-zero if any model failed or a size limit was exceeded (everything else is still written).

usage: python3 scripts/golden/make_arch_goldens.py --out OUT [--seed 1234] [--tokens 300] [--only NAME ...]
       python3 scripts/golden/make_arch_goldens.py --out OUT --dry-run    (checks arguments and sizes; no torch)
"""
import argparse
import copy
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import traceback
import zlib

CHECKPOINT_LIMIT_BYTES = 1_500_000  # per folder, model files only (they are committed)
TOTAL_LIMIT_BYTES = 8_000_000  # everything under OUT
GOLDEN_FILE = "golden.safetensors"

# One entry per golden folder. `config` holds the transformers config fields (rope handled separately so the
# script works with both the transformers-5 rope_parameters and the classic rope_theta/rope_scaling spellings).
# Sizes are chosen so each checkpoint stays far below 1.5 MB and all of OUT below 8 MB (see --dry-run).
MODELS = [
    {
        "name": "qwen3-tied-bf16",
        "class": "Qwen3ForCausalLM",
        "config_class": "Qwen3Config",
        "dtype": "bfloat16",
        "config": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                       rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False,
                       use_sliding_window=False, sliding_window=None, bos_token_id=1, eos_token_id=2),
        "rope": {"rope_type": "default", "rope_theta": 1e6},
        "why": "head_dim 32 != hidden/heads, q/k RMSNorm, tied lm_head, bf16 storage",
    },
    {
        "name": "qwen2-bias-fp16",
        "class": "Qwen2ForCausalLM",
        "config_class": "Qwen2Config",
        "dtype": "float16",
        "config": dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
                       bos_token_id=1, eos_token_id=2),
        "rope": {"rope_type": "default", "rope_theta": 1e6},
        "why": "non-zero q/k/v biases (k bias goes through RoPE), untied, fp16 storage",
    },
    {
        "name": "llama3-rope-sharded-fp32",
        "class": "LlamaForCausalLM",
        "config_class": "LlamaConfig",
        "dtype": "float32",
        "max_shard_size": "200KB",
        "config": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
        # theta 1e4 with head_dim 16 puts rotary pairs in all three llama3 bands: wavelength 6.3 (< 16, kept),
        # 19.9 and 62.8 (between 16 and 64, smoothed), >= 199 (> 64, divided by 8).
        "rope": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        "second_layout": True,
        "why": "llama3 rope scaling in all three frequency bands, sharded safetensors + index, fp32",
    },
    {
        "name": "llama-linear-rope-fp32",
        "class": "LlamaForCausalLM",
        "config_class": "LlamaConfig",
        "dtype": "float32",
        "config": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
        "rope": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        "why": "linear rope scaling, MHA (kv heads == heads)",
    },
    {
        "name": "mistral-fp32",
        "class": "MistralForCausalLM",
        "config_class": "MistralConfig",
        "dtype": "float32",
        "config": dict(vocab_size=320, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None,
                       bos_token_id=1, eos_token_id=2),
        "rope": {"rope_type": "default", "rope_theta": 10000.0},
        "why": "Mistral, GQA with 3 query heads per kv head, no sliding window",
    },
    {
        "name": "mqa-llama",
        "class": "LlamaForCausalLM",
        "config_class": "LlamaConfig",
        "dtype": "float32",
        "config": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
        "rope": {"rope_type": "default", "rope_theta": 500000.0},
        "why": "multi-query attention (1 kv head), 3 layers",
    },
]
MODEL_NAMES = [m["name"] for m in MODELS]


# ----------------------------------------------------------------------------------------------------------------
# Pure-python helpers (usable by --dry-run without torch)

def head_dim_of(spec):
    c = spec["config"]
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


def parameter_count(spec):
    c = spec["config"]
    h, v, i, n = c["hidden_size"], c["vocab_size"], c["intermediate_size"], c["num_hidden_layers"]
    d, nh, nkv = head_dim_of(spec), c["num_attention_heads"], c["num_key_value_heads"]
    qkv_bias = spec["class"] == "Qwen2ForCausalLM"
    per_layer = h * nh * d + 2 * h * nkv * d + nh * d * h + 3 * h * i + 2 * h
    if qkv_bias:
        per_layer += nh * d + 2 * nkv * d
    if spec["class"] == "Qwen3ForCausalLM":
        per_layer += 2 * d  # q_norm, k_norm
    lm_head = 0 if c["tie_word_embeddings"] else v * h
    return v * h + lm_head + n * per_layer + h


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def estimated_checkpoint_bytes(spec):
    return parameter_count(spec) * DTYPE_BYTES[spec["dtype"]] + 16_000  # + headers, config, index


def estimated_golden_bytes(spec, tokens):
    c = spec["config"]
    d = head_dim_of(spec)
    kv = c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * tokens * d
    return 8 * tokens + 4 * (tokens * c["vocab_size"] + kv + d // 2) + 4_000


def expected_inv_freq(head_dim, rope):
    """RoPE inverse frequencies from the formulas (transformers' modeling_rope_utils), in float64, written
    independently of transformers so a config that means something else than intended is caught."""
    base = float(rope["rope_theta"])
    inv = [1.0 / (base ** (2 * k / head_dim)) for k in range(head_dim // 2)]
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return inv
    if kind == "linear":
        return [f / rope["factor"] for f in inv]
    if kind == "llama3":
        factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        low_freq_wavelen, high_freq_wavelen = old / lo, old / hi
        out = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen < high_freq_wavelen:
                out.append(f)
            elif wavelen > low_freq_wavelen:
                out.append(f / factor)
            else:
                smooth = (old / wavelen - lo) / (hi - lo)
                out.append((1 - smooth) * f / factor + smooth * f)
        return out
    raise ValueError(f"unknown rope_type {kind}")


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_files(folder):
    return sorted(f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f)))


def checkpoint_bytes(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in folder_files(folder) if f != GOLDEN_FILE)


def write_json_atomic(path, obj):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)


def token_ids(name, seed, tokens, vocab, bos):
    """Deterministic ids: BOS, then uniform draws from [3, vocab) with a generator seeded from (seed, name),
    so adding or reordering models never changes another model's ids."""
    import torch
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    rest = torch.randint(3, vocab, (tokens - 1,), generator=g, dtype=torch.int64)
    return torch.cat([torch.tensor([bos], dtype=torch.int64), rest])


# ----------------------------------------------------------------------------------------------------------------
# config.json layouts

def is_new_layout(cfg_json):
    return "rope_parameters" in cfg_json


def to_classic_layout(cfg_json):
    """transformers-5 layout (rope_parameters, dtype) -> classic (rope_theta, rope_scaling, torch_dtype)."""
    c = copy.deepcopy(cfg_json)
    rp = dict(c.pop("rope_parameters"))
    c["rope_theta"] = rp.pop("rope_theta")
    rp.pop("type", None)
    kind = rp.get("rope_type", "default")
    c["rope_scaling"] = None if kind == "default" else rp
    if "dtype" in c:
        c["torch_dtype"] = c.pop("dtype")
    return c


def to_new_layout(cfg_json):
    """classic -> transformers-5 layout (only used when the installed transformers still writes classic)."""
    c = copy.deepcopy(cfg_json)
    rp = dict(c.pop("rope_scaling", None) or {"rope_type": "default"})
    if "type" in rp:
        rp.setdefault("rope_type", rp.pop("type"))
    rp["rope_theta"] = c.pop("rope_theta", 10000.0)
    c["rope_parameters"] = rp
    if "torch_dtype" in c:
        c["dtype"] = c.pop("torch_dtype")
    return c


# ----------------------------------------------------------------------------------------------------------------
# transformers side

def versions():
    env = {"python": platform.python_version(), "platform": platform.platform()}
    for module in ("torch", "transformers", "safetensors", "numpy", "huggingface_hub"):
        try:
            env[module] = __import__(module).__version__
        except Exception as e:  # a version we cannot read must not stop the run
            env[module] = f"unknown ({type(e).__name__})"
    return env


def build_config(spec):
    import inspect
    import transformers
    cls = getattr(transformers, spec["config_class"])
    kwargs = dict(spec["config"])
    rope = dict(spec["rope"])
    try:
        takes_rope_parameters = "rope_parameters" in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        takes_rope_parameters = "rope_parameters" in getattr(cls, "__dataclass_fields__", {})
    if takes_rope_parameters:
        kwargs["rope_parameters"] = rope
    else:
        kwargs["rope_theta"] = rope.pop("rope_theta")
        kwargs["rope_scaling"] = None if rope.get("rope_type") == "default" else rope
    return cls(**kwargs)


def reinit_weights(model, seed):
    """Re-draws every parameter with its own seeded generator, independent of transformers' _init_weights (which
    changes between versions). Scales: projections 1/sqrt(fan_in) (q/k 1.5x, for attention that is neither
    uniform nor one-hot), embeddings so the logits spread over several units, norms in [0.5, 1.5] and biases
    0.5 so that a forward which ignores either is caught."""
    import torch
    g = torch.Generator().manual_seed(seed)
    tied = bool(model.config.tie_word_embeddings)
    with torch.no_grad():
        for name, p in model.named_parameters():  # shared (tied) parameters are listed once
            shape = tuple(p.shape)
            if name.endswith("norm.weight"):
                values = 0.5 + torch.rand(shape, generator=g)
            elif name.endswith(".bias"):
                values = 0.5 * torch.randn(shape, generator=g)
            elif "embed_tokens" in name:
                values = (0.5 if tied else 1.0) * torch.randn(shape, generator=g)
            elif name.startswith("lm_head"):
                values = 3.0 / math.sqrt(shape[1]) * torch.randn(shape, generator=g)
            elif p.dim() == 2:
                gain = 1.5 if (".q_proj." in name or ".k_proj." in name) else 1.0
                values = gain / math.sqrt(shape[1]) * torch.randn(shape, generator=g)
            else:
                raise RuntimeError(f"no init rule for parameter {name} {shape}")
            p.copy_(values.to(p.dtype))


def load_fp32(folder, class_name, attn):
    import torch
    import transformers
    cls = getattr(transformers, class_name)
    try:
        model, info = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn,
                                          output_loading_info=True)
    except TypeError:
        model, info = cls.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation=attn,
                                          output_loading_info=True)
    # A missing, unexpected or mis-shaped tensor means the checkpoint is not what the golden claims it is.
    problems = {k: sorted(map(str, info.get(k) or [])) for k in
                ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        raise RuntimeError(f"{folder}: transformers loading problems {problems}")
    got = getattr(model.config, "_attn_implementation", attn)
    if attn == "eager" and got != "eager":
        raise RuntimeError(f"{folder}: asked for attn_implementation=eager, got {got}")
    return model.eval()


def cache_layers(cache):
    """(keys, values) per layer of a transformers cache: the transformers-5 Cache API (cache.layers[i].keys),
    the 4.x DynamicCache (key_cache / value_cache lists) or the legacy tuple of tuples."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v in cache]


def forward_full(model, ids):
    import torch
    with torch.no_grad():
        out = model(input_ids=ids[None, :], use_cache=True)
    kv = [(k[0].detach().float().clone(), v[0].detach().float().clone()) for k, v in cache_layers(out.past_key_values)]
    return out.logits[0].detach().float().clone(), kv


def forward_incremental(model, ids, prefill):
    """transformers' own cached decode: `prefill` tokens at once, then one token per call."""
    import torch
    with torch.no_grad():
        out = model(input_ids=ids[None, :prefill], use_cache=True)
        rows = [out.logits[0]]
        cache = out.past_key_values
        for t in range(prefill, ids.shape[0]):
            out = model(input_ids=ids[None, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            rows.append(out.logits[0])
    return torch.cat(rows, 0).float()


def rotary_inv_freqs(model):
    import torch
    return {name: m.inv_freq.detach().float().clone() for name, m in model.named_modules()
            if isinstance(getattr(m, "inv_freq", None), torch.Tensor)}


def max_abs(a, b):
    return float((a.double() - b.double()).abs().max())


def saved_tensor_dtypes(folder):
    """dtype spelling of every tensor in the folder's safetensors files, read from the headers."""
    import struct
    dtypes = {}
    for f in folder_files(folder):
        if f.endswith(".safetensors") and f != GOLDEN_FILE:
            with open(os.path.join(folder, f), "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for name, entry in header.items():
                if name != "__metadata__":
                    dtypes[name] = entry["dtype"]
    return dtypes


def make_model(spec, out_dir, args, env, command):
    import safetensors.torch
    import torch
    import transformers

    name = spec["name"]
    folder = os.path.join(out_dir, name)
    if os.path.exists(folder):
        shutil.rmtree(folder)
    report = {"why": spec["why"], "class": spec["class"], "storage_dtype": spec["dtype"]}
    model_seed = args.seed * 1_000_003 + zlib.crc32(name.encode()) + 1
    t0 = time.time()

    torch.manual_seed(args.seed)
    config = build_config(spec)
    model = getattr(transformers, spec["class"])(config).float().eval()
    reinit_weights(model, model_seed)
    if config.tie_word_embeddings:
        if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
            model.tie_weights()
        if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
            raise RuntimeError("tie_word_embeddings is set but lm_head is not the embedding")
    storage = getattr(torch, spec["dtype"])
    model = model.to(storage)
    save_kwargs = {"max_shard_size": spec["max_shard_size"]} if "max_shard_size" in spec else {}
    model.save_pretrained(folder, **save_kwargs)
    del model

    # The checkpoint must say what it is: dtype recorded in config.json, tensors stored in that dtype,
    # the tied lm_head omitted, the sharded one sharded, the Qwen2 biases present and non-zero.
    cfg_path = os.path.join(folder, "config.json")
    with open(cfg_path) as f:
        cfg_json = json.load(f)
    dtype_key = "dtype" if "dtype" in cfg_json else "torch_dtype"
    if cfg_json.get(dtype_key) != spec["dtype"]:
        report["config_dtype_patched_from"] = cfg_json.get(dtype_key)
        cfg_json[dtype_key] = spec["dtype"]
        write_json_atomic(cfg_path, cfg_json)
    want_st = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[spec["dtype"]]
    dtypes = saved_tensor_dtypes(folder)
    wrong = {k: v for k, v in dtypes.items() if v != want_st}
    if wrong:
        raise RuntimeError(f"tensors not stored as {want_st}: {wrong}")
    if config.tie_word_embeddings == ("lm_head.weight" in dtypes):
        raise RuntimeError(f"tie_word_embeddings={config.tie_word_embeddings} but lm_head.weight "
                           f"{'present' if 'lm_head.weight' in dtypes else 'absent'} in the checkpoint")
    if "max_shard_size" in spec:
        if not os.path.exists(os.path.join(folder, "model.safetensors.index.json")):
            raise RuntimeError("expected a sharded checkpoint (model.safetensors.index.json) but got "
                               f"{folder_files(folder)}")
        report["shards"] = [f for f in folder_files(folder) if f.endswith(".safetensors")]
    report["config_layout"] = "transformers-5 (rope_parameters)" if is_new_layout(cfg_json) else \
        "classic (rope_theta/rope_scaling)"

    # The reference: the saved folder reloaded as fp32, eager attention.
    ref = load_fp32(folder, spec["class"], "eager")
    if spec["class"] == "Qwen2ForCausalLM":
        smallest = min(float(p.abs().max()) for n, p in ref.named_parameters() if n.endswith(".bias"))
        if smallest == 0.0:
            raise RuntimeError("a Qwen2 q/k/v bias is all zeros")
        report["min_of_max_abs_bias"] = smallest
    vocab = ref.config.vocab_size
    ids = token_ids(name, args.seed, args.tokens, vocab, spec["config"]["bos_token_id"])
    logits, kv = forward_full(ref, ids)
    T = ids.shape[0]
    nkv, d = spec["config"]["num_key_value_heads"], head_dim_of(spec)
    if tuple(logits.shape) != (T, vocab):
        raise RuntimeError(f"logits shape {tuple(logits.shape)} != {(T, vocab)}")
    if len(kv) != spec["config"]["num_hidden_layers"]:
        raise RuntimeError(f"cache has {len(kv)} layers")
    for k, v in kv:
        if tuple(k.shape) != (nkv, T, d) or tuple(v.shape) != (nkv, T, d):
            raise RuntimeError(f"cache K/V shapes {tuple(k.shape)} {tuple(v.shape)} != {(nkv, T, d)}")
    if not bool(torch.isfinite(logits).all()):
        raise RuntimeError("non-finite logits")

    freqs = rotary_inv_freqs(ref)
    if not freqs:
        raise RuntimeError("no rotary embedding module with an inv_freq buffer found")
    expected = torch.tensor(expected_inv_freq(d, spec["rope"]), dtype=torch.float64)
    inv_freq = next(iter(freqs.values()))
    report["inv_freq_max_rel_diff_vs_formula"] = max(
        float(((f.double() - expected).abs() / expected).max()) for f in freqs.values())
    # transformers computes in float32 (a few 1e-7 relative, more in the llama3 smooth band where
    # old/wavelen - low_freq_factor cancels); a config read differently than intended is off by O(1).
    if report["inv_freq_max_rel_diff_vs_formula"] > 1e-4:
        raise RuntimeError(f"rotary inv_freq differs from the {spec['rope']} formula: "
                           f"{inv_freq.tolist()} vs {expected.tolist()}")
    attention_scaling = {n: float(getattr(m, "attention_scaling", 1.0)) for n, m in ref.named_modules()
                         if hasattr(m, "inv_freq")}
    if any(s != 1.0 for s in attention_scaling.values()):
        raise RuntimeError(f"unexpected rope attention_scaling {attention_scaling}")

    # Sanity numbers (not part of the golden): how much transformers disagrees with itself.
    # A failure here is reported, never fatal: the golden above does not depend on it.
    try:
        sdpa = load_fp32(folder, spec["class"], "sdpa")
        logits_sdpa, kv_sdpa = forward_full(sdpa, ids)
        report["eager_vs_sdpa_max_abs_logit_diff"] = max_abs(logits, logits_sdpa)
        report["eager_vs_sdpa_max_abs_kv_diff"] = max(max(max_abs(k, k2), max_abs(v, v2))
                                                      for (k, v), (k2, v2) in zip(kv, kv_sdpa))
        del sdpa
    except Exception as e:
        report["eager_vs_sdpa_max_abs_logit_diff"] = report["eager_vs_sdpa_max_abs_kv_diff"] = float("nan")
        report["sdpa_error"] = repr(e)[:500]
    try:
        prefill = min(args.prefill, T - 1)
        report["hf_incremental_vs_full_max_abs_logit_diff"] = max_abs(forward_incremental(ref, ids, prefill),
                                                                      logits)
    except Exception as e:
        report["hf_incremental_vs_full_max_abs_logit_diff"] = float("nan")
        report["hf_incremental_error"] = repr(e)[:500]
    report["logit_std"] = float(logits.std())
    report["mean_per_row_logit_range"] = float((logits.max(1).values - logits.min(1).values).mean())
    report["kv_max_abs"] = max(max(float(k.abs().max()), float(v.abs().max())) for k, v in kv)

    tensors = {"input_ids": ids.clone(), "logits": logits.contiguous(), "rope_inv_freq": inv_freq.contiguous()}
    for layer, (k, v) in enumerate(kv):
        tensors[f"layers.{layer}.key"] = k.contiguous()
        tensors[f"layers.{layer}.value"] = v.contiguous()
    metadata = {
        "model": name,
        "architecture": spec["class"],
        "made_by": "scripts/golden/make_arch_goldens.py",
        "command": command,
        "seed": str(args.seed),
        "weight_seed": str(model_seed),
        "storage_dtype": spec["dtype"],
        "reference": "transformers from_pretrained(this folder, dtype=float32, attn_implementation=eager), CPU, "
                     f"{env['torch_threads']} thread(s), one forward over all tokens with use_cache=True",
        "attn_implementation": "eager",
        "compute_dtype": "float32",
        "input_ids": f"BOS={spec['config']['bos_token_id']} then uniform [3, vocab) from "
                     "torch.Generator(seed*1000003 + crc32(name))",
        "layout": "input_ids I64 [T]; logits F32 [T, vocab]; layers.N.key / layers.N.value F32 "
                  "[num_key_value_heads, T, head_dim] from the DynamicCache after the forward (batch dim dropped, "
                  "keys post-RoPE); rope_inv_freq F32 [head_dim/2]",
        "transformers": env["transformers"],
        "torch": env["torch"],
        "safetensors": env["safetensors"],
        "python": env["python"],
        "sanity": json.dumps({k: report[k] for k in ("eager_vs_sdpa_max_abs_logit_diff",
                                                     "hf_incremental_vs_full_max_abs_logit_diff",
                                                     "inv_freq_max_rel_diff_vs_formula")}),
    }
    safetensors.torch.save_file(tensors, os.path.join(folder, GOLDEN_FILE), metadata=metadata)
    report["tokens"] = T
    report["seconds"] = round(time.time() - t0, 2)
    return report, {"folder": folder, "cfg_json": cfg_json, "ids": ids, "logits": logits, "kv": kv,
                    "inv_freq": inv_freq}


def make_second_layout(spec, folder, cfg_json, ids, logits, kv, inv_freq):
    """The same weights and golden with config.json in the other layout; transformers must agree bit for bit."""
    if is_new_layout(cfg_json):
        other_name, other_cfg = "llama3-rope-classic", to_classic_layout(cfg_json)
        if "rope_parameters" in other_cfg or "rope_theta" not in other_cfg:
            raise RuntimeError(f"classic layout conversion failed: {other_cfg}")
    else:
        other_name, other_cfg = "llama3-rope-newlayout", to_new_layout(cfg_json)
    other = os.path.join(os.path.dirname(folder), other_name)
    if os.path.exists(other):
        shutil.rmtree(other)
    shutil.copytree(folder, other)
    write_json_atomic(os.path.join(other, "config.json"), other_cfg)
    ref = load_fp32(other, spec["class"], "eager")
    logits2, kv2 = forward_full(ref, ids)
    freqs2 = rotary_inv_freqs(ref)
    report = {
        "why": f"{spec['name']} with config.json rewritten to the "
               f"{'classic' if is_new_layout(cfg_json) else 'transformers-5'} layout; golden.safetensors shared",
        "copy_of": spec["name"],
        "max_abs_logit_diff_vs_original_layout": max_abs(logits2, logits),
        "max_abs_kv_diff_vs_original_layout": max(max(max_abs(k, k2), max_abs(v, v2))
                                                  for (k, v), (k2, v2) in zip(kv, kv2)),
        "inv_freq_max_abs_diff_vs_original_layout": max(max_abs(f, inv_freq) for f in freqs2.values()),
    }
    # Same weights, same rope: anything but (near) bit-identical output means the layouts mean different things.
    worst = max(report["max_abs_logit_diff_vs_original_layout"], report["max_abs_kv_diff_vs_original_layout"],
                report["inv_freq_max_abs_diff_vs_original_layout"])
    if worst > 1e-6:
        raise RuntimeError(f"{other_name}: transformers reads the two config layouts differently: {report}")
    return other_name, report


# ----------------------------------------------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (created; existing model folders are replaced)")
    ap.add_argument("--seed", type=int, default=1234, help="seed of weights and token ids (default 1234)")
    ap.add_argument("--tokens", type=int, default=300, help="sequence length T including BOS (default 300)")
    ap.add_argument("--prefill", type=int, default=200,
                    help="prefill length of the incremental-decode sanity check (default 200)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads; 1 keeps the reduction order fixed (default 1)")
    ap.add_argument("--only", nargs="+", choices=MODEL_NAMES, help="make only these models")
    ap.add_argument("--dry-run", action="store_true", help="check arguments and size estimates, import no torch")
    args = ap.parse_args(argv)
    if args.tokens < 2:
        ap.error("--tokens must be at least 2")
    if not 1 <= args.prefill < args.tokens:
        ap.error("--prefill must be in [1, --tokens)")
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    if args.seed < 0:
        ap.error("--seed must be >= 0")
    for spec in MODELS:
        if args.tokens > spec["config"]["max_position_embeddings"]:
            ap.error(f"--tokens {args.tokens} exceeds max_position_embeddings of {spec['name']}")
    parent = os.path.dirname(os.path.abspath(args.out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        ap.error(f"--out {args.out}: {parent} is not writable")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        ap.error(f"--out {args.out} exists and is not a directory")
    return args


def size_plan(args, selected):
    total, ok = 0, True
    for spec in selected:
        ckpt = estimated_checkpoint_bytes(spec)
        gold = estimated_golden_bytes(spec, args.tokens)
        copies = 2 if spec.get("second_layout") else 1
        total += copies * (ckpt + gold)
        ok &= ckpt < CHECKPOINT_LIMIT_BYTES
        print(f"  {spec['name']:26s} {spec['class']:18s} {spec['dtype']:9s} params {parameter_count(spec):7d}  "
              f"checkpoint ~{ckpt / 1e6:.2f} MB  golden ~{gold / 1e6:.2f} MB  x{copies}")
    ok &= total < TOTAL_LIMIT_BYTES
    print(f"  estimated total {total / 1e6:.2f} MB (limits: {CHECKPOINT_LIMIT_BYTES / 1e6} MB per checkpoint, "
          f"{TOTAL_LIMIT_BYTES / 1e6} MB in all)")
    return ok


def main(argv):
    args = parse_args(argv)
    selected = [m for m in MODELS if not args.only or m["name"] in args.only]
    command = shlex.join(["python3", sys.argv[0]] + argv)
    print(f"make_arch_goldens: {len(selected)} model(s), T={args.tokens}, seed={args.seed} -> {args.out}")
    sizes_ok = size_plan(args, selected)
    if args.dry_run:
        for spec in selected:
            inv = expected_inv_freq(head_dim_of(spec), spec["rope"])
            print(f"  {spec['name']:26s} rope {spec['rope']['rope_type']:7s} inv_freq[0..] "
                  + " ".join(f"{f:.3g}" for f in inv))
        print("dry run: arguments OK" + ("" if sizes_ok else ", but the size estimate exceeds a limit"))
        return 0 if sizes_ok else 1

    import torch
    torch.set_num_threads(args.threads)
    env = versions()
    env["torch_threads"] = torch.get_num_threads()
    print("versions: " + json.dumps(env), flush=True)
    os.makedirs(args.out, exist_ok=True)

    results, failed = {}, []
    for spec in selected:
        print(f"[{spec['name']}] building ...", flush=True)
        # One model's failure must not cost the others: the lead gets one run on the GPU machine.
        try:
            rep, made = make_model(spec, args.out, args, env, command)
            results[spec["name"]] = rep
            print(f"[{spec['name']}] OK " + json.dumps(rep, default=str), flush=True)
            print(f"[{spec['name']}] sanity: eager vs sdpa fp32 max|d| logits "
                  f"{rep['eager_vs_sdpa_max_abs_logit_diff']:.3e}, K/V {rep['eager_vs_sdpa_max_abs_kv_diff']:.3e}; "
                  f"transformers incremental vs full {rep['hf_incremental_vs_full_max_abs_logit_diff']:.3e}",
                  flush=True)
        except Exception:
            failed.append(spec["name"])
            results[spec["name"]] = {"error": traceback.format_exc()[-4000:]}
            print(f"[{spec['name']}] FAILED\n{results[spec['name']]['error']}", flush=True)
            continue
        if spec.get("second_layout"):
            try:
                other_name, other_rep = make_second_layout(spec, made["folder"], made["cfg_json"], made["ids"],
                                                           made["logits"], made["kv"], made["inv_freq"])
                results[other_name] = other_rep
                print(f"[{other_name}] OK " + json.dumps(other_rep, default=str), flush=True)
            except Exception:
                failed.append(spec["name"] + " (second config layout)")
                results[spec["name"] + "-second-layout"] = {"error": traceback.format_exc()[-4000:]}
                print(f"[{spec['name']}] second layout FAILED\n{traceback.format_exc()[-4000:]}", flush=True)

    manifest = {"command": command, "cwd": os.getcwd(), "seed": args.seed, "tokens": args.tokens,
                "prefill_for_sanity": args.prefill, "env": env, "models": {}, "failed": failed}
    total = 0
    for name, rep in results.items():
        folder = os.path.join(args.out, name)
        entry = dict(rep)
        if os.path.isdir(folder) and "error" not in rep:
            entry["files"] = {f: {"bytes": os.path.getsize(os.path.join(folder, f)),
                                  "sha256": sha256_of(os.path.join(folder, f))} for f in folder_files(folder)}
            entry["checkpoint_bytes"] = checkpoint_bytes(folder)
            total += sum(v["bytes"] for v in entry["files"].values())
            if entry["checkpoint_bytes"] >= CHECKPOINT_LIMIT_BYTES:
                failed.append(f"{name}: checkpoint {entry['checkpoint_bytes']} bytes >= {CHECKPOINT_LIMIT_BYTES}")
        manifest["models"][name] = entry
    manifest["total_bytes"] = total
    if total >= TOTAL_LIMIT_BYTES:
        failed.append(f"total {total} bytes >= {TOTAL_LIMIT_BYTES}")
    write_json_atomic(os.path.join(args.out, "MANIFEST.json"), manifest)

    print("summary:")
    for name, rep in manifest["models"].items():
        if "error" in rep:
            print(f"  {name:26s} FAILED")
        else:
            sdpa = rep.get("eager_vs_sdpa_max_abs_logit_diff", rep.get("max_abs_logit_diff_vs_original_layout"))
            print(f"  {name:26s} ckpt {rep['checkpoint_bytes'] / 1e6:.3f} MB  eager-vs-sdpa/layout max|d| "
                  f"{sdpa:.2e}  hf-incremental max|d| {rep.get('hf_incremental_vs_full_max_abs_logit_diff', 0):.2e}"
                  f"  logit range {rep.get('mean_per_row_logit_range', float('nan')):.2f}")
    print(f"  total {total / 1e6:.3f} MB; MANIFEST.json written")
    if failed:
        print("FAILED: " + "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
