// CPU implementation of flm_rt::vocab_argmax: (indices int64, values x.dtype) over the last dimension,
// with torch.max / torch.argmax semantics (first maximal index; NaN is the maximum, first NaN wins).
#include "../common.h"
#include "dispatch.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace flm_rt {
namespace {

std::tuple<at::Tensor, at::Tensor> vocab_argmax_cpu(const at::Tensor& x) {
  const RowShape shape = check_argmax_input("flm_rt::vocab_argmax", x, c10::DeviceType::CPU);
  const auto out_sizes = x.sizes().slice(0, x.dim() - 1);
  at::Tensor idx = at::empty(out_sizes, x.options().dtype(c10::ScalarType::Long));
  at::Tensor val = at::empty(out_sizes, x.options());
  if (shape.rows == 0) return {idx, val};
  const at::Tensor xc = x.contiguous();

  cpu::ArgmaxParams p{};
  p.x = xc.const_data_ptr();
  switch (xc.scalar_type()) {
    case c10::ScalarType::BFloat16: p.kind = cpu::FloatKind::BF16; break;
    case c10::ScalarType::Half: p.kind = cpu::FloatKind::F16; break;
    default: p.kind = cpu::FloatKind::F32; break;
  }
  p.V = shape.V;
  p.indices = idx.mutable_data_ptr<int64_t>();
  p.values = val.mutable_data_ptr();
  const auto& k = cpu::kernels();
  const int64_t grain = std::max<int64_t>(1, 65536 / shape.V);
  at::parallel_for(0, shape.rows, grain, [&](int64_t r0, int64_t r1) { k.argmax_rows(p, r0, r1); });
  return {idx, val};
}

}  // namespace

TORCH_LIBRARY_IMPL(flm_rt, CPU, m) { m.impl("vocab_argmax", &vocab_argmax_cpu); }

}  // namespace flm_rt
