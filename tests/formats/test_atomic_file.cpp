// AtomicFile and sha256: commit semantics, cleanup without commit, unwritable targets, and sha256 against the
// FIPS 180-2 test vectors and the fixture checksums recorded in PROVENANCE.md.
#include <gtest/gtest.h>

#include <unistd.h>

#include <fstream>

#include "formats/atomic_file.h"
#include "formats/error.h"
#include "test_support.h"

namespace oscar::fmt {
namespace {

namespace fs = std::filesystem;

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

size_t entries_in(const fs::path& dir) {
  return static_cast<size_t>(std::distance(fs::directory_iterator(dir), fs::directory_iterator()));
}

TEST(AtomicFile, CommitReplacesTarget) {
  const fs::path dir = test::temp_dir_for_test();
  const fs::path target = dir / "out.txt";
  write_file_atomic(target, "old contents");
  {
    AtomicFile f(target);
    EXPECT_EQ(f.temp_path().parent_path(), dir);
    EXPECT_EQ(f.temp_path().filename().string().rfind(".out.txt.tmp.", 0), 0u) << f.temp_path();
    f.write(std::string_view("new "));
    f.write(std::as_bytes(std::span("contents", 8)));
    EXPECT_EQ(read_text(target), "old contents");  // readers see the old file until commit
    f.commit();
    EXPECT_THROW(f.commit(), Error);
    EXPECT_THROW(f.write(std::string_view("x")), Error);
  }
  EXPECT_EQ(read_text(target), "new contents");
  EXPECT_EQ(entries_in(dir), 1u);
  EXPECT_EQ(fs::status(target).permissions() & fs::perms::all,
            fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read | fs::perms::others_read);
}

TEST(AtomicFile, NoCommitLeavesTargetAndRemovesTemp) {
  const fs::path dir = test::temp_dir_for_test();
  const fs::path target = dir / "keep.txt";
  write_file_atomic(target, "original");
  fs::path temp;
  try {
    AtomicFile f(target);
    temp = f.temp_path();
    f.write(std::string_view("partial"));
    EXPECT_TRUE(fs::exists(temp));
    throw std::runtime_error("simulated failure while writing");
  } catch (const std::runtime_error&) {
  }
  EXPECT_FALSE(fs::exists(temp));
  EXPECT_EQ(read_text(target), "original");
  EXPECT_EQ(entries_in(dir), 1u);

  { AtomicFile never_committed(dir / "new.txt"); }
  EXPECT_FALSE(fs::exists(dir / "new.txt"));
  EXPECT_EQ(entries_in(dir), 1u);
}

TEST(AtomicFile, TempPathForLibrariesThatWriteByName) {
  const fs::path dir = test::temp_dir_for_test();
  AtomicFile f(dir / "lib.bin");
  {
    // A library that truncates/recreates the file by name, as H5Fcreate(H5F_ACC_TRUNC) does.
    fs::remove(f.temp_path());
    std::ofstream out(f.temp_path(), std::ios::binary);
    out << "written by name";
  }
  f.commit();
  EXPECT_EQ(read_text(dir / "lib.bin"), "written by name");
  EXPECT_EQ(entries_in(dir), 1u);
}

TEST(AtomicFile, UnwritableTargetsThrowNamingTheTarget) {
  const fs::path dir = test::temp_dir_for_test();
  const fs::path missing = dir / "no-such-dir" / "out.txt";
  try {
    AtomicFile f(missing);
    FAIL() << "expected oscar::Error";
  } catch (const Error& e) {
    EXPECT_EQ(e.where(), missing.string());
    EXPECT_NE(e.detail().find("does not exist"), std::string::npos) << e.what();
  }
  write_file_atomic(dir / "plain-file", "x");
  EXPECT_THROW(AtomicFile(dir / "plain-file" / "out.txt"), Error);  // parent is a file
  EXPECT_THROW(write_file_atomic(dir, "x"), Error);                 // target is a directory: rename fails
  EXPECT_EQ(entries_in(dir), 1u);                                   // and no temp file survives
}

TEST(AtomicFile, ReadOnlyDirectoryThrows) {
  if (::geteuid() == 0) GTEST_SKIP() << "running as root: directory permissions do not stop writes";
  const fs::path ro = test::temp_dir_for_test() / "read-only";
  fs::create_directory(ro);
  fs::permissions(ro, fs::perms::owner_read | fs::perms::owner_exec);
  EXPECT_THROW(AtomicFile(ro / "out.txt"), Error);
  fs::permissions(ro, fs::perms::owner_all);
}

TEST(Sha256, Fips180TestVectors) {
  auto hex = [](std::string_view s) { return sha256_hex(std::as_bytes(std::span(s.data(), s.size()))); };
  EXPECT_EQ(hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

TEST(Sha256, FileIsStreamedInChunks) {
  // One million 'a' is the FIPS 180-2 long-message vector; the 3 MiB file spans several 1 MiB read chunks and is
  // checked against the digest of the same bytes in memory.
  const fs::path dir = test::temp_dir_for_test();
  write_file_atomic(dir / "million-a", std::string(1000000, 'a'));
  EXPECT_EQ(sha256_file(dir / "million-a"), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  const std::string big(3 * (1 << 20) + 17, 'q');
  write_file_atomic(dir / "big", big);
  EXPECT_EQ(sha256_file(dir / "big"), sha256_hex(std::as_bytes(std::span(big.data(), big.size()))));
  EXPECT_THROW(sha256_file(dir / "absent"), Error);
}

TEST(Sha256, FixtureChecksumsFromProvenance) {
  OSCAR_REQUIRE_FIXTURE("models/qwen3-tiny-trained/model-00001-of-00003.safetensors");
  const fs::path models = test::fixtures_dir() / "models";
  EXPECT_EQ(sha256_file(models / "qwen3-tiny-trained/model-00001-of-00003.safetensors"),
            "43ffad0f7b85862a4b310b5e427ddf559841bac67cbcd79e4d14a5996cebc830");
  EXPECT_EQ(sha256_file(models / "qwen3-tiny-trained/config.json"),
            "5009fb269a5b5f706aab9f095379e6b182b72095472c56b4398bcf277257aaae");
}

}  // namespace
}  // namespace oscar::fmt
