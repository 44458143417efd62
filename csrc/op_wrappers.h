// The operator entry points shared by the CPU and CUDA implementations: argument checks, device guard, output
// allocation, contiguous operands and the in-place fallback for a non-contiguous z. A backend only supplies the
// kernel run on contiguous tensors. Host-only code; also compiled by nvcc.
//
//   struct Kernel {
//     static constexpr c10::DeviceType kDevice = ...;
//     using Guard = ...;  // constructed from the input's device for the call (NoDeviceGuard on the CPU)
//     static void run(...);  // see FlowMapStepOp / VocabArgmaxOp; called only when there are rows
//   };
//   TORCH_LIBRARY_IMPL(flm_rt, CPU, m) { m.impl("flow_map_step", &FlowMapStepOp<Kernel>::functional); ... }
#pragma once

#include "common.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Device.h>

#include <optional>
#include <tuple>

namespace flm_rt {

struct NoDeviceGuard {
  explicit NoDeviceGuard(c10::Device) {}
};

inline at::Tensor empty_contiguous_like(const at::Tensor& t) {
  return at::empty(t.sizes(), t.options().memory_format(c10::MemoryFormat::Contiguous));
}

// fn(t) on x itself when x is contiguous, else on a contiguous copy that is then copied back into x: the fallback
// of the in-place ops whose kernels read and write one contiguous array (softcap_softmax_, gelu_tanh_).
template <typename Fn>
void inplace_on_contiguous(at::Tensor& x, Fn&& fn) {
  if (x.is_contiguous()) {
    fn(x);
    return;
  }
  at::Tensor tmp = x.contiguous();
  fn(tmp);
  x.copy_(tmp);
}

// (indices int64, values x.dtype), both of shape x.shape[:-1], uninitialised.
inline std::tuple<at::Tensor, at::Tensor> empty_argmax_outputs(const at::Tensor& x) {
  const auto sizes = x.sizes().slice(0, x.dim() - 1);
  return {at::empty(sizes, x.options().dtype(c10::ScalarType::Long)), at::empty(sizes, x.options())};
}

// flow_map_step's operands, contiguous; eps undefined when absent.
struct StepOperands {
  at::Tensor z, logits, a, b, c, eps;
};

// The fields that the CPU (cpu::StepParams) and CUDA (StepArgs<T>) kernel arguments share; the logits pointer
// and anything backend-specific are the caller's.
template <typename Params>
void set_step_params(Params& p, const at::Tensor& out, const StepOperands& in, double cap, const RowShape& shape) {
  p.z = in.z.const_data_ptr<float>();
  p.eps = in.eps.defined() ? in.eps.const_data_ptr<float>() : nullptr;
  p.out = out.mutable_data_ptr<float>();
  p.a = in.a.const_data_ptr<float>();
  p.b = in.b.const_data_ptr<float>();
  p.c = in.c.const_data_ptr<float>();
  p.a_stride = coef_stride(in.a);
  p.b_stride = coef_stride(in.b);
  p.c_stride = coef_stride(in.c);
  p.V = shape.V;
  p.cap = static_cast<float>(cap);
}

// Kernel::run(const at::Tensor& out, const StepOperands& in, double cap, const RowShape& shape) writes the step
// into `out` (contiguous float32, the shape of z; may be in.z itself).
template <typename Kernel>
struct FlowMapStepOp {
  static at::Tensor functional(const at::Tensor& z, const at::Tensor& logits, const at::Tensor& a,
                               const at::Tensor& b, const at::Tensor& c, const std::optional<at::Tensor>& eps,
                               double cap) {
    const RowShape shape = check_step_inputs("flm_rt::flow_map_step", z, logits, a, b, c, eps, Kernel::kDevice);
    const typename Kernel::Guard guard(z.device());
    at::Tensor out = empty_contiguous_like(z);
    step_into(out, z, logits, a, b, c, eps, cap, shape);
    return out;
  }

  static void inplace(at::Tensor& z, const at::Tensor& logits, const at::Tensor& a, const at::Tensor& b,
                      const at::Tensor& c, const std::optional<at::Tensor>& eps, double cap) {
    const RowShape shape = check_step_inputs("flm_rt::flow_map_step_", z, logits, a, b, c, eps, Kernel::kDevice);
    const typename Kernel::Guard guard(z.device());
    if (z.is_contiguous()) {
      step_into(z, z, logits, a, b, c, eps, cap, shape);
    } else {
      at::Tensor tmp = empty_contiguous_like(z);
      step_into(tmp, z, logits, a, b, c, eps, cap, shape);
      z.copy_(tmp);
    }
  }

 private:
  static void step_into(const at::Tensor& out, const at::Tensor& z, const at::Tensor& logits, const at::Tensor& a,
                        const at::Tensor& b, const at::Tensor& c, const std::optional<at::Tensor>& eps, double cap,
                        const RowShape& shape) {
    if (shape.rows == 0) return;
    const StepOperands in{z.contiguous(),  logits.contiguous(), a.contiguous(), b.contiguous(), c.contiguous(),
                          (eps.has_value() && eps->defined()) ? eps->contiguous() : at::Tensor()};
    Kernel::run(out, in, cap, shape);
  }
};

// Kernel::run(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& val, const RowShape& shape) with x
// contiguous and idx / val from empty_argmax_outputs(x).
template <typename Kernel>
struct VocabArgmaxOp {
  static std::tuple<at::Tensor, at::Tensor> call(const at::Tensor& x) {
    const RowShape shape = check_argmax_input("flm_rt::vocab_argmax", x, Kernel::kDevice);
    const typename Kernel::Guard guard(x.device());
    std::tuple<at::Tensor, at::Tensor> out = empty_argmax_outputs(x);
    if (shape.rows > 0) Kernel::run(x.contiguous(), std::get<0>(out), std::get<1>(out), shape);
    return out;
  }
};

}  // namespace flm_rt
