#include "lib/eval/simulated_attention.h"

#include <fmt/format.h>
#include <tbb/parallel_for.h>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <limits>

#include "formats/error.h"

namespace oscar::eval {
namespace {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstRowMap = Eigen::Map<const RowMatrix>;

// Query rows per task: large enough for the GEMMs to run at speed, small enough that a 32k-token prefill still
// splits into many tasks.
constexpr int64_t kQueryBlock = 64;

}  // namespace

SimulatedCacheAttention::SimulatedCacheAttention(const CacheFormat& format)
    : format_(format), layers_(static_cast<size_t>(format.num_layers())) {}

int64_t SimulatedCacheAttention::quantized_keys(int64_t layer) const {
  const auto& s = layers_.at(static_cast<size_t>(layer));
  return std::max<int64_t>(0, s.k_quantized - std::min(format_.windows().sink, s.k_quantized));
}
int64_t SimulatedCacheAttention::quantized_values(int64_t layer) const {
  const auto& s = layers_.at(static_cast<size_t>(layer));
  return std::max<int64_t>(0, s.v_quantized - std::min(format_.windows().sink, s.v_quantized));
}

void SimulatedCacheAttention::update_copies(const model::AttentionCall& c, LayerState& s) const {
  const int64_t d = c.head_dim, kvh = c.num_kv_heads;
  const CacheWindows w = format_.windows();
  if (c.pos0 == 0 || s.stride != c.cache_stride) {
    if (c.pos0 != 0)
      throw Error("SimulatedCacheAttention",
                  ::fmt::format("layer {}: the cache capacity changed in the middle of a sequence", c.layer));
    s = LayerState{};
    s.stride = c.cache_stride;
    const auto n = static_cast<size_t>(kvh * s.stride * d);
    s.k_bf16.assign(n, 0.f);
    s.v_bf16.assign(n, 0.f);
    s.k_quant.assign(n, 0.f);
    s.v_quant.assign(n, 0.f);
    // Sink tokens are never quantized: the quantized copies start after them.
    s.k_quantized = s.v_quantized = w.sink;
  }
  if (c.pos0 != s.length)
    throw Error("SimulatedCacheAttention", ::fmt::format("layer {}: call at position {} does not continue a sequence "
                                                         "of {} tokens",
                                                         c.layer, c.pos0, s.length));
  const int64_t total = c.pos0 + c.num_tokens;
  for (int64_t h = 0; h < kvh; ++h) {
    const size_t off = static_cast<size_t>((h * c.cache_stride + c.pos0) * d);
    const auto n = static_cast<size_t>(c.num_tokens * d);
    round_to_bf16({c.k + off, n}, {s.k_bf16.data() + off, n});
    round_to_bf16({c.v + off, n}, {s.v_bf16.data() + off, n});
  }
  s.length = total;

  // A decode cache quantizes a token when it leaves the recent window of the newest query, from what it held in
  // bf16 until then; groups (KIVI keys) only once the whole group has left. Quantizing here exactly the tokens the
  // newest query already reads quantized keeps "once, when needed" and makes the result independent of how the
  // sequence was split into calls.
  const int64_t limit = total - w.recent;  // tokens [.., limit) are outside the newest query's window
  const int64_t gk = format_.key_group_tokens();
  auto quantize = [&](bool keys, int64_t& done, int64_t group) {
    const int64_t end = done + std::max<int64_t>(0, (limit - done) / group) * group;
    if (end <= done) return;
    for (int64_t h = 0; h < kvh; ++h) {
      const size_t off = static_cast<size_t>((h * s.stride + done) * d);
      const auto n = static_cast<size_t>((end - done) * d);
      if (keys)
        format_.fake_quantize_keys(c.layer, h, {s.k_bf16.data() + off, n}, end - done, {s.k_quant.data() + off, n});
      else
        format_.fake_quantize_values(c.layer, h, {s.v_bf16.data() + off, n}, end - done,
                                     {s.v_quant.data() + off, n});
    }
    done = end;
  };
  quantize(true, s.k_quantized, gk);
  quantize(false, s.v_quantized, format_.value_group_tokens());
}

void SimulatedCacheAttention::attend(const model::AttentionCall& c) {
  if (c.layer < 0 || c.layer >= format_.num_layers() || c.num_kv_heads != format_.num_kv_heads() ||
      c.head_dim != format_.head_dim())
    throw Error("SimulatedCacheAttention",
                ::fmt::format("call (layer {}, {} KV heads, head_dim {}) does not match the cache format ({} layers, "
                              "{} KV heads, head_dim {})",
                              c.layer, c.num_kv_heads, c.head_dim, format_.num_layers(), format_.num_kv_heads(),
                              format_.head_dim()));
  if (c.num_heads <= 0 || c.num_heads % c.num_kv_heads != 0)
    throw Error("SimulatedCacheAttention", "num_heads must be a positive multiple of num_kv_heads");
  if (c.pos0 + c.num_tokens > c.cache_stride) throw Error("SimulatedCacheAttention", "keys beyond the cache capacity");
  LayerState& s = layers_[static_cast<size_t>(c.layer)];
  update_copies(c, s);

  const int64_t T = c.num_tokens, d = c.head_dim, group = c.num_heads / c.num_kv_heads;
  const int64_t out_stride = c.num_heads * d;
  const CacheWindows w = format_.windows();
  const int64_t gk = format_.key_group_tokens(), gv = format_.value_group_tokens();
  const int64_t blocks = (T + kQueryBlock - 1) / kQueryBlock;
  const int64_t sink = w.sink;

  tbb::parallel_for(int64_t{0}, c.num_heads * blocks, [&](int64_t job) {
    const int64_t h = job / blocks, b = job % blocks;
    const int64_t kvh = h / group;
    const int64_t t0 = b * kQueryBlock, t1 = std::min(T, t0 + kQueryBlock), rows = t1 - t0;
    const int64_t num_keys = c.pos0 + t1;  // causal: the block's last query sees keys 0 .. pos0+t1-1
    const size_t head_off = static_cast<size_t>(kvh * s.stride * d);
    ConstRowMap q(c.q + (h * T + t0) * d, rows, d);
    ConstRowMap k_bf16(s.k_bf16.data() + head_off, num_keys, d);
    ConstRowMap v_bf16(s.v_bf16.data() + head_off, num_keys, d);

    RowMatrix scores = q * k_bf16.transpose();
    // Keys with a quantized copy that some row of this block may read: [sink, k_end).
    const int64_t k_end = std::min(s.k_quantized, num_keys);
    if (k_end > sink) {
      ConstRowMap k_quant(s.k_quant.data() + head_off + static_cast<size_t>(sink * d), k_end - sink, d);
      const RowMatrix quant_scores = q * k_quant.transpose();
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t pos = c.pos0 + t0 + r;
        for (int64_t j = sink; j < k_end; ++j)
          if (reads_quantized(pos, j, w, gk)) scores(r, j) = quant_scores(r, j - sink);
      }
    }
    // Softmax per row over keys 0 .. pos in fp32 (transformers eager: (q·kᵀ)·scale, then softmax).
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t pos = c.pos0 + t0 + r;
      float max_score = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j <= pos; ++j) {
        scores(r, j) *= c.scale;
        max_score = std::max(max_score, scores(r, j));
      }
      float sum = 0.f;
      for (int64_t j = 0; j <= pos; ++j) {
        scores(r, j) = std::exp(scores(r, j) - max_score);
        sum += scores(r, j);
      }
      const float inv_sum = 1.0f / sum;
      for (int64_t j = 0; j <= pos; ++j) scores(r, j) *= inv_sum;
      for (int64_t j = pos + 1; j < num_keys; ++j) scores(r, j) = 0.f;
    }
    RowMatrix out;
    const int64_t v_end = std::min(s.v_quantized, num_keys);
    if (v_end > sink) {
      // The probabilities of keys whose value is read quantized move to their own matrix, so P·V is the sum of a
      // bf16 product and a quantized product.
      RowMatrix quant_probs = RowMatrix::Zero(rows, v_end - sink);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t pos = c.pos0 + t0 + r;
        for (int64_t j = sink; j < v_end; ++j)
          if (reads_quantized(pos, j, w, gv)) {
            quant_probs(r, j - sink) = scores(r, j);
            scores(r, j) = 0.f;
          }
      }
      ConstRowMap v_quant(s.v_quant.data() + head_off + static_cast<size_t>(sink * d), v_end - sink, d);
      out.noalias() = scores * v_bf16;
      out.noalias() += quant_probs * v_quant;
    } else {
      out.noalias() = scores * v_bf16;
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* dst = c.out + (t0 + r) * out_stride + h * d;
      for (int64_t i = 0; i < d; ++i) dst[i] = out(r, i);
    }
  });
}

}  // namespace oscar::eval
