#pragma once
// `oscar eval --device cuda`: the measurements of lib/eval/evaluator.h through rt::Engine (runtime/engine.h), the
// INT2 runtime that serves, instead of the CPU simulation. The driver is runtime/eval_decode.h; this file adds
// the engines: one DeviceModel (one copy of the weights) shared by a bf16 reference engine and one engine per
// requested engine mode, all stepped in lockstep.
//
// Modes: the engine implements bf16, int2, int4 (one 4-bit segment per head, through the segmented kernels), fp8
// (e4m3 pages), hadamard2 (the seed of options.mode_options.seed, as the CPU simulation) and oscar (one rotation per
// layer, whole-head INT2 or per-layer spectral segments). kivi2 (per-channel key groups over tokens, a different
// cache) exists only in the CPU simulation: it is refused ("cpu only"), or with cpu_fallback run through
// eval::evaluate on the CPU model and merged into the report with a warning — those modes are then compared with
// the CPU's bf16 reference, the engine modes with the engine's.
//
// This header needs no CUDA headers; evaluate_on_gpu is defined only in CUDA builds (runtime/eval_gpu.cpp).
#include <filesystem>
#include <vector>

#include "formats/tokenizer.h"
#include "lib/eval/evaluator.h"
#include "lib/model/cpu_model.h"
#include "runtime/eval_decode.h"

namespace oscar::rt {

struct GpuEvalOptions {
  DecodeScheduleOptions schedule;  // --gpu-batch, --prefill-tokens
  bool cpu_fallback = false;       // --cpu-fallback: run CPU-only modes on the CPU simulation instead of refusing
  // Per engine; 0 = eval_cache_budget_bytes for schedule.batch sequences of the longest job.
  size_t cache_budget_bytes = 0;
  // --fold-v: engines with a V rotation (oscar, hadamard2) fold it into W_v / W_o at load. Each such engine then
  // holds its own copy of the weights (the bf16 reference keeps the unfolded ones).
  bool fold_v = false;
};

// Evaluates options.modes on the GPU. options.mode_options.windows are the engines' sink/recent windows;
// options.mode_options.bundle is the oscar bundle (checked against model_dir's fingerprint by Engine::load).
// `cpu_model` is needed only with cpu_fallback and CPU-only modes. Throws oscar::Error naming the flag for
// CPU-only modes without cpu_fallback, a prefill longer than the sink, and anything Engine::load refuses — all
// before a forward pass runs.
eval::EvalReport evaluate_on_gpu(const std::filesystem::path& model_dir, const fmt::Tokenizer* tokenizer,
                                 const std::vector<eval::ContextSequences>& data, const eval::EvalOptions& options,
                                 const GpuEvalOptions& gpu, model::CpuModel* cpu_model = nullptr);

}  // namespace oscar::rt
