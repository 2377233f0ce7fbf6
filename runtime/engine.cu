// rt::Engine: prefill into the paged cache and the layer-by-layer decode executor (runtime/engine.h).
//
// Numerics match DeviceModel::forward op for op (same kernels, same GEMM wrapper, fp32 residual, bf16 activations
// into every GEMM), so with the bf16 cache a decode step differs from a full recompute only in the attention
// kernel's summation order.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <string>

#include "formats/error.h"
#include "kernels/activation/swiglu.h"
#include "kernels/attention_decode/decode_attention.h"
#include "kernels/common/device_utils.cuh"
#include "kernels/embedding/embedding.h"
#include "kernels/kv_quantize/kv_quantize.h"
#include "kernels/norm/rmsnorm.h"
#include "kernels/rope/rope_qkv.h"
#include "kernels/sampling/argmax_rows.h"
#include "lib/calib/calibrator.h"
#include "lib/calib/ef_calibration.h"
#include "lib/model/cpu_model.h"
#include "runtime/device_buffer.h"
#include "runtime/device_model.h"
#include "runtime/engine.h"
#include "runtime/kv_cache.h"
#include "runtime/lt_gemm.h"
#include "runtime/prefill_layer_writer.h"

namespace oscar::rt {

namespace {

void check(kern::Status s, const std::string& where) {
  if (s != kern::Status::Ok) throw Error(where, "kernel launch refused: " + std::string(kern::status_name(s)));
}

size_t bytes_of(int64_t n, int64_t elem) { return static_cast<size_t>(n * elem); }

}  // namespace

struct SequenceState {
  std::vector<int32_t> tokens;  // ids whose K/V are cached
  int32_t next = 0;
  std::mt19937_64 rng;
  std::vector<float> logits;
};

struct Engine::Impl {
  std::shared_ptr<DeviceModel> model;  // shared by engines over one set of weights (Engine::load)
  fmt::ModelConfig cfg;
  DeviceWeights w;
  EngineOptions opt;
  CacheFormat format;
  std::unique_ptr<KvCache> cache;
  std::unique_ptr<LtGemm> gemm;
  cudaStream_t stream = nullptr;
  int sm_count = 0;
  std::vector<DeviceBuffer> k_rot, v_rot;  // per layer; empty = identity
  // Bundle 2.0 storage transforms per layer (CacheFormat::k_transform ...); empty = the layer's R above.
  std::vector<DeviceBuffer> k_tf, v_tf, k_mean, k_read, v_read;
  // Error-feedback tables per layer (CacheFormat::k_ef_order ...), uploaded once at load; empty = RTN.
  std::vector<DeviceBuffer> k_ef_order, k_ef_weights, v_ef_order, v_ef_weights;
  // A bundle with stored key metrics (format 1.3), kept to rebuild the key tables for other contexts
  // (set_key_table_context); null otherwise.
  std::unique_ptr<fmt::Bundle> metric_bundle;
  std::vector<fmt::SegmentedPageGeometry> k_geo, v_geo;  // per layer when format.segmented(); else empty (INT2)
  std::map<int64_t, SequenceState> seqs;

  // Decode scratch, grown to the largest batch seen.
  std::vector<int32_t> host_ints;
  DeviceBuffer ints;  // ids [B], positions [B], seq_lens [B], bf16 slots [B], int2 slots [B], tables 2 x [B, W]
  DeviceBuffer x, normed, qkv, q, k, v, attn, proj, gate_up, act, logits, workspace;
  DeviceBuffer q_pad, k_pad, v_pad, attn_pad;  // cache_head_dim copies when the model's head_dim is padded
  // Prefill: the staging and side stream of its cache writes, and the slots [2 T] they write to.
  std::unique_ptr<PrefillLayerWriter> prefill_writer;
  DeviceBuffer prefill_slots;
  DeviceBuffer picks;  // int32 [rows]: greedy picks made on the device

  ~Impl() = default;

  bool padded() const { return format.cache_head_dim != cfg.head_dim; }
  // Layer `layer`'s buffer of a per-layer list, null when the list or the entry is empty.
  const float* rotation(const std::vector<DeviceBuffer>& r, int64_t layer) const {
    const auto l = static_cast<size_t>(layer);
    return l >= r.size() || r[l].empty() ? nullptr : r[l].as<float>();
  }

  const DeviceBuffer* ef_table(const std::vector<DeviceBuffer>& t, int64_t layer) const {
    return t.empty() || t[static_cast<size_t>(layer)].empty() ? nullptr : &t[static_cast<size_t>(layer)];
  }

  // Writes `tokens` new head vectors of one layer into the cache: x_k / x_v bf16 [tokens, Hkv, D] (token stride
  // `stride` elements), slots from KvPageTables (-1 = not stored in that pool).
  void write_layer(int64_t layer, const uint16_t* x_k, const uint16_t* x_v, int64_t tokens, int64_t stride,
                   const int32_t* bf16_slots, const int32_t* int2_slots, Stream write_stream,
                   const std::string& where) {
    kern::KvWriteParams common;
    common.tokens = tokens;
    common.token_stride = stride;
    common.num_kv_heads = static_cast<int32_t>(cfg.num_kv_heads);
    common.head_dim = static_cast<int32_t>(format.cache_head_dim);
    common.page_tokens = static_cast<int32_t>(cache->layout().page_tokens);
    const auto st = reinterpret_cast<kern::Stream>(write_stream);
    for (const bool value : {false, true}) {
      // Fresh per tensor: K's INT2 fields (EF tables, clip) must not reach V's bf16 write, which refuses tables.
      kern::KvWriteParams p = common;
      p.x = value ? x_v : x_k;
      p.rotation = rotation(value ? v_rot : k_rot, layer);
      // Bundle 2.0: this tensor's per-KV-head A (and the keys' mean) in every write, bf16 windows included, so the
      // decode kernel reads one basis.
      if (const float* a = rotation(value ? v_tf : k_tf, layer)) {
        p.rotation = a;
        p.rotation_head_stride = common.head_dim * static_cast<int64_t>(common.head_dim);
        p.head_mean = value ? nullptr : rotation(k_mean, layer);
      }
      p.slots = bf16_slots;
      p.bf16_pool = cache->bf16_pool(layer, value);
      p.int2_pool = nullptr;
      check(kern::kv_write(p, kern::KvWriteMode::Bf16, st), where + (value ? " V" : " K") + " bf16 write");
      if (format.quantized) {
        p.slots = int2_slots;
        p.bf16_pool = nullptr;
        p.int2_pool = cache->int2_pool(layer, value);
        p.clip_ratio = (value ? format.v_clip_ratio : format.k_clip_ratio)[static_cast<size_t>(layer)];
        // Same tables for the prefill and every decode step; window tokens are quantized on write too
        // (runtime/kv_cache.h), so no later flush needs them.
        const DeviceBuffer* order = ef_table(value ? v_ef_order : k_ef_order, layer);
        p.ef_order = order ? order->as<int32_t>() : nullptr;
        p.ef_weights = order ? ef_table(value ? v_ef_weights : k_ef_weights, layer)->as<float>() : nullptr;
        p.ef_clip_feedback = format.ef_clip_feedback;
        // A whole-head INT2 tensor of a segmented format has pages byte-identical to INT2 pages (the decode side
        // relies on the same identity), so the INT2 writer fills them: with its tables when the tensor has some,
        // which the segmented writer has no error-feedback rounding for.
        const fmt::SegmentedPageGeometry* geo =
            k_geo.empty() ? nullptr : &(value ? v_geo : k_geo)[static_cast<size_t>(layer)];
        const bool seg = geo != nullptr && !geo->whole_head_int2();
        p.geometry = seg ? geo : nullptr;
        const kern::KvWriteMode mode = format.fp8() ? kern::KvWriteMode::Fp8
                                       : seg        ? kern::KvWriteMode::Segmented
                                                    : kern::KvWriteMode::Int2;
        check(kern::kv_write(p, mode, st), where + (value ? " V" : " K") +
                                               (format.fp8() ? " FP8 write" : seg ? " segmented write" : " INT2 write"));
      }
    }
  }

  // Greedy picks without keep_logits are made on the device: one int32 per sequence crosses to the host instead of
  // a logits row (0.6 MB at Qwen3-8B's 151936 ids), with model::pick_next_token's rule (the first maximum).
  bool picks_on_device() const { return !opt.keep_logits && opt.sampling.temperature <= 0.0f; }
  std::vector<int32_t> device_argmax(const float* logits, int64_t rows, const std::string& where) {
    picks.ensure(bytes_of(rows, 4), "greedy picks");
    check(kern::argmax_rows(logits, rows, cfg.vocab_size, cfg.vocab_size, picks.as<int32_t>(),
                            reinterpret_cast<kern::Stream>(stream)),
          where + ": argmax");
    std::vector<int32_t> host(static_cast<size_t>(rows));
    check_cuda(cudaMemcpyAsync(host.data(), picks.data(), host.size() * 4, cudaMemcpyDeviceToHost, stream),
               where + ": download picks");
    check_cuda(cudaStreamSynchronize(stream), where);
    return host;
  }

  // Host picks of rows [states.size(), vocab] (sampling, or greedy with keep_logits): the rows are kept first, then
  // picked in parallel, each from its own sequence's generator (model::pick_next_tokens).
  std::vector<int32_t> host_picks(std::span<SequenceState* const> states, const std::vector<float>& logits) {
    const auto vocab = static_cast<size_t>(cfg.vocab_size);
    std::vector<std::mt19937_64*> rngs;
    for (size_t i = 0; i < states.size(); ++i) {
      if (opt.keep_logits) states[i]->logits.assign(logits.begin() + i * vocab, logits.begin() + (i + 1) * vocab);
      rngs.push_back(&states[i]->rng);
    }
    return model::pick_next_tokens(logits, cfg.vocab_size, opt.sampling, rngs);
  }
};

// The prefill observer: each layer's post-RoPE K/V (the forward's bf16, token-major) go to the cache. It asks for
// no fp32 copies, so the forward neither writes nor allocates them.
class PrefillCacheWriter : public DeviceObserver {
 public:
  PrefillCacheWriter(Engine::Impl& e, const int32_t* bf16_slots, const int32_t* int2_slots)
      : e_(e), bf16_slots_(bf16_slots), int2_slots_(int2_slots) {}
  void on_attention_inputs(const DeviceAttentionInputs& in) override {
    const int64_t D = e_.format.cache_head_dim;
    const std::string where = "Engine::add_sequence: layer " + std::to_string(in.layer);
    e_.prefill_writer->write_layer(
        in, D,
        [&](int64_t layer, const uint16_t* k, const uint16_t* v, Stream stream) {
          e_.write_layer(layer, k, v, in.num_tokens, in.num_kv_heads * D, bf16_slots_, int2_slots_, stream, where);
        },
        where);
  }
  bool wants_fp32() const override { return false; }

 private:
  Engine::Impl& e_;
  const int32_t* bf16_slots_;
  const int32_t* int2_slots_;
};

// ---------------------------------------------------------------------------------------------------------------

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Engine::~Engine() = default;
const fmt::ModelConfig& Engine::config() const { return impl_->cfg; }
const CacheFormat& Engine::cache_format() const { return impl_->format; }
const KvCache& Engine::cache() const { return *impl_->cache; }
DeviceModel& Engine::model() { return *impl_->model; }

std::unique_ptr<Engine> Engine::load(const std::filesystem::path& model_dir, const EngineOptions& options,
                                     const fmt::Bundle* bundle, std::shared_ptr<DeviceModel> shared_model) {
  auto e = std::make_unique<Impl>();
  e->opt = options;
  e->cfg = fmt::ModelConfig::from_dir(model_dir);
  // Everything checkable on the host is checked before the weights are uploaded.
  fmt::Bundle read;
  if (options.cache == CacheMode::Oscar) {
    std::string bundle_where = "--bundle";
    if (!bundle) {
      if (options.bundle.empty()) throw Error("--bundle", "the oscar cache format needs a calibration bundle");
      read = fmt::read_bundle(options.bundle);
      bundle = &read;
      bundle_where = options.bundle.string();
    }
    check_bundle_matches(*bundle, calib::model_fingerprint(model_dir), bundle_where, model_dir.string());
  }
  if (bundle && fmt::has_key_metric(*bundle)) e->metric_bundle = std::make_unique<fmt::Bundle>(*bundle);
  if (options.key_table_context < 0) throw Error("--ef-context", "must be >= 0 (0 = the bundle's key tables)");
  if (bundle && options.key_table_context > 0 && options.key_table_context != calib::error_feedback_context(*bundle)) {
    calib::require_key_metric(*bundle, "--ef-context");
    calib::retarget_key_tables(*e->metric_bundle, model::rope_inv_freq(e->cfg), options.key_table_context);
    bundle = e->metric_bundle.get();
  }
  e->format = resolve_cache_format(e->cfg, options.cache, bundle, options.sink_tokens, options.recent_tokens,
                                   "--cache " + std::string(cache_mode_name(options.cache)), options.hadamard_seed);
  const bool fold_v = options.fold_v && e->format.value_rotations();
  // Key transforms leave V alone, so R_v folds as in a 1.x bundle (and as `oscar export --fold-v` allows).
  if (fold_v && e->format.value_transforms())
    throw Error("--fold-v", "the bundle stores per-KV-head value transforms (format 2.0): --fold-v folds one "
                            "orthogonal R_v per layer and does not fold them (calibrate with --transform none)");
  if (fold_v && shared_model)
    throw Error("--fold-v", "folding R_v rewrites W_v and W_o, so the engine needs its own copy of the weights (not "
                            "a DeviceModel shared with other engines)");
  if (options.max_sequences <= 0) throw Error("--max-sequences", "must be positive");

  const KvCacheLayout layout = cache_layout(e->cfg, e->format);
  if (e->format.quantized && e->format.segmented()) {
    for (size_t l = 0; l < e->format.k_segments.size(); ++l) {
      const auto d = static_cast<int32_t>(e->format.cache_head_dim);
      e->k_geo.push_back(fmt::segmented_page_geometry(e->format.k_segments[l], d, fmt::kKvPageTokens));
      e->v_geo.push_back(fmt::segmented_page_geometry(e->format.v_segments[l], d, fmt::kKvPageTokens));
    }
  }
  const KvCachePlan plan = plan_kv_cache(layout, options.cache_budget_bytes, options.max_sequences, "--cache-budget");

  if (shared_model) {
    const fmt::ModelConfig& m = shared_model->config();
    if (m.num_layers != e->cfg.num_layers || m.hidden_size != e->cfg.hidden_size || m.head_dim != e->cfg.head_dim ||
        m.num_kv_heads != e->cfg.num_kv_heads || m.vocab_size != e->cfg.vocab_size)
      throw Error(model_dir.string(), "the shared DeviceModel was loaded from another checkpoint");
    e->model = std::move(shared_model);
  } else {
    e->model = DeviceModel::load(model_dir);
  }
  e->w = e->model->weights();
  e->stream = reinterpret_cast<cudaStream_t>(e->model->stream());
  e->prefill_writer = std::make_unique<PrefillLayerWriter>(options.overlap_prefill_writes);
  e->gemm = std::make_unique<LtGemm>(size_t{32} << 20);
  e->cache = std::make_unique<KvCache>(layout, plan);
  int device = 0;
  check_cuda(cudaGetDevice(&device), "Engine: cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&e->sm_count, cudaDevAttrMultiProcessorCount, device), "Engine: SM count");
  for (int64_t l = 0; l < e->cfg.num_layers; ++l) {
    const auto& rk = e->format.k_rotation[static_cast<size_t>(l)];
    const auto& rv = e->format.v_rotation[static_cast<size_t>(l)];
    // A storage transform (bundle 2.0) replaces its tensor's R in the writes (A) and in the decode (A⁻ᵀ), so that R
    // stays on the host (CacheFormat::device_bytes counts the same).
    const bool k_transformed = e->format.has_transform(l, false), v_transformed = e->format.has_transform(l, true);
    e->k_rot.push_back(rk.empty() || k_transformed ? DeviceBuffer() : to_device(std::span<const float>(rk), "R_k"));
    // Folded: the projection already yields v·R_v, so neither kv_write nor the decode kernel rotates V.
    if (fold_v && !rv.empty()) e->model->fold_value_rotation(l, rv, 1);
    e->v_rot.push_back(rv.empty() || fold_v || v_transformed ? DeviceBuffer()
                                                             : to_device(std::span<const float>(rv), "R_v"));
  }
  e->format.v_rotation_folded = fold_v;
  if (e->format.storage_transforms()) {
    const auto upload = [](const std::vector<std::vector<float>>& host, size_t l, const char* what) {
      return l < host.size() && !host[l].empty() ? to_device(std::span<const float>(host[l]), what) : DeviceBuffer();
    };
    for (size_t l = 0; l < static_cast<size_t>(e->cfg.num_layers); ++l) {
      e->k_tf.push_back(upload(e->format.k_transform, l, "K storage transform"));
      e->v_tf.push_back(upload(e->format.v_transform, l, "V storage transform"));
      e->k_mean.push_back(upload(e->format.k_mean, l, "K mean"));
      e->k_read.push_back(upload(e->format.k_read, l, "K transform read matrix"));
      e->v_read.push_back(upload(e->format.v_read, l, "V transform read matrix"));
    }
  }
  if (e->format.error_feedback()) {
    // V tables are in the rotated basis, which is also what a folded projection yields, so folding keeps them.
    const auto upload = [](const auto& host, const char* what) {
      return host.empty() ? DeviceBuffer() : to_device(std::span(host), what);
    };
    for (size_t l = 0; l < static_cast<size_t>(e->cfg.num_layers); ++l) {
      e->k_ef_order.push_back(upload(e->format.k_ef_order[l], "K error-feedback order"));
      e->k_ef_weights.push_back(upload(e->format.k_ef_weights[l], "K error-feedback weights"));
      e->v_ef_order.push_back(upload(e->format.v_ef_order[l], "V error-feedback order"));
      e->v_ef_weights.push_back(upload(e->format.v_ef_weights[l], "V error-feedback weights"));
    }
  }
  return std::unique_ptr<Engine>(new Engine(std::move(e)));
}

bool Engine::rebuilds_key_tables() const { return impl_->metric_bundle && !impl_->k_ef_order.empty(); }

void Engine::set_key_table_context(int64_t positions) {
  Impl& e = *impl_;
  const std::string where = "Engine::set_key_table_context";
  if (positions == e.format.key_table_context) return;
  if (e.k_ef_order.empty()) throw Error(where, "the cache format has no error-feedback key tables");
  if (!e.metric_bundle)
    throw Error(where, "the bundle stores no key metric (format 1.2 or calibrate --no-ef-key-metric): its key tables "
                       "serve only the context they were made for");
  if (!e.seqs.empty())
    throw Error(where, std::to_string(e.seqs.size()) + " live sequence(s) hold records rounded with the present tables");
  calib::retarget_key_tables(*e.metric_bundle, model::rope_inv_freq(e.cfg), positions);
  // Everything else in the bundle is unchanged, so only the K tables are uploaded again (same shapes, checked at
  // load). The device copies may still be read by queued work: synchronize before the old buffers go.
  check_cuda(cudaStreamSynchronize(e.stream), where);
  for (size_t l = 0; l < e.metric_bundle->layers.size(); ++l) {
    const fmt::LayerCalibration& lc = e.metric_bundle->layers[l];
    if (lc.k_ef_order.empty()) continue;
    e.format.k_ef_order[l] = lc.k_ef_order;
    e.format.k_ef_weights[l] = lc.k_ef_weights;
    e.k_ef_order[l] = to_device(std::span<const int32_t>(lc.k_ef_order), "K error-feedback order");
    e.k_ef_weights[l] = to_device(std::span<const float>(lc.k_ef_weights), "K error-feedback weights");
  }
  e.format.key_table_context = positions;
}

int64_t Engine::add_sequence(std::span<const int32_t> prompt) {
  const std::vector<std::span<const int32_t>> one{prompt};
  return add_sequences(one).front();
}

std::vector<int64_t> Engine::add_sequences(const std::vector<std::vector<int32_t>>& prompts) {
  const std::vector<std::span<const int32_t>> spans(prompts.begin(), prompts.end());
  return add_sequences(std::span<const std::span<const int32_t>>(spans));
}

std::vector<int64_t> Engine::add_sequences(std::span<const std::span<const int32_t>> prompts) {
  Impl& e = *impl_;
  const std::string where = prompts.size() == 1 ? "Engine::add_sequence" : "Engine::add_sequences";
  if (prompts.empty()) return {};
  // Everything checkable on the host first, so a refused call leaves no trace.
  int64_t total = 0;
  for (size_t p = 0; p < prompts.size(); ++p) {
    const std::string which = prompts.size() == 1 ? where : where + ": prompt " + std::to_string(p);
    if (prompts[p].empty()) throw Error(which, "empty prompt");
    for (size_t i = 0; i < prompts[p].size(); ++i)
      if (prompts[p][i] < 0 || prompts[p][i] >= e.cfg.vocab_size)
        throw Error(which + ": prompt id at " + std::to_string(i),
                    std::to_string(prompts[p][i]) + " is outside the vocabulary");
    total += static_cast<int64_t>(prompts[p].size());
  }
  const auto count = static_cast<int64_t>(prompts.size());
  if (static_cast<int64_t>(e.seqs.size()) + count > e.opt.max_sequences)
    throw Error(where, std::to_string(e.seqs.size()) + " live sequence(s) + " + std::to_string(count) +
                           " new exceed --max-sequences " + std::to_string(e.opt.max_sequences));
  // Slots and positions are int32 on the device, and a sequence may grow past its prompt.
  if (total > std::numeric_limits<int32_t>::max() / 2) throw Error(where, "prompts too long");

  KvPageTables& tables = e.cache->tables();
  std::vector<int64_t> created;
  created.reserve(prompts.size());
  try {
    std::vector<int64_t> lengths;
    for (const auto& prompt : prompts) {
      created.push_back(tables.create_sequence());
      lengths.push_back(static_cast<int64_t>(prompt.size()));
    }
    tables.extend(created, lengths, where);  // all or nothing
    // The forward packs the prompts back to back; the writer's slots follow that order: bf16 slots of every
    // packed token, then their INT2 slots.
    std::vector<int32_t> slots(static_cast<size_t>(2 * total));
    PackedBatch batch;
    int64_t row = 0;
    for (size_t p = 0; p < prompts.size(); ++p) {
      batch.add_sequence(prompts[p]);
      for (int64_t t = 0; t < lengths[p]; ++t, ++row) {
        slots[static_cast<size_t>(row)] = tables.bf16_slot(created[p], t);
        slots[static_cast<size_t>(total + row)] = tables.int2_slot(created[p], t);
      }
    }
    e.prefill_slots.ensure(slots.size() * 4, "prefill slots");
    check_cuda(cudaMemcpyAsync(e.prefill_slots.data(), slots.data(), slots.size() * 4, cudaMemcpyHostToDevice,
                               e.stream),
               where + ": upload slots");
    PrefillCacheWriter writer(e, e.prefill_slots.as<int32_t>(), e.prefill_slots.as<int32_t>() + total);
    DeviceForwardOptions fo;
    fo.observer = &writer;
    fo.rows = LogitsRows::LastPerSequence;
    const auto& out = e.model->forward(batch, fo);
    e.prefill_writer->join(e.model->stream(), where);
    std::vector<SequenceState> states(prompts.size());
    std::vector<SequenceState*> state_ptrs;
    for (size_t p = 0; p < prompts.size(); ++p) {
      SequenceState& s = states[p];
      s.tokens.assign(prompts[p].begin(), prompts[p].end());
      // Seeded by the sequence id, as a sequence added alone: the picks do not depend on how prompts are grouped.
      s.rng.seed(e.opt.sampling.seed + static_cast<uint64_t>(created[p]));
      state_ptrs.push_back(&s);
    }
    // Either download synchronizes after the joined writes, so the slots may go.
    const std::vector<int32_t> next = e.picks_on_device() && out.type == LogitsType::F32
                                          ? e.device_argmax(static_cast<const float*>(out.data), count, where)
                                          : e.host_picks(state_ptrs, out.to_host());
    for (size_t p = 0; p < prompts.size(); ++p) {
      states[p].next = next[p];
      e.seqs.emplace(created[p], std::move(states[p]));
    }
  } catch (...) {
    // Writes already enqueued on the side stream may still target these sequences' pages: let them finish before
    // the pages go back to the allocator, where the next sequence could get them.
    e.prefill_writer->drain();
    for (const int64_t seq : created) {
      e.seqs.erase(seq);
      tables.free_sequence(seq);
    }
    throw;
  }
  return created;
}

std::vector<Engine::StepToken> Engine::step() {
  Impl& e = *impl_;
  const fmt::ModelConfig& c = e.cfg;
  const std::string where = "Engine::step";
  std::vector<int64_t> ids;
  for (const auto& [id, s] : e.seqs) ids.push_back(id);
  const auto B = static_cast<int64_t>(ids.size());
  if (B == 0) return {};

  KvPageTables& tables = e.cache->tables();
  std::vector<int64_t> positions(ids.size()), new_lengths(ids.size());
  int64_t max_len = 0;
  for (size_t b = 0; b < ids.size(); ++b) {
    positions[b] = tables.length(ids[b]);
    new_lengths[b] = positions[b] + 1;
    max_len = std::max(max_len, new_lengths[b]);
  }
  if (max_len > std::numeric_limits<int32_t>::max() / 2) throw Error(where, "sequence too long");
  tables.extend(ids, new_lengths, where);  // all or nothing

  // One upload: ids, positions, lengths, slots, page tables.
  const int32_t W = tables.table_width(ids);
  std::vector<int32_t>& h = e.host_ints;
  h.assign(static_cast<size_t>(5 * B + 2 * B * W), 0);
  for (size_t b = 0; b < ids.size(); ++b) {
    h[b] = e.seqs.at(ids[b]).next;
    h[B + b] = static_cast<int32_t>(positions[b]);
    h[2 * B + b] = static_cast<int32_t>(new_lengths[b]);
    h[3 * B + b] = tables.bf16_slot(ids[b], positions[b]);
    h[4 * B + b] = tables.int2_slot(ids[b], positions[b]);
  }
  tables.fill_tables(ids, W, /*int2_table=*/h.data() + 5 * B + B * W, /*bf16_table=*/h.data() + 5 * B);
  e.ints.ensure(h.size() * 4, "decode integer inputs");
  check_cuda(cudaMemcpyAsync(e.ints.data(), h.data(), h.size() * 4, cudaMemcpyHostToDevice, e.stream),
             where + ": upload");
  const int32_t* d_ids = e.ints.as<int32_t>();
  const int32_t* d_pos = d_ids + B;
  const int32_t* d_lens = d_ids + 2 * B;
  const int32_t* d_bf16_slots = d_ids + 3 * B;
  const int32_t* d_int2_slots = d_ids + 4 * B;
  const int32_t* d_bf16_table = d_ids + 5 * B;
  const int32_t* d_int2_table = d_ids + 5 * B + B * W;

  const int64_t H = c.hidden_size, I = c.intermediate_size, qd = c.q_dim(), kvd = c.kv_dim(), d = c.head_dim;
  const int64_t D = e.format.cache_head_dim, nqkv = qd + 2 * kvd;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const auto st = reinterpret_cast<kern::Stream>(e.stream);
  e.x.ensure(bytes_of(B * H, 4), "decode residual");
  e.normed.ensure(bytes_of(B * H, 2), "decode normed");
  e.qkv.ensure(bytes_of(B * nqkv, 4), "decode qkv");
  e.q.ensure(bytes_of(B * qd, 2), "decode q");
  e.k.ensure(bytes_of(B * kvd, 2), "decode k");
  e.v.ensure(bytes_of(B * kvd, 2), "decode v");
  e.attn.ensure(bytes_of(B * qd, 2), "decode attention output");
  e.proj.ensure(bytes_of(B * H, 4), "decode projection");
  e.gate_up.ensure(bytes_of(B * 2 * I, 2), "decode gate_up");
  e.act.ensure(bytes_of(B * I, 2), "decode swiglu");
  e.logits.ensure(bytes_of(B * c.vocab_size, 4), "decode logits");
  if (e.padded()) {
    e.q_pad.ensure(bytes_of(B * c.num_heads * D, 2), "decode padded q");
    e.k_pad.ensure(bytes_of(B * c.num_kv_heads * D, 2), "decode padded k");
    e.v_pad.ensure(bytes_of(B * c.num_kv_heads * D, 2), "decode padded v");
    e.attn_pad.ensure(bytes_of(B * c.num_heads * D, 2), "decode padded attention output");
  }
  const int32_t page_tokens = static_cast<int32_t>(e.cache->layout().page_tokens);
  const int32_t splits = kern::decode_attention_num_splits(static_cast<int32_t>(B), static_cast<int32_t>(c.num_heads),
                                                           static_cast<int32_t>(c.num_kv_heads),
                                                           static_cast<int32_t>(max_len), page_tokens, e.sm_count);
  const size_t ws = kern::decode_attention_workspace_bytes(static_cast<int32_t>(B), static_cast<int32_t>(c.num_heads),
                                                           static_cast<int32_t>(D), splits);
  e.workspace.ensure(std::max<size_t>(ws, 16), "decode attention workspace");

  float* x = e.x.as<float>();
  uint16_t* normed = e.normed.as<uint16_t>();
  float* proj = e.proj.as<float>();
  check(kern::embedding_gather(d_ids, B, e.w.embed, c.vocab_size, H, x, st), where + ": embedding");
  check(kern::rmsnorm(x, B, H, e.w.layers[0].input_norm, eps, normed, st), where + ": layer 0 input_layernorm");

  kern::DecodeAttentionParams ap;
  ap.batch = static_cast<int32_t>(B);
  ap.num_q_heads = static_cast<int32_t>(c.num_heads);
  ap.num_kv_heads = static_cast<int32_t>(c.num_kv_heads);
  ap.head_dim = static_cast<int32_t>(D);
  ap.page_tokens = page_tokens;
  ap.q = e.padded() ? e.q_pad.as<uint16_t>() : e.q.as<uint16_t>();
  // The model's scale, not the padded dim's: padding must not change the scores.
  ap.softmax_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  ap.seq_lens = d_lens;
  ap.max_seq_len = static_cast<int32_t>(max_len);
  // bf16 mode: every token is a "sink" token, which makes the kernel read only bf16 pages.
  ap.sink_tokens = e.format.quantized ? e.format.sink_tokens : std::numeric_limits<int32_t>::max();
  ap.recent_tokens = e.format.quantized ? e.format.recent_tokens : 0;
  ap.int2_page_table = d_int2_table;
  ap.bf16_page_table = d_bf16_table;
  ap.max_pages = W;
  ap.out_bf16 = e.padded() ? e.attn_pad.as<uint16_t>() : e.attn.as<uint16_t>();
  ap.num_splits = splits;
  ap.workspace = e.workspace.data();
  ap.workspace_bytes = e.workspace.bytes();

  const kern::RopeQkvShape rope_shape{B, c.num_heads, c.num_kv_heads, d, nqkv};
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const DeviceLayerWeights& L = e.w.layers[static_cast<size_t>(l)];
    const std::string lw = where + ": layer " + std::to_string(l);
    e.gemm->xwt(normed, B, H, L.qkv, nqkv, e.qkv.data(), GemmOut::F32, 0.f, st, lw + " qkv_proj");
    kern::RopeQkvArgs ra;
    ra.qkv = e.qkv.as<float>();
    ra.bias = L.qkv_bias;
    ra.q_norm_weight = L.q_norm;
    ra.k_norm_weight = L.k_norm;
    ra.norm_eps = eps;
    ra.positions = d_pos;
    ra.inv_freq = e.w.inv_freq;
    ra.q_out = e.q.as<uint16_t>();
    ra.k_out = e.k.as<uint16_t>();
    ra.v_out = e.v.as<uint16_t>();
    check(kern::rope_qkv(rope_shape, ra, st), lw + " rope_qkv");

    const uint16_t* k_new = e.k.as<uint16_t>();
    const uint16_t* v_new = e.v.as<uint16_t>();
    if (e.padded()) {
      copy_heads(e.q.as<uint16_t>(), B * c.num_heads, d, e.q_pad.as<uint16_t>(), D, e.stream, lw + " pad q");
      copy_heads(e.k.as<uint16_t>(), B * c.num_kv_heads, d, e.k_pad.as<uint16_t>(), D, e.stream, lw + " pad k");
      copy_heads(e.v.as<uint16_t>(), B * c.num_kv_heads, d, e.v_pad.as<uint16_t>(), D, e.stream, lw + " pad v");
      k_new = e.k_pad.as<uint16_t>();
      v_new = e.v_pad.as<uint16_t>();
    }
    e.write_layer(l, k_new, v_new, B, c.num_kv_heads * D, d_bf16_slots, d_int2_slots, e.stream, lw);

    ap.rotation_k = e.rotation(e.k_rot, l);
    ap.rotation_v = e.rotation(e.v_rot, l);
    const int64_t dd = static_cast<int64_t>(D) * D;
    if (const float* r = e.rotation(e.k_read, l)) ap.rotation_k = r, ap.rotation_k_head_stride = dd;
    if (const float* r = e.rotation(e.v_read, l)) ap.rotation_v = r, ap.rotation_v_head_stride = dd;
    ap.k_int2_pool = e.cache->int2_pool(l, false);
    ap.v_int2_pool = e.cache->int2_pool(l, true);
    ap.k_geometry = e.k_geo.empty() ? nullptr : &e.k_geo[static_cast<size_t>(l)];
    ap.v_geometry = e.v_geo.empty() ? nullptr : &e.v_geo[static_cast<size_t>(l)];
    ap.quant_storage = e.format.quant_storage;
    ap.k_bf16_pool = e.cache->bf16_pool(l, false);
    ap.v_bf16_pool = e.cache->bf16_pool(l, true);
    check(kern::decode_attention(ap, st), lw + " decode_attention");
    if (e.padded())
      copy_heads(e.attn_pad.as<uint16_t>(), B * c.num_heads, D, e.attn.as<uint16_t>(), d, e.stream,
                 lw + " unpad attention output");

    e.gemm->xwt(e.attn.as<uint16_t>(), B, qd, L.o, H, proj, GemmOut::F32, 0.f, st, lw + " o_proj");
    check(kern::add_rmsnorm(x, proj, B, H, L.post_attention_norm, eps, normed, st), lw + " post_attention_layernorm");
    e.gemm->xwt(normed, B, H, L.gate_up, 2 * I, e.gate_up.data(), GemmOut::BF16, 0.f, st, lw + " gate_up_proj");
    check(kern::swiglu(e.gate_up.as<uint16_t>(), B, I, e.act.as<uint16_t>(), st), lw + " swiglu");
    e.gemm->xwt(e.act.as<uint16_t>(), B, I, L.down, H, proj, GemmOut::F32, 0.f, st, lw + " down_proj");
    const uint16_t* next_norm =
        l + 1 < c.num_layers ? e.w.layers[static_cast<size_t>(l + 1)].input_norm : e.w.final_norm;
    check(kern::add_rmsnorm(x, proj, B, H, next_norm, eps, normed, st), lw + " residual + next norm");
  }
  e.gemm->xwt(normed, B, H, e.w.lm_head, c.vocab_size, e.logits.data(), GemmOut::F32, 0.f, st, where + ": lm_head");

  std::vector<SequenceState*> states;
  for (const int64_t id : ids) states.push_back(&e.seqs.at(id));
  const auto download_logits = [&] {
    std::vector<float> logits(static_cast<size_t>(B * c.vocab_size));
    check_cuda(cudaMemcpyAsync(logits.data(), e.logits.data(), logits.size() * 4, cudaMemcpyDeviceToHost, e.stream),
               where + ": download logits");
    check_cuda(cudaStreamSynchronize(e.stream), where);
    return logits;
  };
  const std::vector<int32_t> picks = e.picks_on_device() ? e.device_argmax(e.logits.as<float>(), B, where)
                                                         : e.host_picks(states, download_logits());
  std::vector<StepToken> out;
  out.reserve(ids.size());
  for (size_t b = 0; b < ids.size(); ++b) {
    states[b]->tokens.push_back(states[b]->next);
    states[b]->next = picks[b];
    out.push_back({ids[b], picks[b]});
  }
  return out;
}

void Engine::free_sequence(int64_t seq) {
  Impl& e = *impl_;
  if (!e.seqs.count(seq)) throw Error("Engine::free_sequence", "unknown sequence id " + std::to_string(seq));
  // Work already enqueued may still read the pages; they are reused only by later work on the same stream.
  e.cache->tables().free_sequence(seq);
  e.seqs.erase(seq);
}

std::vector<int64_t> Engine::sequences() const {
  std::vector<int64_t> ids;
  for (const auto& [id, s] : impl_->seqs) ids.push_back(id);
  return ids;
}

namespace {
template <class Map>
auto& find_sequence(Map& seqs, int64_t seq, const char* where) {
  auto it = seqs.find(seq);
  if (it == seqs.end()) throw Error(where, "unknown sequence id " + std::to_string(seq));
  return it->second;
}
}  // namespace

int32_t Engine::next_token(int64_t seq) const { return find_sequence(impl_->seqs, seq, "Engine::next_token").next; }

void Engine::set_next_token(int64_t seq, int32_t token) {
  if (token < 0 || token >= impl_->cfg.vocab_size)
    throw Error("Engine::set_next_token", std::to_string(token) + " is outside the vocabulary");
  find_sequence(impl_->seqs, seq, "Engine::set_next_token").next = token;
}

const std::vector<int32_t>& Engine::tokens(int64_t seq) const {
  return find_sequence(impl_->seqs, seq, "Engine::tokens").tokens;
}

std::span<const float> Engine::last_logits(int64_t seq) const {
  if (!impl_->opt.keep_logits) throw Error("Engine::last_logits", "the engine was built without keep_logits");
  return find_sequence(impl_->seqs, seq, "Engine::last_logits").logits;
}

}  // namespace oscar::rt
