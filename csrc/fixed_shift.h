// The soft-cap bound of the fixed-shift softmax, shared by every kernel (CPU row kernels, CUDA, the fused
// vocabulary pass). Free of ATen so that the per-capability CPU objects (cpu/vec_kernels.cpp) can include it.
#pragma once

namespace flm_rt {

// Soft-capped logits are bounded by |y| <= cap, so for moderate caps exp(y) can be summed without
// subtracting the row maximum (no overflow, no underflow to denormals: e^-60 ~ 8.8e-27). Above this cap,
// and without a cap, the kernels use the max-subtracted (online) formulation.
constexpr float kFixedShiftMaxCap = 60.0f;

}  // namespace flm_rt
