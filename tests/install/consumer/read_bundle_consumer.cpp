// Reads a .oscar bundle through the installed oscar::formats and prints its shape; then writes it, reads the copy
// and writes that again: read_bundle must accept the copy and both writes must give identical bytes
// (write_bundle is deterministic), which exercises the installed HDF5/OpenSSL link line end to end.
//   read_bundle_consumer BUNDLE SCRATCH_DIR
#include <cstdio>
#include <filesystem>

#include "formats/atomic_file.h"
#include "formats/bundle.h"
#include "formats/error.h"
#include "oscar_version.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s BUNDLE SCRATCH_DIR\n", argv[0]);
    return 2;
  }
  try {
    const std::filesystem::path in = argv[1];
    const oscar::fmt::Bundle b = oscar::fmt::read_bundle(in);
    std::printf("oscar %s: %s format %d.%d layers=%zu head_dim=%lld groups=%lld composition=%s\n",
                OSCAR_VERSION_STRING, b.model.architecture.c_str(), b.format_major, b.format_minor, b.layers.size(),
                static_cast<long long>(b.quant.head_dim), static_cast<long long>(b.rotation_groups),
                b.rotation_composition.c_str());
    for (size_t l = 0; l < b.layers.size(); ++l)
      std::printf("layer %zu: k_clip=%.4f v_clip=%.4f k_rotation[0]=%.6f\n", l, b.layers[l].k_clip_ratio,
                  b.layers[l].v_clip_ratio, b.layers[l].k_rotation.at(0));
    const std::filesystem::path copy = std::filesystem::path(argv[2]) / "copy.oscar";
    const std::filesystem::path copy2 = std::filesystem::path(argv[2]) / "copy2.oscar";
    oscar::fmt::write_bundle(copy, b);
    oscar::fmt::write_bundle(copy2, oscar::fmt::read_bundle(copy));
    const bool same = oscar::fmt::sha256_file(copy) == oscar::fmt::sha256_file(copy2);
    std::printf("roundtrip: %s\n", same ? "identical bytes" : "BYTES DIFFER");
    return same ? 0 : 1;
  } catch (const oscar::Error& e) {
    std::fprintf(stderr, "read_bundle_consumer: error: %s\n", e.what());
    return 1;
  }
}
