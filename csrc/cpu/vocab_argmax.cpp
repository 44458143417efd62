// CPU implementation of flm_rt::vocab_argmax: (indices int64, values x.dtype) over the last dimension,
// with torch.max / torch.argmax semantics (first maximal index; NaN is the maximum, first NaN wins).
// Checks and allocation: op_wrappers.h.
#include "../op_wrappers.h"
#include "dispatch.h"

#include <ATen/core/Tensor.h>
#include <torch/library.h>

namespace flm_rt {
namespace {

struct CpuArgmax {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
  using Guard = NoDeviceGuard;

  static void run(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& val, const RowShape& shape) {
    cpu::ArgmaxParams p{};
    p.x = x.const_data_ptr();
    p.kind = cpu::float_kind(x.scalar_type());
    p.V = shape.V;
    p.indices = idx.mutable_data_ptr<int64_t>();
    p.values = val.mutable_data_ptr();
    cpu::argmax_rows_parallel(p, shape.rows);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(flm_rt, CPU, m) { m.impl("vocab_argmax", &VocabArgmaxOp<CpuArgmax>::call); }

}  // namespace flm_rt
