// Shared input validation for the flm_rt operators (CPU and CUDA implementations).
//
// Every problem with the inputs is reported through TORCH_CHECK (a c10::Error, i.e. a Python
// RuntimeError) that names the operator, the argument and what was expected.
#pragma once

#include "fixed_shift.h"

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <optional>

namespace flm_rt {

// Rows / vocabulary view of a [..., V] problem.
struct RowShape {
  int64_t rows;
  int64_t V;
};

inline bool is_supported_logits_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Float || t == c10::ScalarType::BFloat16 || t == c10::ScalarType::Half;
}

inline RowShape check_step_inputs(const char* op, const at::Tensor& z, const at::Tensor& logits,
                                  const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                                  const std::optional<at::Tensor>& eps, c10::DeviceType expected_device) {
  TORCH_CHECK(z.defined() && logits.defined(), op, ": z and logits must be defined tensors");
  TORCH_CHECK(z.device().type() == expected_device, op, ": expected z on ", c10::DeviceTypeName(expected_device),
              ", got ", z.device());
  TORCH_CHECK(logits.device() == z.device(), op, ": logits must be on the same device as z (z on ", z.device(),
              ", logits on ", logits.device(), ")");
  TORCH_CHECK(z.scalar_type() == c10::ScalarType::Float, op, ": z must be float32, got ", z.scalar_type());
  TORCH_CHECK(is_supported_logits_dtype(logits.scalar_type()), op,
              ": logits must be float32, bfloat16 or float16, got ", logits.scalar_type());
  TORCH_CHECK(z.dim() >= 1, op, ": z must have at least one dimension [..., V], got a 0-dim tensor");
  TORCH_CHECK(z.sizes() == logits.sizes(), op, ": z and logits must have the same shape, got z ", z.sizes(),
              " and logits ", logits.sizes());
  const int64_t V = z.size(-1);
  TORCH_CHECK(V > 0, op, ": the vocabulary (last) dimension must be non-empty, got shape ", z.sizes());
  const int64_t rows = V > 0 ? z.numel() / V : 0;
  if (eps.has_value() && eps->defined()) {
    TORCH_CHECK(eps->device() == z.device(), op, ": eps must be on the same device as z (z on ", z.device(),
                ", eps on ", eps->device(), ")");
    TORCH_CHECK(eps->scalar_type() == c10::ScalarType::Float, op, ": eps must be float32, got ",
                eps->scalar_type());
    TORCH_CHECK(eps->sizes() == z.sizes(), op, ": eps must have the shape of z ", z.sizes(), ", got ",
                eps->sizes());
  }
  const at::Tensor* coefs[3] = {&a, &b, &c};
  const char* names[3] = {"a", "b", "c"};
  for (int i = 0; i < 3; ++i) {
    const at::Tensor& t = *coefs[i];
    TORCH_CHECK(t.defined(), op, ": coefficient ", names[i], " must be a defined tensor");
    TORCH_CHECK(t.device() == z.device(), op, ": coefficient ", names[i], " must be on the device of z (",
                z.device(), "), got ", t.device());
    TORCH_CHECK(t.scalar_type() == c10::ScalarType::Float, op, ": coefficient ", names[i],
                " must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.numel() == 1 || t.numel() == rows, op, ": coefficient ", names[i],
                " must have 1 element or one per row (z.shape[:-1] has ", rows, " rows), got shape ", t.sizes(),
                " (the Python wrapper flm_rt.ops.flow_map_step broadcasts to z.shape[:-1] for you)");
  }
  return {rows, V};
}

inline RowShape check_argmax_input(const char* op, const at::Tensor& x, c10::DeviceType expected_device) {
  TORCH_CHECK(x.defined(), op, ": x must be a defined tensor");
  TORCH_CHECK(x.device().type() == expected_device, op, ": expected x on ", c10::DeviceTypeName(expected_device),
              ", got ", x.device());
  TORCH_CHECK(is_supported_logits_dtype(x.scalar_type()), op, ": x must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension [..., V], got a 0-dim tensor");
  const int64_t V = x.size(-1);
  TORCH_CHECK(V > 0, op, ": cannot take the argmax over an empty vocabulary (last) dimension, got shape ",
              x.sizes());
  return {x.numel() / V, V};
}

// Coefficient stride: 0 for a single value broadcast over all rows, 1 for one value per row.
inline int64_t coef_stride(const at::Tensor& t) { return t.numel() == 1 ? 0 : 1; }

}  // namespace flm_rt
