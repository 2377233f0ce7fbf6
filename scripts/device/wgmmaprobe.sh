#!/usr/bin/env bash
# wgmmaprobe (issue #4, step 1 of a wgmma/TMA prefill attention): the wgmma building blocks of
# kernels/common/wgmma.cuh against a double matmul (test_gpu WgmmaGpu.*). Needs a pack built with
# CMAKE_CUDA_ARCHITECTURES 90a (the default since this branch). Expected GPU time: seconds.
# Look for: two "[       OK ]" lines; "rs + transposed B nmse" prints both MN-major stride conventions.
source scripts/device/common.sh
timeout 60 "$BIN/bin/test_gpu" --gtest_filter='WgmmaGpu.*' 2>&1 | tee "$OUT/wgmmaprobe.log"
