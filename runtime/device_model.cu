#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "formats/error.h"
#include "formats/safetensors.h"
#include "kernels/activation/swiglu.h"
#include "kernels/attention_prefill/attention_prefill.h"
#include "kernels/embedding/embedding.h"
#include "kernels/norm/rmsnorm.h"
#include "kernels/rope/rope_qkv.h"
#include "lib/model/cpu_model.h"
#include "runtime/device_buffer.h"
#include "runtime/device_model.h"
#include "runtime/lt_gemm.h"

namespace oscar::rt {

// ---------------------------------------------------------------------------------------------------------------
// PackedBatch

PackedBatch PackedBatch::from_sequences(std::span<const std::vector<int32_t>> sequences) {
  PackedBatch b;
  for (const auto& s : sequences) b.add_sequence(s);
  return b;
}

void PackedBatch::add_sequence(std::span<const int32_t> sequence_ids) {
  if (cu_seqlens.empty()) cu_seqlens.push_back(0);
  if (ids.size() + sequence_ids.size() > 0x7fffffffu)
    throw Error("PackedBatch", "more than 2^31 tokens in one batch");
  ids.insert(ids.end(), sequence_ids.begin(), sequence_ids.end());
  cu_seqlens.push_back(static_cast<int32_t>(ids.size()));
}

int32_t PackedBatch::max_seqlen() const {
  int32_t m = 0;
  for (size_t s = 0; s + 1 < cu_seqlens.size(); ++s) m = std::max(m, cu_seqlens[s + 1] - cu_seqlens[s]);
  return m;
}

// ---------------------------------------------------------------------------------------------------------------
// Small device kernels that belong to the model rather than to an op family.

namespace {

__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Element i of a random tensor depends only on (stream_key, i): the same weights come out whatever the launch
// shape, device or order of tensors.
__global__ void fill_uniform_kernel(void* out, bool as_bf16, int64_t n, uint64_t stream_key, float offset,
                                    float half_width) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const uint64_t bits = splitmix64(stream_key + static_cast<uint64_t>(i));
    const float unit = static_cast<float>(bits >> 40) * (1.0f / 16777216.0f);  // 24 bits -> [0, 1)
    const float v = offset + half_width * (2.f * unit - 1.f);
    if (as_bf16)
      static_cast<uint16_t*>(out)[i] = __bfloat16_as_ushort(__float2bfloat16_rn(v));
    else
      static_cast<float*>(out)[i] = v;
  }
}

// Copies row rows[i] of src [*, n] to row i of dst (bf16): the last token of each sequence for LastPerSequence.
__global__ void gather_rows_kernel(const uint16_t* __restrict__ src, const int32_t* __restrict__ rows, int64_t n,
                                   uint16_t* __restrict__ dst) {
  const int64_t r = rows[blockIdx.x];
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[blockIdx.x * n + i] = src[r * n + i];
}

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

void check(kern::Status s, const std::string& where) {
  if (s != kern::Status::Ok) throw Error(where, "kernel launch refused: " + std::string(kern::status_name(s)));
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Model state

struct LayerWeights {
  DeviceBuffer input_norm, post_attention_norm;  // bf16 [H]
  DeviceBuffer q_norm, k_norm;                   // bf16 [d], Qwen3 only
  DeviceBuffer qkv;                              // bf16 [q_dim + 2 kv_dim, H]: q_proj, k_proj, v_proj stacked
  DeviceBuffer qkv_bias;                         // fp32 [q_dim + 2 kv_dim], empty without biases
  DeviceBuffer o;                                // bf16 [H, q_dim]
  DeviceBuffer gate_up;                          // bf16 [2 I, H]: gate_proj, up_proj stacked
  DeviceBuffer down;                             // bf16 [H, I]
};

// Per-forward scratch, grown to the largest batch seen and then reused.
struct Scratch {
  DeviceBuffer tokens;  // int32: ids [T], positions [T], cu_seqlens [S + 1], last rows [S]
  DeviceBuffer x;       // fp32 [T, H] residual stream
  DeviceBuffer normed;  // bf16 [T, H]
  DeviceBuffer qkv;     // fp32 [T, q_dim + 2 kv_dim]
  DeviceBuffer q, k, v;  // bf16 [T, q_dim], [T, kv_dim], [T, kv_dim]
  DeviceBuffer attn;     // bf16 [T, q_dim]
  DeviceBuffer proj;     // fp32 [T, H]: o_proj and down_proj outputs before the residual add
  DeviceBuffer gate_up;  // bf16 [T, 2 I]
  DeviceBuffer act;      // bf16 [T, I]
  DeviceBuffer obs_q, obs_k_pre, obs_k, obs_v;  // fp32 observer copies
  DeviceBuffer last_normed;                     // bf16 [S, H]
  DeviceBuffer logits;                          // [rows, vocab]
};

struct DeviceModel::Impl {
  fmt::ModelConfig cfg;
  cudaStream_t stream = nullptr;
  std::unique_ptr<LtGemm> gemm;
  DeviceBuffer embed;    // bf16 [V, H]
  DeviceBuffer lm_head;  // bf16 [V, H]; empty when tied (embed is used)
  DeviceBuffer final_norm;
  DeviceBuffer inv_freq;  // fp32 [d / 2]
  std::vector<LayerWeights> layers;
  size_t weight_bytes = 0;
  Scratch scratch;

  ~Impl() {
    if (stream) cudaStreamDestroy(stream);
  }

  const uint16_t* lm_head_weight() const { return (lm_head.empty() ? embed : lm_head).as<uint16_t>(); }

  DeviceBuffer alloc(size_t bytes, const std::string& what) {
    weight_bytes += bytes;
    return DeviceBuffer(bytes, what);
  }
};

namespace {

void validate_config(const fmt::ModelConfig& c, const std::string& where) {
  if (c.hidden_size <= 0 || c.num_layers <= 0 || c.num_heads <= 0 || c.num_kv_heads <= 0 || c.head_dim <= 0 ||
      c.intermediate_size <= 0 || c.vocab_size <= 0)
    throw Error(where, "model dimensions must be positive");
  if (c.num_heads % c.num_kv_heads != 0)
    throw Error(where + ": num_key_value_heads", "num_attention_heads is not a multiple of num_key_value_heads");
  if (c.head_dim % 8 != 0 || c.head_dim > 128)
    throw Error(where + ": head_dim", "the GPU prefill attention supports head_dim a multiple of 8 up to 128, got " +
                                          std::to_string(c.head_dim));
  if (c.sliding_window)
    throw Error(where + ": sliding_window", "sliding-window attention is not supported by the forward pass");
}

std::unique_ptr<DeviceModel::Impl> make_impl(const fmt::ModelConfig& cfg) {
  auto m = std::make_unique<DeviceModel::Impl>();
  m->cfg = cfg;
  // A blocking stream (not cudaStreamNonBlocking): plain cudaMemcpy on the legacy default stream then orders
  // after the forward, so DeviceBuffer::download of an observer's or a test's buffer is always safe.
  check_cuda(cudaStreamCreate(&m->stream), "DeviceModel: cudaStreamCreate");
  m->gemm = std::make_unique<LtGemm>();
  const std::vector<float> inv_freq = model::rope_inv_freq(cfg);
  m->inv_freq = to_device(std::span<const float>(inv_freq), "rope inv_freq");
  m->layers.resize(static_cast<size_t>(cfg.num_layers));
  return m;
}

}  // namespace

DeviceModel::DeviceModel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
DeviceModel::~DeviceModel() = default;
const fmt::ModelConfig& DeviceModel::config() const { return impl_->cfg; }
Stream DeviceModel::stream() const { return reinterpret_cast<Stream>(impl_->stream); }
size_t DeviceModel::weight_bytes() const { return impl_->weight_bytes; }

DeviceWeights DeviceModel::weights() const {
  const Impl& m = *impl_;
  auto bf16 = [](const DeviceBuffer& b) { return b.empty() ? nullptr : b.as<uint16_t>(); };
  DeviceWeights w;
  w.embed = bf16(m.embed);
  w.lm_head = m.lm_head_weight();
  w.final_norm = bf16(m.final_norm);
  w.inv_freq = m.inv_freq.as<float>();
  for (const LayerWeights& L : m.layers)
    w.layers.push_back({bf16(L.input_norm), bf16(L.post_attention_norm), bf16(L.q_norm), bf16(L.k_norm), bf16(L.qkv),
                        L.qkv_bias.empty() ? nullptr : L.qkv_bias.as<float>(), bf16(L.o), bf16(L.gate_up),
                        bf16(L.down)});
  return w;
}

// ---------------------------------------------------------------------------------------------------------------
// Loading

std::unique_ptr<DeviceModel> DeviceModel::load(const std::filesystem::path& model_dir) {
  const fmt::ModelConfig cfg = fmt::ModelConfig::from_dir(model_dir);
  validate_config(cfg, (model_dir / "config.json").string());
  const fmt::TensorStore store = fmt::TensorStore::open(model_dir);
  auto m = make_impl(cfg);
  const int64_t H = cfg.hidden_size, I = cfg.intermediate_size, qd = cfg.q_dim(), kvd = cfg.kv_dim();

  auto view = [&](const std::string& name, const std::vector<int64_t>& shape) -> const fmt::TensorView& {
    const fmt::TensorView& t = store.get(name);
    if (t.shape != shape)
      throw Error(t.file.string() + ": tensor " + name,
                  "shape " + shape_str(t.shape) + " but config.json implies " + shape_str(shape));
    if (!fmt::is_float(t.dtype))
      throw Error(t.file.string() + ": tensor " + name, "dtype " + std::string(fmt::dtype_name(t.dtype)) +
                                                            " is not a float type");
    return t;
  };
  // Converts on the host one tensor at a time (peak host memory: one tensor's bf16 copy), uploads into place.
  auto put_bf16 = [&](DeviceBuffer& dst, size_t element_offset, const std::string& name,
                      const std::vector<int64_t>& shape) {
    const std::vector<uint16_t> bits = fmt::to_bf16(view(name, shape));
    dst.upload(bits.data(), bits.size() * 2, element_offset * 2);
  };
  auto bf16_tensor = [&](const std::string& name, const std::vector<int64_t>& shape) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    DeviceBuffer b = m->alloc(static_cast<size_t>(n) * 2, name);
    put_bf16(b, 0, name, shape);
    return b;
  };

  m->embed = bf16_tensor("model.embed_tokens.weight", {cfg.vocab_size, H});
  m->final_norm = bf16_tensor("model.norm.weight", {H});
  if (!cfg.tie_word_embeddings) m->lm_head = bf16_tensor("lm_head.weight", {cfg.vocab_size, H});

  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    LayerWeights& L = m->layers[l];
    const std::string p = "model.layers." + std::to_string(l) + ".";
    L.input_norm = bf16_tensor(p + "input_layernorm.weight", {H});
    L.post_attention_norm = bf16_tensor(p + "post_attention_layernorm.weight", {H});
    if (cfg.qk_norm) {
      L.q_norm = bf16_tensor(p + "self_attn.q_norm.weight", {cfg.head_dim});
      L.k_norm = bf16_tensor(p + "self_attn.k_norm.weight", {cfg.head_dim});
    }
    L.qkv = m->alloc(static_cast<size_t>((qd + 2 * kvd) * H) * 2, p + "qkv");
    put_bf16(L.qkv, 0, p + "self_attn.q_proj.weight", {qd, H});
    put_bf16(L.qkv, static_cast<size_t>(qd * H), p + "self_attn.k_proj.weight", {kvd, H});
    put_bf16(L.qkv, static_cast<size_t>((qd + kvd) * H), p + "self_attn.v_proj.weight", {kvd, H});
    // Same rule as the CPU reference: the tensors decide (Qwen2 carries biases whatever the config says), and a
    // config that promises biases makes them mandatory.
    const bool has_bias = cfg.attention_bias || store.contains(p + "self_attn.q_proj.bias");
    if (has_bias) {
      std::vector<float> bias;
      bias.reserve(static_cast<size_t>(qd + 2 * kvd));
      for (const auto& [proj, n] : {std::pair{"q_proj", qd}, std::pair{"k_proj", kvd}, std::pair{"v_proj", kvd}}) {
        const std::vector<float> b = fmt::to_f32(view(p + "self_attn." + proj + ".bias", {n}));
        bias.insert(bias.end(), b.begin(), b.end());
      }
      L.qkv_bias = m->alloc(bias.size() * 4, p + "qkv bias");
      L.qkv_bias.upload(bias.data(), bias.size() * 4);
    }
    if (store.contains(p + "self_attn.o_proj.bias"))
      throw Error(store.get(p + "self_attn.o_proj.bias").file.string() + ": tensor " + p + "self_attn.o_proj.bias",
                  "o_proj biases are not supported (neither is the CPU reference)");
    L.o = bf16_tensor(p + "self_attn.o_proj.weight", {H, qd});
    L.gate_up = m->alloc(static_cast<size_t>(2 * I * H) * 2, p + "gate_up");
    put_bf16(L.gate_up, 0, p + "mlp.gate_proj.weight", {I, H});
    put_bf16(L.gate_up, static_cast<size_t>(I * H), p + "mlp.up_proj.weight", {I, H});
    L.down = bf16_tensor(p + "mlp.down_proj.weight", {H, I});
  }
  return std::unique_ptr<DeviceModel>(new DeviceModel(std::move(m)));
}

std::unique_ptr<DeviceModel> DeviceModel::random(const fmt::ModelConfig& cfg, uint64_t seed) {
  validate_config(cfg, "DeviceModel::random config");
  auto m = make_impl(cfg);
  const int64_t H = cfg.hidden_size, I = cfg.intermediate_size, qd = cfg.q_dim(), kvd = cfg.kv_dim();
  auto fill = [&](const std::string& name, int64_t n, bool as_bf16, float offset, float half_width) {
    DeviceBuffer b = m->alloc(static_cast<size_t>(n) * (as_bf16 ? 2 : 4), name);
    // Each tensor gets its own key: seed and name hashed together, elements counted from there.
    const uint64_t key = fnv1a(name) * 0x9e3779b97f4a7c15ull ^ seed;
    fill_uniform_kernel<<<1024, 256, 0, m->stream>>>(b.data(), as_bf16, n, key, offset, half_width);
    check_cuda(cudaGetLastError(), "DeviceModel::random " + name);
    return b;
  };
  // Uniform on [-a, a] has variance a²/3; a = sqrt(3 / fan_in) gives unit-variance outputs for unit inputs.
  auto linear = [&](const std::string& name, int64_t out, int64_t in) {
    return fill(name, out * in, true, 0.f, std::sqrt(3.f / static_cast<float>(in)));
  };
  auto norm = [&](const std::string& name, int64_t n) { return fill(name, n, true, 1.f, 0.1f); };

  m->embed = fill("model.embed_tokens.weight", cfg.vocab_size * H, true, 0.f, 1.f);
  m->final_norm = norm("model.norm.weight", H);
  if (!cfg.tie_word_embeddings) m->lm_head = linear("lm_head.weight", cfg.vocab_size, H);
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    LayerWeights& L = m->layers[l];
    const std::string p = "model.layers." + std::to_string(l) + ".";
    L.input_norm = norm(p + "input_layernorm.weight", H);
    L.post_attention_norm = norm(p + "post_attention_layernorm.weight", H);
    if (cfg.qk_norm) {
      L.q_norm = norm(p + "self_attn.q_norm.weight", cfg.head_dim);
      L.k_norm = norm(p + "self_attn.k_norm.weight", cfg.head_dim);
    }
    L.qkv = linear(p + "self_attn.qkv", qd + 2 * kvd, H);
    if (cfg.attention_bias) L.qkv_bias = fill(p + "self_attn.qkv_bias", qd + 2 * kvd, false, 0.f, 0.1f);
    L.o = linear(p + "self_attn.o_proj.weight", H, qd);
    L.gate_up = linear(p + "mlp.gate_up", 2 * I, H);
    L.down = linear(p + "mlp.down_proj.weight", H, I);
  }
  check_cuda(cudaStreamSynchronize(m->stream), "DeviceModel::random");
  return std::unique_ptr<DeviceModel>(new DeviceModel(std::move(m)));
}

// ---------------------------------------------------------------------------------------------------------------
// Forward

std::vector<float> LogitsView::to_host() const {
  std::vector<float> out(static_cast<size_t>(rows * vocab));
  if (out.empty()) return out;
  check_cuda(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream)), "LogitsView::to_host");
  if (type == LogitsType::F32) {
    check_cuda(cudaMemcpy(out.data(), data, out.size() * 4, cudaMemcpyDeviceToHost), "LogitsView::to_host");
  } else {
    std::vector<uint16_t> bits(out.size());
    check_cuda(cudaMemcpy(bits.data(), data, bits.size() * 2, cudaMemcpyDeviceToHost), "LogitsView::to_host");
    for (size_t i = 0; i < bits.size(); ++i) out[i] = fmt::bf16_to_f32(bits[i]);
  }
  return out;
}

LogitsView DeviceModel::forward(const PackedBatch& batch, const DeviceForwardOptions& opt) {
  Impl& m = *impl_;
  const fmt::ModelConfig& c = m.cfg;
  const int64_t T = batch.num_tokens(), S = batch.num_sequences();
  const int64_t H = c.hidden_size, I = c.intermediate_size, qd = c.q_dim(), kvd = c.kv_dim();
  const int64_t d = c.head_dim, nqkv = qd + 2 * kvd;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const Stream st = reinterpret_cast<Stream>(m.stream);

  LogitsView view;
  view.vocab = c.vocab_size;
  view.type = opt.type;
  view.stream = st;
  if (S < 0 || batch.cu_seqlens.empty() || batch.cu_seqlens.front() != 0 || batch.cu_seqlens.back() != T)
    throw Error("DeviceModel::forward: cu_seqlens", "must start at 0 and end at the number of ids");
  for (int64_t s = 0; s < S; ++s)
    if (batch.cu_seqlens[s + 1] < batch.cu_seqlens[s])
      throw Error("DeviceModel::forward: cu_seqlens", "decreases at sequence " + std::to_string(s));
  for (int64_t t = 0; t < T; ++t)
    if (batch.ids[t] < 0 || batch.ids[t] >= c.vocab_size)
      throw Error("DeviceModel::forward: input id at " + std::to_string(t),
                  std::to_string(batch.ids[t]) + " is outside the vocabulary [0, " + std::to_string(c.vocab_size) +
                      ")");
  if (T == 0) return view;

  // One upload for all integer inputs: ids, positions, cu_seqlens, last row of each sequence.
  std::vector<int32_t> host_ints;
  host_ints.reserve(static_cast<size_t>(2 * T + 2 * S + 1));
  host_ints.insert(host_ints.end(), batch.ids.begin(), batch.ids.end());
  for (int64_t s = 0; s < S; ++s)
    for (int32_t t = batch.cu_seqlens[s]; t < batch.cu_seqlens[s + 1]; ++t)
      host_ints.push_back(t - batch.cu_seqlens[s]);
  host_ints.insert(host_ints.end(), batch.cu_seqlens.begin(), batch.cu_seqlens.end());
  std::vector<int32_t> last_rows;
  for (int64_t s = 0; s < S; ++s)
    if (batch.cu_seqlens[s + 1] > batch.cu_seqlens[s]) last_rows.push_back(batch.cu_seqlens[s + 1] - 1);
  host_ints.insert(host_ints.end(), last_rows.begin(), last_rows.end());

  Scratch& sc = m.scratch;
  sc.tokens.ensure(host_ints.size() * 4, "forward token buffer");
  check_cuda(cudaMemcpyAsync(sc.tokens.data(), host_ints.data(), host_ints.size() * 4, cudaMemcpyHostToDevice,
                             m.stream),
             "DeviceModel::forward upload");
  const int32_t* d_ids = sc.tokens.as<int32_t>();
  const int32_t* d_pos = d_ids + T;
  const int32_t* d_cu = d_pos + T;
  const int32_t* d_last = d_cu + S + 1;

  auto sz = [](int64_t n, int64_t elem) { return static_cast<size_t>(n * elem); };
  sc.x.ensure(sz(T * H, 4), "residual stream");
  sc.normed.ensure(sz(T * H, 2), "normed activations");
  sc.qkv.ensure(sz(T * nqkv, 4), "qkv projection");
  sc.q.ensure(sz(T * qd, 2), "q");
  sc.k.ensure(sz(T * kvd, 2), "k");
  sc.v.ensure(sz(T * kvd, 2), "v");
  sc.attn.ensure(sz(T * qd, 2), "attention output");
  sc.proj.ensure(sz(T * H, 4), "projection output");
  sc.gate_up.ensure(sz(T * 2 * I, 2), "gate_up");
  sc.act.ensure(sz(T * I, 2), "swiglu output");
  if (opt.observer) {
    sc.obs_q.ensure(sz(T * qd, 4), "observer q");
    sc.obs_k_pre.ensure(sz(T * kvd, 4), "observer k_pre_rope");
    sc.obs_k.ensure(sz(T * kvd, 4), "observer k");
    sc.obs_v.ensure(sz(T * kvd, 4), "observer v");
  }

  float* x = sc.x.as<float>();
  uint16_t* normed = sc.normed.as<uint16_t>();
  float* proj = sc.proj.as<float>();
  check(kern::embedding_gather(d_ids, T, m.embed.as<uint16_t>(), c.vocab_size, H, x, st), "forward: embedding");
  check(kern::rmsnorm(x, T, H, m.layers[0].input_norm.as<uint16_t>(), eps, normed, st),
        "forward: layer 0 input_layernorm");

  kern::RopeQkvShape rope_shape{T, c.num_heads, c.num_kv_heads, d, nqkv};
  kern::PrefillAttentionArgs attn;
  attn.q = sc.q.as<uint16_t>();
  attn.k = sc.k.as<uint16_t>();
  attn.v = sc.v.as<uint16_t>();
  attn.out = sc.attn.as<uint16_t>();
  attn.q_row_stride = qd;
  attn.k_row_stride = kvd;
  attn.v_row_stride = kvd;
  attn.out_row_stride = qd;
  attn.cu_seqlens = d_cu;
  attn.num_seqs = static_cast<int32_t>(S);
  attn.max_seqlen = batch.max_seqlen();
  attn.num_heads = static_cast<int32_t>(c.num_heads);
  attn.num_kv_heads = static_cast<int32_t>(c.num_kv_heads);
  attn.head_dim = static_cast<int32_t>(d);
  attn.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));

  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& L = m.layers[l];
    const std::string where = "forward: layer " + std::to_string(l);
    m.gemm->xwt(normed, T, H, L.qkv.as<uint16_t>(), nqkv, sc.qkv.data(), GemmOut::F32, 0.f, st, where + " qkv_proj");

    kern::RopeQkvArgs ra;
    ra.qkv = sc.qkv.as<float>();
    ra.bias = L.qkv_bias.empty() ? nullptr : L.qkv_bias.as<float>();
    ra.q_norm_weight = L.q_norm.empty() ? nullptr : L.q_norm.as<uint16_t>();
    ra.k_norm_weight = L.k_norm.empty() ? nullptr : L.k_norm.as<uint16_t>();
    ra.norm_eps = eps;
    ra.positions = d_pos;
    ra.inv_freq = m.inv_freq.as<float>();
    ra.q_out = sc.q.as<uint16_t>();
    ra.k_out = sc.k.as<uint16_t>();
    ra.v_out = sc.v.as<uint16_t>();
    if (opt.observer) {
      ra.q_f32 = sc.obs_q.as<float>();
      ra.k_pre_rope_f32 = sc.obs_k_pre.as<float>();
      ra.k_f32 = sc.obs_k.as<float>();
      ra.v_f32 = sc.obs_v.as<float>();
    }
    check(kern::rope_qkv(rope_shape, ra, st), where + " rope_qkv");

    if (opt.observer) {
      DeviceAttentionInputs in;
      in.layer = l;
      in.num_tokens = T;
      in.num_sequences = S;
      in.num_heads = c.num_heads;
      in.num_kv_heads = c.num_kv_heads;
      in.head_dim = d;
      in.cu_seqlens = d_cu;
      in.positions = d_pos;
      in.q = ra.q_f32;
      in.k_pre_rope = ra.k_pre_rope_f32;
      in.k = ra.k_f32;
      in.v = ra.v_f32;
      in.stream = st;
      opt.observer->on_attention_inputs(in);
    }

    check(kern::attention_prefill(attn, st), where + " attention_prefill");
    m.gemm->xwt(sc.attn.as<uint16_t>(), T, qd, L.o.as<uint16_t>(), H, proj, GemmOut::F32, 0.f, st, where + " o_proj");
    check(kern::add_rmsnorm(x, proj, T, H, L.post_attention_norm.as<uint16_t>(), eps, normed, st),
          where + " post_attention_layernorm");
    m.gemm->xwt(normed, T, H, L.gate_up.as<uint16_t>(), 2 * I, sc.gate_up.data(), GemmOut::BF16, 0.f, st,
                where + " gate_up_proj");
    check(kern::swiglu(sc.gate_up.as<uint16_t>(), T, I, sc.act.as<uint16_t>(), st), where + " swiglu");
    m.gemm->xwt(sc.act.as<uint16_t>(), T, I, L.down.as<uint16_t>(), H, proj, GemmOut::F32, 0.f, st,
                where + " down_proj");
    // The residual add of this MLP is fused with the next norm: the next layer's input norm, or the final norm.
    const uint16_t* next_norm =
        l + 1 < c.num_layers ? m.layers[l + 1].input_norm.as<uint16_t>() : m.final_norm.as<uint16_t>();
    check(kern::add_rmsnorm(x, proj, T, H, next_norm, eps, normed, st), where + " residual + next norm");
  }

  if (opt.rows == LogitsRows::None) return view;
  const uint16_t* head_in = normed;
  int64_t rows = T;
  if (opt.rows == LogitsRows::LastPerSequence) {
    rows = static_cast<int64_t>(last_rows.size());
    sc.last_normed.ensure(sz(rows * H, 2), "last-token activations");
    gather_rows_kernel<<<static_cast<unsigned>(rows), 256, 0, m.stream>>>(normed, d_last, H,
                                                                          sc.last_normed.as<uint16_t>());
    check_cuda(cudaGetLastError(), "forward: gather last rows");
    head_in = sc.last_normed.as<uint16_t>();
  }
  const bool f32 = opt.type == LogitsType::F32;
  sc.logits.ensure(sz(rows * c.vocab_size, f32 ? 4 : 2), "logits");
  m.gemm->xwt(head_in, rows, H, m.lm_head_weight(), c.vocab_size, sc.logits.data(), f32 ? GemmOut::F32 : GemmOut::BF16,
              0.f, st, "forward: lm_head");
  view.data = sc.logits.data();
  view.rows = rows;
  return view;
}

}  // namespace oscar::rt
