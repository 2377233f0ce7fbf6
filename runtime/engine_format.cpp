// Host half of rt::Engine (runtime/engine.h): cache-mode names, format resolution, bundle/model matching.
// Plain C++ so CPU-only builds and tests/runtime exercise it.
#include <string>

#include "formats/error.h"
#include "formats/kv_quant_spec.h"
#include "runtime/engine.h"

namespace oscar::rt {

std::string_view cache_mode_name(CacheMode mode) {
  switch (mode) {
    case CacheMode::Bf16: return "bf16";
    case CacheMode::Int2: return "int2";
    case CacheMode::Oscar: return "oscar";
  }
  return "unknown";
}

CacheMode parse_cache_mode(std::string_view name, const std::string& where) {
  for (CacheMode m : {CacheMode::Bf16, CacheMode::Int2, CacheMode::Oscar})
    if (name == cache_mode_name(m)) return m;
  throw Error(where, "unknown cache format '" + std::string(name) + "' (expected bf16, int2 or oscar)");
}

int64_t padded_cache_head_dim(int64_t head_dim, const std::string& where) {
  for (int64_t d : {64, 128, 256})
    if (head_dim <= d) return d;
  throw Error(where, "head_dim " + std::to_string(head_dim) + " is above the decode kernels' largest (256)");
}

namespace {

// The kernels store one INT2 segment over the whole head (kern::kv_write); anything else is eval-only.
void require_whole_head_int2(const fmt::TensorQuantSpec& t, int64_t head_dim, const std::string& where) {
  const bool ok = t.storage == fmt::KvStorage::Int && t.segments.size() == 1 && t.segments[0].begin == 0 &&
                  t.segments[0].end == head_dim && t.segments[0].bits == 2;
  if (!ok)
    throw Error(where, "the GPU cache stores INT2 over the whole head; this bundle's format (" +
                           std::string(fmt::kv_storage_name(t.storage)) + ", " + std::to_string(t.segments.size()) +
                           " segment(s)) is only supported by `oscar eval`");
}

std::string describe(const fmt::ModelFingerprint& f) {
  return f.architecture + " (" + std::to_string(f.num_layers) + " layers, " + std::to_string(f.num_heads) + "/" +
         std::to_string(f.num_kv_heads) + " heads, head_dim " + std::to_string(f.head_dim) + ", hidden " +
         std::to_string(f.hidden_size) + ", vocab " + std::to_string(f.vocab_size) + ", config sha256 " +
         f.config_sha256.substr(0, 12) + ", attention weights sha256 " + f.attention_sha256.substr(0, 12) + ")";
}

}  // namespace

void check_bundle_matches(const fmt::Bundle& bundle, const fmt::ModelFingerprint& model,
                          const std::string& bundle_where, const std::string& model_where) {
  if (bundle.model == model) return;
  throw Error(bundle_where, "calibrated for " + describe(bundle.model) + ", but " + model_where + " is " +
                                describe(model) + "; calibrate this checkpoint (oscar calibrate) first");
}

CacheFormat resolve_cache_format(const fmt::ModelConfig& cfg, CacheMode mode, const fmt::Bundle* bundle,
                                 std::optional<int64_t> sink_tokens, std::optional<int64_t> recent_tokens,
                                 const std::string& where) {
  CacheFormat f;
  f.mode = mode;
  f.model_head_dim = cfg.head_dim;
  const auto L = static_cast<size_t>(cfg.num_layers);
  if (mode == CacheMode::Bf16) {
    f.cache_head_dim = padded_cache_head_dim(cfg.head_dim, where);
    f.quantized = false;
    f.k_rotation.assign(L, {});
    f.v_rotation.assign(L, {});
    f.k_clip_ratio.assign(L, 1.f);
    f.v_clip_ratio.assign(L, 1.f);
    return f;
  }
  if (cfg.head_dim != 64 && cfg.head_dim != 128 && cfg.head_dim != 256)
    throw Error(where, "the INT2 cache needs head_dim 64, 128 or 256; this model has " + std::to_string(cfg.head_dim) +
                           " (use --cache bf16)");
  f.cache_head_dim = cfg.head_dim;
  f.quantized = true;
  fmt::KvQuantSpec spec = fmt::KvQuantSpec::int2_default(cfg.head_dim);
  if (mode == CacheMode::Int2) {
    f.k_rotation.assign(L, {});
    f.v_rotation.assign(L, {});
    f.k_clip_ratio.assign(L, 1.f);
    f.v_clip_ratio.assign(L, 1.f);
  } else {
    if (!bundle) throw Error(where, "the oscar cache format needs a calibration bundle (--bundle)");
    spec = bundle->quant;
    if (spec.head_dim != cfg.head_dim)
      throw Error(where, "bundle head_dim " + std::to_string(spec.head_dim) + " but the model's is " +
                             std::to_string(cfg.head_dim));
    require_whole_head_int2(spec.k, cfg.head_dim, where + ": K format");
    require_whole_head_int2(spec.v, cfg.head_dim, where + ": V format");
    if (bundle->rotation_groups != 1)
      throw Error(where, "per-KV-head rotations (rotation_groups " + std::to_string(bundle->rotation_groups) +
                             ") are not supported by the decode kernel, which takes one R_k/R_v per layer");
    if (bundle->layers.size() != L)
      throw Error(where, "bundle has " + std::to_string(bundle->layers.size()) + " layers, the model " +
                             std::to_string(L));
    const size_t dd = static_cast<size_t>(cfg.head_dim * cfg.head_dim);
    for (size_t l = 0; l < L; ++l) {
      const fmt::LayerCalibration& lc = bundle->layers[l];
      if (lc.k_rotation.size() != dd || lc.v_rotation.size() != dd)
        throw Error(where + ": layer " + std::to_string(l), "rotation is not [head_dim, head_dim]");
      // Bundle 1.1 per-layer layouts (spectral bit allocation) would otherwise be silently read as whole-head INT2.
      if (!lc.k_segments.empty() || !lc.v_segments.empty())
        throw Error(where + ": layer " + std::to_string(l),
                    "per-layer segment layouts (bundle format 1.1) are not supported by the INT2 decode kernel");
      f.k_rotation.push_back(lc.k_rotation);
      f.v_rotation.push_back(lc.v_rotation);
      f.k_clip_ratio.push_back(lc.k_clip_ratio);
      f.v_clip_ratio.push_back(lc.v_clip_ratio);
    }
  }
  f.sink_tokens = sink_tokens.value_or(spec.sink_tokens);
  f.recent_tokens = recent_tokens.value_or(spec.recent_tokens);
  if (f.sink_tokens < 0) throw Error(where + ": sink", "must be >= 0");
  if (f.recent_tokens < 0) throw Error(where + ": recent", "must be >= 0");
  for (size_t l = 0; l < L; ++l)
    for (float c : {f.k_clip_ratio[l], f.v_clip_ratio[l]})
      if (!(c > 0.f && c <= 1.f))
        throw Error(where + ": layer " + std::to_string(l), "clip ratio " + std::to_string(c) + " outside (0, 1]");
  return f;
}

}  // namespace oscar::rt
