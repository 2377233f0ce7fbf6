#pragma once
// CPU reference of kv_write: the same params with host pointers, built on lib/calib/quantizer_ref.h.
#include "kernels/kv_quantize/kv_quantize.h"

namespace oscar::kern {

// Same contract as kv_write (host pointers). Throws oscar::Error on invalid params instead of returning a status.
void kv_write_ref(const KvWriteParams& p, KvWriteMode mode);

}  // namespace oscar::kern
