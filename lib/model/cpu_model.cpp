#include "lib/model/cpu_model.h"

#include <tbb/parallel_for.h>

#include <cmath>
#include <optional>
#include <random>
#include <string>

#include "formats/error.h"
#include "lib/model/gemm.h"
#include "lib/model/rope.h"

namespace oscar::model {

KvCache::KvCache(const fmt::ModelConfig& cfg, int64_t capacity) : capacity_(capacity) {
  if (capacity <= 0) throw Error("KvCache", "capacity must be positive, got " + std::to_string(capacity));
  const size_t per_layer = static_cast<size_t>(cfg.num_kv_heads * capacity * cfg.head_dim);
  k_.assign(static_cast<size_t>(cfg.num_layers), std::vector<float>(per_layer, 0.f));
  v_.assign(static_cast<size_t>(cfg.num_layers), std::vector<float>(per_layer, 0.f));
}

namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

struct LayerWeights {
  std::vector<float> input_norm, post_attention_norm;
  std::vector<float> q_norm, k_norm;          // empty unless qk_norm
  std::vector<float> q_bias, k_bias, v_bias;  // empty when the checkpoint has none
  WeightMatrix q, k, v, o, gate, up, down;
};

void rms_norm_rows(const float* x, int64_t rows, int64_t n, const float* weight, double eps, float* y) {
  // transformers: x * rsqrt(mean(x²) + eps) * w, all in fp32. The mean is accumulated in double so that the
  // result is the correctly rounded fp32 value rather than depending on a summation order.
  tbb::parallel_for(int64_t{0}, rows, [&](int64_t r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    double sum_sq = 0;
    for (int64_t i = 0; i < n; ++i) sum_sq += static_cast<double>(xr[i]) * xr[i];
    const float variance = static_cast<float>(sum_sq / static_cast<double>(n));
    const float inv_rms = static_cast<float>(1.0 / std::sqrt(static_cast<double>(variance + static_cast<float>(eps))));
    for (int64_t i = 0; i < n; ++i) yr[i] = weight[i] * (xr[i] * inv_rms);
  });
}

// [T, heads*d] (projection output) -> [heads, T, d] (the observer / cache layout).
void to_head_major(const float* x, int64_t T, int64_t heads, int64_t d, float* y) {
  tbb::parallel_for(int64_t{0}, heads, [&](int64_t h) {
    for (int64_t t = 0; t < T; ++t) std::copy_n(x + t * heads * d + h * d, d, y + (h * T + t) * d);
  });
}

class CpuModelImpl final : public CpuModel {
 public:
  const fmt::ModelConfig& config() const override { return cfg_; }
  const fmt::TensorStore* weights() const override { return store_ ? &*store_ : nullptr; }

  std::vector<float> forward(std::span<const int32_t> ids, KvCache& cache, const ForwardOptions& opt) override;

  static std::unique_ptr<CpuModelImpl> from_store(const fmt::ModelConfig& cfg, fmt::TensorStore store);
  static std::unique_ptr<CpuModelImpl> from_random(const fmt::ModelConfig& cfg, uint64_t seed);

 private:
  void check_config() const;
  // Owned fp32 storage (random models, and checkpoint tensors of dtypes the GEMM cannot widen). Inner vectors'
  // buffers do not move when the outer vector grows, so WeightMatrix pointers into them stay valid.
  std::vector<std::vector<float>> owned_;
  const float* own(std::vector<float> v) {
    owned_.push_back(std::move(v));
    return owned_.back().data();
  }

  fmt::ModelConfig cfg_;
  std::optional<fmt::TensorStore> store_;
  std::vector<float> inv_freq_;
  WeightMatrix embed_, lm_head_;
  std::vector<float> final_norm_;
  std::vector<LayerWeights> layers_;
};

void CpuModelImpl::check_config() const {
  const auto& c = cfg_;
  if (c.sliding_window)
    throw Error("config.json: sliding_window",
                "sliding-window attention (window " + std::to_string(*c.sliding_window) +
                    ") is not supported by the CPU reference forward; it computes full causal attention only");
  if (c.hidden_size <= 0 || c.num_layers <= 0 || c.num_heads <= 0 || c.num_kv_heads <= 0 || c.head_dim <= 0 ||
      c.intermediate_size <= 0 || c.vocab_size <= 0)
    throw Error("config.json", "model dimensions must be positive");
  if (c.num_heads % c.num_kv_heads != 0)
    throw Error("config.json: num_key_value_heads", "num_attention_heads (" + std::to_string(c.num_heads) +
                                                         ") is not a multiple of num_key_value_heads (" +
                                                         std::to_string(c.num_kv_heads) + ")");
  if (c.head_dim % 2 != 0) throw Error("config.json: head_dim", "RoPE needs an even head_dim");
}

std::unique_ptr<CpuModelImpl> CpuModelImpl::from_store(const fmt::ModelConfig& cfg, fmt::TensorStore store) {
  auto m = std::make_unique<CpuModelImpl>();
  m->cfg_ = cfg;
  m->check_config();
  m->store_.emplace(std::move(store));
  m->inv_freq_ = rope_inv_freq(cfg);
  const fmt::TensorStore& st = *m->store_;

  auto view = [&](const std::string& name, std::vector<int64_t> shape) -> const fmt::TensorView& {
    const fmt::TensorView& t = st.get(name);
    if (t.shape != shape)
      throw Error(t.file.string() + ": tensor " + name,
                  "shape " + shape_str(t.shape) + " but config.json implies " + shape_str(shape));
    if (!fmt::is_float(t.dtype))
      throw Error(t.file.string() + ": tensor " + name,
                  "dtype " + std::string(fmt::dtype_name(t.dtype)) + " is not a float type");
    return t;
  };
  auto matrix = [&](const std::string& name, int64_t rows, int64_t cols) {
    const fmt::TensorView& t = view(name, {rows, cols});
    WeightMatrix w{name, t.dtype, t.data, rows, cols};
    if (t.dtype != fmt::DType::F32 && t.dtype != fmt::DType::BF16 && t.dtype != fmt::DType::F16) {
      w.dtype = fmt::DType::F32;
      w.data = reinterpret_cast<const std::byte*>(m->own(fmt::to_f32(t)));
    }
    return w;
  };
  auto vec = [&](const std::string& name, int64_t n) { return fmt::to_f32(view(name, {n})); };

  const int64_t H = cfg.hidden_size, I = cfg.intermediate_size;
  m->embed_ = matrix("model.embed_tokens.weight", cfg.vocab_size, H);
  m->final_norm_ = vec("model.norm.weight", H);
  if (cfg.tie_word_embeddings) {
    m->lm_head_ = m->embed_;
  } else {
    m->lm_head_ = matrix("lm_head.weight", cfg.vocab_size, H);
  }
  m->layers_.resize(static_cast<size_t>(cfg.num_layers));
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LayerWeights& L = m->layers_[l];
    L.input_norm = vec(p + "input_layernorm.weight", H);
    L.post_attention_norm = vec(p + "post_attention_layernorm.weight", H);
    L.q = matrix(p + "self_attn.q_proj.weight", cfg.q_dim(), H);
    L.k = matrix(p + "self_attn.k_proj.weight", cfg.kv_dim(), H);
    L.v = matrix(p + "self_attn.v_proj.weight", cfg.kv_dim(), H);
    L.o = matrix(p + "self_attn.o_proj.weight", H, cfg.q_dim());
    // Qwen2 checkpoints carry q/k/v biases whatever the config says, so the tensors decide; a config that
    // promises biases makes them mandatory.
    auto bias = [&](const std::string& proj, int64_t n) {
      const std::string name = p + "self_attn." + proj + ".bias";
      if (st.contains(name) || cfg.attention_bias) return vec(name, n);
      return std::vector<float>{};
    };
    L.q_bias = bias("q_proj", cfg.q_dim());
    L.k_bias = bias("k_proj", cfg.kv_dim());
    L.v_bias = bias("v_proj", cfg.kv_dim());
    if (cfg.qk_norm) {
      L.q_norm = vec(p + "self_attn.q_norm.weight", cfg.head_dim);
      L.k_norm = vec(p + "self_attn.k_norm.weight", cfg.head_dim);
    }
    L.gate = matrix(p + "mlp.gate_proj.weight", I, H);
    L.up = matrix(p + "mlp.up_proj.weight", I, H);
    L.down = matrix(p + "mlp.down_proj.weight", H, I);
  }
  return m;
}

std::unique_ptr<CpuModelImpl> CpuModelImpl::from_random(const fmt::ModelConfig& cfg, uint64_t seed) {
  auto m = std::make_unique<CpuModelImpl>();
  m->cfg_ = cfg;
  m->check_config();
  m->inv_freq_ = rope_inv_freq(cfg);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  auto randn = [&](int64_t n) {
    std::vector<float> v(static_cast<size_t>(n));
    for (float& x : v) x = 0.02f * normal(rng);
    return v;
  };
  auto matrix = [&](const std::string& name, int64_t rows, int64_t cols) {
    return WeightMatrix{name, fmt::DType::F32, reinterpret_cast<const std::byte*>(m->own(randn(rows * cols))), rows,
                        cols};
  };
  auto ones = [](int64_t n) { return std::vector<float>(static_cast<size_t>(n), 1.f); };
  const int64_t H = cfg.hidden_size, I = cfg.intermediate_size;
  m->embed_ = matrix("model.embed_tokens.weight", cfg.vocab_size, H);
  m->final_norm_ = ones(H);
  m->lm_head_ = cfg.tie_word_embeddings ? m->embed_ : matrix("lm_head.weight", cfg.vocab_size, H);
  m->layers_.resize(static_cast<size_t>(cfg.num_layers));
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LayerWeights& L = m->layers_[l];
    L.input_norm = ones(H);
    L.post_attention_norm = ones(H);
    L.q = matrix(p + "self_attn.q_proj.weight", cfg.q_dim(), H);
    L.k = matrix(p + "self_attn.k_proj.weight", cfg.kv_dim(), H);
    L.v = matrix(p + "self_attn.v_proj.weight", cfg.kv_dim(), H);
    L.o = matrix(p + "self_attn.o_proj.weight", H, cfg.q_dim());
    if (cfg.attention_bias) {
      L.q_bias = randn(cfg.q_dim());
      L.k_bias = randn(cfg.kv_dim());
      L.v_bias = randn(cfg.kv_dim());
    }
    if (cfg.qk_norm) {
      L.q_norm = ones(cfg.head_dim);
      L.k_norm = ones(cfg.head_dim);
    }
    L.gate = matrix(p + "mlp.gate_proj.weight", I, H);
    L.up = matrix(p + "mlp.up_proj.weight", I, H);
    L.down = matrix(p + "mlp.down_proj.weight", H, I);
  }
  return m;
}

std::vector<float> CpuModelImpl::forward(std::span<const int32_t> ids, KvCache& cache, const ForwardOptions& opt) {
  const auto& c = cfg_;
  const int64_t T = static_cast<int64_t>(ids.size());
  const int64_t pos0 = cache.length();
  const int64_t H = c.hidden_size, I = c.intermediate_size, d = c.head_dim;
  const int64_t nh = c.num_heads, nkv = c.num_kv_heads, qd = c.q_dim(), kvd = c.kv_dim();
  if (T == 0) throw Error("forward", "no input tokens");
  if (cache.num_layers() != c.num_layers)
    throw Error("forward", "KV cache has " + std::to_string(cache.num_layers()) + " layers, the model " +
                               std::to_string(c.num_layers));
  if (pos0 + T > cache.capacity())
    throw Error("forward", "KV cache overflow: " + std::to_string(pos0) + " cached + " + std::to_string(T) +
                               " new tokens > capacity " + std::to_string(cache.capacity()));
  for (int64_t t = 0; t < T; ++t)
    if (ids[t] < 0 || ids[t] >= c.vocab_size)
      throw Error("forward: input id at " + std::to_string(t),
                  std::to_string(ids[t]) + " is outside the vocabulary [0, " + std::to_string(c.vocab_size) + ")");

  std::vector<float> x(static_cast<size_t>(T * H)), h(x.size()), proj_out(x.size());
  std::vector<float> q(static_cast<size_t>(T * qd)), k(static_cast<size_t>(T * kvd)), v(k.size());
  std::vector<float> q_hm(q.size()), k_pre_hm(k.size()), k_hm(k.size()), v_hm(k.size()), attn(q.size());
  std::vector<float> gate(static_cast<size_t>(T * I)), up(gate.size());

  tbb::parallel_for(int64_t{0}, T, [&](int64_t t) { widen_rows(embed_, ids[t], 1, x.data() + t * H); });
  const RopeTables rope = rope_tables(inv_freq_, pos0, T);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));

  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& L = layers_[l];
    rms_norm_rows(x.data(), T, H, L.input_norm.data(), c.rms_norm_eps, h.data());
    linear(h.data(), T, L.q, L.q_bias.empty() ? nullptr : L.q_bias.data(), q.data());
    linear(h.data(), T, L.k, L.k_bias.empty() ? nullptr : L.k_bias.data(), k.data());
    linear(h.data(), T, L.v, L.v_bias.empty() ? nullptr : L.v_bias.data(), v.data());
    if (!L.q_norm.empty()) {
      // Qwen3: RMSNorm over each head's d channels (rows of length d), before RoPE.
      rms_norm_rows(q.data(), T * nh, d, L.q_norm.data(), c.rms_norm_eps, q.data());
      rms_norm_rows(k.data(), T * nkv, d, L.k_norm.data(), c.rms_norm_eps, k.data());
    }
    to_head_major(q.data(), T, nh, d, q_hm.data());
    to_head_major(k.data(), T, nkv, d, k_pre_hm.data());
    to_head_major(v.data(), T, nkv, d, v_hm.data());
    k_hm = k_pre_hm;
    apply_rope(q_hm.data(), nh, d, rope);
    apply_rope(k_hm.data(), nkv, d, rope);

    float* kc = cache.k(l);
    float* vc = cache.v(l);
    const int64_t cap = cache.capacity();
    for (int64_t g = 0; g < nkv; ++g) {
      std::copy_n(k_hm.data() + g * T * d, T * d, kc + (g * cap + pos0) * d);
      std::copy_n(v_hm.data() + g * T * d, T * d, vc + (g * cap + pos0) * d);
    }
    if (opt.observer) {
      AttentionInputs in;
      in.layer = l;
      in.num_tokens = T;
      in.pos0 = pos0;
      in.num_heads = nh;
      in.num_kv_heads = nkv;
      in.head_dim = d;
      in.q = q_hm.data();
      in.k_pre_rope = k_pre_hm.data();
      in.k = k_hm.data();
      in.v = v_hm.data();
      opt.observer->on_attention_inputs(in);
    }
    AttentionCall call;
    call.layer = l;
    call.num_tokens = T;
    call.pos0 = pos0;
    call.num_heads = nh;
    call.num_kv_heads = nkv;
    call.head_dim = d;
    call.cache_stride = cap;
    call.scale = scale;
    call.q = q_hm.data();
    call.k = kc;
    call.v = vc;
    call.out = attn.data();
    if (opt.attention)
      opt.attention->attend(call);
    else
      exact_attention(call);

    linear(attn.data(), T, L.o, nullptr, proj_out.data());
    for (size_t i = 0; i < x.size(); ++i) x[i] += proj_out[i];

    rms_norm_rows(x.data(), T, H, L.post_attention_norm.data(), c.rms_norm_eps, h.data());
    linear(h.data(), T, L.gate, nullptr, gate.data());
    linear(h.data(), T, L.up, nullptr, up.data());
    tbb::parallel_for(size_t{0}, gate.size(), [&](size_t i) {
      const float g = gate[i];
      gate[i] = g / (1.0f + std::exp(-g)) * up[i];  // SiLU(gate) * up, as torch's silu computes it
    });
    linear(gate.data(), T, L.down, nullptr, proj_out.data());
    for (size_t i = 0; i < x.size(); ++i) x[i] += proj_out[i];
  }
  cache.set_length(pos0 + T);

  const int64_t first_row = opt.last_logits_only ? T - 1 : 0;
  const int64_t rows = T - first_row;
  rms_norm_rows(x.data() + first_row * H, rows, H, final_norm_.data(), c.rms_norm_eps, h.data());
  std::vector<float> logits(static_cast<size_t>(rows * c.vocab_size));
  linear(h.data(), rows, lm_head_, nullptr, logits.data());
  return logits;
}

}  // namespace

std::unique_ptr<CpuModel> CpuModel::load(const std::filesystem::path& model_dir) {
  const fmt::ModelConfig cfg = fmt::ModelConfig::from_dir(model_dir);
  if (cfg.sliding_window)
    throw Error((model_dir / "config.json").string() + ": sliding_window",
                "sliding-window attention is not supported by the CPU reference forward");
  return CpuModelImpl::from_store(cfg, fmt::TensorStore::open(model_dir));
}

std::unique_ptr<CpuModel> CpuModel::random(const fmt::ModelConfig& cfg, uint64_t seed) {
  return CpuModelImpl::from_random(cfg, seed);
}

}  // namespace oscar::model
