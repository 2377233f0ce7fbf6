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
#include "runtime/decoder_layer.h"
#include "runtime/forward_profiler.h"
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

// bf16 [H] norms, [d] q/k norms (Qwen3 only), [q_dim + 2 kv_dim, H] qkv (q_proj, k_proj, v_proj stacked), fp32
// qkv bias (empty without), [H, q_dim] o, [2 I, H] gate_up (gate_proj, up_proj stacked), [H, I] down.
using LayerWeights = DeviceLayerBuffers;

DeviceLayerWeights DeviceLayerBuffers::view() const {
  auto bf16 = [](const DeviceBuffer& b) { return b.empty() ? nullptr : b.as<uint16_t>(); };
  return {bf16(input_norm), bf16(post_attention_norm), bf16(q_norm), bf16(k_norm), bf16(qkv),
          qkv_bias.empty() ? nullptr : qkv_bias.as<float>(), bf16(o), bf16(gate_up), bf16(down)};
}

size_t DeviceLayerBuffers::bytes() const {
  size_t n = 0;
  for (const DeviceBuffer* b : {&input_norm, &post_attention_norm, &q_norm, &k_norm, &qkv, &qkv_bias, &o, &gate_up,
                                &down})
    n += b->bytes();
  return n;
}

// Per-forward scratch, grown to the largest batch seen and then reused.
struct Scratch {
  DeviceBuffer tokens;  // int32: ids [T], positions [T], cu_seqlens [S + 1], last rows [S]
  DeviceBuffer x;       // fp32 [T, H] residual stream
  DeviceBuffer normed;  // bf16 [T, H]
  DeviceBuffer qkv;     // fp32 [T, q_dim + 2 kv_dim]
  DeviceBuffer q, k, v;  // bf16 [T, q_dim], [T, kv_dim], [T, kv_dim]
  DeviceBuffer attn;     // bf16 [T, q_dim]
  DeviceBuffer proj;     // fp32 [T, H]: o_proj and down_proj outputs before the residual add (residual_in_gemm off)
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

}  // namespace

void validate_device_config(const fmt::ModelConfig& c, const std::string& where) {
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

namespace {

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
  for (const LayerWeights& L : m.layers) w.layers.push_back(L.view());
  return w;
}

// ---------------------------------------------------------------------------------------------------------------
// Loading

namespace {

const fmt::TensorView& checked_view(const fmt::TensorStore& store, const std::string& name,
                                    const std::vector<int64_t>& shape) {
  const fmt::TensorView& t = store.get(name);
  if (t.shape != shape)
    throw Error(t.file.string() + ": tensor " + name,
                "shape " + shape_str(t.shape) + " but config.json implies " + shape_str(shape));
  if (!fmt::is_float(t.dtype))
    throw Error(t.file.string() + ": tensor " + name, "dtype " + std::string(fmt::dtype_name(t.dtype)) +
                                                          " is not a float type");
  return t;
}

std::vector<uint16_t> bf16_of(const fmt::TensorStore& store, const std::string& name,
                              const std::vector<int64_t>& shape) {
  return fmt::to_bf16(checked_view(store, name, shape));
}

void append_bf16(std::vector<uint16_t>& dst, const fmt::TensorStore& store, const std::string& name,
                 const std::vector<int64_t>& shape) {
  const std::vector<uint16_t> bits = bf16_of(store, name, shape);
  dst.insert(dst.end(), bits.begin(), bits.end());
}

void upload_async(DeviceBuffer& dst, const void* host, size_t bytes, const std::string& what, cudaStream_t st) {
  if (bytes == 0) {
    dst = DeviceBuffer();
    return;
  }
  dst.ensure(bytes, what);
  check_cuda(cudaMemcpyAsync(dst.data(), host, bytes, cudaMemcpyHostToDevice, st), "upload " + what);
}

}  // namespace

HostLayerWeights read_checkpoint_layer(const fmt::TensorStore& store, const fmt::ModelConfig& cfg, int64_t l) {
  const int64_t H = cfg.hidden_size, I = cfg.intermediate_size, qd = cfg.q_dim(), kvd = cfg.kv_dim();
  const std::string p = "model.layers." + std::to_string(l) + ".";
  HostLayerWeights w;
  w.input_norm = bf16_of(store, p + "input_layernorm.weight", {H});
  w.post_attention_norm = bf16_of(store, p + "post_attention_layernorm.weight", {H});
  if (cfg.qk_norm) {
    w.q_norm = bf16_of(store, p + "self_attn.q_norm.weight", {cfg.head_dim});
    w.k_norm = bf16_of(store, p + "self_attn.k_norm.weight", {cfg.head_dim});
  }
  w.qkv.reserve(static_cast<size_t>((qd + 2 * kvd) * H));
  append_bf16(w.qkv, store, p + "self_attn.q_proj.weight", {qd, H});
  append_bf16(w.qkv, store, p + "self_attn.k_proj.weight", {kvd, H});
  append_bf16(w.qkv, store, p + "self_attn.v_proj.weight", {kvd, H});
  // Same rule as the CPU reference: the tensors decide (Qwen2 carries biases whatever the config says), and a
  // config that promises biases makes them mandatory.
  const bool has_bias = cfg.attention_bias || store.contains(p + "self_attn.q_proj.bias");
  if (has_bias) {
    w.qkv_bias.reserve(static_cast<size_t>(qd + 2 * kvd));
    for (const auto& [proj, n] : {std::pair{"q_proj", qd}, std::pair{"k_proj", kvd}, std::pair{"v_proj", kvd}}) {
      const std::vector<float> b = fmt::to_f32(checked_view(store, p + "self_attn." + proj + ".bias", {n}));
      w.qkv_bias.insert(w.qkv_bias.end(), b.begin(), b.end());
    }
  }
  if (store.contains(p + "self_attn.o_proj.bias"))
    throw Error(store.get(p + "self_attn.o_proj.bias").file.string() + ": tensor " + p + "self_attn.o_proj.bias",
                "o_proj biases are not supported (neither is the CPU reference)");
  w.o = bf16_of(store, p + "self_attn.o_proj.weight", {H, qd});
  w.gate_up.reserve(static_cast<size_t>(2 * I * H));
  append_bf16(w.gate_up, store, p + "mlp.gate_proj.weight", {I, H});
  append_bf16(w.gate_up, store, p + "mlp.up_proj.weight", {I, H});
  w.down = bf16_of(store, p + "mlp.down_proj.weight", {H, I});
  return w;
}

std::vector<uint16_t> read_checkpoint_embedding(const fmt::TensorStore& store, const fmt::ModelConfig& cfg) {
  return bf16_of(store, "model.embed_tokens.weight", {cfg.vocab_size, cfg.hidden_size});
}

void upload_layer(const HostLayerWeights& w, DeviceLayerBuffers& out, Stream stream) {
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const auto up16 = [&](DeviceBuffer& dst, const std::vector<uint16_t>& src, const char* what) {
    upload_async(dst, src.data(), src.size() * 2, what, st);
  };
  up16(out.input_norm, w.input_norm, "input_layernorm");
  up16(out.post_attention_norm, w.post_attention_norm, "post_attention_layernorm");
  up16(out.q_norm, w.q_norm, "q_norm");
  up16(out.k_norm, w.k_norm, "k_norm");
  up16(out.qkv, w.qkv, "qkv");
  upload_async(out.qkv_bias, w.qkv_bias.data(), w.qkv_bias.size() * 4, "qkv bias", st);
  up16(out.o, w.o, "o_proj");
  up16(out.gate_up, w.gate_up, "gate_up");
  up16(out.down, w.down, "down_proj");
}

void require_cuda_device(const std::string& flag) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it so that a caller catching the error starts clean
    throw Error(flag, std::string("no usable CUDA device: ") + cudaGetErrorString(e));
  }
  if (count == 0) throw Error(flag, "no CUDA device found");
}

std::unique_ptr<DeviceModel> DeviceModel::load(const std::filesystem::path& model_dir) {
  const fmt::ModelConfig cfg = fmt::ModelConfig::from_dir(model_dir);
  validate_device_config(cfg, (model_dir / "config.json").string());
  const fmt::TensorStore store = fmt::TensorStore::open(model_dir);
  auto m = make_impl(cfg);
  const int64_t H = cfg.hidden_size;
  // Converts on the host one tensor at a time (peak host memory: one tensor's bf16 copy), uploads into place.
  auto bf16_tensor = [&](const std::string& name, const std::vector<int64_t>& shape) {
    const std::vector<uint16_t> bits = bf16_of(store, name, shape);
    DeviceBuffer b = m->alloc(bits.size() * 2, name);
    b.upload(bits.data(), bits.size() * 2);
    return b;
  };

  m->embed = bf16_tensor("model.embed_tokens.weight", {cfg.vocab_size, H});
  m->final_norm = bf16_tensor("model.norm.weight", {H});
  if (!cfg.tie_word_embeddings) m->lm_head = bf16_tensor("lm_head.weight", {cfg.vocab_size, H});

  // One layer's host copy at a time (peak host memory: one layer in bf16).
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    const HostLayerWeights host = read_checkpoint_layer(store, cfg, l);
    upload_layer(host, m->layers[l], reinterpret_cast<Stream>(m->stream));
    check_cuda(cudaStreamSynchronize(m->stream), "DeviceModel::load layer " + std::to_string(l));
    m->weight_bytes += m->layers[l].bytes();
  }
  return std::unique_ptr<DeviceModel>(new DeviceModel(std::move(m)));
}

namespace {

// Each tensor gets its own key: seed and name hashed together, elements counted from there.
void fill_random(DeviceBuffer& b, const std::string& name, int64_t n, bool as_bf16, float offset, float half_width,
                 uint64_t seed, cudaStream_t st) {
  b.ensure(static_cast<size_t>(n) * (as_bf16 ? 2 : 4), name);
  const uint64_t key = fnv1a(name) * 0x9e3779b97f4a7c15ull ^ seed;
  fill_uniform_kernel<<<1024, 256, 0, st>>>(b.data(), as_bf16, n, key, offset, half_width);
  check_cuda(cudaGetLastError(), "DeviceModel::random " + name);
}

// Uniform on [-a, a] has variance a²/3; a = sqrt(3 / fan_in) gives unit-variance outputs for unit inputs.
void fill_linear(DeviceBuffer& b, const std::string& name, int64_t out, int64_t in, uint64_t seed, cudaStream_t st) {
  fill_random(b, name, out * in, true, 0.f, std::sqrt(3.f / static_cast<float>(in)), seed, st);
}
void fill_norm(DeviceBuffer& b, const std::string& name, int64_t n, uint64_t seed, cudaStream_t st) {
  fill_random(b, name, n, true, 1.f, 0.1f, seed, st);
}

}  // namespace

void generate_random_layer(const fmt::ModelConfig& cfg, uint64_t seed, int64_t l, DeviceLayerBuffers& L,
                           Stream stream) {
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const int64_t H = cfg.hidden_size, I = cfg.intermediate_size, qd = cfg.q_dim(), kvd = cfg.kv_dim();
  const std::string p = "model.layers." + std::to_string(l) + ".";
  fill_norm(L.input_norm, p + "input_layernorm.weight", H, seed, st);
  fill_norm(L.post_attention_norm, p + "post_attention_layernorm.weight", H, seed, st);
  if (cfg.qk_norm) {
    fill_norm(L.q_norm, p + "self_attn.q_norm.weight", cfg.head_dim, seed, st);
    fill_norm(L.k_norm, p + "self_attn.k_norm.weight", cfg.head_dim, seed, st);
  }
  fill_linear(L.qkv, p + "self_attn.qkv", qd + 2 * kvd, H, seed, st);
  if (cfg.attention_bias) fill_random(L.qkv_bias, p + "self_attn.qkv_bias", qd + 2 * kvd, false, 0.f, 0.1f, seed, st);
  fill_linear(L.o, p + "self_attn.o_proj.weight", H, qd, seed, st);
  fill_linear(L.gate_up, p + "mlp.gate_up", 2 * I, H, seed, st);
  fill_linear(L.down, p + "mlp.down_proj.weight", H, I, seed, st);
}

DeviceBuffer generate_random_embedding(const fmt::ModelConfig& cfg, uint64_t seed, Stream stream) {
  DeviceBuffer b;
  fill_random(b, "model.embed_tokens.weight", cfg.vocab_size * cfg.hidden_size, true, 0.f, 1.f, seed,
              reinterpret_cast<cudaStream_t>(stream));
  return b;
}

std::unique_ptr<DeviceModel> DeviceModel::random(const fmt::ModelConfig& cfg, uint64_t seed) {
  validate_device_config(cfg, "DeviceModel::random config");
  auto m = make_impl(cfg);
  const Stream st = reinterpret_cast<Stream>(m->stream);
  m->embed = generate_random_embedding(cfg, seed, st);
  fill_norm(m->final_norm, "model.norm.weight", cfg.hidden_size, seed, m->stream);
  if (!cfg.tie_word_embeddings)
    fill_linear(m->lm_head, "lm_head.weight", cfg.vocab_size, cfg.hidden_size, seed, m->stream);
  m->weight_bytes = m->embed.bytes() + m->final_norm.bytes() + m->lm_head.bytes();
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    generate_random_layer(cfg, seed, l, m->layers[l], st);
    m->weight_bytes += m->layers[l].bytes();
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

int64_t DeviceModel::gemm_timed_shapes() const { return impl_->gemm->timed_shapes(); }
int64_t DeviceModel::gemm_timed_changed() const { return impl_->gemm->timed_changed(); }

LogitsView DeviceModel::forward(const PackedBatch& batch, const DeviceForwardOptions& opt) {
  Impl& m = *impl_;
  const fmt::ModelConfig& c = m.cfg;
  const int64_t T = batch.num_tokens(), S = batch.num_sequences();
  const int64_t H = c.hidden_size, I = c.intermediate_size, qd = c.q_dim(), kvd = c.kv_dim();
  const int64_t nqkv = qd + 2 * kvd;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const Stream st = reinterpret_cast<Stream>(m.stream);
  m.gemm->set_selection(opt.gemm_selection);

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
  // With the residual add in the GEMM epilogue nothing writes `proj`: a forward that never uses it allocates none.
  if (!opt.residual_in_gemm) sc.proj.ensure(sz(T * H, 4), "projection output");
  sc.gate_up.ensure(sz(T * 2 * I, 2), "gate_up");
  sc.act.ensure(sz(T * I, 2), "swiglu output");
  const bool observer_fp32 = opt.observer && opt.observer->wants_fp32();
  if (observer_fp32) {
    sc.obs_q.ensure(sz(T * qd, 4), "observer q");
    sc.obs_k_pre.ensure(sz(T * kvd, 4), "observer k_pre_rope");
    sc.obs_k.ensure(sz(T * kvd, 4), "observer k");
    sc.obs_v.ensure(sz(T * kvd, 4), "observer v");
  }

  float* x = sc.x.as<float>();
  uint16_t* normed = sc.normed.as<uint16_t>();
  float* proj = opt.residual_in_gemm ? nullptr : sc.proj.as<float>();
  if (opt.profiler) opt.profiler->mark(st, "embedding");
  check(kern::embedding_gather(d_ids, T, m.embed.as<uint16_t>(), c.vocab_size, H, x, st), "forward: embedding");
  check(kern::rmsnorm(x, T, H, m.layers[0].input_norm.as<uint16_t>(), eps, normed, st),
        "forward: layer 0 input_layernorm");

  DecoderLayerIo io;
  io.num_tokens = T;
  io.num_sequences = S;
  io.max_seqlen = batch.max_seqlen();
  io.positions = d_pos;
  io.cu_seqlens = d_cu;
  io.x = x;
  io.normed = normed;
  io.qkv = sc.qkv.as<float>();
  io.q = sc.q.as<uint16_t>();
  io.k = sc.k.as<uint16_t>();
  io.v = sc.v.as<uint16_t>();
  io.attn = sc.attn.as<uint16_t>();
  io.proj = proj;
  io.gate_up = sc.gate_up.as<uint16_t>();
  io.act = sc.act.as<uint16_t>();
  io.attention_kernel = opt.attention_kernel;
  io.residual_in_gemm = opt.residual_in_gemm;
  io.qkv_bf16 = opt.qkv_bf16;
  io.profiler = opt.profiler;
  if (observer_fp32) {
    io.obs_q = sc.obs_q.as<float>();
    io.obs_k_pre = sc.obs_k_pre.as<float>();
    io.obs_k = sc.obs_k.as<float>();
    io.obs_v = sc.obs_v.as<float>();
  }
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const uint16_t* next_norm =
        l + 1 < c.num_layers ? m.layers[l + 1].input_norm.as<uint16_t>() : m.final_norm.as<uint16_t>();
    run_decoder_layer(c, *m.gemm, m.inv_freq.as<float>(), m.layers[l].view(), next_norm, l, io, opt.observer,
                      LayerPart::Full, st);
  }

  if (opt.profiler) opt.profiler->mark(st, "lm_head");
  if (opt.rows == LogitsRows::None) {
    if (opt.profiler) opt.profiler->finish(st);
    return view;
  }
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
  if (opt.profiler) opt.profiler->finish(st);
  view.data = sc.logits.data();
  view.rows = rows;
  return view;
}

}  // namespace oscar::rt
