// `oscar calibrate --error-feedback off|k|kv --ef-damp --ef-clip-feedback` (bundle 1.2) on the CPU, on the real
// TinyStories llama2.c 280k checkpoint: the tables land on every whole-head INT2 tensor, the flags are recorded,
// repeat runs give the same bytes, off writes a 1.1 bundle without any new key, and bad values are clear errors.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>

#include <nlohmann/json.hpp>

#include "calibrate_cli_fixture.h"
#include "formats/bundle.h"
#include "formats/safetensors.h"
#include "lib/calib/ef_calibration.h"
#include "lib/calib/error_feedback.h"
#include "lib/calib/quantizer_ref.h"
#include "run_oscar.h"
#include "test_support.h"

namespace oscar::test {
namespace {

namespace fs = std::filesystem;

class CalibrateEfCli : public TinyStoriesCalibrateCli {
 protected:
  std::vector<std::string> args(const fs::path& out, const std::vector<std::string>& extra) const {
    return calibrate_args(out,
                          // Format 1.2/1.3 bundles: the tables without the (2.0) storage transforms the CLI adds by
                          // default, which test_calibrate_transform_cli.cpp covers.
                          {"--method", "published", "--num-seqs", "4", "--seq-len", "64", "--heldout-seqs", "3",
                           "--sink", "16", "--recent", "16", "--seed", "5", "--log-level", "warn", "--transform", "none"},
                          extra);
  }
  static std::string option(const fmt::Bundle& b, const std::string& key) {
    for (const auto& [k, v] : b.calibration.options)
      if (k == key) return v;
    return "(absent)";
  }
};

TEST_F(CalibrateEfCli, DefaultIsKvRecordedAndByteDeterministic) {
  const RunResult a = run_oscar(args(dir_ / "a.oscar", {}));
  ASSERT_EQ(a.exit_code, 0) << a.err;
  const RunResult b = run_oscar(args(dir_ / "b.oscar", {}));
  ASSERT_EQ(b.exit_code, 0) << b.err;
  EXPECT_EQ(slurp(dir_ / "a.oscar"), slurp(dir_ / "b.oscar"));
  EXPECT_NE(a.out.find("Error-feedback rounding (kv, damp 0.1, clip feedback on)"), std::string::npos) << a.out;

  const fmt::Bundle bundle = fmt::read_bundle(dir_ / "a.oscar");
  EXPECT_EQ(bundle.format_minor, 3);  // 1.3: the key metric is stored beside the key tables
  EXPECT_EQ(bundle.ef_damp, 0.1);
  EXPECT_EQ(bundle.ef_metric_positions, 64);
  EXPECT_EQ(bundle.ef_key_context, 64);
  EXPECT_TRUE(bundle.ef_clip_feedback);
  EXPECT_EQ(option(bundle, "error_feedback"), "kv");
  EXPECT_EQ(option(bundle, "ef_damp"), "0.1");
  EXPECT_EQ(option(bundle, "ef_clip_feedback"), "on");
  EXPECT_EQ(option(bundle, "ef_key_metric"), "sigma_q");  // the calibration statistics, not the held-out ones
  EXPECT_EQ(option(bundle, "ef_tables"), std::to_string(2 * bundle.layers.size()));
  // The held-out score of the tables in their own metrics, "RTN/EF": keys must improve (the metric they minimize).
  for (const char* key : {"ef_heldout_k", "ef_heldout_v"}) {
    const std::string v = option(bundle, key);
    const size_t slash = v.find('/');
    ASSERT_NE(slash, std::string::npos) << key << " = " << v;
    const double rtn = std::stod(v.substr(0, slash)), ef = std::stod(v.substr(slash + 1));
    EXPECT_GT(rtn, 0.0) << key;
    EXPECT_GT(ef, 0.0) << key;
    if (std::string(key) == "ef_heldout_k") {
      EXPECT_LT(ef, rtn) << key << " = " << v;
    }
  }
  EXPECT_NE(a.out.find("Held-out, mean over the tabled layers: K relative logit MSE"), std::string::npos) << a.out;
  const int64_t d = bundle.quant.head_dim, kv = bundle.model.num_kv_heads;
  for (const auto& l : bundle.layers) {
    ASSERT_EQ(l.k_ef_order.size(), static_cast<size_t>(kv * d));
    ASSERT_EQ(l.v_ef_weights.size(), static_cast<size_t>(kv * d * d));
    ASSERT_EQ(l.k_ef_metric.size(), static_cast<size_t>(kv * d * d));
    double off = 0;
    for (float w : l.k_ef_weights) off += std::abs(w);
    EXPECT_GT(off, 0.0) << "keys got a diagonal table: Σ_Q in the stored basis is not diagonal";
  }
  // inspect names the tables; export carries them.
  const RunResult ins = run_oscar({"inspect", (dir_ / "a.oscar").string()});
  ASSERT_EQ(ins.exit_code, 0) << ins.err;
  EXPECT_NE(ins.out.find("format          1.3"), std::string::npos) << ins.out;
  EXPECT_NE(ins.out.find("error feedback  K layers [0,1,2,3,4], V layers [0,1,2,3,4], clip feedback on"), std::string::npos)
      << ins.out;
  const RunResult ex = run_oscar({"export", (dir_ / "a.oscar").string(), "--format", "safetensors", "--out",
                                  (dir_ / "exp").string()});
  ASSERT_EQ(ex.exit_code, 0) << ex.err;
  const std::string manifest = slurp(dir_ / "exp" / "manifest.json");
  for (const char* name : {"\"layers.1.k_ef_order\"", "\"layers.1.v_ef_weights\"", "\"ef_clip_feedback\""})
    EXPECT_NE(manifest.find(name), std::string::npos) << name;
  for (const char* name : {"\"layers.1.k_ef_metric\"", "\"ef_damp\"", "\"ef_metric_positions_key_context\""})
    EXPECT_NE(manifest.find(name), std::string::npos) << name;
  // --ef-context rebuilds the key tables before exporting (needs the checkpoint's RoPE): the stored context gives
  // the same file, another one other tables.
  const auto export_at = [&](const std::string& n, const fs::path& out) {
    return run_oscar({"export", (dir_ / "a.oscar").string(), "--format", "safetensors", "--out", out.string(),
                      "--ef-context", n, "--model", model_});
  };
  ASSERT_EQ(export_at("64", dir_ / "exp64").exit_code, 0);
  ASSERT_EQ(export_at("128", dir_ / "exp128").exit_code, 0);
  EXPECT_EQ(slurp(dir_ / "exp64" / "oscar_rotations.safetensors"), slurp(dir_ / "exp" / "oscar_rotations.safetensors"));
  EXPECT_NE(slurp(dir_ / "exp128" / "oscar_rotations.safetensors"),
            slurp(dir_ / "exp" / "oscar_rotations.safetensors"));
  const RunResult no_model = run_oscar({"export", (dir_ / "a.oscar").string(), "--format", "safetensors", "--out",
                                        (dir_ / "x").string(), "--ef-context", "128"});
  EXPECT_NE(no_model.exit_code, 0);
  EXPECT_NE(no_model.err.find("--ef-context"), std::string::npos) << no_model.err;
  EXPECT_FALSE(fs::exists(dir_ / "x" / "manifest.json"));
  // The published server has no error-feedback writer: the export says so rather than let a team expect kv's KL.
  const RunResult sg = run_oscar({"export", (dir_ / "a.oscar").string(), "--format", "sglang-oscar", "--out",
                                  (dir_ / "sg").string()});
  ASSERT_EQ(sg.exit_code, 0) << sg.err;
  const auto server = nlohmann::json::parse(slurp(dir_ / "sg" / "manifest.json"))["server"];
  ASSERT_TRUE(server.contains("error_feedback")) << server.dump();
  EXPECT_NE(server["error_feedback"].get<std::string>().find("--error-feedback off"), std::string::npos);
  EXPECT_NE(sg.err.find("error-feedback tables: not applied"), std::string::npos) << sg.err;
}

TEST_F(CalibrateEfCli, OffWritesA11BundleAndKOnlyHasNoValueTables) {
  const RunResult off = run_oscar(args(dir_ / "off.oscar", {"--error-feedback", "off"}));
  ASSERT_EQ(off.exit_code, 0) << off.err;
  const fmt::Bundle ob = fmt::read_bundle(dir_ / "off.oscar");
  EXPECT_EQ(ob.format_minor, 1);
  EXPECT_FALSE(fmt::has_error_feedback(ob));
  for (const char* key :
       {"error_feedback", "ef_damp", "ef_clip_feedback", "ef_key_metric", "ef_tables", "ef_heldout_k"})
    EXPECT_EQ(option(ob, key), "(absent)") << key;

  const RunResult k = run_oscar(args(dir_ / "k.oscar", {"--error-feedback", "k", "--ef-damp", "0.01",
                                                         "--ef-clip-feedback", "off"}));
  ASSERT_EQ(k.exit_code, 0) << k.err;
  const fmt::Bundle kb = fmt::read_bundle(dir_ / "k.oscar");
  EXPECT_EQ(kb.format_minor, 3);
  EXPECT_EQ(kb.ef_damp, 0.01);
  EXPECT_FALSE(kb.ef_clip_feedback);
  EXPECT_EQ(option(kb, "error_feedback"), "k");
  EXPECT_EQ(option(kb, "ef_damp"), "0.01");
  EXPECT_EQ(option(kb, "ef_clip_feedback"), "off");
  for (size_t l = 0; l < kb.layers.size(); ++l) {
    EXPECT_FALSE(kb.layers[l].k_ef_order.empty());
    EXPECT_TRUE(kb.layers[l].v_ef_order.empty());
    // Everything but the tables and the provenance equals the RTN bundle: tables never change the layout.
    EXPECT_EQ(kb.layers[l].k_rotation, ob.layers[l].k_rotation);
    EXPECT_EQ(kb.layers[l].k_clip_ratio, ob.layers[l].k_clip_ratio);
  }
}

TEST_F(CalibrateEfCli, SegmentedLayersKeepRtnWholeHeadOnesGetTables) {
  // head_dim 8 with a 7-bit budget (whole-head INT2 is 6 bits there, scale/zero included): keys at 3-4 bits, some
  // values at 2. The whole-head INT2 tensors get tables (the engine writes them with its INT2 writer also in
  // segmented pages), the segmented ones keep round-to-nearest.
  const RunResult r = run_oscar(args(dir_ / "s.oscar", {"--method", "spectral", "--budget-bits", "7", "--widths",
                                                         "2,3,4", "--candidates", "spectral"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const fmt::Bundle b = fmt::read_bundle(dir_ / "s.oscar");
  int64_t tables = 0, segmented = 0;
  for (size_t l = 0; l < b.layers.size(); ++l)
    for (const bool keys : {true, false}) {
      const bool has = !(keys ? b.layers[l].k_ef_order : b.layers[l].v_ef_order).empty();
      EXPECT_EQ(has, calib::whole_head_int2(b, l, keys)) << "layer " << l << (keys ? " K" : " V");
      tables += has;
      segmented += !calib::whole_head_int2(b, l, keys);
    }
  EXPECT_GT(tables, 0) << "expected whole-head INT2 values";
  EXPECT_GT(segmented, 0) << "the 7-bit budget should give segmented layouts";
  EXPECT_EQ(option(b, "ef_tables"), std::to_string(tables));
}

TEST_F(CalibrateEfCli, BadValuesAreClearErrors) {
  for (const auto& [extra, flag] : std::vector<std::pair<std::vector<std::string>, std::string>>{
           {{"--error-feedback", "v"}, "--error-feedback"},
           {{"--ef-damp", "-1"}, "--ef-damp"},
           {{"--ef-damp", "nan"}, "--ef-damp"},
           {{"--ef-clip-feedback", "yes"}, "--ef-clip-feedback"}}) {
    const fs::path out = dir_ / "bad.oscar";
    const RunResult r = run_oscar(args(out, extra));
    EXPECT_NE(r.exit_code, 0) << extra[0];
    EXPECT_NE(r.err.find(flag), std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(out));
  }
}

// `export --golden-kv` is what a serving team checks its own writer against: for a bundle with tables its records
// must be the error-feedback ones the engine writes (not round-to-nearest), and scripts/serving_example.py (the
// docs/serving.md example) must reproduce them.
class CalibrateEfGolden : public CalibrateEfCli {
 protected:
  void SetUp() override {
    CalibrateEfCli::SetUp();
    if (IsSkipped()) return;
    ASSERT_EQ(run_oscar(args(dir_ / "kv.oscar", {})).exit_code, 0);
    ASSERT_EQ(run_oscar(args(dir_ / "off.oscar", {"--error-feedback", "off"})).exit_code, 0);
    const RunResult fwd = run_oscar({"forward", "--model", model_, "--prompt",
                                     "Once upon a time there was a little girl named Lily. She loved to play outside "
                                     "in the sun with her dog and her big red ball.",
                                     "--dump", (dir_ / "kv.safetensors").string(), "--top", "1"});
    ASSERT_EQ(fwd.exit_code, 0) << fwd.err;
    for (const char* name : {"kv", "off"}) {
      const RunResult ex = run_oscar({"export", (dir_ / (std::string(name) + ".oscar")).string(), "--format",
                                      "safetensors", "--golden-kv", (dir_ / "kv.safetensors").string(),
                                      "--golden-tokens", "24", "--out", (dir_ / (std::string("st-") + name)).string()});
      ASSERT_EQ(ex.exit_code, 0) << ex.err;
    }
  }
};

TEST_F(CalibrateEfGolden, RecordsAreTheErrorFeedbackWritersAndDifferFromRtn) {
  const fmt::Bundle kv = fmt::read_bundle(dir_ / "kv.oscar");
  const fmt::Bundle off = fmt::read_bundle(dir_ / "off.oscar");
  ASSERT_TRUE(fmt::has_error_feedback(kv));
  const auto manifest = nlohmann::json::parse(slurp(dir_ / "st-kv" / "manifest.json"));
  EXPECT_EQ(manifest["golden"]["error_feedback_tensors"], 2 * kv.layers.size());
  const auto g_kv = fmt::SafetensorsFile::open(dir_ / "st-kv" / "int2_golden.safetensors");
  const auto g_off = fmt::SafetensorsFile::open(dir_ / "st-off" / "int2_golden.safetensors");
  const int64_t d = kv.quant.head_dim;
  int64_t records = 0, differ_from_rtn = 0;
  for (size_t l = 0; l < kv.layers.size(); ++l)
    for (const bool keys : {true, false}) {
      const std::string name = "layers." + std::to_string(l) + (keys ? ".k" : ".v");
      const fmt::TensorView* x = g_kv->find(name + ".x");
      const fmt::TensorView* rec = g_kv->find(name + ".record");
      const fmt::TensorView* rtn = g_off->find(name + ".record");
      ASSERT_TRUE(x && rec && rtn) << name;
      ASSERT_EQ(rec->nbytes, rtn->nbytes) << name;  // same record format: the tables change codes, not layout
      const std::vector<float> xs = fmt::to_f32(*x);
      const fmt::LayerCalibration& lc = kv.layers[l];
      const fmt::LayerCalibration& lo = off.layers[l];
      EXPECT_EQ(keys ? lc.k_rotation : lc.v_rotation, keys ? lo.k_rotation : lo.v_rotation);  // tables come after
      const auto& order = keys ? lc.k_ef_order : lc.v_ef_order;
      const auto& weights = keys ? lc.k_ef_weights : lc.v_ef_weights;
      const auto& rot = keys ? lc.k_rotation : lc.v_rotation;
      const float clip = keys ? lc.k_clip_ratio : lc.v_clip_ratio;
      const int64_t heads = x->dim(0), tokens = x->dim(1), rb = rec->dim(2);
      const calib::HeadQuantizer q(keys ? kv.quant.k : kv.quant.v, d, name);
      std::vector<uint8_t> want(static_cast<size_t>(rb)), plain(static_cast<size_t>(rb));
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t g = kv.rotation_groups == 1 ? 0 : h;
        const std::span<const float> r(rot.data() + g * d * d, static_cast<size_t>(d * d));
        for (int64_t t = 0; t < tokens; ++t) {
          const std::span<const float> xv(xs.data() + (h * tokens + t) * d, static_cast<size_t>(d));
          const calib::HeadTable ht = calib::head_table(order, weights, h, d);
          calib::error_feedback_encode_record(xv, r, clip, 2, ht.order, ht.weights, kv.ef_clip_feedback, want);
          q.encode(xv, r, clip, plain);
          const size_t at = static_cast<size_t>((h * tokens + t) * rb);
          const auto* got = reinterpret_cast<const uint8_t*>(rec->data) + at;
          const auto* got_rtn = reinterpret_cast<const uint8_t*>(rtn->data) + at;
          EXPECT_EQ(std::memcmp(got, want.data(), want.size()), 0) << name << " head " << h << " token " << t;
          EXPECT_EQ(std::memcmp(got_rtn, plain.data(), plain.size()), 0) << name << " head " << h << " token " << t;
          // Same scale/zero (the last 4 bytes) either way; codes may differ.
          EXPECT_EQ(std::memcmp(got + rb - 4, got_rtn + rb - 4, 4), 0) << name;
          differ_from_rtn += std::memcmp(got, got_rtn, static_cast<size_t>(rb - 4)) != 0;
          ++records;
        }
      }
    }
  EXPECT_GT(differ_from_rtn, records / 10) << "error feedback changed the codes of too few records";
}

TEST_F(CalibrateEfGolden, ServingExampleReproducesThem) {
  const fs::path script = test_data_dir() / ".." / ".." / "scripts" / "serving_example.py";
  const std::string python = python_with("numpy");
  if (python.empty()) GTEST_SKIP() << "no python3 with numpy";
  const std::string golden = (dir_ / "st-kv" / "int2_golden.safetensors").string();
  const std::string ok = python + " " + script.string() + " --export " + (dir_ / "st-kv").string() + " --golden " +
                         golden + " > " + (dir_ / "example.txt").string() + " 2>&1";
  EXPECT_EQ(std::system(ok.c_str()), 0) << slurp(dir_ / "example.txt");
  const std::string out = slurp(dir_ / "example.txt");
  EXPECT_NE(out.find("error feedback"), std::string::npos) << out;
  EXPECT_NE(out.find("code mismatches 0/"), std::string::npos) << out;
  // Negative control: the tables' records are not what a round-to-nearest writer produces, so checking the RTN
  // bundle's export against them must fail.
  const std::string bad = python + " " + script.string() + " --export " + (dir_ / "st-off").string() + " --golden " +
                          golden + " > " + (dir_ / "bad.txt").string() + " 2>&1";
  EXPECT_NE(std::system(bad.c_str()), 0) << slurp(dir_ / "bad.txt");
}

}  // namespace
}  // namespace oscar::test
