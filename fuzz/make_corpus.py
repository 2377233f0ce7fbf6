#!/usr/bin/env python3
"""Regenerates the seed corpora in fuzz/corpus/{safetensors,config,tokenizer}/ (deterministic, small).

    python3 fuzz/make_corpus.py [--fixtures ../shared/fixtures]

Seeds are hand-made inputs (valid minimal files and one of each rejection docs/formats-input.md lists) plus a few
derived from the shared fixtures' *structure* (tensor names and dtypes, tokenizer pipeline) with the bulk cut away;
no fixture file is copied. fuzz/corpus/bundle/ holds bundles written by fmt::write_bundle (see fuzz/README.md).
"""
import argparse
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def put(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def safetensors(tensors, metadata=None, pad=True, raw_header=None):
    """tensors: list of (name, dtype, shape, bytes)."""
    header, blob = {}, b""
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(blob), len(blob) + len(data)]}
        blob += data
    if metadata is not None:
        header["__metadata__"] = metadata
    h = raw_header if raw_header is not None else json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + blob


def make_safetensors(fixtures):
    f32 = struct.pack("<4f", 1.0, -2.0, 0.5, 3.25)
    bf16 = struct.pack("<4H", 0x3F80, 0xC000, 0x3F00, 0x7F80)
    f16 = struct.pack("<2H", 0x3C00, 0xFC00)
    put("safetensors", "valid_mixed", safetensors(
        [("a", "F32", [2, 2], f32), ("b", "BF16", [4], bf16), ("c", "F16", [2], f16), ("i", "I32", [1], b"\1\0\0\0")],
        {"format": "pt"}))
    put("safetensors", "valid_empty_tensor", safetensors([("z", "F32", [0, 3], b""), ("s", "F64", [], b"\0" * 8)]))
    put("safetensors", "short", b"\x08\x00\x00")
    put("safetensors", "header_too_long", struct.pack("<Q", 1 << 40) + b"{}")
    put("safetensors", "not_json", safetensors([], raw_header=b"{\"a\":"))
    put("safetensors", "duplicate_key", safetensors([], raw_header=(
        b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'))
        + f32[:4])
    put("safetensors", "overlap", safetensors([], raw_header=(
        b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}'))
        + f32[:12])
    put("safetensors", "bad_shape", safetensors([], raw_header=(
        b'{"a":{"dtype":"F32","shape":[-1, 9223372036854775807],"data_offsets":[0,4]}}')) + f32[:4])
    put("safetensors", "bad_dtype", safetensors([], raw_header=(
        b'{"a":{"dtype":"F4","shape":[1],"data_offsets":[0,4]},"__metadata__":{"n":3}}')) + f32[:4])
    # The tinystories fixture's tensor names and dtypes, every shape shrunk to [2] so the seed stays small.
    src = os.path.join(fixtures, "models/tinystories-llama2c-280k-hf/model.safetensors")
    if os.path.exists(src):
        with open(src, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
        tensors = [(k, v["dtype"], [2], b"\0" * 8) for k, v in sorted(header.items()) if k != "__metadata__"]
        put("safetensors", "fixture_names", safetensors(tensors[:12], header.get("__metadata__")))


def make_config():
    llama = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
             "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "float32",
             "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
    put("config", "llama.json", json.dumps(llama))
    put("config", "llama3_rope.json", json.dumps(dict(llama, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})))
    put("config", "qwen3_tf5.json", json.dumps({
        "architectures": ["Qwen3ForCausalLM"], "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 50, "dtype": "bfloat16",
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "eos_token_id": [2, 3]}))
    put("config", "mistral_window.json", json.dumps({
        "model_type": "mistral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "vocab_size": 50, "sliding_window": 16, "rope_scaling": {"type": "linear",
                                                                                       "factor": 2.0}}))
    put("config", "qwen2_bias.json", json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 3, "num_key_value_heads": 1, "vocab_size": 50, "torch_dtype": "float16"}))
    put("config", "bad_types.json", '{"architectures":"LlamaForCausalLM","hidden_size":"64","num_hidden_layers":-1}')
    put("config", "bad_heads.json", json.dumps(dict(llama, num_key_value_heads=3, head_dim=15)))
    put("config", "unknown_arch.json", '{"architectures":["GPT2LMHeadModel"]}')
    put("config", "not_json.json", '{"hidden_size": 64,')


def make_tokenizer(fixtures):
    tiny = {"version": "1.0", "added_tokens": [], "normalizer": None, "pre_tokenizer": None,
            "post_processor": None, "decoder": None,
            "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5},
                      "merges": ["a b", ["b", "c"], "ab c"]}}
    put("tokenizer", "tiny_bpe.json", json.dumps(tiny))
    sp = {"added_tokens": [{"id": 0, "content": "<unk>", "special": True}, {"id": 1, "content": "<s>", "special": True},
                           {"id": 2, "content": "</s>", "special": True}],
          "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                             {"type": "Replace", "pattern": {"String": " "},
                                                              "content": "\u2581"}]},
          "pre_tokenizer": None,
          "post_processor": {"type": "TemplateProcessing",
                             "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                        {"Sequence": {"id": "A", "type_id": 0}}],
                             "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
          "decoder": {"type": "Sequence", "decoders": [
              {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
              {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
          "model": {"type": "BPE", "unk_token": "<unk>", "byte_fallback": True, "fuse_unk": True,
                    "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "<0xC3>": 3, "<0xA9>": 4, "\u2581": 5, "a": 6,
                              "\u2581a": 7},
                    "merges": ["\u2581 a"]}}
    put("tokenizer", "sentencepiece_style.json", json.dumps(sp))
    put("tokenizer", "bad_merge.json", json.dumps(dict(tiny, model=dict(tiny["model"], merges=["a q"]))))
    put("tokenizer", "bad_regex.json", json.dumps(dict(tiny, pre_tokenizer={
        "type": "Split", "pattern": {"Regex": "(?<!"}, "behavior": "Isolated", "invert": False})))
    # The fixtures' pipelines (normalizer, pre-tokenizer regex, post-processor, decoder) with the vocabulary cut to
    # the byte/base pieces and the first merges whose parts and result survive.
    for name, keep in (("qwen3-tiny-trained", 300), ("tinystories-llama2c-280k-hf", 300)):
        src = os.path.join(fixtures, "models", name, "tokenizer.json")
        if not os.path.exists(src):
            continue
        with open(src, encoding="utf-8") as f:
            j = json.load(f)
        vocab = {k: v for k, v in j["model"]["vocab"].items() if v < keep}
        merges = []
        for m in j["model"]["merges"]:
            left, right = m.split(" ", 1) if isinstance(m, str) else m
            if left in vocab and right in vocab and left + right in vocab:
                merges.append(m)
        j["model"]["vocab"], j["model"]["merges"] = vocab, merges[:200]
        j["added_tokens"] = [t for t in j.get("added_tokens", []) if t["id"] < keep]
        put("tokenizer", f"derived_{name}.json", json.dumps(j, ensure_ascii=False))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default=os.path.join(HERE, "..", "..", "shared", "fixtures"))
    args = ap.parse_args()
    make_safetensors(args.fixtures)
    make_config()
    make_tokenizer(args.fixtures)


if __name__ == "__main__":
    main()
