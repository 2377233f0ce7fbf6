// Host half of rt::Engine (runtime/engine.h): cache-mode names, format resolution, bundle/model matching.
// Plain C++ so CPU-only builds and tests/runtime exercise it.
#include <algorithm>
#include <cmath>
#include <string>

#include <fmt/format.h>

#include "formats/error.h"
#include "formats/kv_layout.h"
#include "formats/kv_quant_spec.h"
#include "lib/eval/cache_modes.h"
#include "lib/calib/ef_calibration.h"
#include "runtime/engine.h"
#include "runtime/kv_cache.h"

namespace oscar::rt {

std::string_view cache_mode_name(CacheMode mode) {
  switch (mode) {
    case CacheMode::Bf16: return "bf16";
    case CacheMode::Int2: return "int2";
    case CacheMode::Oscar: return "oscar";
    case CacheMode::Hadamard2: return "hadamard2";
    case CacheMode::Int4: return "int4";
    case CacheMode::Fp8: return "fp8";
  }
  return "unknown";
}

CacheMode parse_cache_mode(std::string_view name, const std::string& where) {
  for (CacheMode m :
       {CacheMode::Bf16, CacheMode::Int2, CacheMode::Oscar, CacheMode::Hadamard2, CacheMode::Int4, CacheMode::Fp8})
    if (name == cache_mode_name(m)) return m;
  throw Error(where, "unknown cache format '" + std::string(name) +
                         "' (expected bf16, int2, int4, fp8, hadamard2 or oscar)");
}

int64_t padded_cache_head_dim(int64_t head_dim, const std::string& where) {
  for (int64_t d : {64, 128, 256})
    if (head_dim <= d) return d;
  throw Error(where, "head_dim " + std::to_string(head_dim) + " is above the decode kernels' largest (256)");
}

namespace {

// What the GPU cache stores: integer segments on 16-dim boundaries with widths the decode kernels read (whole-head
// INT2, or a segmented layout of {0, 1, 2, 3, 4}-bit segments). Everything else is eval-only.
void require_kernel_layout(const fmt::TensorQuantSpec& t, const std::vector<fmt::QuantSegment>& segs,
                           int64_t head_dim, const std::string& where) {
  if (t.storage != fmt::KvStorage::Int)
    throw Error(where, "the GPU cache stores integer codes; this bundle's format (" +
                           std::string(fmt::kv_storage_name(t.storage)) + ") is only supported by `oscar eval`");
  if (segs.size() > static_cast<size_t>(fmt::kMaxPageSegments))
    throw Error(where, std::to_string(segs.size()) + " segments; the GPU cache takes at most " +
                           std::to_string(fmt::kMaxPageSegments));
  int32_t next = 0;
  for (const auto& s : segs) {
    if (s.begin != next || s.end <= s.begin)
      throw Error(where, "segments do not tile the head at dim " + std::to_string(next));
    if (s.begin % 16 != 0 || s.end % 16 != 0)
      throw Error(where, "segment [" + std::to_string(s.begin) + ", " + std::to_string(s.end) +
                             ") is not on 16-dim boundaries, which the decode kernel needs (`oscar eval` only)");
    if (s.bits < 0 || s.bits > 4)
      throw Error(where, "segment [" + std::to_string(s.begin) + ", " + std::to_string(s.end) + ") has " +
                             std::to_string(s.bits) +
                             " bits; the decode kernel reads widths 0 to 4 (8 is `oscar eval` only)");
    next = s.end;
  }
  if (next != head_dim)
    throw Error(where, "segments cover [0, " + std::to_string(next) + ") of head_dim " + std::to_string(head_dim));
}

bool whole_head_int2(const std::vector<fmt::QuantSegment>& segs, int64_t head_dim) {
  return segs.size() == 1 && segs[0].begin == 0 && segs[0].end == head_dim && segs[0].bits == 2;
}

}  // namespace

KvCacheLayout cache_layout(const fmt::ModelConfig& cfg, const CacheFormat& f) {
  KvCacheLayout layout;
  layout.num_layers = cfg.num_layers;
  layout.num_kv_heads = cfg.num_kv_heads;
  layout.head_dim = f.cache_head_dim;
  layout.page_tokens = fmt::kKvPageTokens;
  layout.quantized = f.quantized;
  layout.sink_tokens = f.sink_tokens;
  layout.recent_tokens = f.recent_tokens;
  if (f.quantized && f.fp8()) {
    const fmt::Fp8PageGeometry g{static_cast<int32_t>(f.cache_head_dim), static_cast<int32_t>(fmt::kKvPageTokens)};
    layout.k_page_bytes.assign(f.k_segments.size(), g.page_bytes());
    layout.v_page_bytes.assign(f.v_segments.size(), g.page_bytes());
  } else if (f.quantized && f.segmented()) {
    for (size_t l = 0; l < f.k_segments.size(); ++l) {
      const auto d = static_cast<int32_t>(f.cache_head_dim);
      layout.k_page_bytes.push_back(fmt::segmented_page_geometry(f.k_segments[l], d, fmt::kKvPageTokens).page_bytes());
      layout.v_page_bytes.push_back(fmt::segmented_page_geometry(f.v_segments[l], d, fmt::kKvPageTokens).page_bytes());
    }
  }
  return layout;
}

bool CacheFormat::segmented() const {
  if (fp8()) return false;
  for (size_t l = 0; l < k_segments.size(); ++l)
    if (!whole_head_int2(k_segments[l], cache_head_dim) || !whole_head_int2(v_segments[l], cache_head_dim)) return true;
  return false;
}

namespace {

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

namespace {

// The kernel reads the tables unchecked (a bad order index is an out-of-bounds access), so everything is checked here.
void check_ef_table(const std::vector<int32_t>& order, const std::vector<float>& weights,
                    const std::vector<fmt::QuantSegment>& segments, const fmt::ModelConfig& cfg,
                    const std::string& where) {
  if (order.empty() && weights.empty()) return;
  const int64_t d = cfg.head_dim, heads = cfg.num_kv_heads;
  if (segments.size() != 1 || segments[0].begin != 0 || segments[0].end != d || segments[0].bits != 2)
    throw Error(where, "tables are only defined for a whole-head INT2 tensor");
  if (static_cast<int64_t>(order.size()) != heads * d || static_cast<int64_t>(weights.size()) != heads * d * d)
    throw Error(where, ::fmt::format("order has {} values and weights {}, expected [{}, {}] and [{}, {}, {}]",
                                     order.size(), weights.size(), heads, d, heads, d, d));
  for (int64_t h = 0; h < heads; ++h) {
    std::vector<uint8_t> seen(static_cast<size_t>(d), 0);
    for (int64_t k = 0; k < d; ++k) {
      const int32_t c = order[static_cast<size_t>(h * d + k)];
      if (c < 0 || c >= d || seen[static_cast<size_t>(c)])
        throw Error(where, ::fmt::format("order of KV head {} is not a permutation of 0..{} (step {}: {})", h, d - 1,
                                         k, c));
      seen[static_cast<size_t>(c)] = 1;
    }
  }
  for (float w : weights)
    if (!std::isfinite(w)) throw Error(where, "weights are not finite");
}

// Whether some layer of a per-layer list has an entry (an empty vector = the layer has none).
template <class T>
bool any_layer(const std::vector<std::vector<T>>& per_layer) {
  return std::any_of(per_layer.begin(), per_layer.end(), [](const std::vector<T>& v) { return !v.empty(); });
}

}  // namespace

bool CacheFormat::error_feedback() const { return any_layer(k_ef_order) || any_layer(v_ef_order); }

bool CacheFormat::storage_transforms() const { return any_layer(k_transform) || any_layer(v_transform); }

bool CacheFormat::value_transforms() const { return any_layer(v_transform); }

bool CacheFormat::value_rotations() const { return any_layer(v_rotation); }

bool CacheFormat::has_transform(int64_t layer, bool value) const {
  const auto& t = value ? v_transform : k_transform;
  return layer >= 0 && static_cast<size_t>(layer) < t.size() && !t[static_cast<size_t>(layer)].empty();
}

int64_t CacheFormat::device_bytes() const {
  const auto bytes = [](const auto& v) { return static_cast<int64_t>(v.size() * sizeof(v[0])); };
  const auto all = [&](const auto& per_layer) {
    int64_t n = 0;
    for (const auto& v : per_layer) n += bytes(v);
    return n;
  };
  int64_t n = 0;
  for (size_t l = 0; l < k_rotation.size(); ++l)
    if (!has_transform(static_cast<int64_t>(l), false)) n += bytes(k_rotation[l]);
  for (size_t l = 0; l < v_rotation.size(); ++l)
    if (!has_transform(static_cast<int64_t>(l), true) && !v_rotation_folded) n += bytes(v_rotation[l]);
  for (const auto* t : {&k_transform, &v_transform, &k_mean, &k_read, &v_read}) n += all(*t);
  return n + all(k_ef_order) + all(v_ef_order) + all(k_ef_weights) + all(v_ef_weights);
}

CacheFormat resolve_cache_format(const fmt::ModelConfig& cfg, CacheMode mode, const fmt::Bundle* bundle,
                                 std::optional<int64_t> sink_tokens, std::optional<int64_t> recent_tokens,
                                 const std::string& where, uint64_t hadamard_seed) {
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
  const std::vector<fmt::QuantSegment> int2_whole{{0, static_cast<int32_t>(cfg.head_dim), 2}};
  if (mode == CacheMode::Int2 || mode == CacheMode::Int4) {
    // int4 is eval's per-token INT4 baseline: one 4-bit segment over the head, stored and read by the segmented
    // path (a compiled kernel at head_dim 128) — the codes eval::CacheFormat's int4 writes, so the engine and the
    // CPU simulation agree.
    const std::vector<fmt::QuantSegment> int4_whole{{0, static_cast<int32_t>(cfg.head_dim), 4}};
    f.k_segments.assign(L, mode == CacheMode::Int2 ? int2_whole : int4_whole);
    f.v_segments.assign(L, mode == CacheMode::Int2 ? int2_whole : int4_whole);
    f.k_rotation.assign(L, {});
    f.v_rotation.assign(L, {});
    f.k_clip_ratio.assign(L, 1.f);
    f.v_clip_ratio.assign(L, 1.f);
  } else if (mode == CacheMode::Fp8) {
    f.quant_storage = fmt::KvStorage::Fp8E4M3;
    const std::vector<fmt::QuantSegment> fp8_whole{{0, static_cast<int32_t>(cfg.head_dim), 8}};
    f.k_segments.assign(L, fp8_whole);
    f.v_segments.assign(L, fp8_whole);
    f.k_rotation.assign(L, {});
    f.v_rotation.assign(L, {});
    f.k_clip_ratio.assign(L, 1.f);
    f.v_clip_ratio.assign(L, 1.f);
  } else if (mode == CacheMode::Hadamard2) {
    f.k_segments.assign(L, int2_whole);
    f.v_segments.assign(L, int2_whole);
    // The per-layer seeds of eval::CacheFormat::create (hadamard2); tests/runtime checks both give the same codes.
    for (size_t l = 0; l < L; ++l) {
      f.k_rotation.push_back(eval::random_sign_hadamard(cfg.head_dim, hadamard_seed * 1000003u + 2 * l));
      f.v_rotation.push_back(eval::random_sign_hadamard(cfg.head_dim, hadamard_seed * 1000003u + 2 * l + 1));
    }
    f.k_clip_ratio.assign(L, 1.f);
    f.v_clip_ratio.assign(L, 1.f);
  } else {
    if (!bundle) throw Error(where, "the oscar cache format needs a calibration bundle (--bundle)");
    spec = bundle->quant;
    if (spec.head_dim != cfg.head_dim)
      throw Error(where, "bundle head_dim " + std::to_string(spec.head_dim) + " but the model's is " +
                             std::to_string(cfg.head_dim));
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
      // Bundle 1.1: the layer's own layouts (spectral bit allocation), else the bundle's.
      const std::string lw = where + ": layer " + std::to_string(l);
      f.k_segments.push_back(lc.k_segments.empty() ? spec.k.segments : lc.k_segments);
      f.v_segments.push_back(lc.v_segments.empty() ? spec.v.segments : lc.v_segments);
      require_kernel_layout(spec.k, f.k_segments.back(), cfg.head_dim, lw + " K format");
      require_kernel_layout(spec.v, f.v_segments.back(), cfg.head_dim, lw + " V format");
      f.k_rotation.push_back(lc.k_rotation);
      f.v_rotation.push_back(lc.v_rotation);
      f.k_clip_ratio.push_back(lc.k_clip_ratio);
      f.v_clip_ratio.push_back(lc.v_clip_ratio);
      f.k_ef_order.push_back(lc.k_ef_order);
      f.k_ef_weights.push_back(lc.k_ef_weights);
      f.v_ef_order.push_back(lc.v_ef_order);
      f.v_ef_weights.push_back(lc.v_ef_weights);
      check_ef_table(f.k_ef_order.back(), f.k_ef_weights.back(), f.k_segments.back(), cfg, lw + " K error feedback");
      check_ef_table(f.v_ef_order.back(), f.v_ef_weights.back(), f.v_segments.back(), cfg, lw + " V error feedback");
      // Bundle 2.0: per-KV-head transforms (validated by read_bundle: shapes, A·A⁻¹ = I, whole-head INT2).
      const size_t hdd = static_cast<size_t>(cfg.num_kv_heads) * dd;
      for (const bool keys : {true, false}) {
        const std::vector<float>& a = keys ? lc.k_transform : lc.v_transform;
        const std::vector<float>& inv = keys ? lc.k_transform_inverse : lc.v_transform_inverse;
        auto& out_a = keys ? f.k_transform : f.v_transform;
        auto& out_read = keys ? f.k_read : f.v_read;
        out_a.push_back(a);
        out_read.emplace_back();
        if (keys) f.k_mean.push_back(lc.k_mean);
        if (a.empty()) continue;
        if (a.size() != hdd || inv.size() != hdd || (keys && lc.k_mean.size() != hdd / cfg.head_dim))
          throw Error(lw, std::string(keys ? "K" : "V") + " storage transform is not [num_kv_heads, head_dim, head_dim]");
        // The decode kernel applies a per-head matrix as q·M (keys) and o'·Mᵀ (values); A⁻ᵀ serves both.
        std::vector<float>& r = out_read.back();
        r.resize(hdd);
        const auto d = static_cast<size_t>(cfg.head_dim);
        for (size_t h = 0; h < static_cast<size_t>(cfg.num_kv_heads); ++h)
          for (size_t i = 0; i < d; ++i)
            for (size_t j = 0; j < d; ++j) r[h * dd + j * d + i] = inv[h * dd + i * d + j];
      }
    }
    f.ef_clip_feedback = bundle->ef_clip_feedback;
    f.key_table_context = calib::error_feedback_context(*bundle);
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

namespace {

std::string describe_layout(const fmt::RecordLayout& r) {
  if (r.storage == fmt::KvStorage::BF16) return "bf16";
  if (r.storage == fmt::KvStorage::Fp8E4M3) return "fp8";
  std::string s;
  for (const fmt::RecordSegment& g : r.segments)
    s += ::fmt::format("{}{}b[{},{})", s.empty() ? "" : " ", g.bits, g.begin, g.end);
  return s;
}

// Pages rt::Engine holds for one sequence grown to `context` tokens at once (a prefill), in bytes.
double engine_sequence_bytes(const KvCacheLayout& layout, int64_t context) {
  const int64_t pages = (context + layout.page_tokens - 1) / layout.page_tokens;
  const auto cap = static_cast<int32_t>(std::max<int64_t>(pages + layout.bf16_pages_per_sequence() + 1, 1));
  KvPageTables tables(layout, layout.quantized ? cap : 0, cap);
  const int64_t seq = tables.create_sequence();
  tables.extend(std::span<const int64_t>(&seq, 1), std::span<const int64_t>(&context, 1), "kv_footprint");
  return static_cast<double>(tables.int2_pages_of(seq)) * static_cast<double>(layout.int2_page_bytes()) +
         static_cast<double>(tables.bf16_pages_of(seq)) * static_cast<double>(layout.bf16_page_bytes());
}

}  // namespace

KvFootprint kv_footprint(const fmt::ModelConfig& cfg, CacheMode mode, const fmt::Bundle* bundle,
                         std::span<const int64_t> contexts, std::optional<int64_t> sink_tokens,
                         std::optional<int64_t> recent_tokens, const std::string& where) {
  KvFootprint fp;
  fp.mode = std::string(cache_mode_name(mode));
  const int64_t L = cfg.num_layers, Hkv = cfg.num_kv_heads, d = cfg.head_dim;
  fp.bf16_bytes_per_token = 2.0 * static_cast<double>(L * Hkv * d) * 2.0;
  if (mode == CacheMode::Oscar && !bundle) throw Error(where, "the oscar cache format needs a calibration bundle");
  if (mode == CacheMode::Oscar && (bundle->quant.head_dim != d || static_cast<int64_t>(bundle->layers.size()) != L))
    throw Error(where, ::fmt::format("bundle is for head_dim {} and {} layers, the model has {} and {}",
                                     bundle->quant.head_dim, bundle->layers.size(), d, L));
  fmt::KvQuantSpec base = mode == CacheMode::Oscar ? bundle->quant
                                : mode == CacheMode::Bf16 ? fmt::KvQuantSpec::uniform(d, 16)
                                : mode == CacheMode::Int4 ? fmt::KvQuantSpec::uniform(d, 4)
                                                          : fmt::KvQuantSpec::uniform(d, 2);
  if (mode == CacheMode::Fp8) {
    base.k.storage = fmt::KvStorage::Fp8E4M3;  // one segment [0, d) says how wide the head is
    base.k.segments = {fmt::QuantSegment{0, static_cast<int32_t>(d), 8}};
    base.k.clip_ratio = 1.0f;
    base.v = base.k;
  }
  if (mode != CacheMode::Bf16) {
    const fmt::KvQuantSpec windows = mode == CacheMode::Oscar ? bundle->quant : fmt::KvQuantSpec::int2_default(d);
    fp.sink_tokens = sink_tokens.value_or(windows.sink_tokens);
    fp.recent_tokens = recent_tokens.value_or(windows.recent_tokens);
    if (fp.sink_tokens < 0 || fp.recent_tokens < 0) throw Error(where, "sink and recent windows must be >= 0");
  }
  double k_bits = 0, v_bits = 0;
  for (int64_t l = 0; l < L; ++l) {
    fmt::KvQuantSpec spec = mode == CacheMode::Oscar ? fmt::layer_spec(*bundle, static_cast<size_t>(l)) : base;
    if (mode == CacheMode::Bf16) spec.k.storage = spec.v.storage = fmt::KvStorage::BF16;
    const std::string lw = ::fmt::format("{}: layer {}", where, l);
    const fmt::RecordLayout k = fmt::RecordLayout::from_spec(spec.k, d, lw + " K");
    const fmt::RecordLayout v = fmt::RecordLayout::from_spec(spec.v, d, lw + " V");
    fp.k_record_bytes.push_back(k.record_bytes());
    fp.v_record_bytes.push_back(v.record_bytes());
    fp.k_layout.push_back(describe_layout(k));
    fp.v_layout.push_back(describe_layout(v));
    fp.quant_bytes_per_token += static_cast<double>(Hkv * (k.record_bytes() + v.record_bytes()));
    k_bits += 8.0 * k.record_bytes() / static_cast<double>(d);
    v_bits += 8.0 * v.record_bytes() / static_cast<double>(d);
  }
  fp.k_bits_per_element = k_bits / static_cast<double>(L);
  fp.v_bits_per_element = v_bits / static_cast<double>(L);

  // The engine's pages, when it runs this format (resolve_cache_format is the engine's own admission check).
  std::optional<KvCacheLayout> layout;
  try {
    const CacheFormat f = resolve_cache_format(cfg, mode, bundle, sink_tokens, recent_tokens, where);
    layout = cache_layout(cfg, f);
    fp.engine_format_bytes = f.device_bytes();
  } catch (const Error&) {
  }
  for (int64_t c : contexts) {
    if (c <= 0) throw Error(where, ::fmt::format("context {} must be positive", c));
    KvFootprintRow row;
    row.context = c;
    row.bf16_bytes = fp.bf16_bytes_per_token * static_cast<double>(c);
    const int64_t high = mode == CacheMode::Bf16 ? c : std::min(c, fp.sink_tokens + fp.recent_tokens);
    row.stored_bytes = static_cast<double>(high) * fp.bf16_bytes_per_token +
                       static_cast<double>(c - high) * fp.quant_bytes_per_token;
    if (layout) row.engine_bytes = engine_sequence_bytes(*layout, c);
    fp.rows.push_back(row);
  }
  return fp;
}

}  // namespace oscar::rt
