#pragma once
// Device check of the wgmma building blocks (kernels/common/wgmma.cuh), before an attention kernel relies on them.
// One warpgroup computes, from bf16 inputs into fp32:
//   Ss:  C[64 x 64]  = A[64 x 128] · B[64 x 128]ᵀ  (A and B row-major, K contiguous: the Q·Kᵀ case, both operands
//        through 128B-swizzle K-major descriptors)
//   RsT: C[64 x 128] = A[64 x 128] · B[128 x 128]  (A from registers, B row-major with N contiguous: the P·V case,
//        an MN-major descriptor with the transpose-B flag)
//   Rs:  C[64 x 128] = A[64 x 128] · B[128 x 128]ᵀ (A from registers, B rows are n with K contiguous: S = Q·Kᵀ over
//        a 128-key tile with Q in registers, a K-major descriptor)
//   Rs8: C[64 x 8]   = A[64 x 128] · B[8 x 128]ᵀ   (wgmma m64n8k16, A from registers, K-major B of 8 rows: prefill
//        v11's P · ones, here with arbitrary B so that the layout is checked, not only the row sums)
// `mn_lbo_bytes` / `mn_sbo_bytes` set RsT's descriptor strides, so a test can tell which convention the hardware
// follows (expected: LBO = the distance between 64-wide N atoms, 16384 here; SBO = the 8-row K group stride, 1024).
// Needs an sm_90 device and a build for sm_90a (CMAKE_CUDA_ARCHITECTURES 90a); otherwise Unsupported or a trap.
#include <cstdint>

#include "kernels/common/status.h"

namespace oscar::kern {

enum class WgmmaProbeMode { Ss, RsT, Rs, Rs8 };

struct WgmmaProbeArgs {
  WgmmaProbeMode mode = WgmmaProbeMode::Ss;
  const uint16_t* a = nullptr;  // device, bf16 [64, 128] row-major
  const uint16_t* b = nullptr;  // device, bf16: Ss [64, 128] (n rows of k), RsT [128, 128] (k rows of n),
                                // Rs [128, 128] (n rows of k), Rs8 [8, 128] (n rows of k)
  float* c = nullptr;           // device, fp32: Ss [64, 64], RsT and Rs [64, 128], Rs8 [64, 8], row-major
  uint32_t mn_lbo_bytes = 16384;
  uint32_t mn_sbo_bytes = 1024;
};

Status wgmma_probe(const WgmmaProbeArgs& args, Stream stream);

}  // namespace oscar::kern
