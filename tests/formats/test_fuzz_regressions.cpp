// Replays every fuzz seed (fuzz/corpus/<target>/) and every input a fuzzer once crashed on
// (fuzz/regressions/<target>/) through the parser it targets: the only thing allowed to escape is oscar::Error.
// Under scripts/sanitize.sh the same replay also checks for memory errors and undefined behaviour.
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <functional>
#include <typeinfo>

#include "formats/bundle.h"
#include "formats/error.h"
#include "formats/model_config.h"
#include "formats/safetensors.h"
#include "formats/tokenizer.h"
#include "test_support.h"

namespace oscar::fmt {
namespace {

namespace fs = std::filesystem;

fs::path repo_root() { return test::test_data_dir().parent_path().parent_path(); }

// Copies the input to a file named as the parser expects (safetensors is mmapped, tokenizers are found by name).
void replay(const std::string& target, const std::string& file_name, const std::function<void(const fs::path&)>& parse) {
  const fs::path scratch = test::temp_dir_for_test() / file_name;
  int inputs = 0;
  for (const char* kind : {"corpus", "regressions"}) {
    const fs::path dir = repo_root() / "fuzz" / kind / target;
    if (!fs::is_directory(dir)) continue;
    std::vector<fs::path> files;
    for (const auto& e : fs::directory_iterator(dir)) files.push_back(e.path());
    std::sort(files.begin(), files.end());
    for (const auto& f : files) {
      fs::copy_file(f, scratch, fs::copy_options::overwrite_existing);
      try {
        parse(scratch);
      } catch (const Error&) {
      } catch (const std::exception& e) {
        ADD_FAILURE() << f << ": escaped as " << typeid(e).name() << ": " << e.what();
      }
      ++inputs;
    }
  }
  if (inputs == 0) GTEST_SKIP() << "no fuzz inputs under " << repo_root() / "fuzz";
}

TEST(FuzzReplay, Safetensors) {
  replay("safetensors", "model.safetensors", [](const fs::path& p) {
    auto f = SafetensorsFile::open(p);
    for (const auto& t : f->tensors())
      if (is_float(t.dtype) && t.dtype != DType::F8_E4M3 && t.dtype != DType::F8_E5M2) {
        (void)to_f32(t);
        (void)to_bf16(t);
      }
  });
}

TEST(FuzzReplay, Config) {
  replay("config", "config.json", [](const fs::path& p) { (void)ModelConfig::from_file(p); });
}

TEST(FuzzReplay, Tokenizer) {
  replay("tokenizer", "tokenizer.json", [](const fs::path& p) {
    auto tok = Tokenizer::from_tokenizer_json(p);
    (void)tok->decode(tok->encode("Hello, world! \xc3\xa9"));
  });
}

TEST(FuzzReplay, Bundle) {
  replay("bundle", "bundle.oscar", [](const fs::path& p) {
    try {
      (void)read_bundle(p);
    } catch (const Error&) {
    }
    (void)bundle_checksums(p);
  });
}

// fuzz_safetensors' first find: converting an empty tensor passed the null data() of an empty vector to memcpy
// (undefined behaviour even for 0 bytes; UBSan aborts). Empty tensors are legal and convert to nothing.
TEST(FuzzRegressions, EmptyTensorConvertsToNothing) {
  const fs::path path = repo_root() / "fuzz/regressions/safetensors/empty_tensor_memcpy_null";
  if (!fs::exists(path)) GTEST_SKIP() << path;
  auto f = SafetensorsFile::open(path);
  const TensorView* z = f->find("z");
  ASSERT_NE(z, nullptr);
  EXPECT_EQ(z->shape, (std::vector<int64_t>{0, 3}));
  EXPECT_TRUE(to_f32(*z).empty());
  EXPECT_TRUE(to_bf16(*z).empty());
  std::vector<float> none;
  to_f32_range(*z, 0, none);
}

// fuzz_bundle's find in the long run: a string attribute whose forged dataspace x width asked read_bundle for a
// 1.1 GB buffer before any check (libFuzzer OOM). The reader now refuses string attributes over 16 MiB by name,
// before allocating; without the fix this input allocates the buffer and fails later (or not at all).
TEST(FuzzRegressions, ForgedStringAttributeSizeIsRefusedBeforeAllocating) {
  const fs::path path = repo_root() / "fuzz/regressions/bundle/string_attr_forged_1gib_alloc.oscar";
  if (!fs::exists(path)) GTEST_SKIP() << path;
  try {
    (void)read_bundle(path);
    FAIL() << "read_bundle accepted " << path;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("implausibly large"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.where()).find(path.string()), std::string::npos) << e.where();
  }
}

// The next find, same class: /quant/k/segments declaring [n, 3] with n from a forged dataspace, 48 GB before any
// check. Reader::dataset now refuses shapes whose bytes exceed the file (bundles are uncompressed).
TEST(FuzzRegressions, ForgedDatasetShapeIsRefusedBeforeAllocating) {
  const fs::path path = repo_root() / "fuzz/regressions/bundle/dataset_forged_shape_48gb_alloc.oscar";
  if (!fs::exists(path)) GTEST_SKIP() << path;
  try {
    (void)read_bundle(path);
    FAIL() << "read_bundle accepted " << path;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("more elements than the file can hold"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace oscar::fmt
