// CPU implementation of flm_rt::rotary_split (see docs/KERNELS.md): the step between a block's qkv Linear and
// its attention,
//
//   qkv [B, L, 3 * H * hd]  ->  out [3, B, H, L, hd]:  out[0] = rot(q), out[1] = rot(k), out[2] = v
//
// with rot the halves-convention rotary embedding of ops.rotary_reference, computed in the dtype of qkv exactly as
// its plain-PyTorch ops round (cos / sin rounded to that dtype, every product and sum rounded). One read of qkv
// and one write of out, in the layout the attention's batched products read, instead of the permuted views, the
// four products, two sums, the concatenation and the copy of v. at::parallel_for over the B * L token rows; the
// row kernel is in vec_kernels.cpp.
#include "../common.h"
#include "dispatch.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

namespace flm_rt {
namespace {

at::Tensor rotary_split_cpu(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t n_heads) {
  constexpr const char* op = "flm_rt::rotary_split";
  TORCH_CHECK(qkv.defined() && cos.defined() && sin.defined(), op, ": qkv, cos and sin must be defined tensors");
  TORCH_CHECK(qkv.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(), op,
              ": expected CPU tensors, got qkv on ", qkv.device(), ", cos on ", cos.device(), ", sin on ",
              sin.device());
  TORCH_CHECK(is_supported_logits_dtype(qkv.scalar_type()), op, ": qkv must be float32, bfloat16 or float16, got ",
              qkv.scalar_type());
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, op,
              ": cos and sin must be float32, got ", cos.scalar_type(), " and ", sin.scalar_type());
  TORCH_CHECK(qkv.dim() == 3, op, ": qkv must be [B, L, 3 * n_heads * head_dim], got ", qkv.dim(), " dimensions");
  TORCH_CHECK(n_heads >= 1, op, ": n_heads must be >= 1, got ", n_heads);
  const int64_t B = qkv.size(0), L = qkv.size(1), width = qkv.size(2);
  TORCH_CHECK(width % (3 * n_heads) == 0, op, ": the last dimension of qkv (", width,
              ") is not 3 * n_heads * head_dim with n_heads = ", n_heads);
  const int64_t hd = width / (3 * n_heads);
  TORCH_CHECK(hd >= 2 && hd % 2 == 0, op, ": head_dim must be even and >= 2, got ", hd);
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == L && cos.size(1) == hd / 2 && sin.sizes() == cos.sizes(), op,
              ": cos and sin must be [L, head_dim / 2] = [", L, ", ", hd / 2, "], got ", cos.sizes(), " and ",
              sin.sizes());

  at::Tensor out = at::empty({3, B, n_heads, L, hd}, qkv.options().memory_format(c10::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor x = qkv.contiguous();
  // cos / sin as the plain ops see them: rounded to the dtype of qkv (exact in float32).
  const at::Tensor c = cos.to(qkv.scalar_type()).to(at::kFloat).contiguous();
  const at::Tensor s = sin.to(qkv.scalar_type()).to(at::kFloat).contiguous();
  cpu::RotaryParams p{};
  p.qkv = x.const_data_ptr();
  p.out = out.mutable_data_ptr();
  p.kind = cpu::float_kind(qkv.scalar_type());
  p.cos = c.const_data_ptr<float>();
  p.sin = s.const_data_ptr<float>();
  p.B = B;
  p.L = L;
  p.H = n_heads;
  p.hd = hd;
  const auto& k = cpu::kernels();
  at::parallel_for(0, B * L, std::max<int64_t>(1, 32768 / (3 * width)), [&](int64_t r0, int64_t r1) {
    k.rotary_rows(p, r0, r1);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(flm_rt, CPU, m) {
  m.impl("rotary_split", &rotary_split_cpu);
}

}  // namespace flm_rt
