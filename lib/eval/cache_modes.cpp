#include "lib/eval/cache_modes.h"

#include <fmt/format.h>

#include <algorithm>
#include <random>

#include "formats/dtype.h"
#include "formats/error.h"
#include "lib/calib/ef_calibration.h"
#include "lib/calib/error_feedback.h"
#include "lib/calib/kv_transform.h"
#include "lib/calib/rotation.h"

namespace oscar::eval {
namespace {

fmt::TensorQuantSpec whole_head_spec(fmt::KvStorage storage, int64_t d, int32_t bits) {
  fmt::TensorQuantSpec s;
  s.storage = storage;
  s.segments = {fmt::QuantSegment{0, static_cast<int32_t>(d), bits}};
  s.clip_ratio = 1.0f;
  return s;
}

// KIVI's per-token values: one (scale, zero) pair per group of `group` channels.
fmt::TensorQuantSpec channel_group_spec(int64_t d, int64_t group, int32_t bits) {
  fmt::TensorQuantSpec s;
  s.storage = fmt::KvStorage::Int;
  for (int64_t b = 0; b < d; b += group)
    s.segments.push_back(fmt::QuantSegment{static_cast<int32_t>(b), static_cast<int32_t>(b + group), bits});
  s.clip_ratio = 1.0f;
  return s;
}

}  // namespace

std::string_view cache_mode_name(CacheMode mode) {
  switch (mode) {
    case CacheMode::BF16: return "bf16";
    case CacheMode::Oscar: return "oscar";
    case CacheMode::Int2: return "int2";
    case CacheMode::Hadamard2: return "hadamard2";
    case CacheMode::Kivi2: return "kivi2";
    case CacheMode::Int4: return "int4";
    case CacheMode::Fp8: return "fp8";
  }
  return "?";
}

CacheMode parse_cache_mode(std::string_view name, const std::string& where) {
  for (CacheMode m : kAllCacheModes)
    if (cache_mode_name(m) == name) return m;
  throw Error(where, ::fmt::format("unknown cache mode '{}' (bf16, oscar, int2, kivi2, hadamard2, int4, fp8)", name));
}

std::vector<CacheMode> parse_cache_modes(std::string_view csv, const std::string& where) {
  std::vector<CacheMode> modes;
  size_t start = 0;
  while (start <= csv.size()) {
    size_t end = csv.find(',', start);
    if (end == std::string_view::npos) end = csv.size();
    std::string_view item = csv.substr(start, end - start);
    while (!item.empty() && item.front() == ' ') item.remove_prefix(1);
    while (!item.empty() && item.back() == ' ') item.remove_suffix(1);
    if (item.empty()) throw Error(where, "empty mode name in the list");
    const CacheMode m = parse_cache_mode(item, where);
    if (std::find(modes.begin(), modes.end(), m) != modes.end())
      throw Error(where, ::fmt::format("mode '{}' is listed twice", item));
    modes.push_back(m);
    start = end + 1;
  }
  return modes;
}

void round_to_bf16(std::span<const float> x, std::span<float> out) {
  for (size_t i = 0; i < x.size(); ++i) out[i] = fmt::bf16_to_f32(fmt::f32_to_bf16(x[i]));
}

std::vector<float> random_sign_hadamard(int64_t d, uint64_t seed) {
  const std::vector<double> h = calib::hadamard(d);
  // Signs from the top bit of mt19937_64 draws: identical on every standard library (no distribution object).
  std::mt19937_64 rng(seed);
  std::vector<float> r(static_cast<size_t>(d * d));
  for (int64_t i = 0; i < d; ++i) {
    const double sign = (rng() >> 63) ? -1.0 : 1.0;
    for (int64_t j = 0; j < d; ++j) r[i * d + j] = static_cast<float>(sign * h[i * d + j]);
  }
  return r;
}

struct CacheFormat::TensorCodec {
  calib::HeadQuantizer quantizer;
  // rotations[layer]: [groups, d, d] (groups 1 = shared by the layer's KV heads), or empty for no rotation.
  std::vector<std::vector<float>> rotations;
  int64_t rotation_groups = 1;
  std::vector<float> clip_ratios;  // per layer
  // Bundle format 1.1: layers with their own segment layout (spectral bit allocation); null = `quantizer`.
  std::vector<std::unique_ptr<calib::HeadQuantizer>> layer_quantizers;
  // Bundle format 1.2: per-layer error-feedback tables ([kv_heads, d] / [kv_heads, d, d]; empty = RTN).
  std::vector<std::vector<int32_t>> ef_order;
  std::vector<std::vector<float>> ef_weights;
  bool ef_clip_feedback = true;
  // Bundle format 2.0: per layer, the bundle's transform fields (fp32 A, A⁻¹ per KV head, keys' μ; the rest of each
  // entry is empty), copied because the bundle may be a retargeted temporary, and read per call through
  // calib::stored_transform_view without converting them. No entries = no transforms.
  std::vector<fmt::LayerCalibration> transforms;
  bool has_ef(int64_t layer) const {
    const auto l = static_cast<size_t>(layer);
    return l < ef_order.size() && !ef_order[l].empty();
  }
  const calib::HeadQuantizer& for_layer(int64_t layer) const {
    const auto l = static_cast<size_t>(layer);
    return l < layer_quantizers.size() && layer_quantizers[l] ? *layer_quantizers[l] : quantizer;
  }

  TensorCodec(const fmt::TensorQuantSpec& spec, int64_t d, int64_t layers, const std::string& where)
      : quantizer(spec, d, where), rotations(static_cast<size_t>(layers)), clip_ratios(static_cast<size_t>(layers),
                                                                                     spec.clip_ratio) {}
  std::span<const float> rotation(int64_t layer, int64_t kv_head, int64_t d) const {
    const auto& r = rotations[static_cast<size_t>(layer)];
    if (r.empty()) return {};
    const int64_t g = rotation_groups == 1 ? 0 : kv_head;
    return std::span<const float>(r).subspan(static_cast<size_t>(g * d * d), static_cast<size_t>(d * d));
  }
};

CacheFormat::~CacheFormat() = default;

std::unique_ptr<CacheFormat> CacheFormat::create(CacheMode mode, const fmt::ModelConfig& cfg, const ModeOptions& opt,
                                                 const std::string& where) {
  const std::string mode_where = ::fmt::format("{} (mode {})", where, cache_mode_name(mode));
  const int64_t d = cfg.head_dim, layers = cfg.num_layers;
  if (opt.windows.sink < 0 || opt.windows.recent < 0) throw Error(mode_where, "sink and recent windows must be >= 0");
  std::unique_ptr<CacheFormat> f(new CacheFormat());
  f->mode_ = mode;
  f->head_dim_ = d;
  f->num_layers_ = layers;
  f->num_kv_heads_ = cfg.num_kv_heads;
  f->windows_ = opt.windows;
  f->rounding_hook_ = opt.rounding_hook;

  auto per_token = [&](const fmt::TensorQuantSpec& ks, const fmt::TensorQuantSpec& vs) {
    f->k_ = std::make_unique<TensorCodec>(ks, d, layers, mode_where + " keys");
    f->v_ = std::make_unique<TensorCodec>(vs, d, layers, mode_where + " values");
    f->cost_ = {ks.bits_per_element(d), vs.bits_per_element(d)};
  };

  switch (mode) {
    case CacheMode::BF16: {
      const auto s = whole_head_spec(fmt::KvStorage::BF16, d, 16);
      per_token(s, s);
      break;
    }
    case CacheMode::Int2:
    case CacheMode::Int4: {
      const auto s = whole_head_spec(fmt::KvStorage::Int, d, mode == CacheMode::Int2 ? 2 : 4);
      per_token(s, s);
      break;
    }
    case CacheMode::Fp8: {
      const auto s = whole_head_spec(fmt::KvStorage::Fp8E4M3, d, 8);
      per_token(s, s);
      break;
    }
    case CacheMode::Hadamard2: {
      if (!calib::is_power_of_two(d))
        throw Error(mode_where, ::fmt::format("head_dim {} is not a power of two (no Hadamard matrix)", d));
      const auto s = whole_head_spec(fmt::KvStorage::Int, d, 2);
      per_token(s, s);
      // Independent signs per layer and tensor, all derived from the one seed.
      for (int64_t l = 0; l < layers; ++l) {
        f->k_->rotations[l] = random_sign_hadamard(d, opt.seed * 1000003u + 2 * static_cast<uint64_t>(l));
        f->v_->rotations[l] = random_sign_hadamard(d, opt.seed * 1000003u + 2 * static_cast<uint64_t>(l) + 1);
      }
      break;
    }
    case CacheMode::Kivi2: {
      const int64_t gt = opt.kivi_key_group_tokens;
      // A head narrower than KIVI's channel group (llama2.c's head_dim 8/16) is one group: KIVI's per-token values
      // then degrade to plain per-token INT2 rather than refusing the model.
      const int64_t gc = std::min(opt.kivi_value_group_channels, d);
      if (gt < 1) throw Error(mode_where, "KIVI key group must be >= 1 token");
      if (gc < 1 || d % gc != 0)
        throw Error(mode_where, ::fmt::format("KIVI value group of {} channels does not divide head_dim {}", gc, d));
      // Keys are quantized per channel with the same INT2 building blocks; the codec's spec only describes one
      // element's bits for the cost (2 bits + one fp16 pair per channel per group of gt tokens).
      per_token(whole_head_spec(fmt::KvStorage::Int, d, 2), channel_group_spec(d, gc, 2));
      f->cost_.key_bits = 2.0 + 32.0 / static_cast<double>(gt);
      f->keys_per_channel_ = true;
      f->key_group_tokens_ = gt;
      f->windows_.recent = std::max(opt.windows.recent, opt.kivi_residual);
      break;
    }
    case CacheMode::Oscar: {
      if (!opt.bundle)
        throw Error(mode_where, "the oscar mode needs a calibration bundle (--bundle FILE from `oscar calibrate`)");
      fmt::Bundle retargeted;
      const bool retarget = opt.key_table_context > 0 && fmt::has_error_feedback(*opt.bundle) &&
                            opt.key_table_context != calib::error_feedback_context(*opt.bundle);
      if (retarget) retargeted = calib::bundle_for_context(*opt.bundle, cfg, opt.key_table_context);
      const fmt::Bundle& b = retarget ? retargeted : *opt.bundle;
      if (b.quant.head_dim != d || static_cast<int64_t>(b.layers.size()) != layers)
        throw Error(mode_where, ::fmt::format("bundle is for head_dim {} and {} layers, the model has {} and {}",
                                              b.quant.head_dim, b.layers.size(), d, layers));
      if (b.rotation_groups != 1 && b.rotation_groups != cfg.num_kv_heads)
        throw Error(mode_where, ::fmt::format("bundle has {} rotation groups, the model {} KV heads",
                                              b.rotation_groups, cfg.num_kv_heads));
      per_token(b.quant.k, b.quant.v);
      f->k_->rotation_groups = f->v_->rotation_groups = b.rotation_groups;
      for (int64_t l = 0; l < layers; ++l) {
        const auto& lc = b.layers[static_cast<size_t>(l)];
        const size_t expect = static_cast<size_t>(b.rotation_groups * d * d);
        if (lc.k_rotation.size() != expect || lc.v_rotation.size() != expect)
          throw Error(mode_where, ::fmt::format("bundle layer {} rotations have the wrong size", l));
        f->k_->rotations[l] = lc.k_rotation;
        f->v_->rotations[l] = lc.v_rotation;
        f->k_->clip_ratios[l] = lc.k_clip_ratio;
        f->v_->clip_ratios[l] = lc.v_clip_ratio;
      }
      // Per-layer layouts: each layer quantizes with its own segments; the cost is the mean over layers.
      double k_bits = 0, v_bits = 0;
      for (int64_t l = 0; l < layers; ++l) {
        const fmt::KvQuantSpec ls = fmt::layer_spec(b, static_cast<size_t>(l));
        const std::string lw = ::fmt::format("{} layer {}", mode_where, l);
        f->k_->layer_quantizers.push_back(b.layers[l].k_segments.empty() ? nullptr
                                              : std::make_unique<calib::HeadQuantizer>(ls.k, d, lw + " keys"));
        f->v_->layer_quantizers.push_back(b.layers[l].v_segments.empty() ? nullptr
                                              : std::make_unique<calib::HeadQuantizer>(ls.v, d, lw + " values"));
        k_bits += ls.k.bits_per_element(d);
        v_bits += ls.v.bits_per_element(d);
      }
      if (layers > 0) f->cost_ = {k_bits / static_cast<double>(layers), v_bits / static_cast<double>(layers)};
      // Format 2.0: storage transforms replace the rotation of the tensors that have one (the tables below are in
      // their basis).
      if (fmt::has_storage_transform(b))
        for (int64_t l = 0; l < layers; ++l) {
          const auto& lc = b.layers[static_cast<size_t>(l)];
          fmt::LayerCalibration k, v;
          k.k_transform = lc.k_transform;
          k.k_transform_inverse = lc.k_transform_inverse;
          k.k_mean = lc.k_mean;
          v.v_transform = lc.v_transform;
          v.v_transform_inverse = lc.v_transform_inverse;
          // Every head's views are checked now, so a short array is an error at create(), not mid-evaluation.
          for (const auto& [keys, stored] : {std::pair{true, &k}, std::pair{false, &v}})
            if (calib::has_transform(*stored, keys))
              for (int64_t h = 0; h < cfg.num_kv_heads; ++h)
                (void)calib::stored_transform_view(*stored, keys, h, d,
                                                   ::fmt::format("{} layer {} {} transform", mode_where, l,
                                                                 keys ? "K" : "V"));
          f->k_->transforms.push_back(std::move(k));
          f->v_->transforms.push_back(std::move(v));
        }
      // Error-feedback tables change which code a token gets, not the format (same bits, same decode).
      if (fmt::has_error_feedback(b)) {
        for (TensorCodec* c : {f->k_.get(), f->v_.get()}) c->ef_clip_feedback = b.ef_clip_feedback;
        for (int64_t l = 0; l < layers; ++l) {
          const auto& lc = b.layers[static_cast<size_t>(l)];
          f->k_->ef_order.push_back(lc.k_ef_order);
          f->k_->ef_weights.push_back(lc.k_ef_weights);
          f->v_->ef_order.push_back(lc.v_ef_order);
          f->v_->ef_weights.push_back(lc.v_ef_weights);
        }
      }
      break;
    }
  }
  return f;
}

void CacheFormat::fake_quantize(const TensorCodec& codec, int64_t layer, int64_t kv_head, std::span<const float> x,
                                int64_t tokens, std::span<float> out) const {
  if (layer < 0 || layer >= num_layers_ || kv_head < 0 || kv_head >= num_kv_heads_)
    throw Error(std::string(name()), ::fmt::format("layer {} / KV head {} out of range", layer, kv_head));
  const bool keys = &codec == k_.get();
  const auto l = static_cast<size_t>(layer);
  if (l < codec.transforms.size() && calib::has_transform(codec.transforms[l], keys)) {
    // y = (x − μ)·A, the tensor's own rounding in y's basis (no rotation there: A includes R), x̂ = ŷ·A⁻¹ + μ.
    const float clip = codec.clip_ratios[l];
    calib::transform_fake_quantize(
        calib::stored_transform_view(codec.transforms[l], keys, kv_head, head_dim_, std::string(name())), x, tokens,
        [&](std::span<const float> y, int64_t rows, std::span<float> y_hat) {
          if (codec.has_ef(layer)) {
            const calib::HeadTable ht = calib::head_table(codec.ef_order[l], codec.ef_weights[l], kv_head, head_dim_);
            calib::error_feedback_fake_quantize_stored(y, rows, {}, clip, 2, ht.order, ht.weights,
                                                       codec.ef_clip_feedback, y_hat);
          } else {
            codec.for_layer(layer).fake_quantize(y, rows, {}, clip, calib::Basis::Original, y_hat);
          }
        },
        out);
    return;
  }
  if (rounding_hook_ && rounding_hook_(keys, layer, kv_head, x, tokens, codec.rotation(layer, kv_head, head_dim_),
                                       codec.clip_ratios[l], out))
    return;
  if (codec.has_ef(layer)) {
    // The rounding every cache writer runs from the stored table (calib::error_feedback_codes_stored).
    const calib::HeadTable ht = calib::head_table(codec.ef_order[l], codec.ef_weights[l], kv_head, head_dim_);
    calib::error_feedback_fake_quantize_stored(x, tokens, codec.rotation(layer, kv_head, head_dim_),
                                               codec.clip_ratios[l], 2, ht.order, ht.weights, codec.ef_clip_feedback,
                                               out);
    return;
  }
  codec.for_layer(layer).fake_quantize(x, tokens, codec.rotation(layer, kv_head, head_dim_), codec.clip_ratios[l],
                                       calib::Basis::Original, out);
}

void CacheFormat::fake_quantize_keys(int64_t layer, int64_t kv_head, std::span<const float> x, int64_t tokens,
                                     std::span<float> out) const {
  if (!keys_per_channel_) return fake_quantize(*k_, layer, kv_head, x, tokens, out);
  const int64_t d = head_dim_, g = key_group_tokens_;
  if (tokens % g != 0 || static_cast<int64_t>(x.size()) != tokens * d || out.size() != x.size())
    throw Error("kivi2 keys", ::fmt::format("{} tokens is not a whole number of {}-token groups", tokens, g));
  // KIVI quantizes keys along the token axis: each channel of a group is one INT2 segment with its own
  // fp16 scale/zero, which keeps the outlier channels of K from inflating every token's range.
  std::vector<float> column(static_cast<size_t>(g));
  std::vector<uint8_t> codes(static_cast<size_t>(g));
  for (int64_t t0 = 0; t0 < tokens; t0 += g) {
    for (int64_t c = 0; c < d; ++c) {
      for (int64_t i = 0; i < g; ++i) column[i] = x[(t0 + i) * d + c];
      const calib::IntParams p = calib::int_params(column, 2);
      calib::int_codes(column, 2, p, codes);
      for (int64_t i = 0; i < g; ++i) out[(t0 + i) * d + c] = calib::int_dequant(codes[i], p);
    }
  }
}

void CacheFormat::fake_quantize_values(int64_t layer, int64_t kv_head, std::span<const float> x, int64_t tokens,
                                       std::span<float> out) const {
  fake_quantize(*v_, layer, kv_head, x, tokens, out);
}

}  // namespace oscar::eval
