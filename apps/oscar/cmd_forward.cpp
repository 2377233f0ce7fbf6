// oscar forward: one forward pass over a prompt, on the fp32 CPU reference or (--device cuda) the bf16 GPU
// DeviceModel; logits and the post-RoPE K/V of every layer can be dumped to safetensors, the format the golden files
// use, so any run can be compared with transformers (or the other device) tensor by tensor.
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <memory>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "apps/oscar/command.h"
#include "apps/oscar/common.h"
#include "formats/error.h"
#include "formats/safetensors.h"
#include "lib/model/observer.h"
#include "oscar_version.h"
#ifdef OSCAR_HAVE_CUDA
#include "runtime/device_model.h"
#include "runtime/gpu_calibration.h"
#endif

namespace oscar::app {
namespace {

struct ForwardCliOptions {
  std::string model_dir;
  std::string ids;
  std::string prompt;
  std::string dump;
  std::string device = "cpu";
  int top = 5;
  bool json = false;
  bool random_weights = false;  // --device cuda: weights drawn on the GPU from --seed; --model may be a config.json
  uint64_t seed = 0;
};

// Keeps a copy of every layer's K (post-RoPE, as a KV cache stores it) and V, [num_kv_heads, T, head_dim].
class KvCapture : public model::Observer {
 public:
  explicit KvCapture(int64_t layers) : k(static_cast<size_t>(layers)), v(static_cast<size_t>(layers)) {}
  void on_attention_inputs(const model::AttentionInputs& in) override {
    const size_t n = static_cast<size_t>(in.num_kv_heads * in.num_tokens * in.head_dim);
    k.at(static_cast<size_t>(in.layer)).assign(in.k, in.k + n);
    v.at(static_cast<size_t>(in.layer)).assign(in.v, in.v + n);
  }
  std::vector<std::vector<float>> k, v;
};

std::vector<int32_t> forward_ids(const ForwardCliOptions& o, const fmt::ModelConfig& cfg) {
  std::vector<int32_t> ids;
  if (!o.ids.empty()) {
    ids = parse_id_list(o.ids, cfg.vocab_size, "--ids");
  } else {
    auto tok = load_tokenizer(o.model_dir);
    ids = encode_prompt(*tok, o.prompt, "--prompt");
  }
  const auto T = static_cast<int64_t>(ids.size());
  if (cfg.max_position_embeddings > 0 && T > cfg.max_position_embeddings)
    spdlog::warn("{} tokens exceed max_position_embeddings {}", T, cfg.max_position_embeddings);
  return ids;
}

// One forward's outputs: every position's logits [T, vocab] and every layer's K/V ([num_kv_heads, T, d]).
struct ForwardRun {
  fmt::ModelConfig cfg;
  std::vector<int32_t> ids;
  std::vector<float> logits;
  std::unique_ptr<KvCapture> kv;
};

ForwardRun forward_on_cpu(const ForwardCliOptions& o) {
  ForwardRun run;
  auto model = load_model(o.model_dir);
  run.cfg = model->config();
  run.ids = forward_ids(o, run.cfg);
  run.kv = std::make_unique<KvCapture>(run.cfg.num_layers);
  model::KvCache cache(run.cfg, static_cast<int64_t>(run.ids.size()));
  model::ForwardOptions fwd;
  fwd.observer = run.kv.get();
  run.logits = model->forward(run.ids, cache, fwd);
  return run;
}

// The GPU forward: bf16 weights, fp32 residual and accumulation (runtime/device_model.h). K/V are the forward's
// fp32 copies (before the bf16 rounding the attention reads), relayed to the host in the CPU layout; they are
// copied only when they are dumped.
ForwardRun forward_on_device(const ForwardCliOptions& o) {
#ifndef OSCAR_HAVE_CUDA
  (void)o;
  throw Error("--device cuda", "this build has no CUDA runtime (CPU only build); use --device cpu");
#else
  std::unique_ptr<rt::DeviceModel> model;
  if (o.random_weights) {
    // Any config.json shape, no checkpoint: a model folder or the config file itself (bench/configs/*.json).
    fmt::ModelConfig shape;
    if (std::filesystem::is_regular_file(o.model_dir)) {
      shape = fmt::ModelConfig::from_file(o.model_dir);
    } else {
      check_model_dir(o.model_dir);
      shape = fmt::ModelConfig::from_dir(o.model_dir);
    }
    rt::require_cuda_device("--device cuda");
    model = rt::DeviceModel::random(shape, o.seed);
  } else {
    check_model_dir(o.model_dir);
    rt::require_cuda_device("--device cuda");
    model = rt::DeviceModel::load(o.model_dir);
  }
  ForwardRun run;
  run.cfg = model->config();
  run.ids = forward_ids(o, run.cfg);
  run.kv = std::make_unique<KvCapture>(run.cfg.num_layers);
  const std::unique_ptr<rt::DeviceObserver> relay = rt::make_host_relay(*run.kv);
  rt::PackedBatch batch;
  batch.add_sequence(run.ids);
  rt::DeviceForwardOptions fwd;
  fwd.observer = o.dump.empty() ? nullptr : relay.get();
  fwd.rows = rt::LogitsRows::All;
  fwd.type = rt::LogitsType::F32;
  run.logits = model->forward(batch, fwd).to_host();
  return run;
#endif
}

int run_forward(const ForwardCliOptions& o) {
  if (o.device != "cuda") require_cpu_device(o.device);
  if (o.random_weights && o.device != "cuda")
    throw Error("--random-weights", "draws the weights on the GPU: add --device cuda (`oscar synth` writes a random "
                                    "checkpoint the CPU reference can load)");
  if (o.random_weights && o.ids.empty() && std::filesystem::is_regular_file(o.model_dir))
    throw Error("--prompt", "needs the tokenizer of a model folder; --model " + o.model_dir + " is a file: pass --ids");
  // Fail before the (possibly long) forward pass when the dump could not be written anyway.
  if (!o.dump.empty()) check_output_parent(o.dump);

  const ForwardRun run = o.device == "cuda" ? forward_on_device(o) : forward_on_cpu(o);
  const fmt::ModelConfig& cfg = run.cfg;
  const std::vector<int32_t>& ids = run.ids;
  const std::vector<float>& logits = run.logits;
  const KvCapture* capture = run.kv.get();
  const auto T = static_cast<int64_t>(ids.size());
  const int64_t vocab = static_cast<int64_t>(logits.size()) / T;

  if (!o.dump.empty()) {
    std::vector<fmt::TensorToWrite> tensors;
    tensors.push_back(fmt::f32_tensor("logits", {T, vocab}, logits));
    tensors.push_back({"input_ids", fmt::DType::I32, {T}, std::as_bytes(std::span<const int32_t>(ids))});
    const std::vector<int64_t> kv_shape = {cfg.num_kv_heads, T, cfg.head_dim};
    for (int64_t l = 0; l < cfg.num_layers; ++l) {
      tensors.push_back(fmt::f32_tensor(::fmt::format("layers.{}.k", l), kv_shape, capture->k[l]));
      tensors.push_back(fmt::f32_tensor(::fmt::format("layers.{}.v", l), kv_shape, capture->v[l]));
    }
    const std::map<std::string, std::string> metadata = {
        {"command", command_line()},
        {"model", o.model_dir},
        {"device", o.device == "cuda" ? "cuda (bf16 weights, fp32 residual and K/V)" : "cpu (fp32 reference)"},
        {"weights", o.random_weights ? ::fmt::format("random (seed {})", o.seed) : std::string("checkpoint")},
        {"oscar_version", OSCAR_VERSION_STRING},
        {"layout",
         "logits [T, vocab] fp32; input_ids [T] int32; layers.N.k / layers.N.v [num_kv_heads, T, head_dim] fp32, "
         "k after RoPE (and q/k-norm), as a KV cache stores it"}};
    fmt::write_safetensors(o.dump, tensors, metadata);
    spdlog::info("wrote {} ({} tensors)", o.dump, tensors.size());
  }

  // Summary of the last position: the top candidates for the next token.
  const std::span<const float> last(logits.data() + (T - 1) * vocab, static_cast<size_t>(vocab));
  std::vector<int32_t> order(static_cast<size_t>(vocab));
  for (int32_t i = 0; i < vocab; ++i) order[i] = i;
  const int top = std::clamp<int>(o.top, 0, static_cast<int>(vocab));
  std::partial_sort(order.begin(), order.begin() + top, order.end(),
                    [&](int32_t a, int32_t b) { return last[a] > last[b] || (last[a] == last[b] && a < b); });
  if (o.json) {
    nlohmann::json top_json = nlohmann::json::array();
    for (int i = 0; i < top; ++i) top_json.push_back({{"id", order[i]}, {"logit", last[order[i]]}});
    nlohmann::json j = {
        {"input_ids", ids}, {"num_tokens", T}, {"vocab", vocab}, {"top_next", top_json}, {"device", o.device}};
    if (o.random_weights) j["random_weights_seed"] = o.seed;
    if (!o.dump.empty()) j["dump"] = o.dump;
    std::puts(j.dump(2).c_str());
  } else {
    std::string out = ::fmt::format("{} tokens, vocab {}; top-{} next tokens:\n", T, vocab, top);
    for (int i = 0; i < top; ++i) out += ::fmt::format("  {:>8}  {:+.4f}\n", order[i], last[order[i]]);
    std::fputs(out.c_str(), stdout);
  }
  return 0;
}

}  // namespace

OSCAR_REGISTER_COMMAND(
    "forward",
    "Run the forward pass (CPU reference or --device cuda) on a prompt; optionally dump logits and per-layer K/V to "
    "safetensors",
    30,
    [](CLI::App& sub) -> RunCommand {
      auto o = std::make_shared<ForwardCliOptions>();
      add_model_option(sub, o->model_dir);
      auto* ids = sub.add_option("--ids", o->ids, "comma-separated token ids, used as given (no BOS added)")
                      ->type_name("1,2,3");
      auto* prompt = sub.add_option("--prompt", o->prompt, "text, tokenized with the model's tokenizer (BOS added)");
      ids->excludes(prompt);
      prompt->excludes(ids);
      sub.add_option("--dump", o->dump, "write logits, input_ids and layers.N.{k,v} (fp32) to this .safetensors file")
          ->type_name("OUT.safetensors");
      sub.add_option("--top", o->top, "how many next-token candidates to print")->capture_default_str();
      add_device_option(sub, o->device);
      sub.add_flag("--random-weights", o->random_weights,
                   "--device cuda: deterministic random bf16 weights of --model's config.json shape (a model folder "
                   "or the config file itself), no checkpoint; for benchmarks of large shapes");
      sub.add_option("--seed", o->seed, "seed of --random-weights")->capture_default_str();
      add_json_flag(sub, o->json);
      sub.callback([ids, prompt] {
        if (ids->count() == 0 && prompt->count() == 0) throw CLI::RequiredError("--ids or --prompt");
      });
      return [o] { return run_forward(*o); };
    });

}  // namespace oscar::app
