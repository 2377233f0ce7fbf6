// .oscar bundle reader (HDF5): read_bundle's structural validation and the per-dataset checksum walk of
// `oscar verify`. libhdf5 itself is not instrumented, so coverage stops at its API; crashes inside it still show.
#include "formats/bundle.h"
#include "formats/error.h"
#include "fuzz/fuzz_input_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto path = oscar::fuzz::write_input("bundle.oscar", data, size);
  try {
    (void)oscar::fmt::read_bundle(path);
  } catch (const oscar::Error&) {
  }
  try {
    (void)oscar::fmt::bundle_checksums(path);
  } catch (const oscar::Error&) {
  }
  return 0;
}
