// CPU implementation of flm_rt::gelu_tanh_ (see docs/KERNELS.md): the MLP activation of the denoiser's blocks,
//
//   x <- 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))        (torch's GELU, approximate="tanh")
//
// in place, computed in float32 for float32, bfloat16 and float16 storage. It runs on the output of the block's
// first MLP product, which flm_rt.prepack then computes without oneDNN's fused GELU post-op: the plain product
// and this pass took 0.8x the time of the fused one at [1024 x 3072 x 768] on a 2-core AVX2 Zen 3. One read and
// one write per element; at::parallel_for over blocks of elements; the lane kernel is in vec_kernels.cpp.
#include "../common.h"
#include "../op_wrappers.h"
#include "dispatch.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace flm_rt {
namespace {

constexpr int64_t kGrain = 32768;  // elements per task (a multiple of every vector width)

void gelu_tanh_contiguous(const at::Tensor& x) {
  const int64_t n = x.numel();
  if (n == 0) return;
  void* p = x.mutable_data_ptr();
  const cpu::FloatKind kind = cpu::float_kind(x.scalar_type());
  const auto& k = cpu::kernels();
  at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) { k.gelu_tanh_range(p, kind, i0, i1); });
}

void gelu_tanh_inplace_cpu(at::Tensor& x) {
  constexpr const char* op = "flm_rt::gelu_tanh_";
  TORCH_CHECK(x.defined(), op, ": x must be a defined tensor");
  TORCH_CHECK(x.device().is_cpu(), op, ": expected a CPU tensor, got x on ", x.device());
  TORCH_CHECK(is_supported_logits_dtype(x.scalar_type()), op, ": x must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  inplace_on_contiguous(x, gelu_tanh_contiguous);
}

}  // namespace

TORCH_LIBRARY_IMPL(flm_rt, CPU, m) {
  m.impl("gelu_tanh_", &gelu_tanh_inplace_cpu);
}

}  // namespace flm_rt
