// oscar inspect: everything a .oscar bundle says, readable (or --json): model fingerprint, calibration provenance,
// quantizer spec, per-layer eigen-spectra (top eigenvalues, condition number), clip ratios, error report, sizes.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <memory>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "apps/oscar/bundle_tools.h"
#include "apps/oscar/command.h"
#include "apps/oscar/common.h"
#include "formats/atomic_file.h"
#include "formats/bundle.h"
#include "lib/calib/ef_calibration.h"

namespace oscar::app {
namespace {

struct InspectOptions {
  std::string bundle;
  bool json = false;
  int top = 3;
};

// How many leading eigenvalues the summary shows, and the spectrum's shape in two numbers: λ_max / λ_min (inf when
// the smallest is not positive, as for a rank-deficient Σ) and the share of the trace in the top eighth of dims,
// which is what the INT2 error depends on.
struct Spectrum {
  std::vector<double> top;
  double condition = 0;
  double top_eighth_energy = 0;
};

Spectrum summarize(std::span<const double> values, int top) {
  Spectrum s;
  const size_t n = values.size();
  for (size_t i = 0; i < std::min<size_t>(n, static_cast<size_t>(std::max(top, 0))); ++i) s.top.push_back(values[i]);
  if (n == 0) return s;
  const double mx = values.front(), mn = values.back();
  s.condition = mn > 0 ? mx / mn : std::numeric_limits<double>::infinity();
  double total = 0, head = 0;
  const size_t eighth = std::max<size_t>(1, n / 8);
  for (size_t i = 0; i < n; ++i) {
    total += std::max(values[i], 0.0);
    if (i < eighth) head += std::max(values[i], 0.0);
  }
  s.top_eighth_energy = total > 0 ? head / total : 0;
  return s;
}

nlohmann::json number(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json("inf"); }

std::string segments_text(const fmt::TensorQuantSpec& t) {
  std::string s;
  for (const auto& seg : t.segments) s += ::fmt::format("{}[{},{}):{}b", s.empty() ? "" : " ", seg.begin, seg.end, seg.bits);
  return s.empty() ? "-" : s;
}

int run_inspect(const InspectOptions& o) {
  const fmt::Bundle b = fmt::read_bundle(o.bundle);
  const auto file_bytes = static_cast<double>(std::filesystem::file_size(o.bundle));
  const std::string file_sha = fmt::sha256_file(o.bundle);
  const int64_t d = b.quant.head_dim, g = b.rotation_groups;
  // Format 1.1 bundles may give each layer its own segment layout (layer_spec), so the cache size is a sum.
  const double layer_elements = static_cast<double>(b.model.num_kv_heads * d);
  double kv_bytes_per_token = 0;
  for (size_t l = 0; l < b.layers.size(); ++l) {
    const fmt::KvQuantSpec s = fmt::layer_spec(b, l);
    kv_bytes_per_token += layer_elements * (s.k.bits_per_element(d) + s.v.bits_per_element(d)) / 8;
  }
  const double bf16_bytes_per_token = static_cast<double>(b.layers.size()) * layer_elements * 4;
  const double rotation_bytes = static_cast<double>(b.layers.size()) * 2.0 * static_cast<double>(g * d * d) * 4.0;

  // Format 1.2: which tensors round with error feedback (the rest round to nearest).
  std::string ef_k, ef_v;
  for (size_t l = 0; l < b.layers.size(); ++l) {
    if (!b.layers[l].k_ef_order.empty()) ef_k += (ef_k.empty() ? "" : ",") + std::to_string(l);
    if (!b.layers[l].v_ef_order.empty()) ef_v += (ef_v.empty() ? "" : ",") + std::to_string(l);
  }
  const bool has_ef = fmt::has_error_feedback(b);
  // Format 2.0: which tensors store a per-KV-head transform instead of the rotation.
  std::string tf_k, tf_v;
  for (size_t l = 0; l < b.layers.size(); ++l) {
    if (!b.layers[l].k_transform.empty()) tf_k += (tf_k.empty() ? "" : ",") + std::to_string(l);
    if (!b.layers[l].v_transform.empty()) tf_v += (tf_v.empty() ? "" : ",") + std::to_string(l);
  }
  const bool has_tf = fmt::has_storage_transform(b);

  if (o.json) {
    nlohmann::json j;
    j["file"] = o.bundle;
    if (has_ef)
      j["error_feedback"] = {{"k_layers", ef_k},
                             {"v_layers", ef_v},
                             {"clip_feedback", b.ef_clip_feedback},
                             {"key_table_positions", calib::error_feedback_context(b)},
                             {"key_metric_stored", fmt::has_key_metric(b)},
                             {"key_metric_positions", b.ef_metric_positions},
                             {"damp", b.ef_damp}};
    if (has_tf) j["storage_transforms"] = {{"k_layers", tf_k}, {"v_layers", tf_v}};
    j["sha256"] = file_sha;
    j["format"] = ::fmt::format("{}.{}", b.format_major, b.format_minor);
    j["producer"] = b.producer;
    const auto& m = b.model;
    j["model"] = {{"architecture", m.architecture}, {"num_layers", m.num_layers}, {"num_heads", m.num_heads},
                  {"num_kv_heads", m.num_kv_heads}, {"head_dim", m.head_dim},   {"hidden_size", m.hidden_size},
                  {"vocab_size", m.vocab_size},     {"config_sha256", m.config_sha256},
                  {"attention_sha256", m.attention_sha256}};
    const auto& c = b.calibration;
    nlohmann::json files = nlohmann::json::array();
    for (const auto& f : c.data_files) files.push_back({{"path", f.path}, {"sha256", f.sha256}});
    nlohmann::json options = nlohmann::json::object();
    for (const auto& [k, v] : c.options) options[k] = v;
    j["calibration"] = {{"data_files", files},       {"num_sequences", c.num_sequences},
                        {"num_tokens", c.num_tokens}, {"seq_len", c.seq_len},
                        {"num_heldout_sequences", c.num_heldout_sequences},
                        {"seed", c.seed},             {"options", options}};
    auto tensor_json = [&](const fmt::TensorQuantSpec& t) {
      nlohmann::json segs = nlohmann::json::array();
      for (const auto& s : t.segments) segs.push_back({{"begin", s.begin}, {"end", s.end}, {"bits", s.bits}});
      return nlohmann::json{{"storage", std::string(fmt::kv_storage_name(t.storage))},
                            {"clip_ratio", t.clip_ratio},
                            {"segments", segs},
                            {"bits_per_element", t.bits_per_element(d)}};
    };
    j["quant"] = {{"head_dim", d},
                  {"sink_tokens", b.quant.sink_tokens},
                  {"recent_tokens", b.quant.recent_tokens},
                  {"k", tensor_json(b.quant.k)},
                  {"v", tensor_json(b.quant.v)}};
    j["rotation_groups"] = g;
    j["rotation_composition"] = b.rotation_composition;
    nlohmann::json layers = nlohmann::json::array();
    for (size_t l = 0; l < b.layers.size(); ++l) {
      const auto& L = b.layers[l];
      nlohmann::json lg = nlohmann::json::array();
      for (int64_t gi = 0; gi < g; ++gi) {
        const auto ks = summarize(std::span(L.k_eigenvalues).subspan(gi * d, d), o.top);
        const auto vs = summarize(std::span(L.v_eigenvalues).subspan(gi * d, d), o.top);
        lg.push_back({{"k_top_eigenvalues", ks.top}, {"k_condition", number(ks.condition)},
                      {"k_top_eighth_energy", ks.top_eighth_energy}, {"v_top_eigenvalues", vs.top},
                      {"v_condition", number(vs.condition)}, {"v_top_eighth_energy", vs.top_eighth_energy}});
      }
      const fmt::KvQuantSpec ls = fmt::layer_spec(b, l);
      layers.push_back({{"layer", l}, {"k_clip_ratio", L.k_clip_ratio}, {"v_clip_ratio", L.v_clip_ratio},
                        {"k_segments", segments_text(ls.k)}, {"v_segments", segments_text(ls.v)},
                        {"own_segments", !L.k_segments.empty() || !L.v_segments.empty()}, {"groups", lg}});
    }
    j["layers"] = layers;
    nlohmann::json rows = nlohmann::json::array();
    const auto& e = b.errors;
    for (size_t r = 0; r < e.rows.size(); ++r) {
      const auto L = static_cast<size_t>(e.num_layers);
      std::vector<double> k(e.k_relative_error.begin() + r * L, e.k_relative_error.begin() + (r + 1) * L);
      std::vector<double> v(e.v_relative_error.begin() + r * L, e.v_relative_error.begin() + (r + 1) * L);
      rows.push_back({{"row", e.rows[r]}, {"k_relative_error", k}, {"v_relative_error", v}});
    }
    j["error_report"] = rows;
    j["sizes"] = {{"file_bytes", file_bytes},
                  {"rotation_bytes", rotation_bytes},
                  {"kv_bytes_per_token", kv_bytes_per_token},
                  {"bf16_kv_bytes_per_token", bf16_bytes_per_token}};
    std::puts(j.dump(2).c_str());
    return 0;
  }

  std::string out;
  auto line = [&](std::string_view key, const std::string& value) { out += ::fmt::format("{:<16}{}\n", key, value); };
  line("bundle", o.bundle);
  line("sha256", file_sha);
  line("format", ::fmt::format("{}.{} ({})", b.format_major, b.format_minor, b.producer));
  const auto& m = b.model;
  line("model", ::fmt::format("{}: {} layers, {} heads / {} KV heads, head_dim {}, hidden {}, vocab {}", m.architecture,
                              m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.hidden_size, m.vocab_size));
  line("config sha256", m.config_sha256);
  line("attention sha", m.attention_sha256);
  const auto& c = b.calibration;
  line("calibration", ::fmt::format("{} sequences, {} tokens, seq_len {}, {} held-out, seed {}", c.num_sequences,
                                    c.num_tokens, c.seq_len, c.num_heldout_sequences, c.seed));
  for (const auto& f : c.data_files) line("  data", ::fmt::format("{} (sha256 {})", f.path, f.sha256));
  for (const auto& [k, v] : c.options) line("  option", ::fmt::format("{} = {}", k, v));
  for (auto [name, t] : {std::pair{"K", &b.quant.k}, std::pair{"V", &b.quant.v}})
    line(::fmt::format("quant {}", name),
         ::fmt::format("{} {} clip {:.4g} ({:.3f} bits/element)", fmt::kv_storage_name(t->storage), segments_text(*t),
                       t->clip_ratio, t->bits_per_element(d)));
  line("windows", ::fmt::format("first {} and last {} tokens kept bf16", b.quant.sink_tokens, b.quant.recent_tokens));
  line("rotations", ::fmt::format("{} ({} per layer)", b.rotation_composition,
                                  g == 1 ? std::string("one shared") : ::fmt::format("{}, one per KV head", g)));
  if (has_ef)
    line("error feedback",
         ::fmt::format("K layers [{}], V layers [{}], clip feedback {}, key tables for positions 0..{} (other "
                       "tensors: RTN)",
                       ef_k, ef_v, b.ef_clip_feedback ? "on" : "off", calib::error_feedback_context(b) - 1));
  if (fmt::has_key_metric(b))
    line("key metric",
         ::fmt::format("stored (format 1.3; positions 0..{}, damp {:.6g}): eval and the engine rebuild the key tables "
                       "for their context (--ef-context)",
                       b.ef_metric_positions - 1, b.ef_damp));
  if (has_tf)
    line("transforms",
         ::fmt::format("K layers [{}], V layers [{}]: per KV head y = (x - mean)·A (format 2.0; keys centered)",
                       tf_k, tf_v));
  line("sizes", ::fmt::format("file {}, rotations {}; KV cache {}/token vs bf16 {}/token", human_bytes(file_bytes),
                              human_bytes(rotation_bytes), human_bytes(kv_bytes_per_token),
                              human_bytes(bf16_bytes_per_token)));

  out += ::fmt::format("\n{:>5} {:>5}  {:>6} {:>6}  {:<30} {:>9} {:>6}  {:<30} {:>9} {:>6}\n", "layer", "group", "clipK",
                       "clipV", "K eigenvalues (top)", "K cond", "K top8", "V eigenvalues (top)", "V cond", "V top8");
  auto cond_text = [](double v) { return std::isfinite(v) ? ::fmt::format("{:.3g}", v) : std::string("inf"); };
  for (size_t l = 0; l < b.layers.size(); ++l) {
    const auto& L = b.layers[l];
    for (int64_t gi = 0; gi < g; ++gi) {
      const auto ks = summarize(std::span(L.k_eigenvalues).subspan(gi * d, d), o.top);
      const auto vs = summarize(std::span(L.v_eigenvalues).subspan(gi * d, d), o.top);
      out += ::fmt::format("{:>5} {:>5}  {:>6.3f} {:>6.3f}  {:<30} {:>9} {:>5.1f}%  {:<30} {:>9} {:>5.1f}%\n", l, gi,
                           L.k_clip_ratio, L.v_clip_ratio, ::fmt::format("{:.4g}", ::fmt::join(ks.top, " ")),
                           cond_text(ks.condition), 100 * ks.top_eighth_energy,
                           ::fmt::format("{:.4g}", ::fmt::join(vs.top, " ")), cond_text(vs.condition),
                           100 * vs.top_eighth_energy);
    }
  }
  const auto& e = b.errors;
  if (!e.rows.empty() && e.num_layers > 0) {
    out += ::fmt::format("\nerror report (relative, mean over {} layers; per layer in --json)\n{:<24} {:>12} {:>12}\n",
                         e.num_layers, "configuration", "K logit", "V output");
    const auto L = static_cast<size_t>(e.num_layers);
    for (size_t r = 0; r < e.rows.size(); ++r) {
      double k = 0, v = 0;
      for (size_t l = 0; l < L; ++l) k += e.k_relative_error[r * L + l], v += e.v_relative_error[r * L + l];
      out += ::fmt::format("{:<24} {:>12.5g} {:>12.5g}\n", e.rows[r], k / L, v / L);
    }
  } else {
    out += "\nerror report: empty (calibrated without held-out data)\n";
  }
  for (size_t l = 0; l < b.layers.size(); ++l)
    if (!b.layers[l].k_segments.empty() || !b.layers[l].v_segments.empty()) {
      const fmt::KvQuantSpec ls = fmt::layer_spec(b, l);
      out += ::fmt::format("layer {} segments: K {} | V {}\n", l, segments_text(ls.k), segments_text(ls.v));
    }
  // --method spectral's per-layer choice (provenance "layer_choice" / "layer_proxy" / "layer_kl":
  // "name=p0/p1/..;name=..."; "candidate_metric" absent = proxy, as in bundles made before the option).
  std::string choice, proxies, kls, metric = "proxy";
  for (const auto& [k, v] : c.options) {
    if (k == "layer_choice") choice = v;
    if (k == "layer_proxy") proxies = v;
    if (k == "layer_kl") kls = v;
    if (k == "candidate_metric") metric = v;
  }
  if (!choice.empty()) {
    auto split = [](std::string_view text, char sep) {
      std::vector<std::string> parts;
      for (size_t start = 0; start <= text.size();) {
        const size_t end = std::min(text.find(sep, start), text.size());
        parts.emplace_back(text.substr(start, end - start));
        start = end + 1;
      }
      return parts;
    };
    const auto chosen = split(choice, ',');
    auto per_layer = [&](const std::string& text) {
      std::vector<std::pair<std::string, std::vector<std::string>>> per;
      for (const std::string& item : split(text, ';'))
        if (const size_t eq = item.find('='); eq != std::string::npos)
          per.emplace_back(item.substr(0, eq), split(std::string_view(item).substr(eq + 1), '/'));
      return per;
    };
    const auto per_proxy = per_layer(proxies), per_kl = per_layer(kls);
    auto row = [](const auto& per, size_t l) {
      std::string p;
      for (const auto& [name, values] : per)
        if (l < values.size()) p += ::fmt::format("{}{} {}", p.empty() ? "" : ", ", name, values[l]);
      return p;
    };
    out += ::fmt::format("per-layer candidates chosen by: {}\n", metric);
    for (size_t l = 0; l < chosen.size(); ++l) {
      out += ::fmt::format("layer {} stored as {} (selection proxy: {}", l, chosen[l], row(per_proxy, l));
      if (!per_kl.empty()) out += ::fmt::format("; selection KL: {}", row(per_kl, l));
      out += ")\n";
    }
  }
  std::fputs(out.c_str(), stdout);
  return 0;
}

}  // namespace

OSCAR_REGISTER_COMMAND(
    "inspect", "Show what a .oscar bundle holds: model, provenance, quantizer, eigen-spectra, clips, error report", 60,
    [](CLI::App& sub) -> RunCommand {
      auto o = std::make_shared<InspectOptions>();
      sub.add_option("FILE", o->bundle, ".oscar bundle")->required()->type_name("FILE");
      sub.add_option("--top", o->top, "leading eigenvalues shown per layer")->capture_default_str()->check(CLI::Range(0, 4096));
      add_json_flag(sub, o->json);
      return [o] { return run_inspect(*o); };
    });

}  // namespace oscar::app
