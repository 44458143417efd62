// CPU implementation of flm_rt::scaled_add (see docs/KERNELS.md): the adaLN modulation and the gated residual of
// the denoiser's blocks,
//
//   out = base + x * w        computed as ATen's addcmul on float32 operands, stored in `dtype` (default float32)
//
// with base, x and w each [B, L, D] or [B, 1, D] (broadcast over the positions) in float32, bfloat16 or float16.
// One pass: no float32 copies of bf16 operands, and the result goes straight to the dtype of the Linear that
// reads it (modulate under bf16 autocast) instead of through a float32 tensor and a cast. at::parallel_for over
// the B * L rows; the row kernel is in vec_kernels.cpp.
#include "../common.h"
#include "dispatch.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <optional>

namespace flm_rt {
namespace {

cpu::ScaledAddOperand operand(const char* name, const at::Tensor& t, int64_t B, int64_t L, int64_t D) {
  constexpr const char* op = "flm_rt::scaled_add";
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a defined tensor");
  TORCH_CHECK(t.device().is_cpu(), op, ": expected CPU tensors, got ", name, " on ", t.device());
  TORCH_CHECK(is_supported_logits_dtype(t.scalar_type()), op, ": ", name,
              " must be float32, bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 3 && t.size(0) == B && (t.size(1) == L || t.size(1) == 1) && t.size(2) == D, op, ": ",
              name, " must be [B, L, D] = [", B, ", ", L, ", ", D, "] or [B, 1, D], got ", t.sizes());
  TORCH_CHECK(t.stride(2) == 1 || D <= 1, op, ": the last dimension of ", name, " must be contiguous");
  return {t.const_data_ptr(), cpu::float_kind(t.scalar_type()), B > 1 ? t.stride(0) : 0,
          t.size(1) == 1 ? 0 : t.stride(1)};
}

at::Tensor scaled_add_cpu(const at::Tensor& base, const at::Tensor& x, const at::Tensor& w,
                          std::optional<at::ScalarType> dtype) {
  constexpr const char* op = "flm_rt::scaled_add";
  TORCH_CHECK(base.defined() && x.defined() && w.defined(), op, ": base, x and w must be defined tensors");
  TORCH_CHECK(base.dim() == 3 && x.dim() == 3 && w.dim() == 3, op,
              ": base, x and w must be 3-dimensional ([B, L, D] or [B, 1, D]), got ", base.sizes(), ", ",
              x.sizes(), " and ", w.sizes());
  const int64_t B = x.size(0), D = x.size(2);
  const int64_t L = std::max({base.size(1), x.size(1), w.size(1)});
  const at::ScalarType out_type = dtype.value_or(at::kFloat);
  TORCH_CHECK(is_supported_logits_dtype(out_type), op, ": dtype must be float32, bfloat16 or float16, got ",
              out_type);
  // Operands with a non-unit last stride are copied (then the views below stay alive until the end).
  const at::Tensor b_ = base.stride(-1) == 1 ? base : base.contiguous();
  const at::Tensor x_ = x.stride(-1) == 1 ? x : x.contiguous();
  const at::Tensor w_ = w.stride(-1) == 1 ? w : w.contiguous();
  cpu::ScaledAddParams p{};
  p.base = operand("base", b_, B, L, D);
  p.x = operand("x", x_, B, L, D);
  p.w = operand("w", w_, B, L, D);
  at::Tensor out = at::empty({B, L, D}, x.options().dtype(out_type).memory_format(c10::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  p.out = out.mutable_data_ptr();
  p.out_kind = cpu::float_kind(out_type);
  p.L = L;
  p.D = D;
  const auto& k = cpu::kernels();
  at::parallel_for(0, B * L, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    std::unique_ptr<float[]> scratch(new float[static_cast<size_t>(3 * D)]);
    k.scaled_add_rows(p, r0, r1, scratch.get());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(flm_rt, CPU, m) {
  m.impl("scaled_add", &scaled_add_cpu);
}

}  // namespace flm_rt
