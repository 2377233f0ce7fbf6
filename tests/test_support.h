#pragma once
// Shared helpers for the test executables: where fixtures live, and skipping cleanly when they are absent.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>

namespace oscar::test {

inline std::filesystem::path fixtures_dir() { return OSCAR_FIXTURES_DIR; }
inline std::filesystem::path test_data_dir() { return OSCAR_TEST_DATA_DIR; }
inline std::filesystem::path cache_dir() { return OSCAR_TEST_CACHE_DIR; }
inline std::filesystem::path binary_dir() { return OSCAR_BINARY_DIR; }

// A fresh, empty directory under the system temp dir, unique per test.
inline std::filesystem::path temp_dir_for_test() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  auto dir = std::filesystem::temp_directory_path() / "oscar-tests" /
             (std::string(info->test_suite_name()) + "." + info->name());
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

}  // namespace oscar::test

// Skip (not fail) when the shared fixtures are not beside the checkout.
#define OSCAR_REQUIRE_FIXTURE(relpath)                                                   \
  do {                                                                                   \
    if (!std::filesystem::exists(::oscar::test::fixtures_dir() / (relpath)))            \
      GTEST_SKIP() << "fixture not found: " << (::oscar::test::fixtures_dir() / (relpath)); \
  } while (0)
