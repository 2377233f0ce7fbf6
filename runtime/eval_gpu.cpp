// `oscar eval --device cuda` (runtime/eval_gpu.h): rt::Engine behind the Decoder interface of
// runtime/eval_decode.h, one shared DeviceModel, and the CPU fallback for modes the engine does not implement.
// Host code, compiled by the C++ compiler; its body exists only in CUDA builds, where rt::Engine does.
#include "runtime/eval_gpu.h"

#ifdef OSCAR_HAVE_CUDA
#include <algorithm>
#include <memory>
#include <string>

#include <fmt/format.h>

#include "formats/error.h"
#include "lib/calib/calibrator.h"
#include "runtime/device_model.h"
#include "runtime/engine.h"
#include "runtime/kv_cache.h"

namespace oscar::rt {

namespace {

class EngineDecoder : public Decoder {
 public:
  explicit EngineDecoder(std::unique_ptr<Engine> engine) : engine_(std::move(engine)) {}
  int64_t add_sequence(std::span<const int32_t> prompt) override { return engine_->add_sequence(prompt); }
  // The engine's own prefill path (DeviceModel::forward), all rows; only positions that read bf16 tokens use it.
  std::vector<float> prefill_logits(std::span<const int32_t> prompt) override {
    PackedBatch batch;
    batch.add_sequence(prompt);
    DeviceForwardOptions fo;
    fo.rows = LogitsRows::All;
    return engine_->model().forward(batch, fo).to_host();
  }
  int32_t next_token(int64_t seq) const override { return engine_->next_token(seq); }
  void set_next_token(int64_t seq, int32_t token) override { engine_->set_next_token(seq, token); }
  void step() override { engine_->step(); }
  std::span<const float> last_logits(int64_t seq) const override { return engine_->last_logits(seq); }
  void free_sequence(int64_t seq) override { engine_->free_sequence(seq); }
  void use_key_tables_for(int64_t positions) override {
    if (engine_->rebuilds_key_tables()) engine_->set_key_table_context(positions);
  }
  const Engine& engine() const { return *engine_; }

 private:
  std::unique_ptr<Engine> engine_;
};

std::string mode_list(std::span<const eval::CacheMode> modes) {
  std::string s;
  for (eval::CacheMode m : modes) s += (s.empty() ? "" : ", ") + std::string(eval::cache_mode_name(m));
  return s;
}

}  // namespace

eval::EvalReport evaluate_on_gpu(const std::filesystem::path& model_dir, const fmt::Tokenizer* tokenizer,
                                 const std::vector<eval::ContextSequences>& data, const eval::EvalOptions& options,
                                 const GpuEvalOptions& gpu, model::CpuModel* cpu_model) {
  auto say = [&](const std::string& line) {
    if (options.progress) options.progress(line);
  };
  // Every check that needs no device comes first.
  const ModeSplit split = split_engine_modes(options.modes);
  if (!split.cpu_only.empty() && !gpu.cpu_fallback)
    throw Error("--modes", ::fmt::format("{} {} cpu only: the GPU engine implements bf16, int2, int4, fp8, hadamard2 "
                                         "and oscar. Use --device cpu, or --cpu-fallback to run {} on the CPU simulation",
                                         mode_list(split.cpu_only), split.cpu_only.size() == 1 ? "is" : "are",
                                         split.cpu_only.size() == 1 ? "it" : "them"));
  if (!split.cpu_only.empty() && !cpu_model)
    throw Error("--cpu-fallback", "the CPU fallback needs the CPU reference model");
  const fmt::ModelConfig cfg = fmt::ModelConfig::from_dir(model_dir);
  const eval::CacheWindows windows = options.mode_options.windows;
  check_schedule(gpu.schedule, windows);
  for (eval::CacheMode m : options.modes) eval::CacheFormat::create(m, cfg, options.mode_options);
  const fmt::Bundle* bundle = options.mode_options.bundle;
  const bool wants_oscar = std::find(split.engine.begin(), split.engine.end(), eval::CacheMode::Oscar) !=
                           split.engine.end();
  if (wants_oscar) {
    if (!bundle) throw Error("--bundle", "the oscar mode needs a calibration bundle");
    check_bundle_matches(*bundle, calib::model_fingerprint(model_dir), "--bundle", model_dir.string());
  }
  const int64_t max_tokens = max_eval_cache_tokens(data, options);
  auto engine_options = [&](CacheMode mode) {
    EngineOptions eo;
    eo.cache = mode;
    if (mode != CacheMode::Bf16) {
      eo.sink_tokens = windows.sink;
      eo.recent_tokens = windows.recent;
    }
    eo.max_sequences = gpu.schedule.batch;
    eo.keep_logits = true;
    eo.hadamard_seed = options.mode_options.seed;
    eo.fold_v = gpu.fold_v;
    const CacheFormat f = resolve_cache_format(cfg, mode, mode == CacheMode::Oscar ? bundle : nullptr,
                                               eo.sink_tokens, eo.recent_tokens,
                                               "--modes " + std::string(cache_mode_name(mode)), eo.hadamard_seed);
    eo.cache_budget_bytes = gpu.cache_budget_bytes > 0
                                ? gpu.cache_budget_bytes
                                : eval_cache_budget_bytes(cfg, f, gpu.schedule.batch, std::max<int64_t>(max_tokens, 1));
    return eo;
  };
  // Resolve every engine format (head_dim, bundle layout) before the weights are uploaded.
  for (eval::CacheMode m : split.engine) engine_options(*engine_cache_mode(m));

  eval::EvalReport gpu_report;
  if (!split.engine.empty()) {
    say(::fmt::format("GPU: loading {} (engines: bf16 reference + {})", model_dir.string(), mode_list(split.engine)));
    std::shared_ptr<DeviceModel> weights = DeviceModel::load(model_dir);
    EngineDecoder reference(Engine::load(model_dir, engine_options(CacheMode::Bf16), nullptr, weights));
    std::vector<std::unique_ptr<EngineDecoder>> owned;
    std::vector<Decoder*> mode_decoders;
    for (eval::CacheMode m : split.engine) {
      const CacheMode em = *engine_cache_mode(m);
      if (em == CacheMode::Bf16) {
        mode_decoders.push_back(&reference);
        continue;
      }
      // A folded engine rewrites its weights, so it loads its own copy instead of sharing `weights`.
      const bool own_weights = gpu.fold_v && (em == CacheMode::Oscar || em == CacheMode::Hadamard2);
      owned.push_back(std::make_unique<EngineDecoder>(Engine::load(
          model_dir, engine_options(em), em == CacheMode::Oscar ? bundle : nullptr, own_weights ? nullptr : weights)));
      const CacheFormat& f = owned.back()->engine().cache_format();
      say(::fmt::format("GPU engine {}: sink {}, recent {}, cache {:.1f} MiB{}", cache_mode_name(em), f.sink_tokens,
                        f.recent_tokens,
                        static_cast<double>(owned.back()->engine().cache().device_bytes()) / (1024.0 * 1024.0),
                        f.v_rotation_folded ? ", R_v folded into W_v/W_o (own weights)" : ""));
      mode_decoders.push_back(owned.back().get());
    }
    eval::EvalOptions engine_opt = options;
    engine_opt.modes = split.engine;
    gpu_report = evaluate_with_decoders(cfg, tokenizer, data, engine_opt, reference, mode_decoders, gpu.schedule);
  }
  if (split.cpu_only.empty()) return gpu_report;

  say(::fmt::format("CPU fallback: {} on the CPU simulation", mode_list(split.cpu_only)));
  eval::EvalOptions cpu_opt = options;
  cpu_opt.modes = split.cpu_only;
  eval::EvalReport cpu_report = eval::evaluate(*cpu_model, tokenizer, data, cpu_opt);
  eval::EvalReport merged = merge_reports(gpu_report, cpu_report, data, options);
  merged.warnings.insert(merged.warnings.begin(),
                         ::fmt::format("{} ran on the CPU simulation (--cpu-fallback; the GPU engine implements bf16, "
                                       "int2, int4, fp8, hadamard2 and oscar) and {} compared with the CPU's bf16 reference",
                                       mode_list(split.cpu_only), split.cpu_only.size() == 1 ? "is" : "are"));
  return merged;
}

}  // namespace oscar::rt
#endif  // OSCAR_HAVE_CUDA
