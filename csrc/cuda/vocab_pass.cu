// CUDA implementation of the fused vocabulary pass (flm_rt::vocab_pass_argmax, flm_rt::vocab_pass_embed; contract
// in docs/KERNELS.md, reference in flm_rt/ops.py). The output projection logits = y W^T + b is computed one
// vocabulary chunk [R, chunk] at a time into ONE reused buffer and folded at once into per-row running state, so
// no [R, V] logits tensor ever exists:
//
//   argmax: the soft-cap in the logits dtype (ATen's rounding, see cap_in_dtype), the chunk's argmax and its merge
//           into the running (index, value) with torch.max's rules (an earlier chunk wins ties, the first NaN wins),
//           all in one kernel per chunk (fold_argmax_kernel);
//   embed:  online softmax (as flash attention): fold_softmax_kernel caps in float32, updates the running max m
//           and sum s and writes p = exp(capped - m) (float32) and the rescale factor exp(m_old - m_new); then
//           acc = acc * factor + p @ E_chunk (ATen mul_ and addmm_, float32); finally acc / s. With 0 < cap <= 60
//           the shift is the cap itself (capped logits are bounded), so there is no running max and no rescale.
//
// GEMM backend: cuBLAS (cuBLASLt) through ATen (at::mm_out / at::addmm_out into the chunk buffer, at::Tensor::addmm_
// for p @ E). Its GEMMs are tuned per architecture and use tensor cores for bf16 / fp16 (fp32 follows torch's
// TF32 setting, which this file never changes), while the folds are memory-light (one read of the chunk per
// row, a few bytes of state per row), so a hand-written GEMM would gain nothing. ATen's calls run on the current
// stream and allocate through the caching allocator, and nothing here synchronises with the host: the ops can be
// captured in a CUDA graph.
//
// Memory beyond the inputs and outputs: argmax R*chunk*sizeof(logits); embed R*chunk*(sizeof(logits) + 4) (one
// buffer of R*chunk*4 for float32 logits, which the softmax fold overwrites in place) + R*De*4 (acc) + 12 R.
// `prepacked` and `screen` are CPU notions (oneDNN weight layouts, the bf16 screen): accepted and ignored here.
#include "../op_wrappers.h"
#include "../vocab_pass_checks.h"
#include "kernel_utils.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>

namespace flm_rt::cuda {
namespace {

// Rows of at most this many entries are folded by one warp (kWarpModeBlock / 32 rows per block), longer ones by a
// block of kRowBlock threads.
constexpr int64_t kWarpModeMaxWidth = 1024;
constexpr int kRowBlock = 256;

// cap * tanh(v / cap) exactly as ATen computes logits.div(cap).tanh_().mul_(cap) on CUDA in dtype T: the division
// by a CPU scalar is a multiplication by the reciprocal, computed in double and rounded to float once
// (BinaryDivTrueKernel.cu; cap_reciprocal below), tanh and the multiplication are evaluated in float, and each
// of the three results is rounded to T (no-ops for float).
template <typename T>
__device__ __forceinline__ float cap_in_dtype(float v, float cap, float inv_cap) {
  const float q = static_cast<float>(static_cast<T>(v * inv_cap));
  const float t = static_cast<float>(static_cast<T>(tanhf(q)));
  return static_cast<float>(static_cast<T>(t * cap));
}

// The float reciprocal ATen multiplies by for x.div(cap) (0 without a cap).
float cap_reciprocal(double cap) { return cap > 0 ? static_cast<float>(1.0 / cap) : 0.0f; }

// NaN-propagating maximum (at::maximum / at::amax semantics).
__device__ __forceinline__ float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

struct NanMax {
  __device__ __forceinline__ float operator()(float a, float b) const { return nan_max(a, b); }
};
struct Sum {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

// op over the row's threads (one warp, or a block of NT / 32 warps; the result valid in the first warp), with
// `identity` for the lanes past the last warp. sm: __shared__ [32] of the calling kernel.
template <int NT, typename Op>
__device__ __forceinline__ float row_reduce(float v, float* sm, float identity, Op op) {
  const auto warp = [&](float x) {
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) x = op(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
  };
  v = warp(v);
  if constexpr (NT > 32) {
    constexpr int NW = NT / 32;
    const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    __syncthreads();
    if (l == 0) sm[w] = v;
    __syncthreads();
    v = warp(l < NW ? sm[l] : identity);
  }
  return v;
}

// ------------------------------------------------------------------------------------------------ argmax
template <typename T>
struct FoldArgmaxArgs {
  const T* x;        // [rows, n] the chunk's logits
  int64_t* indices;  // [rows] running index (the op's output)
  T* values;         // [rows] running value (the op's output)
  int64_t rows, n, v0;
  float cap, inv_cap;
  bool capped, first;
};

template <typename T, int NT>
__global__ void __launch_bounds__(NT == 32 ? kWarpModeBlock : NT) fold_argmax_kernel(const FoldArgmaxArgs<T> p) {
  constexpr int kRowsPerBlock = NT == 32 ? kWarpModeBlock / 32 : 1;
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  __shared__ float sm_v[32];
  __shared__ int64_t sm_i[32];
  const int lane = NT == 32 ? (threadIdx.x & 31) : threadIdx.x;
  const int64_t row_in_block = NT == 32 ? (threadIdx.x >> 5) : 0;

  for (int64_t g = blockIdx.x; g * kRowsPerBlock < p.rows; g += gridDim.x) {
    const int64_t row = g * kRowsPerBlock + row_in_block;
    if (NT == 32 && row >= p.rows) continue;  // (a whole warp: its lanes share the row)
    const T* xr = p.x + row * p.n;
    // each thread scans its entries in increasing index order: ties keep the earlier one, the first NaN wins
    float bv = -kInf;
    int64_t bi = kNone;
    for (int64_t k = lane; k < p.n; k += NT) {
      float v = static_cast<float>(xr[k]);
      if (p.capped) v = cap_in_dtype<T>(v, p.cap, p.inv_cap);
      if (scan_better(v, bv)) {
        bv = v;
        bi = k;
      }
    }
    if (bi == kNone && lane < p.n) bi = lane;  // all of this thread's entries are -inf: its first one

    row_reduce_am<NT>(bv, bi, sm_v, sm_i, kNone);
    if (lane == 0) {
      // bv is a value of dtype T (rounded by the cap, or a widened element): narrowing it back is exact
      const float old = p.first ? 0.0f : static_cast<float>(p.values[row]);
      if (p.first || (old == old && (bv != bv || bv > old))) {
        p.values[row] = static_cast<T>(bv);
        p.indices[row] = p.v0 + bi;
      }
    }
  }
}

template <typename T>
void launch_fold_argmax(const FoldArgmaxArgs<T>& args) {
  launch_row_kernel<FoldArgmaxArgs<T>>(args.n, args.rows, kWarpModeMaxWidth, fold_argmax_kernel<T, 32>,
                            fold_argmax_kernel<T, kRowBlock>, kRowBlock, args);
}

// ----------------------------------------------------------------------------------------- online softmax
template <typename T>
struct FoldSoftmaxArgs {
  const T* x;      // [rows, n] the chunk's logits (the same memory as p for float32 logits)
  float* p;        // [rows, n] out: exp(capped - shift)
  float* m;        // [rows] running max (unused with a fixed shift)
  float* s;        // [rows] running sum of exp(capped - m)
  float* factor;   // [rows] out: exp(m_old - m_new), the rescale of the accumulator (unused with a fixed shift)
  int64_t rows, n;
  float cap, inv_cap;
  bool capped, fixed_shift;
};

template <typename T, int NT>
__global__ void __launch_bounds__(NT == 32 ? kWarpModeBlock : NT) fold_softmax_kernel(const FoldSoftmaxArgs<T> p) {
  constexpr int kRowsPerBlock = NT == 32 ? kWarpModeBlock / 32 : 1;
  __shared__ float sm[32];
  const int lane = NT == 32 ? (threadIdx.x & 31) : threadIdx.x;
  const int64_t row_in_block = NT == 32 ? (threadIdx.x >> 5) : 0;

  for (int64_t g = blockIdx.x; g * kRowsPerBlock < p.rows; g += gridDim.x) {
    const int64_t row = g * kRowsPerBlock + row_in_block;
    if (NT == 32 && row >= p.rows) continue;
    const T* xr = p.x + row * p.n;
    float* pr = p.p + row * p.n;
    // (every thread reads x[k] before it writes p[k], for the same k only: x and p may alias)
    const auto capped = [&](int64_t k) {
      const float v = static_cast<float>(xr[k]);
      return p.capped ? cap_in_dtype<float>(v, p.cap, p.inv_cap) : v;  // the reference caps in float32
    };
    float sum = 0.0f;
    if (p.fixed_shift) {  // |capped| <= cap <= 60: exp(capped - cap) in [e^-120, 1]; NaN stays NaN
      for (int64_t k = lane; k < p.n; k += NT) {
        const float e = expf(capped(k) - p.cap);
        pr[k] = e;
        sum += e;
      }
      sum = row_reduce<NT>(sum, sm, 0.0f, Sum{});
      if (lane == 0) p.s[row] += sum;
      continue;
    }
    float mx = -kInf;
    for (int64_t k = lane; k < p.n; k += NT) {
      const float c = capped(k);
      pr[k] = c;
      mx = nan_max(mx, c);
    }
    mx = row_reduce<NT>(mx, sm, -kInf, NanMax{});
    const float m_old = p.m[row];
    const float m_new = nan_max(m_old, mx);
    // 1 where the max did not move (also -inf -> -inf); NaN stays NaN
    const float fac = m_old == m_new ? 1.0f : expf(m_old - m_new);
    // a row that is all -inf so far: exp(-inf - 0) = 0 instead of exp(-inf + inf) = NaN
    const float shift = m_new == -kInf ? 0.0f : m_new;
    for (int64_t k = lane; k < p.n; k += NT) {
      const float e = expf(pr[k] - shift);
      pr[k] = e;
      sum += e;
    }
    sum = row_reduce<NT>(sum, sm, 0.0f, Sum{});
    if (lane == 0) {
      p.s[row] = p.s[row] * fac + sum;
      p.m[row] = m_new;
      p.factor[row] = fac;
    }
  }
}

template <typename T>
void launch_fold_softmax(const FoldSoftmaxArgs<T>& args) {
  launch_row_kernel<FoldSoftmaxArgs<T>>(args.n, args.rows, kWarpModeMaxWidth, fold_softmax_kernel<T, 32>,
                            fold_softmax_kernel<T, kRowBlock>, kRowBlock, args);
}

// ------------------------------------------------------------------------------------------- chunk GEMMs
// The first rows * n elements of a [rows, chunk] buffer as a contiguous [rows, n] matrix (the last, narrower chunk
// reuses the same memory).
at::Tensor leading_block(const at::Tensor& buf, int64_t rows, int64_t n) {
  return buf.view({-1}).narrow(0, 0, rows * n).view({rows, n});
}

struct ChunkedProjection {
  at::Tensor y2;  // [R, D] contiguous
  at::Tensor weight;
  std::optional<at::Tensor> bias;
  int64_t rows, V, chunk;

  ChunkedProjection(const at::Tensor& y, const at::Tensor& w, const std::optional<at::Tensor>& b, int64_t chunk_,
                    const PassShape& s)
      : y2(y.reshape({s.rows, s.D}).contiguous()), weight(w.contiguous()), rows(s.rows), V(s.V),
        chunk(std::min(chunk_, s.V)) {
    if (b.has_value() && b->defined()) bias = b->contiguous();
  }
  int64_t count() const { return (V + chunk - 1) / chunk; }
  int64_t begin(int64_t k) const { return k * chunk; }
  int64_t width(int64_t k) const { return std::min(chunk, V - k * chunk); }

  // logits[:, v0:v0+width] (cuBLAS, in the dtype of y) written into the leading [R, width] block of buf
  at::Tensor logits_into(const at::Tensor& buf, int64_t k) const {
    const int64_t v0 = begin(k), n = width(k);
    at::Tensor out = leading_block(buf, rows, n);
    const at::Tensor wt = weight.narrow(0, v0, n).t();
    if (bias) {
      at::addmm_out(out, bias->narrow(0, v0, n), y2, wt);
    } else {
      at::mm_out(out, y2, wt);
    }
    return out;
  }
};

// ------------------------------------------------------------------------------------------- the operators
std::tuple<at::Tensor, at::Tensor> vocab_pass_argmax_cuda(const at::Tensor& y, const at::Tensor& weight,
                                                          const std::optional<at::Tensor>& bias, double cap,
                                                          int64_t chunk, bool /*prepacked*/, bool /*screen*/) {
  const PassShape s = check_pass_inputs("flm_rt::vocab_pass_argmax", y, weight, bias, chunk, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(y.device());
  // (no structured binding: lambdas below capture idx and val, which C++17 does not allow for bindings)
  at::Tensor idx, val;
  std::tie(idx, val) = empty_argmax_outputs(y);
  if (s.rows == 0) return {idx, val};
  const at::NoGradGuard no_grad;
  const ChunkedProjection proj(y, weight, bias, chunk, s);
  const at::Tensor buf = at::empty({s.rows, proj.chunk}, y.options());
  FLM_RT_DISPATCH_LOGITS_TYPES(y.scalar_type(), "flm_rt::vocab_pass_argmax", [&] {
    FoldArgmaxArgs<scalar_t> a{};
    a.indices = idx.mutable_data_ptr<int64_t>();
    a.values = reinterpret_cast<scalar_t*>(val.mutable_data_ptr());
    a.rows = s.rows;
    a.capped = cap > 0;
    a.cap = static_cast<float>(cap);
    a.inv_cap = cap_reciprocal(cap);
    for (int64_t c = 0; c < proj.count(); ++c) {
      const at::Tensor lg = proj.logits_into(buf, c);
      a.x = reinterpret_cast<const scalar_t*>(lg.const_data_ptr());
      a.n = proj.width(c);
      a.v0 = proj.begin(c);
      a.first = c == 0;
      launch_fold_argmax(a);
    }
  });
  return {idx, val};
}

at::Tensor vocab_pass_embed_cuda(const at::Tensor& y, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& embed, double cap, int64_t chunk, bool /*prepacked*/) {
  const char* op = "flm_rt::vocab_pass_embed";
  const PassShape s = check_pass_inputs(op, y, weight, bias, chunk, c10::DeviceType::CUDA);
  const int64_t De = check_pass_embed(op, y, embed, s);
  const c10::cuda::CUDAGuard guard(y.device());
  auto out_sizes = pass_row_sizes(y);
  out_sizes.push_back(De);
  const auto f32 = y.options().dtype(at::kFloat);
  if (s.rows == 0) return at::empty(out_sizes, f32);
  const at::NoGradGuard no_grad;
  const ChunkedProjection proj(y, weight, bias, chunk, s);
  const at::Tensor E = embed.contiguous();
  const at::Tensor m = at::full({s.rows}, -std::numeric_limits<float>::infinity(), f32);
  const at::Tensor sum = at::zeros({s.rows}, f32);
  const at::Tensor factor = at::empty({s.rows}, f32);
  at::Tensor acc = at::zeros({s.rows, De}, f32);
  const at::Tensor lbuf = at::empty({s.rows, proj.chunk}, y.options());
  const at::Tensor pbuf = y.scalar_type() == at::kFloat ? lbuf : at::empty({s.rows, proj.chunk}, f32);
  const bool fixed_shift = cap > 0 && cap <= kFixedShiftMaxCap;
  FLM_RT_DISPATCH_LOGITS_TYPES(y.scalar_type(), "flm_rt::vocab_pass_embed", [&] {
    FoldSoftmaxArgs<scalar_t> a{};
    a.m = m.mutable_data_ptr<float>();
    a.s = sum.mutable_data_ptr<float>();
    a.factor = factor.mutable_data_ptr<float>();
    a.rows = s.rows;
    a.capped = cap > 0;
    a.cap = static_cast<float>(cap);
    a.inv_cap = cap_reciprocal(cap);
    a.fixed_shift = fixed_shift;
    for (int64_t c = 0; c < proj.count(); ++c) {
      const at::Tensor lg = proj.logits_into(lbuf, c);
      const int64_t n = proj.width(c);
      const at::Tensor p = leading_block(pbuf, s.rows, n);
      a.x = reinterpret_cast<const scalar_t*>(lg.const_data_ptr());
      a.p = p.mutable_data_ptr<float>();
      a.n = n;
      launch_fold_softmax(a);
      if (!fixed_shift) acc.mul_(factor.unsqueeze(1));
      acc.addmm_(p, E.narrow(0, proj.begin(c), n));
    }
  });
  // an all -inf row without a cap: 0 / 0 = NaN, as torch.softmax
  return acc.div_(sum.unsqueeze(1)).reshape(out_sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(flm_rt, CUDA, m) {
  m.impl("vocab_pass_argmax", &vocab_pass_argmax_cuda);
  m.impl("vocab_pass_embed", &vocab_pass_embed_cuda);
}

}  // namespace flm_rt::cuda
