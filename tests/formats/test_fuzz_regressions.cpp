// Replays every fuzz seed (fuzz/corpus/<target>/) and every input a fuzzer once crashed on
// (fuzz/regressions/<target>/) through the parser it targets: the only thing allowed to escape is oscar::Error.
// Under scripts/sanitize.sh the same replay also checks for memory errors and undefined behaviour.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
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

// fuzz_bundle's libFuzzer timeout (h5lvisit_self_linked_group.oscar): the group /calibration (object header at 2744)
// had its symbol-table message overwritten with the root's (B-tree 136, local heap 680), so it lists the root's five
// links, calibration -> itself among them, while its header counts one link. libhdf5's H5Lvisit remembers only
// objects counted twice and recursed forever, re-resolving an ever longer path (oscar verify hung). Our walk
// (formats/bundle.cpp, ChecksumWalk) opens each object itself; on this input the header of /calibration does not
// even open. group_stab_message_names_root.oscar is the same damage made cleanly (the seed bundle with only those 16
// bytes changed): it opens, and the walk's memory of entered groups names the cycle. Both hung the old walk;
// ctest's TIMEOUT on test_formats (tests/CMakeLists.txt) turns a regression into a failure, not a hung CI job.
void expect_walk_refused(const fs::path& path, const std::string& detail) {
  const auto start = std::chrono::steady_clock::now();
  try {
    (void)bundle_checksums(path);
    ADD_FAILURE() << "bundle_checksums accepted " << path;
  } catch (const Error& e) {
    EXPECT_EQ(e.where(), path.string());
    EXPECT_EQ(e.detail(), detail);
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10)) << path;
}

TEST(FuzzRegressions, SelfLinkedGroupIsRefusedInsteadOfWalkedForever) {
  const fs::path fuzzed = repo_root() / "fuzz/regressions/bundle/h5lvisit_self_linked_group.oscar";
  const fs::path clean = repo_root() / "fuzz/regressions/bundle/group_stab_message_names_root.oscar";
  if (!fs::exists(fuzzed) || !fs::exists(clean)) GTEST_SKIP() << fuzzed << ", " << clean;
  expect_walk_refused(fuzzed,
                      "cannot walk the HDF5 object tree at /calibration: cannot open the object (corrupt file)");
  expect_walk_refused(clean,
                      "cannot walk the HDF5 object tree at /calibration/calibration: it links back to its ancestor "
                      "/calibration (a cycle in the group index) (corrupt file)");
  EXPECT_THROW((void)read_bundle(fuzzed), Error);
  // read_bundle looks every object up by name and never lists a group, so the cycle is invisible to it: the
  // clean input reads (only verify's walk can see the damage).
  EXPECT_NO_THROW((void)read_bundle(clean));
}

// fuzz_tokenizer (2026-12-05, third resumed run): an added token with id 2e9 made the id -> token table resize to
// 2e9 strings (64 GB) before any check. Ids beyond 2 x the defined count (+64K) are now refused by name.
TEST(FuzzRegressions, ForgedSparseTokenIdIsRefusedBeforeAllocating) {
  const fs::path src = repo_root() / "fuzz/regressions/tokenizer/added_token_id_2e9_dense_table_alloc.json";
  if (!fs::exists(src)) GTEST_SKIP() << src;
  const fs::path path = test::temp_dir_for_test() / "tokenizer.json";
  fs::copy_file(src, path, fs::copy_options::overwrite_existing);
  try {
    (void)Tokenizer::from_tokenizer_json(path);
    FAIL() << "accepted " << src;
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("added_tokens id 2000000000"), std::string::npos) << what;
    EXPECT_NE(what.find("ids must be dense"), std::string::npos) << what;
    EXPECT_NE(std::string(e.where()).find("tokenizer.json"), std::string::npos) << e.where();
  }
}

}  // namespace
}  // namespace oscar::fmt
