// bundle_checksums walks the HDF5 object tree itself (formats/bundle.cpp, ChecksumWalk) instead of calling H5Lvisit,
// which recursed forever into a damaged self-linked group. On every file H5Lvisit finishes on, the walk must list
// the same datasets in the same order (oscar verify's output depends on it): these tests compare the two on the
// seed bundle and on legal HDF5 the writer never produces (extra objects, shared datasets, a group linked twice,
// a group linked to its own ancestor).
#include <gtest/gtest.h>

#include <hdf5.h>

#include <algorithm>
#include <filesystem>
#include <string>
#include <vector>

#include "formats/bundle.h"
#include "formats/error.h"
#include "test_support.h"

namespace oscar::fmt {
namespace {

namespace fs = std::filesystem;

fs::path seed_bundle() {
  return test::test_data_dir().parent_path().parent_path() / "fuzz/corpus/bundle/handmade_l2_d8.oscar";
}

herr_t collect_dataset(hid_t root, const char* name, const H5L_info_t* info, void* data) {
  if (info->type != H5L_TYPE_HARD) return 0;
  H5O_info_t oi;
  if (H5Oget_info_by_name2(root, name, &oi, H5O_INFO_BASIC, H5P_DEFAULT) < 0) return -1;
  if (oi.type == H5O_TYPE_DATASET) static_cast<std::vector<std::string>*>(data)->push_back(std::string("/") + name);
  return 0;
}

// The reference: what the old bundle_checksums listed, in its order.
std::vector<std::string> h5lvisit_datasets(const fs::path& path) {
  std::vector<std::string> out;
  const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  EXPECT_GE(file, 0) << path;
  EXPECT_GE(H5Lvisit(file, H5_INDEX_NAME, H5_ITER_INC, collect_dataset, &out), 0) << path;
  H5Fclose(file);
  return out;
}

std::vector<std::string> walked_datasets(const fs::path& path) {
  std::vector<std::string> out;
  for (const auto& c : bundle_checksums(path)) out.push_back(c.object);
  return out;
}

void write_i32(hid_t loc, const char* name, std::vector<int32_t> values) {
  const hsize_t n = values.size();
  const hid_t space = H5Screate_simple(1, &n, nullptr);
  const hid_t ds = H5Dcreate2(loc, name, H5T_STD_I32LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  ASSERT_GE(ds, 0) << name;
  ASSERT_GE(H5Dwrite(ds, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data()), 0);
  H5Dclose(ds);
  H5Sclose(space);
}

TEST(BundleWalk, SeedBundleListsEveryDatasetInH5LvisitOrder) {
  const fs::path path = seed_bundle();
  if (!fs::exists(path)) GTEST_SKIP() << path;
  const auto sums = bundle_checksums(path);
  const std::vector<std::string> want = {
      "/error_report/k_relative_error", "/error_report/v_relative_error", "/layers/00000/clip_ratios",
      "/layers/00000/k_eigenvalues",    "/layers/00000/k_rotation",      "/layers/00000/v_eigenvalues",
      "/layers/00000/v_rotation",       "/layers/00001/clip_ratios",     "/layers/00001/k_eigenvalues",
      "/layers/00001/k_rotation",       "/layers/00001/v_eigenvalues",   "/layers/00001/v_rotation",
      "/quant/k/segments",              "/quant/v/segments"};
  EXPECT_EQ(walked_datasets(path), want);
  EXPECT_EQ(h5lvisit_datasets(path), want);
  for (const auto& c : sums) EXPECT_TRUE(c.ok()) << c.object << ": " << c.problem;
}

TEST(BundleWalk, SharedLinksAndLegalCyclesAreListedAsH5LvisitListsThem) {
  if (!fs::exists(seed_bundle())) GTEST_SKIP() << seed_bundle();
  const fs::path path = test::temp_dir_for_test() / "extras.oscar";
  fs::copy_file(seed_bundle(), path, fs::copy_options::overwrite_existing);
  const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(file, 0);
  const hid_t zz = H5Gcreate2(file, "/zz", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  const hid_t inner = H5Gcreate2(zz, "inner", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  ASSERT_GE(inner, 0);
  write_i32(inner, "data", {1, 2, 3});
  write_i32(file, "/aa_first", {4});
  // A second counted link to a group, reached first (name order) through /quant/alias: entered once.
  ASSERT_GE(H5Lcreate_hard(file, "/zz", file, "/quant/alias", H5P_DEFAULT, H5P_DEFAULT), 0);
  // A legal cycle (the link is counted in /zz's header): not re-entered, as H5Lvisit does.
  ASSERT_GE(H5Lcreate_hard(file, "/zz", inner, "up", H5P_DEFAULT, H5P_DEFAULT), 0);
  // A dataset with two names is listed under both.
  ASSERT_GE(H5Lcreate_hard(file, "/layers/00000/k_rotation", file, "/model/k_alias", H5P_DEFAULT, H5P_DEFAULT), 0);
  ASSERT_GE(H5Lcreate_soft("/layers/00001/v_rotation", file, "/layers/00001/soft", H5P_DEFAULT, H5P_DEFAULT), 0);
  H5Gclose(inner);
  H5Gclose(zz);
  ASSERT_GE(H5Fclose(file), 0);

  const auto walked = walked_datasets(path);
  EXPECT_EQ(walked, h5lvisit_datasets(path));
  ASSERT_EQ(walked.size(), 14u + 3u);
  EXPECT_EQ(walked.front(), "/aa_first");
  EXPECT_NE(std::find(walked.begin(), walked.end(), "/model/k_alias"), walked.end());
  EXPECT_NE(std::find(walked.begin(), walked.end(), "/quant/alias/inner/data"), walked.end());
  EXPECT_EQ(std::find(walked.begin(), walked.end(), "/zz/inner/data"), walked.end());
  for (const auto& c : bundle_checksums(path))
    if (c.object == "/aa_first" || c.object == "/quant/alias/inner/data")
      EXPECT_EQ(c.problem, "attribute sha256 is missing") << c.object;
    else
      EXPECT_TRUE(c.ok()) << c.object << ": " << c.problem;
}

}  // namespace
}  // namespace oscar::fmt
