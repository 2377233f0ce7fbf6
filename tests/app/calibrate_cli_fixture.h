#pragma once
// Fixture of the `oscar calibrate` CLI tests: the real TinyStories llama2.c 280k checkpoint (HF layout, head_dim 8)
// and its sample text, a fresh directory per test, and the argument list of a small calibration.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <string>
#include <vector>

#include "run_oscar.h"
#include "test_support.h"

namespace oscar::test {

class TinyStoriesCalibrateCli : public ::testing::Test {
 protected:
  static constexpr const char* kModel = "models/tinystories-llama2c-280k-hf";
  static constexpr const char* kText = "text/tinystories-sample.txt";

  void SetUp() override {
    OSCAR_REQUIRE_FIXTURE(kModel);
    OSCAR_REQUIRE_FIXTURE(kText);
    model_ = (fixtures_dir() / kModel).string();
    text_ = (fixtures_dir() / kText).string();
    dir_ = temp_dir_for_test();
  }

  // `calibrate --model M --data T --out OUT`, then `defaults`, then `extra`: a flag of `extra` that is already in
  // the list replaces its value; any other flag (with its value, when the next item is not a flag) is appended.
  std::vector<std::string> calibrate_args(const std::filesystem::path& out, const std::vector<std::string>& defaults,
                                          const std::vector<std::string>& extra) const {
    std::vector<std::string> a = {"calibrate", "--model", model_, "--data", text_, "--out", out.string()};
    a.insert(a.end(), defaults.begin(), defaults.end());
    for (size_t i = 0; i < extra.size(); ++i) {
      const bool has_value = i + 1 < extra.size() && extra[i + 1].rfind("--", 0) != 0;
      const auto it = std::find(a.begin(), a.end(), extra[i]);
      if (it != a.end() && has_value) {
        *(it + 1) = extra[++i];
        continue;
      }
      a.push_back(extra[i]);
      if (has_value) a.push_back(extra[++i]);
    }
    return a;
  }

  std::string model_, text_;
  std::filesystem::path dir_;
};

}  // namespace oscar::test
