// CPU implementation of flm_rt::flow_map_step and flm_rt::flow_map_step_ (see docs/KERNELS.md).
//
//   out[r, :] = a[r] * z[r, :] + b[r] * softmax(cap * tanh(logits[r, :] / cap)) + c[r] * eps[r, :]
//
// at::parallel_for over rows; each task owns a V-float scratch row; the row kernel itself is the
// at::vec code in vec_kernels.cpp, compiled per CPU capability and chosen in dispatch.cpp. Checks,
// allocation and the in-place variant: op_wrappers.h.
#include "../op_wrappers.h"
#include "dispatch.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>

namespace flm_rt {
namespace {

struct CpuStep {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
  using Guard = NoDeviceGuard;

  static void run(const at::Tensor& out, const StepOperands& in, double cap, const RowShape& shape) {
    cpu::StepParams p{};
    p.logits = in.logits.const_data_ptr();
    p.logits_kind = cpu::float_kind(in.logits.scalar_type());
    set_step_params(p, out, in, cap, shape);

    const auto& k = cpu::kernels();
    const int64_t V = shape.V;
    // Small rows: batch enough rows per task to amortise the scheduling.
    const int64_t grain = std::max<int64_t>(1, 32768 / V);
    at::parallel_for(0, shape.rows, grain, [&](int64_t r0, int64_t r1) {
      std::unique_ptr<float[]> scratch(new float[static_cast<size_t>(V)]);
      k.step_rows(p, r0, r1, scratch.get());
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(flm_rt, CPU, m) {
  m.impl("flow_map_step", &FlowMapStepOp<CpuStep>::functional);
  m.impl("flow_map_step_", &FlowMapStepOp<CpuStep>::inplace);
}

}  // namespace flm_rt
