// CPU implementation of flm_rt::flow_map_step and flm_rt::flow_map_step_ (see docs/KERNELS.md).
//
//   out[r, :] = a[r] * z[r, :] + b[r] * softmax(cap * tanh(logits[r, :] / cap)) + c[r] * eps[r, :]
//
// at::parallel_for over rows; each task owns a V-float scratch row; the row kernel itself is the
// at::vec code in vec_kernels.cpp, compiled per CPU capability and chosen in dispatch.cpp.
#include "../common.h"
#include "dispatch.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <optional>

namespace flm_rt {
namespace {

cpu::FloatKind float_kind(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::BFloat16: return cpu::FloatKind::BF16;
    case c10::ScalarType::Half: return cpu::FloatKind::F16;
    default: return cpu::FloatKind::F32;
  }
}

// Writes the step into `out` (contiguous float32, shape of z; may be z itself when z is contiguous).
void step_into(const at::Tensor& out, const at::Tensor& z, const at::Tensor& logits, const at::Tensor& a,
               const at::Tensor& b, const at::Tensor& c, const std::optional<at::Tensor>& eps, double cap,
               const RowShape& shape) {
  if (shape.rows == 0) return;
  const at::Tensor zc = z.contiguous();
  const at::Tensor lc = logits.contiguous();
  const at::Tensor ac = a.contiguous(), bc = b.contiguous(), cc = c.contiguous();
  at::Tensor ec;
  if (eps.has_value() && eps->defined()) ec = eps->contiguous();

  cpu::StepParams p{};
  p.logits = lc.const_data_ptr();
  p.logits_kind = float_kind(lc.scalar_type());
  p.z = zc.const_data_ptr<float>();
  p.eps = ec.defined() ? ec.const_data_ptr<float>() : nullptr;
  p.out = out.mutable_data_ptr<float>();
  p.a = ac.const_data_ptr<float>();
  p.b = bc.const_data_ptr<float>();
  p.c = cc.const_data_ptr<float>();
  p.a_stride = coef_stride(ac);
  p.b_stride = coef_stride(bc);
  p.c_stride = coef_stride(cc);
  p.V = shape.V;
  p.cap = static_cast<float>(cap);

  const auto& k = cpu::kernels();
  const int64_t V = shape.V;
  // Small rows: batch enough rows per task to amortise the scheduling.
  const int64_t grain = std::max<int64_t>(1, 32768 / V);
  at::parallel_for(0, shape.rows, grain, [&](int64_t r0, int64_t r1) {
    std::unique_ptr<float[]> scratch(new float[static_cast<size_t>(V)]);
    k.step_rows(p, r0, r1, scratch.get());
  });
}

at::Tensor flow_map_step_cpu(const at::Tensor& z, const at::Tensor& logits, const at::Tensor& a,
                             const at::Tensor& b, const at::Tensor& c, const std::optional<at::Tensor>& eps,
                             double cap) {
  const RowShape shape = check_step_inputs("flm_rt::flow_map_step", z, logits, a, b, c, eps, c10::DeviceType::CPU);
  at::Tensor out = at::empty(z.sizes(), z.options().memory_format(c10::MemoryFormat::Contiguous));
  step_into(out, z, logits, a, b, c, eps, cap, shape);
  return out;
}

void flow_map_step_inplace_cpu(at::Tensor& z, const at::Tensor& logits, const at::Tensor& a,
                                      const at::Tensor& b, const at::Tensor& c,
                                      const std::optional<at::Tensor>& eps, double cap) {
  const RowShape shape = check_step_inputs("flm_rt::flow_map_step_", z, logits, a, b, c, eps, c10::DeviceType::CPU);
  if (z.is_contiguous()) {
    step_into(z, z, logits, a, b, c, eps, cap, shape);
  } else {
    at::Tensor tmp = at::empty(z.sizes(), z.options().memory_format(c10::MemoryFormat::Contiguous));
    step_into(tmp, z, logits, a, b, c, eps, cap, shape);
    z.copy_(tmp);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(flm_rt, CPU, m) {
  m.impl("flow_map_step", &flow_map_step_cpu);
  m.impl("flow_map_step_", &flow_map_step_inplace_cpu);
}

}  // namespace flm_rt
