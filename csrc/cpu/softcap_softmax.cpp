// CPU implementation of flm_rt::softcap_softmax and flm_rt::softcap_softmax_ (see docs/KERNELS.md): the
// attention probabilities of the denoiser's blocks,
//
//   out[r, :] = softmax(cap * tanh(scale * x[r, :]))        (cap <= 0: softmax(scale * x[r, :]))
//
// computed in float32 for float32, bfloat16 and float16 storage, one read and one write of each row instead of
// the four passes (scale, tanh, cap, softmax) and, in bf16, the fp32 round trips of the plain-PyTorch version.
// at::parallel_for over rows, each task with an L-float scratch row; the row kernel is in vec_kernels.cpp.
#include "../common.h"
#include "../op_wrappers.h"
#include "dispatch.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <memory>

namespace flm_rt {
namespace {

RowShape check_softmax_input(const char* op, const at::Tensor& x, double scale) {
  TORCH_CHECK(x.defined(), op, ": x must be a defined tensor");
  TORCH_CHECK(x.device().is_cpu(), op, ": expected a CPU tensor, got x on ", x.device());
  TORCH_CHECK(is_supported_logits_dtype(x.scalar_type()), op, ": x must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension [..., L], got a 0-dim tensor");
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  const int64_t L = x.size(-1);
  return {L > 0 ? x.numel() / L : 0, L};
}

// out (contiguous, dtype of x) <- the rows of x (contiguous); out may be x itself.
void run(const at::Tensor& out, const at::Tensor& x, double scale, double cap, const RowShape& s) {
  if (s.rows == 0 || s.V == 0) return;
  cpu::SoftmaxParams p{};
  p.x = x.const_data_ptr();
  p.out = out.mutable_data_ptr();
  p.kind = cpu::float_kind(x.scalar_type());
  p.L = s.V;
  p.scale = static_cast<float>(scale);
  p.cap = static_cast<float>(cap);
  const auto& k = cpu::kernels();
  const int64_t L = s.V;
  at::parallel_for(0, s.rows, std::max<int64_t>(1, 16384 / L), [&](int64_t r0, int64_t r1) {
    std::unique_ptr<float[]> scratch(new float[static_cast<size_t>(L)]);
    k.softcap_softmax_rows(p, r0, r1, scratch.get());
  });
}

at::Tensor softcap_softmax_cpu(const at::Tensor& x, double scale, double cap) {
  const RowShape s = check_softmax_input("flm_rt::softcap_softmax", x, scale);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(c10::MemoryFormat::Contiguous));
  run(out, x.contiguous(), scale, cap, s);
  return out;
}

void softcap_softmax_inplace_cpu(at::Tensor& x, double scale, double cap) {
  const RowShape s = check_softmax_input("flm_rt::softcap_softmax_", x, scale);
  inplace_on_contiguous(x, [&](const at::Tensor& t) { run(t, t, scale, cap, s); });
}

}  // namespace

TORCH_LIBRARY_IMPL(flm_rt, CPU, m) {
  m.impl("softcap_softmax", &softcap_softmax_cpu);
  m.impl("softcap_softmax_", &softcap_softmax_inplace_cpu);
}

}  // namespace flm_rt
