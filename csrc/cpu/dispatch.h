// Run-time choice between the per-capability copies of the CPU row kernels.
#pragma once

#include "vec_kernels.h"

#include <c10/core/ScalarType.h>

#include <string>
#include <vector>

namespace flm_rt::cpu {

struct KernelTable {
  const char* capability;  // "DEFAULT", "AVX2" or "AVX512"
  void (*step_rows)(const StepParams&, int64_t, int64_t, float*);
  void (*argmax_rows)(const ArgmaxParams&, int64_t, int64_t);
  void (*softcap_softmax_rows)(const SoftmaxParams&, int64_t, int64_t, float*);
  void (*rotary_rows)(const RotaryParams&, int64_t, int64_t);
  void (*scaled_add_rows)(const ScaledAddParams&, int64_t, int64_t, float*);
  void (*gelu_tanh_range)(void*, FloatKind, int64_t, int64_t);
  bool (*screen_max)(const ScreenRow&, float*, float*);
  int64_t (*screen_collect)(const ScreenRow&, float, const float*, int64_t, int32_t*, float*, int64_t, int64_t);
  float (*dot_f32)(const float*, const float*, int64_t);
  const char* (*describe)();
};

// The best compiled copy that PyTorch's own CPU capability (at::get_cpu_capability(), which honours
// ATEN_CPU_CAPABILITY) allows. Chosen on first use.
const KernelTable& kernels();

// Capabilities compiled into this build, e.g. {"DEFAULT", "AVX2", "AVX512"}.
std::vector<std::string> compiled_capabilities();

// The kernels' name for a logits dtype (float32, bfloat16 or float16; the operators check it beforehand).
inline FloatKind float_kind(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::BFloat16: return FloatKind::BF16;
    case c10::ScalarType::Half: return FloatKind::F16;
    default: return FloatKind::F32;
  }
}

// kernels().argmax_rows over rows [0, rows) with at::parallel_for.
void argmax_rows_parallel(const ArgmaxParams& p, int64_t rows);

}  // namespace flm_rt::cpu
