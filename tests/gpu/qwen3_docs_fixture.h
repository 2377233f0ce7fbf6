#pragma once
// qwen3-tiny-trained with held-out documentation text, shared by the GPU eval tests (test_eval_gpu.cpp,
// test_engine_ef_gpu.cpp): the fixture paths, a bundle calibrated on text the evaluation does not use, and packed
// held-out sequences.
#include <gtest/gtest.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "datasets/pack.h"
#include "formats/bundle.h"
#include "formats/tokenizer.h"
#include "formats/safetensors.h"
#include "lib/calib/calibrator.h"
#include "lib/calib/ef_calibration.h"
#include "lib/eval/evaluator.h"
#include "lib/model/cpu_model.h"
#include "test_support.h"

namespace oscar::test::qwen3_docs {

inline const char* const kModel = "models/qwen3-tiny-trained";
inline const char* const kPythonDocs = "text/python-docs-heldout.txt";
inline const char* const kLinuxDocs = "text/linux-docs-heldout.txt";
inline const char* const kCalibrationText = "text/wikitext-2-raw-test.txt";

inline bool fixtures_present() {
  for (const char* f : {kModel, kPythonDocs, kLinuxDocs, kCalibrationText})
    if (!std::filesystem::exists(fixtures_dir() / f)) return false;
  return true;
}

// `calibration` + `heldout` packed 256-token sequences of wikitext (not the evaluation's text, seed 1): the first
// `calibration` calibrate, the rest are held out.
inline calib::CalibrationData calibration_data(const fmt::Tokenizer& tok, int64_t calibration, int64_t heldout) {
  data::PackOptions po;
  po.seq_len = 256;
  po.num_seqs = calibration + heldout;
  po.seed = 1;
  const data::PackedDataset packed =
      data::pack_dataset({(fixtures_dir() / kCalibrationText).string()}, &tok, data::SourceOptions{}, po);
  calib::CalibrationData data;
  for (int64_t i = 0; i < packed.num_seqs(); ++i) {
    auto s = packed.sequence(i);
    (i < calibration ? data.sequences : data.heldout).emplace_back(s.begin(), s.end());
  }
  data.seq_len = 256;
  return data;
}

// calib::calibrate on 6 x 256 tokens, published clip ratios (no held-out split to tune them on).
inline fmt::Bundle calibrated_bundle(model::CpuModel& cpu, const fmt::Tokenizer& tok) {
  calib::CpuForwardRunner runner(cpu);
  calib::CalibrationOptions opt;
  opt.quant = fmt::KvQuantSpec::int2_default(cpu.config().head_dim);
  opt.tune_clip = false;
  return calib::calibrate(runner, calib::model_fingerprint(fixtures_dir() / kModel), calibration_data(tok, 6, 0), opt)
      .bundle;
}

// The same calibration with the product's default error-feedback tables (kv) and, with `transform`, bundle 2.0
// whitening transforms (the library's α, 0.5) fitted on 2 held-out sequences.
inline fmt::Bundle ef_bundle(model::CpuModel& cpu, const fmt::Tokenizer& tok, bool transform) {
  calib::CpuForwardRunner runner(cpu);
  calib::CalibrationOptions opt;
  opt.quant = fmt::KvQuantSpec::int2_default(cpu.config().head_dim);
  opt.tune_clip = false;
  opt.error_feedback.mode = calib::ErrorFeedbackMode::KV;
  opt.error_feedback.value_metrics =
      calib::value_output_metrics(fmt::TensorStore::open(fixtures_dir() / kModel), cpu.config());
  opt.transform.enabled = transform;
  return calib::calibrate(runner, calib::model_fingerprint(fixtures_dir() / kModel), calibration_data(tok, 6, 2), opt)
      .bundle;
}

// num_seqs shuffled sequences of `context` tokens from the python + linux documentation (seed 0).
inline std::vector<eval::ContextSequences> heldout(const fmt::Tokenizer& tok, int64_t context, int64_t num_seqs) {
  data::PackOptions po;
  po.seq_len = context;
  po.num_seqs = num_seqs;
  po.shuffle = true;
  po.seed = 0;
  const std::vector<std::string> files = {(fixtures_dir() / kPythonDocs).string(),
                                          (fixtures_dir() / kLinuxDocs).string()};
  const data::PackedDataset packed = data::pack_dataset(files, &tok, data::SourceOptions{}, po);
  EXPECT_EQ(packed.num_seqs(), num_seqs);
  eval::ContextSequences cs{context, {}};
  for (int64_t i = 0; i < packed.num_seqs(); ++i) {
    auto s = packed.sequence(i);
    cs.sequences.emplace_back(s.begin(), s.end());
  }
  return {cs};
}

}  // namespace oscar::test::qwen3_docs
