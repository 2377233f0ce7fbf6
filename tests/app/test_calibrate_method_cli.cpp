// `oscar calibrate --method feedback|spectral|published` and `--rotation` on the CPU, on the real TinyStories
// llama2.c 280k checkpoint (head_dim 8, so the spectral budget must be raised: its scale/zero metadata alone is 4
// bits/element).
// Flags must be recorded in the bundle, repeat runs must give the same bytes, and bad values must be one clear
// error line naming the flag.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "formats/bundle.h"
#include "formats/error.h"
#include "formats/model_config.h"
#include "lib/calib/ef_calibration.h"
#include "lib/calib/rotation.h"
#include "calibrate_cli_fixture.h"
#include "run_oscar.h"
#include "test_support.h"

namespace oscar::test {
namespace {

namespace fs = std::filesystem;

class CalibrateMethodCli : public TinyStoriesCalibrateCli {
 protected:
  std::vector<std::string> args(const fs::path& out, const std::vector<std::string>& extra) const {
    return calibrate_args(out,
                          // Bundle 1.x throughout: these tests are about the methods, tables and key metrics, and
                          // format 2.0 transforms have their own (test_calibrate_transform_cli.cpp).
                          {"--num-seqs", "4", "--seq-len", "64", "--heldout-seqs", "3", "--sink", "16", "--recent",
                           "16", "--seed", "5", "--log-level", "warn", "--transform", "none"},
                          extra);
  }
  static std::string option(const fmt::Bundle& b, const std::string& key) {
    for (const auto& [k, v] : b.calibration.options)
      if (k == key) return v;
    return "(absent)";
  }
};

TEST_F(CalibrateMethodCli, SpectralIsRecordedValidWithinBudgetAndByteDeterministic) {
  const std::vector<std::string> spectral = {"--method", "spectral", "--budget-bits", "6",
                                             "--widths", "0,2,3,4", "--k-weight-grid", "1,4"};
  const RunResult a = run_oscar(args(dir_ / "a.oscar", spectral));
  ASSERT_EQ(a.exit_code, 0) << a.err;
  const RunResult b = run_oscar(args(dir_ / "b.oscar", spectral));
  ASSERT_EQ(b.exit_code, 0) << b.err;
  EXPECT_EQ(slurp(dir_ / "a.oscar"), slurp(dir_ / "b.oscar"));
  EXPECT_NE(a.out.find("Spectral allocation"), std::string::npos) << a.out;

  const fmt::Bundle bundle = fmt::read_bundle(dir_ / "a.oscar");
  EXPECT_EQ(bundle.rotation_composition, "spectral");
  EXPECT_EQ(option(bundle, "method"), "spectral");
  EXPECT_EQ(option(bundle, "budget_bits"), "6");
  EXPECT_EQ(option(bundle, "widths"), "0,2,3,4");
  EXPECT_EQ(option(bundle, "k_weight_mode"), "auto");
  EXPECT_EQ(option(bundle, "k_weight_grid"), "1,4");
  EXPECT_EQ(option(bundle, "cayley"), "false");
  // The per-layer choice (issue #10) is on by default and recorded with each candidate's proxy.
  EXPECT_EQ(option(bundle, "candidates"), "spectral,hadamard");
  EXPECT_EQ(option(bundle, "whole_head_tolerance"), "0.02");
  const std::string choice = option(bundle, "layer_choice");
  EXPECT_EQ(std::count(choice.begin(), choice.end(), ',') + 1, static_cast<long>(bundle.layers.size())) << choice;
  EXPECT_EQ(option(bundle, "layer_proxy").rfind("spectral=", 0), 0u) << option(bundle, "layer_proxy");
  EXPECT_NE(a.out.find("Per-layer candidates"), std::string::npos) << a.out;
  const std::string chosen = option(bundle, "k_weight");
  EXPECT_TRUE(chosen == "1" || chosen == "4") << chosen;
  // The baseline: the published bundle at the default fixed clip ratios.
  EXPECT_NE(option(bundle, "k_weight_proxy").find(",oscar+clip:"), std::string::npos);
  // Report rows: the chosen one and each candidate, next to the published rows.
  for (const char* row : {"spectral", "spectral(k_weight=1)", "spectral(k_weight=4)", "oscar+clip"})
    EXPECT_NE(std::find(bundle.errors.rows.begin(), bundle.errors.rows.end(), row), bundle.errors.rows.end()) << row;
  const int64_t d = bundle.quant.head_dim;
  for (size_t l = 0; l < bundle.layers.size(); ++l) {
    const fmt::KvQuantSpec s = fmt::layer_spec(bundle, l);
    s.validate("layer");  // segments tile [0, d)
    for (const auto* t : {&s.k, &s.v})
      for (const auto& seg : t->segments) {
        EXPECT_NE(seg.bits, 1) << "width 1 was not allowed";
      }
    EXPECT_LE(0.5 * (s.k.bits_per_element(d) + s.v.bits_per_element(d)), 6.0 + 1e-12) << "layer " << l;
    EXPECT_LT(calib::orthogonality_error(std::vector<double>(bundle.layers[l].k_rotation.begin(),
                                                             bundle.layers[l].k_rotation.end()),
                                         d),
              1e-5);
  }
}

TEST_F(CalibrateMethodCli, CandidatesFlagJsonAndInspect) {
  // --candidates spectral: no per-layer choice, nothing new in the provenance (the bundle of before this flag).
  const RunResult s =
      run_oscar(args(dir_ / "s.oscar", {"--method", "spectral", "--budget-bits", "6", "--candidates", "spectral"}));
  ASSERT_EQ(s.exit_code, 0) << s.err;
  const fmt::Bundle sb = fmt::read_bundle(dir_ / "s.oscar");
  for (const char* key : {"candidates", "whole_head_tolerance", "layer_choice", "layer_proxy"})
    EXPECT_EQ(option(sb, key), "(absent)") << key;
  EXPECT_EQ(s.out.find("Per-layer candidates"), std::string::npos);

  const RunResult j = run_oscar(args(dir_ / "j.oscar", {"--method", "spectral", "--budget-bits", "6",
                                                         "--whole-head-tolerance", "0.5",
                                                         "--candidates", "published,spectral", "--json"}));
  ASSERT_EQ(j.exit_code, 0) << j.err;
  const nlohmann::json js = nlohmann::json::parse(j.out);
  const fmt::Bundle jb = fmt::read_bundle(dir_ / "j.oscar");
  EXPECT_EQ(js.at("layer_choice"), option(jb, "layer_choice"));
  EXPECT_EQ(option(jb, "candidates"), "published,spectral");
  EXPECT_EQ(option(jb, "whole_head_tolerance"), "0.5");
  const std::string proxy = js.at("layer_proxy");
  EXPECT_EQ(proxy.rfind("published=", 0), 0u) << proxy;  // scored in the order given
  EXPECT_NE(proxy.find(";spectral="), std::string::npos) << proxy;
  EXPECT_EQ(proxy.find("hadamard"), std::string::npos) << proxy;

  const RunResult i = run_oscar({"inspect", (dir_ / "j.oscar").string()});
  ASSERT_EQ(i.exit_code, 0) << i.err;
  EXPECT_NE(i.out.find("layer_choice = " + option(jb, "layer_choice")), std::string::npos) << i.out;
  EXPECT_NE(i.out.find("stored as"), std::string::npos) << i.out;
}

// --candidate-metric kl: recorded (the metric and each candidate's KL per layer) in the bundle, --json and inspect;
// the default metric records nothing new.
TEST_F(CalibrateMethodCli, CandidateMetricKlIsRecordedAndInspected) {
  const RunResult r = run_oscar(args(dir_ / "kl.oscar", {"--method", "spectral", "--budget-bits", "6",
                                                          "--candidate-metric", "kl",
                                                          "--kl-tokens", "48", "--json"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const nlohmann::json js = nlohmann::json::parse(r.out);
  const fmt::Bundle b = fmt::read_bundle(dir_ / "kl.oscar");
  EXPECT_EQ(option(b, "candidate_metric"), "kl");
  EXPECT_EQ(option(b, "kl_tokens"), "48");
  EXPECT_EQ(option(b, "kl_positions"), "15");  // one selection sequence, positions 32..46
  EXPECT_EQ(js.at("candidate_metric"), "kl");
  EXPECT_EQ(js.at("layer_choice"), option(b, "layer_choice"));
  const std::string kl = js.at("layer_kl");
  EXPECT_EQ(kl, option(b, "layer_kl"));
  EXPECT_EQ(kl.rfind("spectral=", 0), 0u) << kl;
  EXPECT_NE(kl.find(";hadamard="), std::string::npos) << kl;
  const RunResult i = run_oscar({"inspect", (dir_ / "kl.oscar").string()});
  ASSERT_EQ(i.exit_code, 0) << i.err;
  EXPECT_NE(i.out.find("per-layer candidates chosen by: kl"), std::string::npos) << i.out;
  EXPECT_NE(i.out.find("selection KL: spectral "), std::string::npos) << i.out;

  const RunResult t = run_oscar(args(dir_ / "t.oscar", {"--method", "spectral", "--budget-bits", "6"}));
  ASSERT_EQ(t.exit_code, 0) << t.err;
  const RunResult ti = run_oscar({"inspect", (dir_ / "t.oscar").string()});
  ASSERT_EQ(ti.exit_code, 0) << ti.err;
  EXPECT_NE(ti.out.find("per-layer candidates chosen by: proxy"), std::string::npos) << ti.out;
  EXPECT_EQ(ti.out.find("selection KL"), std::string::npos) << ti.out;
}

TEST_F(CalibrateMethodCli, FixedKWeightAndJson) {
  const RunResult r = run_oscar(
      args(dir_ / "f.oscar", {"--method", "spectral", "--budget-bits", "6", "--k-weight", "2", "--json"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j.at("method"), "spectral");
  EXPECT_EQ(j.at("k_weight"), "2");
  EXPECT_EQ(j.at("rotation_composition"), "spectral");
  const fmt::Bundle b = fmt::read_bundle(dir_ / "f.oscar");
  EXPECT_EQ(option(b, "k_weight_mode"), "fixed");
  EXPECT_EQ(option(b, "k_weight_grid"), "(absent)");
}

TEST_F(CalibrateMethodCli, PublishedRotationsAreStoredAndRecorded) {
  const RunResult o = run_oscar(args(dir_ / "o.oscar", {"--method", "published"}));
  ASSERT_EQ(o.exit_code, 0) << o.err;
  const fmt::Bundle ob = fmt::read_bundle(dir_ / "o.oscar");
  EXPECT_EQ(ob.rotation_composition, "eigen*hadamard*bitrev");
  // The default published bundle adds no provenance keys, so it stays byte-identical to earlier releases.
  EXPECT_EQ(option(ob, "method"), "(absent)");
  EXPECT_EQ(option(ob, "rotation"), "(absent)");

  const int64_t d = 8;
  const std::vector<double> h = calib::hadamard(d);
  for (const auto& [name, composition] : std::vector<std::pair<std::string, std::string>>{
           {"hadamard", "hadamard"}, {"none", "none"}, {"eigen", "eigen"}}) {
    const fs::path out = dir_ / (name + ".oscar");
    const RunResult r = run_oscar(args(out, {"--method", "published", "--rotation", name}));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const fmt::Bundle b = fmt::read_bundle(out);
    EXPECT_EQ(b.rotation_composition, composition);
    EXPECT_EQ(option(b, "rotation"), name);
    EXPECT_NE(std::find(b.errors.rows.begin(), b.errors.rows.end(), name + "+clip"), b.errors.rows.end());
    // Same statistics: the eigenvalues equal the default bundle's; the rotation is the one asked for.
    EXPECT_EQ(b.layers[0].k_eigenvalues, ob.layers[0].k_eigenvalues);
    for (int64_t i = 0; i < d * d; ++i) {
      const double want = name == "hadamard" ? h[i] : name == "none" ? (i / d == i % d ? 1.0 : 0.0) : NAN;
      if (!std::isnan(want)) EXPECT_FLOAT_EQ(b.layers[0].k_rotation[i], static_cast<float>(want)) << name << " " << i;
    }
    if (name == "eigen") EXPECT_NE(b.layers[0].k_rotation, ob.layers[0].k_rotation);
  }
}

// The default method is feedback: published's bundle structure with a Hadamard rotation and error-feedback tables
// on every whole-head tensor, recorded as such; --rotation still applies.
TEST_F(CalibrateMethodCli, FeedbackIsTheDefaultHadamardWithTables) {
  const RunResult r = run_oscar(args(dir_ / "fb.oscar", {"--json"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j.at("method"), "feedback");
  EXPECT_EQ(j.at("rotation_composition"), "hadamard");
  EXPECT_EQ(j.at("error_feedback"), "kv");
  const fmt::Bundle b = fmt::read_bundle(dir_ / "fb.oscar");
  EXPECT_EQ(b.rotation_composition, "hadamard");
  EXPECT_EQ(option(b, "rotation"), "hadamard");
  EXPECT_EQ(option(b, "error_feedback"), "kv");
  const int64_t d = b.quant.head_dim;
  const std::vector<double> h = calib::hadamard(d);
  for (int64_t i = 0; i < d * d; ++i) EXPECT_FLOAT_EQ(b.layers[0].k_rotation[i], static_cast<float>(h[i])) << i;
  // The same bytes as the spelled-out flags.
  const RunResult p = run_oscar(args(dir_ / "pub.oscar", {"--method", "published", "--rotation", "hadamard"}));
  ASSERT_EQ(p.exit_code, 0) << p.err;
  EXPECT_EQ(slurp(dir_ / "fb.oscar"), slurp(dir_ / "pub.oscar"));
  // --rotation overrides feedback's Hadamard.
  const RunResult o = run_oscar(args(dir_ / "fo.oscar", {"--method", "feedback", "--rotation", "oscar"}));
  ASSERT_EQ(o.exit_code, 0) << o.err;
  EXPECT_EQ(fmt::read_bundle(dir_ / "fo.oscar").rotation_composition, "eigen*hadamard*bitrev");
}

// --ef-context carries the key metric to another context: recorded, the key tables change and the value tables do
// not (their metric has no position), and naming the calibration's own length is the default's bytes.
TEST_F(CalibrateMethodCli, EfContextChangesOnlyTheKeyTables) {
  const RunResult base = run_oscar(args(dir_ / "base.oscar", {}));
  ASSERT_EQ(base.exit_code, 0) << base.err;
  const RunResult same = run_oscar(args(dir_ / "same.oscar", {"--ef-context", "0"}));
  ASSERT_EQ(same.exit_code, 0) << same.err;
  EXPECT_EQ(slurp(dir_ / "base.oscar"), slurp(dir_ / "same.oscar"));
  const RunResult longer = run_oscar(args(dir_ / "long.oscar", {"--ef-context", "256", "--json"}));
  ASSERT_EQ(longer.exit_code, 0) << longer.err;
  EXPECT_EQ(nlohmann::json::parse(longer.out).at("ef_context"), "256");
  EXPECT_NE(base.out.find("Key tables made for positions 0..63, the calibration length"), std::string::npos) << base.out;
  const fmt::Bundle a = fmt::read_bundle(dir_ / "base.oscar"), b = fmt::read_bundle(dir_ / "long.oscar");
  EXPECT_EQ(option(a, "ef_context"), "(absent)");
  EXPECT_EQ(option(b, "ef_context"), "256");
  ASSERT_EQ(a.layers.size(), b.layers.size());
  size_t key_tables_changed = 0;
  for (size_t l = 0; l < a.layers.size(); ++l) {
    EXPECT_EQ(a.layers[l].k_rotation, b.layers[l].k_rotation) << "layer " << l;
    EXPECT_EQ(a.layers[l].v_ef_weights, b.layers[l].v_ef_weights) << "layer " << l;
    key_tables_changed += a.layers[l].k_ef_weights != b.layers[l].k_ef_weights;
  }
  EXPECT_EQ(key_tables_changed, a.layers.size());
  // inspect tells which positions the key tables are for; eval warns (and records) where it reads other contexts.
  const RunResult ia = run_oscar({"inspect", (dir_ / "base.oscar").string()});
  const RunResult ib = run_oscar({"inspect", (dir_ / "long.oscar").string()});
  ASSERT_EQ(ia.exit_code, 0) << ia.err;
  EXPECT_NE(ia.out.find("key tables for positions 0..63"), std::string::npos) << ia.out;
  EXPECT_NE(ib.out.find("key tables for positions 0..255"), std::string::npos) << ib.out;
  // Format 1.3 stores the collected key metric, so either bundle's key tables can be rebuilt for the other's
  // context, bit for bit what calibrate makes.
  const fmt::ModelConfig cfg = fmt::ModelConfig::from_dir(model_);
  EXPECT_EQ(a.format_minor, 3);
  EXPECT_EQ(a.ef_key_context, 64);
  EXPECT_EQ(b.ef_key_context, 256);
  EXPECT_EQ(b.ef_metric_positions, 64);
  const fmt::Bundle a256 = calib::bundle_for_context(a, cfg, 256), b64 = calib::bundle_for_context(b, cfg, 64);
  for (size_t l = 0; l < a.layers.size(); ++l) {
    EXPECT_EQ(a.layers[l].k_ef_metric, b.layers[l].k_ef_metric) << "layer " << l;
    EXPECT_EQ(a256.layers[l].k_ef_weights, b.layers[l].k_ef_weights) << "layer " << l;
    EXPECT_EQ(a256.layers[l].k_ef_order, b.layers[l].k_ef_order) << "layer " << l;
    EXPECT_EQ(b64.layers[l].k_ef_weights, a.layers[l].k_ef_weights) << "layer " << l;
    EXPECT_EQ(a256.layers[l].v_ef_weights, a.layers[l].v_ef_weights) << "layer " << l;
  }
  EXPECT_NE(ia.out.find("key metric      stored (format 1.3; positions 0..63"), std::string::npos) << ia.out;
  const RunResult ij = run_oscar({"inspect", (dir_ / "long.oscar").string(), "--json"});
  ASSERT_EQ(ij.exit_code, 0) << ij.err;
  const auto ef_json = nlohmann::json::parse(ij.out).at("error_feedback");
  EXPECT_EQ(ef_json.at("key_table_positions"), 256);
  EXPECT_EQ(ef_json.at("key_metric_stored"), true);
  EXPECT_EQ(ef_json.at("key_metric_positions"), 64);
  EXPECT_EQ(ef_json.at("damp"), 0.1);
  // diff names the key tables (every layer) and their positions, not the value tables (unchanged).
  const RunResult df = run_oscar({"diff", (dir_ / "base.oscar").string(), (dir_ / "long.oscar").string()});
  ASSERT_EQ(df.exit_code, 0) << df.err;
  EXPECT_NE(df.out.find("ef key tables for positions"), std::string::npos) << df.out;
  for (size_t l = 0; l < a.layers.size(); ++l)
    EXPECT_NE(df.out.find(::fmt::format("layer {} k ef table", l)), std::string::npos) << df.out;
  EXPECT_EQ(df.out.find("v ef table"), std::string::npos) << df.out;

  // eval --ef-context bundle reads the tables as stored: it warns (and records) where a context differs.
  auto eval_args = [&](const fs::path& bundle, const fs::path& out, const std::vector<std::string>& extra) {
    std::vector<std::string> v = {"eval", "--model", model_, "--bundle", bundle.string(), "--data", text_, "--modes",
                                  "bf16,oscar", "--context", "128,256", "--num-seqs", "1", "--greedy-prompts", "0",
                                  "--device", "cpu", "--out", out.string()};
    v.insert(v.end(), extra.begin(), extra.end());
    return v;
  };
  auto table_warnings = [&](const fs::path& report) {
    std::vector<std::string> out;
    const nlohmann::json j = nlohmann::json::parse(slurp(report / "report.json"));
    for (const auto& w : j.at("warnings"))
      if (w.get<std::string>().find("error-feedback key tables") != std::string::npos) out.push_back(w.get<std::string>());
    return out;
  };
  auto oscar_kl = [&](const fs::path& report, int64_t context) {
    const nlohmann::json j = nlohmann::json::parse(slurp(report / "report.json"));
    for (const auto& r : j.at("results"))
      if (r.at("mode") == "oscar" && r.at("context") == context) return r.at("all_positions").at("kl_mean").get<double>();
    ADD_FAILURE() << "no oscar row at context " << context << " in " << report;
    return -1.0;
  };
  const RunResult ev = run_oscar(eval_args(dir_ / "long.oscar", dir_ / "eval", {"--ef-context", "bundle"}));
  ASSERT_EQ(ev.exit_code, 0) << ev.err;
  EXPECT_NE(ev.err.find("context 128: the bundle's error-feedback key tables are made for 256 positions"),
            std::string::npos) << ev.err;
  EXPECT_EQ(ev.err.find("context 256: the bundle's"), std::string::npos) << ev.err;
  const auto bundle_warnings = table_warnings(dir_ / "eval");
  ASSERT_EQ(bundle_warnings.size(), 1u);
  EXPECT_NE(bundle_warnings[0].find("--ef-context auto"), std::string::npos) << bundle_warnings[0];
  // auto (the default): each context gets its own tables, no warning; context 128 scores as a bundle retargeted
  // to 128 does, context 256 as the tables made for 256.
  const RunResult au = run_oscar(eval_args(dir_ / "base.oscar", dir_ / "auto", {}));
  ASSERT_EQ(au.exit_code, 0) << au.err;
  EXPECT_TRUE(table_warnings(dir_ / "auto").empty());
  const auto settings = nlohmann::json::parse(slurp(dir_ / "auto" / "report.json")).at("settings");
  EXPECT_NE(settings.dump().find("auto (key tables rebuilt for each context"), std::string::npos) << settings.dump();
  const RunResult fixed = run_oscar(eval_args(dir_ / "base.oscar", dir_ / "fixed128", {"--ef-context", "128"}));
  ASSERT_EQ(fixed.exit_code, 0) << fixed.err;
  EXPECT_EQ(table_warnings(dir_ / "fixed128").size(), 1u);  // context 256 reads tables for 128
  EXPECT_EQ(oscar_kl(dir_ / "auto", 128), oscar_kl(dir_ / "fixed128", 128));
  EXPECT_EQ(oscar_kl(dir_ / "auto", 256), oscar_kl(dir_ / "eval", 256));
  EXPECT_NE(oscar_kl(dir_ / "auto", 128), oscar_kl(dir_ / "eval", 128));

  // Without the stored metric (--no-ef-key-metric, format 1.2) auto keeps the tables and says how to do better.
  const RunResult nm = run_oscar(args(dir_ / "nometric.oscar", {"--no-ef-key-metric"}));
  ASSERT_EQ(nm.exit_code, 0) << nm.err;
  const fmt::Bundle c = fmt::read_bundle(dir_ / "nometric.oscar");
  EXPECT_EQ(c.format_minor, 2);
  EXPECT_FALSE(fmt::has_key_metric(c));
  EXPECT_EQ(option(c, "ef_store_key_metric"), "off");
  for (size_t l = 0; l < a.layers.size(); ++l) EXPECT_EQ(c.layers[l].k_ef_weights, a.layers[l].k_ef_weights);
  EXPECT_THROW(calib::bundle_for_context(c, cfg, 256), Error);
  const RunResult ec = run_oscar(eval_args(dir_ / "nometric.oscar", dir_ / "nometric", {}));
  ASSERT_EQ(ec.exit_code, 0) << ec.err;
  const auto nm_warnings = table_warnings(dir_ / "nometric");
  ASSERT_EQ(nm_warnings.size(), 2u);
  EXPECT_NE(nm_warnings[0].find("oscar calibrate --ef-context 128"), std::string::npos) << nm_warnings[0];
  const RunResult bad = run_oscar(eval_args(dir_ / "nometric.oscar", dir_ / "bad", {"--ef-context", "128"}));
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.err.find("stores no key metric"), std::string::npos) << bad.err;
  for (const char* value : {"0", "auto,128", "latest"}) {
    const RunResult v = run_oscar(eval_args(dir_ / "base.oscar", dir_ / "bad", {"--ef-context", value}));
    EXPECT_NE(v.exit_code, 0) << value;
    EXPECT_NE(v.err.find("--ef-context"), std::string::npos) << value << ": " << v.err;
  }
  EXPECT_FALSE(fs::exists(dir_ / "bad" / "report.json"));
}

TEST_F(CalibrateMethodCli, BadValuesAreClearErrors) {
  struct Case {
    std::vector<std::string> extra;
    std::string expect;  // substring of the error line
  };
  const std::vector<Case> cases = {
      {{"--method", "magic"}, "--method"},
      {{"--method", "published", "--rotation", "random"}, "--rotation"},
      {{"--method", "spectral", "--rotation", "hadamard"}, "--rotation"},  // spectral has no --rotation
      {{"--method", "published", "--budget-bits", "3"}, "--budget-bits"},  // spectral-only flag
      {{"--method", "spectral"}, "--budget-bits"},  // spectral's default 2.28 cannot fit head_dim 8
      {{"--budget-bits", "6"}, "--budget-bits"},     // a spectral flag with the default method (feedback)
      {{"--error-feedback", "off"}, "--error-feedback"},  // feedback without its tables
      {{"--method", "spectral", "--budget-bits", "6", "--k-weight", "-1"}, "--k-weight"},
      {{"--method", "spectral", "--budget-bits", "6", "--k-weight", "heavy"}, "--k-weight"},
      {{"--method", "spectral", "--budget-bits", "6", "--widths", "0,9"}, "--widths"},
      {{"--method", "spectral", "--budget-bits", "6", "--widths", "0"}, "--widths"},
      {{"--method", "spectral", "--budget-bits", "6", "--k-weight-grid", "1,0"}, "--k-weight-grid"},
      {{"--method", "spectral", "--budget-bits", "nan"}, "--budget-bits"},
      {{"--method", "spectral", "--budget-bits", "6", "--heldout-seqs", "1"}, "--heldout-seqs"},
      {{"--method", "spectral", "--budget-bits", "6", "--per-head"}, "--per-head"},
      {{"--method", "spectral", "--budget-bits", "6", "--candidates", "published,hadamard"}, "--candidates"},
      {{"--method", "spectral", "--budget-bits", "6", "--candidates", "spectral,magic"}, "--candidates"},
      {{"--method", "spectral", "--budget-bits", "6", "--whole-head-tolerance", "-1"}, "--whole-head-tolerance"},
      {{"--method", "published", "--candidates", "spectral"}, "--candidates"},
      {{"--method", "spectral", "--budget-bits", "6", "--candidate-metric", "ppl"}, "--candidate-metric"},
      {{"--method", "spectral", "--budget-bits", "6", "--candidate-metric", "kl", "--kl-seqs", "-1"}, "--kl-seqs"},
      {{"--method", "spectral", "--budget-bits", "6", "--candidate-metric", "kl", "--kl-tokens", "-5"}, "--kl-tokens"},
      // none beyond 16+16
      {{"--method", "spectral", "--budget-bits", "6", "--candidate-metric", "kl", "--kl-tokens", "32"}, "--kl-tokens"},
      {{"--method", "published", "--candidate-metric", "kl"}, "--candidate-metric"},
      {{"--ef-context", "-1"}, "--ef-context"},
      {{"--method", "published", "--error-feedback", "off", "--ef-context", "256"}, "--ef-context"},
      {{"--method", "published", "--error-feedback", "off", "--no-ef-key-metric"}, "--no-ef-key-metric"},
  };
  for (const Case& c : cases) {
    const fs::path out = dir_ / "bad.oscar";
    const RunResult r = run_oscar(args(out, c.extra));
    std::string cmd;
    for (const auto& x : c.extra) cmd += x + " ";
    EXPECT_NE(r.exit_code, 0) << cmd;
    EXPECT_NE(r.err.find(c.expect), std::string::npos) << cmd << ": " << r.err;
    EXPECT_FALSE(fs::exists(out)) << cmd;
  }
}

}  // namespace
}  // namespace oscar::test
