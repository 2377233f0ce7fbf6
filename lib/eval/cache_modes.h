#pragma once
// The KV-cache formats `oscar eval` compares, each reduced to "what the cache returns for a head vector": a
// quantize-dequantize of K and V per layer and KV head. Every format goes through the reference quantizer
// (lib/calib/quantizer_ref.h); nothing here re-derives quantization arithmetic.
//
//   bf16       K/V rounded to bf16 (the baseline every other mode is compared with)
//   oscar      the bundle's per-layer R_k / R_v and clip ratios, per-token asymmetric INT2 (fp16 scale/zero)
//              (bundle 1.2: codes chosen by the bundle's error-feedback tables, calib::error_feedback_codes_stored)
//              (bundle 2.0: per-KV-head storage transforms y = (x − μ)·A in place of R, lib/calib/kv_transform.h)
//   int2       per-token asymmetric INT2 over the whole head, no rotation, no clipping
//   hadamard2  y = x · D·H (D: seeded random ±1 signs, H: normalized Sylvester Hadamard) + per-token INT2, no clip
//   kivi2      KIVI: K per channel over groups of 32 tokens, V per token in groups of 32 channels, both INT2 with
//              fp16 scale/zero per group, and KIVI's 128-token bf16 residual
//   int4       per-token asymmetric INT4, no rotation, no clipping
//   fp8        e4m3 with one fp16 scale per head vector
//
// Windows: in every mode the first `sink` tokens and the tokens in the recent window of the reading query stay
// bf16 (the same windows for all modes, so modes differ only in how the middle of the cache is stored). kivi2's
// recent window is at least its residual (KIVI's residual is part of the method, and stays with --no-windows).
#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "formats/bundle.h"
#include "formats/kv_quant_spec.h"
#include "formats/model_config.h"
#include "lib/calib/quantizer_ref.h"

namespace oscar::eval {

enum class CacheMode { BF16, Oscar, Int2, Hadamard2, Kivi2, Int4, Fp8 };
inline constexpr std::array<CacheMode, 7> kAllCacheModes = {CacheMode::BF16,  CacheMode::Oscar,     CacheMode::Int2,
                                                            CacheMode::Kivi2, CacheMode::Hadamard2, CacheMode::Int4,
                                                            CacheMode::Fp8};

std::string_view cache_mode_name(CacheMode mode);  // "bf16", "oscar", "int2", "hadamard2", "kivi2", "int4", "fp8"
CacheMode parse_cache_mode(std::string_view name, const std::string& where);
// "bf16,int2, kivi2" -> modes in the given order; duplicates and unknown names are errors naming `where`.
std::vector<CacheMode> parse_cache_modes(std::string_view csv, const std::string& where);

// Which cached tokens a query reads in bf16.
struct CacheWindows {
  int64_t sink = 64;     // tokens 0 .. sink-1
  int64_t recent = 256;  // for the query at t: keys t-recent+1 .. t
};

// Whether the query at position `query` reads key `key` (key <= query) from the quantized copy. Tokens are
// quantized in groups of `group_tokens` consecutive tokens counted from the end of the sink (1 = per token; KIVI
// keys: 32), and a group is read quantized only once ALL its tokens have left the recent window. For
// group_tokens == 1 this is the plain rule key >= sink && key <= query - recent, which is what a decode cache
// that quantizes a token the moment it leaves the window holds (formats/kv_layout.h is_high_precision_token with
// seq_len = query + 1).
constexpr bool reads_quantized(int64_t query, int64_t key, CacheWindows w, int64_t group_tokens = 1) {
  if (key < w.sink) return false;
  const int64_t group_end = w.sink + ((key - w.sink) / group_tokens + 1) * group_tokens;
  return group_end <= query + 1 - w.recent;
}

// The first query position that reads any quantized key (positions before it see a bf16-only cache).
constexpr int64_t first_query_reading_quantized(CacheWindows w, int64_t group_tokens = 1) {
  return w.sink + group_tokens - 1 + w.recent;
}

struct ModeOptions {
  CacheWindows windows;
  uint64_t seed = 0;                     // hadamard2's random signs (one sign vector per layer, K and V apart)
  int64_t kivi_key_group_tokens = 32;    // KIVI group size along tokens for per-channel keys
  int64_t kivi_value_group_channels = 32;  // KIVI group size along channels for per-token values (capped at head_dim)
  int64_t kivi_residual = 128;           // KIVI's bf16 residual: kivi2's recent window is at least this
  const fmt::Bundle* bundle = nullptr;   // needed by oscar (not owned; must outlive the CacheFormat)
  // oscar: rebuild the bundle's error-feedback key tables for positions 0..N-1 (calib::bundle_for_context; needs a
  // bundle 1.3 with stored key metrics); 0 = the tables as stored.
  int64_t key_table_context = 0;
  // Optional: replaces how the per-token modes choose a head vector's codes (experiments such as error-feedback
  // rounding, lib/calib/error_feedback.h, that keep the storage format). Called with the mode's own rotation and
  // clip ratio of (layer, kv_head); returns false to fall back to the mode's quantizer. Not used by kivi2 keys, nor
  // by tensors with a storage transform (bundle 2.0), whose basis is not a rotation.
  std::function<bool(bool keys, int64_t layer, int64_t kv_head, std::span<const float> x, int64_t tokens,
                     std::span<const float> rotation, float clip_ratio, std::span<float> out)>
      rounding_hook;
};

// How many bits one quantized element costs, scale/zero included (bf16 window tokens are accounted separately).
struct ElementCost {
  double key_bits = 16.0;
  double value_bits = 16.0;
};

// One cache format for one model.
class CacheFormat {
 public:
  // Throws oscar::Error(where, ...) when the mode cannot be built: oscar without a bundle or with a bundle of
  // another shape, hadamard2 at a head_dim that is not a power of two, KIVI groups that do not divide head_dim.
  static std::unique_ptr<CacheFormat> create(CacheMode mode, const fmt::ModelConfig& cfg, const ModeOptions& opt,
                                             const std::string& where = "--modes");
  ~CacheFormat();

  CacheMode mode() const { return mode_; }
  std::string_view name() const { return cache_mode_name(mode_); }
  int64_t head_dim() const { return head_dim_; }
  int64_t num_layers() const { return num_layers_; }
  int64_t num_kv_heads() const { return num_kv_heads_; }
  // The windows this mode reads with (kivi2: recent >= kivi_residual).
  CacheWindows windows() const { return windows_; }
  // Tokens quantized together: 1 for every per-token format, KIVI's key group for kivi2 keys.
  int64_t key_group_tokens() const { return key_group_tokens_; }
  int64_t value_group_tokens() const { return 1; }
  ElementCost element_cost() const { return cost_; }

  // Quantize-dequantize `tokens` consecutive head vectors x [tokens, head_dim] of (layer, kv_head) into out, in
  // the original basis. For keys, `tokens` must be a multiple of key_group_tokens() (one call per whole group).
  // x and out may alias.
  void fake_quantize_keys(int64_t layer, int64_t kv_head, std::span<const float> x, int64_t tokens,
                          std::span<float> out) const;
  void fake_quantize_values(int64_t layer, int64_t kv_head, std::span<const float> x, int64_t tokens,
                            std::span<float> out) const;

 private:
  CacheFormat() = default;
  struct TensorCodec;  // one of K or V: quantizer, per-layer rotations and clip ratios
  void fake_quantize(const TensorCodec& codec, int64_t layer, int64_t kv_head, std::span<const float> x,
                     int64_t tokens, std::span<float> out) const;

  CacheMode mode_ = CacheMode::BF16;
  int64_t head_dim_ = 0, num_layers_ = 0, num_kv_heads_ = 0;
  CacheWindows windows_;
  int64_t key_group_tokens_ = 1;
  bool keys_per_channel_ = false;  // kivi2
  ElementCost cost_;
  std::unique_ptr<TensorCodec> k_, v_;
  decltype(ModeOptions::rounding_hook) rounding_hook_;
};

// What every mode does to high-precision (window) tokens: round to bf16, round to nearest even.
void round_to_bf16(std::span<const float> x, std::span<float> out);

// The random-sign Hadamard rotation R = D·H (row-major d x d, orthogonal) of hadamard2; d must be 2^k.
std::vector<float> random_sign_hadamard(int64_t d, uint64_t seed);

}  // namespace oscar::eval
