// Input validation of the fused vocabulary pass (flm_rt::vocab_pass_argmax / vocab_pass_embed), shared by the CPU
// (cpu/vocab_pass.cpp) and CUDA (cuda/vocab_pass.cu) implementations so that both report the same errors.
#pragma once

#include "common.h"

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/DeviceType.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace flm_rt {

struct PassShape {
  int64_t rows, D, V;
};

// y [..., D], weight [V, D], bias [V] (optional), chunk >= 1 on one device of type `expected_device`.
inline PassShape check_pass_inputs(const char* op, const at::Tensor& y, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, int64_t chunk,
                                   c10::DeviceType expected_device) {
  TORCH_CHECK(y.defined() && weight.defined(), op, ": y and weight must be defined tensors");
  TORCH_CHECK(y.device().type() == expected_device && weight.device().type() == expected_device, op, ": expected ",
              c10::DeviceTypeName(expected_device), " tensors, got y on ", y.device(), " and weight on ",
              weight.device());
  TORCH_CHECK(weight.device() == y.device(), op, ": weight must be on the device of y (y on ", y.device(),
              ", weight on ", weight.device(), ")");
  TORCH_CHECK(is_supported_logits_dtype(y.scalar_type()), op, ": y must be float32, bfloat16 or float16, got ",
              y.scalar_type());
  TORCH_CHECK(weight.scalar_type() == y.scalar_type(), op, ": weight must have the dtype of y (", y.scalar_type(),
              "), got ", weight.scalar_type());
  TORCH_CHECK(y.dim() >= 1, op, ": y must have at least one dimension [..., D], got a 0-dim tensor");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be [V, D], got shape ", weight.sizes());
  TORCH_CHECK(weight.size(1) == y.size(-1), op, ": weight is [V, D] = ", weight.sizes(), " but y has D = ",
              y.size(-1));
  const int64_t V = weight.size(0);
  TORCH_CHECK(V > 0, op, ": the vocabulary (weight.shape[0]) must be non-empty, got weight ", weight.sizes());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device() == y.device(), op, ": bias must be on the device of y (y on ", y.device(),
                ", bias on ", bias->device(), ")");
    TORCH_CHECK(bias->scalar_type() == y.scalar_type(), op, ": bias must have the dtype of y (", y.scalar_type(),
                "), got ", bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == V, op, ": bias must be [V] = [", V, "], got ", bias->sizes());
  }
  TORCH_CHECK(chunk >= 1, op, ": chunk must be >= 1, got ", chunk);
  const int64_t D = y.size(-1);
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < y.dim(); ++i) rows *= y.size(i);  // (also for D = 0, where numel / D is not)
  return {rows, D, V};
}

// embed float32 [V, De] on the device of y; returns De.
inline int64_t check_pass_embed(const char* op, const at::Tensor& y, const at::Tensor& embed, const PassShape& s) {
  TORCH_CHECK(embed.defined(), op, ": embed must be a defined tensor");
  TORCH_CHECK(embed.device() == y.device(), op, ": embed must be on the device of y (y on ", y.device(),
              ", embed on ", embed.device(), ")");
  TORCH_CHECK(embed.scalar_type() == c10::ScalarType::Float, op, ": embed must be float32, got ",
              embed.scalar_type());
  TORCH_CHECK(embed.dim() == 2 && embed.size(0) == s.V, op, ": embed must be [V, De] with V = ", s.V, ", got ",
              embed.sizes());
  return embed.size(1);
}

// y.shape[:-1]
inline std::vector<int64_t> pass_row_sizes(const at::Tensor& y) {
  auto s = y.sizes().vec();
  s.pop_back();
  return s;
}

}  // namespace flm_rt
