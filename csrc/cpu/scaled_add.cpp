// CPU implementation of flm_rt::scaled_add (see docs/KERNELS.md): the adaLN modulation and the gated residual of
// the denoiser's blocks,
//
//   out = base + x * w        computed as ATen's addcmul on float32 operands, stored in `dtype` (default float32)
//
// with base, x and w each [B, L, D] or [B, 1, D] (broadcast over the positions) in float32, bfloat16 or float16.
// One pass: no float32 copies of bf16 operands, and the result goes straight to the dtype of the Linear that
// reads it (modulate under bf16 autocast) instead of through a float32 tensor and a cast. at::parallel_for over
// the B * L rows; the row kernel is in vec_kernels.cpp. An operand laid out as the transpose of a contiguous
// [D, B * L] matrix (a bf16 product computed as W @ X^T, flm_rt.prepack) is first copied to rows by tiles.
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

// t [B, L, D] is the transpose of a contiguous [D, B * L] matrix: element (b, l, d) at (b * L + l) + d * B * L.
bool transposed_rows(const at::Tensor& t) {
  if (t.dim() != 3) return false;
  const int64_t B = t.size(0), L = t.size(1), D = t.size(2);
  return D > 1 && t.stride(2) == B * L && (L == 1 || t.stride(1) == 1) && (B == 1 || t.stride(0) == L);
}

// The row-major copy of such an operand, by kTile x kTile tiles (ATen's strided copy of a 16-bit transpose ran
// about 2x slower: 0.6 against 0.28 ms for [1024, 768] on the 2-core development machine).
template <typename Bits>
void copy_transposed(const Bits* src, Bits* dst, int64_t R, int64_t D) {
  constexpr int64_t kTile = 32;
  at::parallel_for(0, (R + kTile - 1) / kTile, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t r0 = t0 * kTile; r0 < std::min(R, t1 * kTile); r0 += kTile) {
      const int64_t r1 = std::min(R, r0 + kTile);
      for (int64_t d0 = 0; d0 < D; d0 += kTile) {
        const int64_t d1 = std::min(D, d0 + kTile);
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t d = d0; d < d1; ++d) dst[r * D + d] = src[d * R + r];
      }
    }
  });
}

at::Tensor rows_of_transposed(const at::Tensor& t) {
  at::Tensor out = at::empty(t.sizes(), t.options().memory_format(c10::MemoryFormat::Contiguous));
  const int64_t R = t.size(0) * t.size(1), D = t.size(2);
  if (t.element_size() == 2) {
    copy_transposed(static_cast<const uint16_t*>(t.const_data_ptr()), static_cast<uint16_t*>(out.mutable_data_ptr()),
                    R, D);
  } else {
    copy_transposed(static_cast<const uint32_t*>(t.const_data_ptr()), static_cast<uint32_t*>(out.mutable_data_ptr()),
                    R, D);
  }
  return out;
}

// the operand with a contiguous last dimension: itself, its tiled row copy, or ATen's copy
at::Tensor unit_last_stride(const at::Tensor& t) {
  if (t.dim() == 0 || t.stride(-1) == 1) return t;
  if (transposed_rows(t) && (t.element_size() == 2 || t.element_size() == 4)) return rows_of_transposed(t);
  return t.contiguous();
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
  const at::Tensor b_ = unit_last_stride(base);
  const at::Tensor x_ = unit_last_stride(x);
  const at::Tensor w_ = unit_last_stride(w);
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
