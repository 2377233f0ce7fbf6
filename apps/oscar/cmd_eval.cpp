// oscar eval: accuracy of quantized KV caches against the BF16 cache, on the CPU reference model with a simulated
// decode-time cache (lib/eval/simulated_attention.h), or (--device cuda) through the GPU engine's decode step
// (runtime/eval_gpu.h). Writes report.json / report.md / report.html into --out.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <limits>
#include <memory>
#include <set>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "apps/oscar/command.h"
#include "apps/oscar/common.h"
#include "datasets/pack.h"
#include "formats/bundle.h"
#include "formats/error.h"
#include "lib/calib/calibrator.h"
#include "lib/calib/ef_calibration.h"
#include "lib/eval/evaluator.h"
#ifdef OSCAR_HAVE_CUDA
#include "runtime/eval_gpu.h"
#endif

namespace oscar::app {
namespace {

struct EvalCliOptions {
  std::string model_dir;
  std::string bundle;
  std::vector<std::string> data;
  std::string modes;  // empty: every mode available (oscar only with --bundle)
  std::string contexts = "512,2048";
  int64_t num_seqs = 4;
  int64_t sink = -1;    // -1: the bundle's spec, else 64
  int64_t recent = -1;  // -1: the bundle's spec, else 256
  bool no_windows = false;
  int64_t kivi_residual = 128;  // KIVI's own bf16 residual; small models need it scaled with their context
  std::string oscar_clip;       // "K,V": replaces the bundle's per-layer clip ratios (ablation); empty: the bundle's
  std::string ef_context = "auto";  // auto | bundle | N: the positions the oscar mode's key tables are made for
  int64_t greedy_prompts = 2;
  int64_t greedy_tokens = 32;
  bool passkey = false;
  std::string passkey_lengths;  // empty: the --context lengths
  std::string passkey_depths = "0,25,50,75,100";
  int64_t passkey_trials = 1;
  std::string device = "cpu";
  std::string out = "oscar-eval";
  bool strict = false;
  uint64_t seed = 0;
  bool timestamp = false;
  // --device cuda only.
  int64_t gpu_batch = 16;  // teacher-forced sequences and greedy prompts of a context in one batch
  int64_t prefill_tokens = 1;
  bool cpu_fallback = false;
  bool fold_v = false;
};

// "a,b,,c" -> {"a", "b", "", "c"}: empty items are kept so the caller's check names them.
std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find(',', start);
    if (end == std::string::npos) end = text.size();
    parts.push_back(text.substr(start, end - start));
    start = end + 1;
  }
  return parts;
}

// The whole of `item` as a decimal number, NaN when it is not one (so every range check rejects it).
double parse_decimal(const std::string& item) {
  try {
    size_t used = 0;
    const double v = std::stod(item, &used);
    if (used == item.size()) return v;
  } catch (const std::exception&) {
  }
  return std::numeric_limits<double>::quiet_NaN();
}

std::vector<int64_t> parse_int_list(const std::string& text, const std::string& flag) {
  std::vector<int64_t> values;
  for (const std::string& item : split_commas(text)) {
    try {
      size_t used = 0;
      const long long v = std::stoll(item, &used);
      if (used != item.size() || v <= 0) throw std::invalid_argument(item);
      values.push_back(v);
    } catch (const std::exception&) {
      throw Error(flag, ::fmt::format("'{}' is not a positive integer", item));
    }
  }
  return values;
}

// "0.96,0.92" -> (0.96, 0.92), each in (0, 1].
std::pair<float, float> parse_clip_pair(const std::string& text) {
  const size_t comma = text.find(',');
  auto one = [&](const std::string& item) {
    const double v = parse_decimal(item);
    if (!(v > 0 && v <= 1)) throw Error("--oscar-clip", ::fmt::format("'{}' is not a clip ratio in (0, 1]", item));
    return static_cast<float>(v);
  };
  if (comma == std::string::npos) throw Error("--oscar-clip", ::fmt::format("'{}' is not K,V (e.g. 0.96,0.92)", text));
  return {one(text.substr(0, comma)), one(text.substr(comma + 1))};
}

int run_eval(const EvalCliOptions& o) {
  const bool on_gpu = o.device == "cuda";
  if (o.fold_v && !on_gpu) throw Error("--fold-v", "folds R_v into the GPU engine's weights: add --device cuda");
#ifndef OSCAR_HAVE_CUDA
  if (on_gpu) throw Error("--device cuda", "this build has no CUDA runtime (built without nvcc); use --device cpu");
#endif
  if (o.num_seqs < 1) throw Error("--num-seqs", "must be >= 1");
  check_model_dir(o.model_dir);
  auto model = load_model(o.model_dir);
  auto tok = load_tokenizer(o.model_dir);
  const fmt::ModelConfig& cfg = model->config();

  std::unique_ptr<fmt::Bundle> bundle;
  if (!o.bundle.empty()) {
    bundle = std::make_unique<fmt::Bundle>(fmt::read_bundle(o.bundle));
    if (!(bundle->model == calib::model_fingerprint(o.model_dir)))
      throw Error(o.bundle, ::fmt::format("calibrated on another checkpoint than {} (model fingerprint differs)",
                                          o.model_dir));
  }
  // --ef-context: auto = each context (and retrieval length) gets key tables for its own positions when the bundle
  // stores their metric (format 1.3); bundle = as stored; N = rebuilt for positions 0..N-1 everywhere.
  bool key_tables_per_context = false;
  std::string ef_context_setting = "bundle";
  if (o.ef_context == "auto") {
    key_tables_per_context = bundle && fmt::has_key_metric(*bundle);
    ef_context_setting = key_tables_per_context ? "auto (key tables rebuilt for each context from the bundle's key "
                                                  "metric)"
                                                : "auto (the bundle stores no key metric: its tables as stored)";
  } else if (const int64_t n = parse_ef_context(o.ef_context); n > 0) {
    if (!bundle) throw Error("--ef-context", "needs --bundle (it rebuilds the bundle's key tables)");
    *bundle = calib::bundle_for_context(*bundle, cfg, n);
    ef_context_setting = ::fmt::format("{} (key tables rebuilt)", n);
  }
  if (!o.oscar_clip.empty()) {
    if (!bundle) throw Error("--oscar-clip", "needs --bundle (it replaces the bundle's clip ratios)");
    const auto [k, v] = parse_clip_pair(o.oscar_clip);
    // The rotation does not depend on the clip ratios (calibration tunes them after the rotation), so one bundle
    // per rotation serves the clip-off / published / tuned ablation on both devices.
    for (auto& layer : bundle->layers) {
      layer.k_clip_ratio = k;
      layer.v_clip_ratio = v;
    }
  }

  eval::EvalOptions opt;
  opt.modes = o.modes.empty() ? std::vector<eval::CacheMode>{} : eval::parse_cache_modes(o.modes, "--modes");
  // The default list on the GPU is what the engine implements (every mode but kivi2) unless --cpu-fallback.
  auto engine_implements = [](eval::CacheMode m) {
#ifdef OSCAR_HAVE_CUDA
    return rt::engine_cache_mode(m).has_value();
#else
    (void)m;
    return false;  // no engine in a CPU build (and no --device cuda to ask for one)
#endif
  };
  if (o.modes.empty())
    for (eval::CacheMode m : eval::kAllCacheModes)
      if ((m != eval::CacheMode::Oscar || bundle) && (!on_gpu || o.cpu_fallback || engine_implements(m)))
        opt.modes.push_back(m);
  if (!bundle && std::find(opt.modes.begin(), opt.modes.end(), eval::CacheMode::Oscar) != opt.modes.end())
    throw Error("--modes", "the oscar mode needs a calibration bundle (--bundle FILE from `oscar calibrate`)");
  opt.mode_options.windows = {bundle ? bundle->quant.sink_tokens : 64, bundle ? bundle->quant.recent_tokens : 256};
  if (o.sink >= 0) opt.mode_options.windows.sink = o.sink;
  if (o.recent >= 0) opt.mode_options.windows.recent = o.recent;
  if (o.no_windows) opt.mode_options.windows = {0, 0};
  if (o.kivi_residual < 0) throw Error("--kivi-residual", "must be >= 0");
  opt.mode_options.kivi_residual = o.kivi_residual;
  opt.mode_options.seed = o.seed;
  opt.mode_options.bundle = bundle.get();
  opt.key_tables_per_context = key_tables_per_context;
  opt.greedy_prompts = o.greedy_prompts;
  opt.greedy_tokens = o.greedy_tokens;
  opt.seed = o.seed;
  opt.progress = [](std::string_view line) { spdlog::info("{}", line); };

  const std::vector<int64_t> contexts = parse_int_list(o.contexts, "--context");
  for (int64_t c : contexts)
    if (cfg.max_position_embeddings > 0 && c > cfg.max_position_embeddings)
      throw Error("--context", ::fmt::format("{} exceeds the model's max_position_embeddings {}", c,
                                             cfg.max_position_embeddings));
  // Error-feedback key tables are made for one position range (calibrate --ef-context; docs/results.md "Key tables
  // for the serving context"): elsewhere they still work, with less of their gain. Said once per context, recorded.
  std::vector<std::string> context_warnings;
  if (bundle && fmt::has_error_feedback(*bundle) && !key_tables_per_context) {
    const int64_t tables = calib::error_feedback_context(*bundle);
    for (int64_t c : contexts)
      if (c != tables)
        context_warnings.push_back(::fmt::format(
            "context {}: the bundle's error-feedback key tables are made for {} positions; {}", c, tables,
            fmt::has_key_metric(*bundle)
                ? std::string("--ef-context auto (the default) rebuilds them for each context")
                : ::fmt::format("a bundle for this context (oscar calibrate --ef-context {}) or one that stores the "
                                "key metric (format 1.3) keeps more of their gain",
                                c)));
  }
  for (const std::string& w : context_warnings) spdlog::warn("{}", w);
  if (o.passkey) {
    opt.retrieval = true;
    opt.retrieval_lengths = o.passkey_lengths.empty() ? contexts : parse_int_list(o.passkey_lengths, "--passkey-lengths");
    opt.retrieval_depths.clear();
    for (const std::string& item : split_commas(o.passkey_depths)) {
      const double v = parse_decimal(item);
      if (!(v >= 0 && v <= 100)) throw Error("--passkey-depths", ::fmt::format("'{}' is not a percentage in [0, 100]", item));
      opt.retrieval_depths.push_back(v / 100.0);
    }
    if (o.passkey_trials < 1) throw Error("--passkey-trials", "must be >= 1");
    opt.retrieval_trials = o.passkey_trials;
  }

  // Evaluation data, one packing per context length; every file is checked against the calibration provenance.
  std::vector<eval::ContextSequences> data;
  eval::EvalReport header;
  header.warnings = context_warnings;
  std::set<std::string> calibration_sha;
  if (bundle)
    for (const auto& f : bundle->calibration.data_files) calibration_sha.insert(f.sha256);
  for (int64_t context : contexts) {
    data::PackOptions po;
    po.seq_len = context;
    po.num_seqs = o.num_seqs;
    po.shuffle = true;
    po.seed = o.seed;
    const data::PackedDataset packed = data::pack_dataset(o.data, tok.get(), data::SourceOptions{}, po);
    if (packed.num_seqs() < o.num_seqs)
      spdlog::warn("context {}: only {} sequences of {} tokens available (asked for {})", context, packed.num_seqs(),
                   context, o.num_seqs);
    eval::ContextSequences cs{context, {}};
    for (int64_t i = 0; i < packed.num_seqs(); ++i) {
      auto seq = packed.sequence(i);
      cs.sequences.emplace_back(seq.begin(), seq.end());
    }
    data.push_back(std::move(cs));
    for (const auto& f : packed.files) {
      if (std::find_if(header.data_files.begin(), header.data_files.end(),
                       [&](const auto& p) { return p.first == f.path; }) != header.data_files.end())
        continue;
      header.data_files.emplace_back(f.path, f.sha256);
      if (calibration_sha.count(f.sha256)) {
        const std::string what = ::fmt::format("evaluation file {} (sha256 {}) was used to calibrate {}", f.path,
                                               f.sha256, o.bundle);
        if (o.strict) throw Error(f.path, "was used to calibrate the bundle (same sha256); refusing with --strict");
        spdlog::warn("{}: results on calibration data overstate accuracy", what);
        header.warnings.push_back(what);
      }
    }
  }

  const auto start = std::chrono::steady_clock::now();
  eval::EvalReport report;
  if (on_gpu) {
#ifdef OSCAR_HAVE_CUDA
    rt::GpuEvalOptions gpu;
    gpu.schedule.batch = o.gpu_batch;
    gpu.schedule.prefill_tokens = o.prefill_tokens;
    gpu.cpu_fallback = o.cpu_fallback;
    gpu.fold_v = o.fold_v;
    report = rt::evaluate_on_gpu(o.model_dir, tok.get(), data, opt, gpu, model.get());
#endif
  } else {
    report = eval::evaluate(*model, tok.get(), data, opt);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  report.model = o.model_dir;
  report.bundle = o.bundle;
  report.data_files = header.data_files;
  report.warnings.insert(report.warnings.begin(), header.warnings.begin(), header.warnings.end());
  std::string mode_list;
  for (eval::CacheMode m : opt.modes) mode_list += (mode_list.empty() ? "" : ",") + std::string(eval::cache_mode_name(m));
  report.settings = {{"modes", mode_list},
                     {"context", o.contexts},
                     {"num_seqs", std::to_string(o.num_seqs)},
                     {"sink", std::to_string(opt.mode_options.windows.sink)},
                     {"recent", std::to_string(opt.mode_options.windows.recent)},
                     {"kivi", ::fmt::format("key groups {} tokens, value groups {} channels, residual {}",
                                            opt.mode_options.kivi_key_group_tokens,
                                            opt.mode_options.kivi_value_group_channels,
                                            opt.mode_options.kivi_residual)},
                     {"greedy", ::fmt::format("{} prompts x {} tokens", o.greedy_prompts, o.greedy_tokens)},
                     {"passkey", o.passkey ? ::fmt::format("depths {}%, {} trial(s)", o.passkey_depths, o.passkey_trials)
                                           : "off"},
                     {"seed", std::to_string(o.seed)},
                     {"oscar_clip", o.oscar_clip.empty() ? "bundle" : o.oscar_clip + " (override)"},
                     {"ef_context", ef_context_setting},
                     {"fold_v", o.fold_v ? "on" : "off"},
                     {"device", on_gpu ? ::fmt::format("cuda (engine decode, batch {}, prefill {} token(s){}{})",
                                                       o.gpu_batch, o.prefill_tokens,
                                                       o.cpu_fallback ? ", CPU fallback" : "",
                                                       o.fold_v ? ", R_v folded into W_v/W_o" : "")
                                       : "cpu"}};
  if (o.timestamp) {
    const std::time_t now = std::time(nullptr);
    char buf[32];
    std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
    report.generated_at = buf;
  }
  std::filesystem::create_directories(o.out);
  eval::write_report(o.out, report);
  std::fputs(eval::format_table(report).c_str(), stdout);
  spdlog::info("evaluated in {:.1f} s; wrote {}/report.{{json,md,html}}", seconds, o.out);
  return 0;
}

}  // namespace

OSCAR_REGISTER_COMMAND(
    "eval", "Accuracy of quantized KV caches (oscar, int2, kivi2, ...) against BF16: PPL, KL, agreement, passkey", 55,
    [](CLI::App& sub) -> RunCommand {
      auto o = std::make_shared<EvalCliOptions>();
      add_model_option(sub, o->model_dir);
      sub.add_option("--bundle", o->bundle, ".oscar bundle from `oscar calibrate` (needed by the oscar mode)");
      sub.add_option("--data", o->data, "held-out evaluation text/JSONL/token files, directories or globs")
          ->required()
          ->expected(1, -1);
      sub.add_option("--modes", o->modes,
                     "comma list of bf16,oscar,int2,kivi2,hadamard2,int4,fp8 (default: all; oscar only with --bundle)");
      sub.add_option("--context", o->contexts, "comma list of context lengths (tokens per sequence)")
          ->capture_default_str();
      sub.add_option("--num-seqs", o->num_seqs, "sequences per context length")->capture_default_str();
      sub.add_option("--sink", o->sink, "first tokens kept in bf16 (default: the bundle's, else 64)");
      sub.add_option("--recent", o->recent, "most recent tokens kept in bf16 (default: the bundle's, else 256)");
      sub.add_flag("--no-windows", o->no_windows, "sink 0 and recent 0: every cached token quantized (KIVI keeps its "
                                                  "residual)");
      sub.add_option("--kivi-residual", o->kivi_residual,
                     "kivi2's bf16 residual window in tokens (KIVI: 128); kivi2 reads max(--recent, this)")
          ->capture_default_str();
      sub.add_option("--ef-context", o->ef_context,
                     "oscar mode: the positions its error-feedback key tables are made for. auto = each --context "
                     "(and passkey length) gets its own, rebuilt from the bundle's key metric (format 1.3); bundle = "
                     "as stored; N = rebuilt for positions 0..N-1")
          ->capture_default_str();
      sub.add_option("--oscar-clip", o->oscar_clip,
                     "K,V clip ratios replacing the bundle's per-layer ones in the oscar mode (ablation; 1,1 = off)");
      sub.add_option("--greedy-prompts", o->greedy_prompts, "prompts per context for greedy agreement (0: off)")
          ->capture_default_str();
      sub.add_option("--greedy-tokens", o->greedy_tokens, "greedy tokens per prompt")->capture_default_str();
      sub.add_flag("--passkey", o->passkey, "run passkey and needle retrieval");
      sub.add_option("--passkey-lengths", o->passkey_lengths, "comma list of prompt lengths (default: --context)");
      sub.add_option("--passkey-depths", o->passkey_depths, "comma list of needle depths in percent")
          ->capture_default_str();
      sub.add_option("--passkey-trials", o->passkey_trials, "prompts per length and depth")->capture_default_str();
      add_device_option(sub, o->device);
      sub.add_option("--gpu-batch", o->gpu_batch, "--device cuda: sequences decoded together per engine step")
          ->capture_default_str();
      sub.add_option("--prefill-tokens", o->prefill_tokens,
                     "--device cuda: tokens prefilled before teacher-forced decoding (1 .. sink)")
          ->capture_default_str();
      sub.add_flag("--cpu-fallback", o->cpu_fallback,
                   "--device cuda: run modes the GPU engine lacks (kivi2) on the CPU");
      sub.add_flag("--fold-v", o->fold_v,
                   "--device cuda: fold R_v into W_v/W_o at load for oscar/hadamard2 (own weight copy per engine)");
      sub.add_option("--out", o->out, "output directory (created) for report.json, report.md, report.html")
          ->capture_default_str();
      sub.add_flag("--strict", o->strict, "refuse evaluation files that were part of the bundle's calibration data");
      sub.add_option("--seed", o->seed, "seed of sequence sampling, hadamard2 signs and retrieval keys")
          ->capture_default_str();
      sub.add_flag("--timestamp", o->timestamp, "record the UTC time in the reports (off: reports are reproducible)");
      return [o] { return run_eval(*o); };
    });

}  // namespace oscar::app
