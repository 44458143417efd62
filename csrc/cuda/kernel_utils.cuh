// Device helpers shared by the flm_rt CUDA kernels.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace flm_rt::cuda {

constexpr float kInf = __builtin_huge_valf();

// Threads per block when one warp handles one row (small V): kWarpModeBlock / 32 rows per block.
constexpr int kWarpModeBlock = 256;
// Upper bound of a launch's grid; the kernels walk the rows with a grid-stride loop.
constexpr int64_t kMaxGrid = int64_t{1} << 20;

// Runs the lambda (which uses scalar_t) for the logits dtypes the operators accept: float, BFloat16, Half.
#define FLM_RT_DISPATCH_LOGITS_TYPES(TYPE, NAME, ...)                      \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                            \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__))

// Elements per 16-byte load.
template <typename T>
struct VecWidth {
  static constexpr int value = 16 / sizeof(T);
};

// Loads N = 16/sizeof(T) elements (one 16-byte transaction) and widens them to float.
template <typename T>
__device__ __forceinline__ void load16_to_float(const T* p, float (&out)[VecWidth<T>::value]) {
  constexpr int N = VecWidth<T>::value;
  alignas(16) T buf[N];
  *reinterpret_cast<uint4*>(buf) = *reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = static_cast<float>(buf[i]);
}

// N floats at a 16-byte aligned address (N a multiple of 4), 16 bytes per load. The streaming variants
// (__ldcs / __stcs: "cache streaming", evict first) are for arrays that are touched exactly once (z, eps,
// the output), so that they do not push the logits, which pass 2 reads again, out of L2.
template <int N>
__device__ __forceinline__ void load_floats_streaming(const float* p, float (&out)[N]) {
  static_assert(N % 4 == 0, "N must be a multiple of 4");
#pragma unroll
  for (int i = 0; i < N; i += 4) {
    const float4 v = __ldcs(reinterpret_cast<const float4*>(p + i));
    out[i] = v.x;
    out[i + 1] = v.y;
    out[i + 2] = v.z;
    out[i + 3] = v.w;
  }
}

template <int N>
__device__ __forceinline__ void store_floats_streaming(float* p, const float (&v)[N]) {
  static_assert(N % 4 == 0, "N must be a multiple of 4");
#pragma unroll
  for (int i = 0; i < N; i += 4) {
    __stcs(reinterpret_cast<float4*>(p + i), make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]));
  }
}

// Row split for vectorised access: elements [0, head) and [head + nvec*W, V) are scalar, the nvec
// W-wide vectors in between are 16-byte aligned for every array (all bases 16-byte aligned, and W a
// multiple of 4 so that the float arrays line up too). Without alignment everything is scalar.
struct RowSplit {
  int64_t head, nvec, tail_begin;
};

__device__ __forceinline__ RowSplit split_row(int64_t row_offset, int64_t V, int W, bool aligned) {
  RowSplit s;
  if (!aligned) {
    s.head = V;
    s.nvec = 0;
    s.tail_begin = V;
    return s;
  }
  int64_t head = (W - (row_offset % W)) % W;
  if (head > V) head = V;
  s.head = head;
  s.nvec = (V - head) / W;
  s.tail_begin = head + s.nvec * W;
  return s;
}

// ---- (max, sum of exp) pairs: online softmax statistics -------------------------------------------
// Invariant: s = sum_j exp(y_j - m) over the elements seen; m = -inf and s = 0 for none (or all -inf).
// A NaN or +inf element makes s NaN, as in torch.softmax.
// Compensated (Kahan) summation: each thread adds up to ~V/blockDim terms, and a plain running sum of
// ~256 similar terms would drift by ~1e-5 relative; with the compensation the error stays ~1e-7.
__device__ __forceinline__ void kahan_add(float& s, float& comp, float v) {
  const float y = v - comp;
  const float t = s + y;
  comp = (t - s) - y;
  s = t;
}

// comp is the Kahan compensation of s (fold it with s - comp before reducing across threads).
__device__ __forceinline__ void ms_add(float& m, float& s, float& comp, float y) {
  if (y > m) {
    const float r = expf(m - y);
    s = s * r;
    comp = comp * r;
    m = y;
  }
  if (y != -kInf) kahan_add(s, comp, expf(y - m));
}

__device__ __forceinline__ void ms_merge(float& m, float& s, float m2, float s2) {
  const float M = fmaxf(m, m2);
  if (M == -kInf) {
    s = s + s2;
    m = M;
    return;
  }
  s = s * expf(m - M) + s2 * expf(m2 - M);
  m = M;
}

// Butterfly (xor) reductions over a warp. Floating-point merges are not guaranteed to give every lane the
// same bits (the compiler may contract s*e1 + s2*e2 into an FMA, which is not symmetric in its operands), so
// each reduction ends by broadcasting lane 0's result: every lane then uses one and the same value.
__device__ __forceinline__ void warp_reduce_ms(float& m, float& s) {
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
    ms_merge(m, s, m2, s2);
  }
  m = __shfl_sync(0xffffffffu, m, 0);
  s = __shfl_sync(0xffffffffu, s, 0);
}

__device__ __forceinline__ float warp_reduce_sum(float s) {
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  return __shfl_sync(0xffffffffu, s, 0);
}

// ---- argmax candidates: torch.max order ---------------------------------------------------------------
// (v1, i1) beats (v2, i2): NaN beats numbers (lower index among NaNs), else larger value, ties -> lower index.
// A total order, so the butterfly below leaves the same (exact) winner in every lane.
__device__ __forceinline__ bool am_better(float v1, int64_t i1, float v2, int64_t i2) {
  const bool n1 = v1 != v1, n2 = v2 != v2;
  if (n1 || n2) return n1 && n2 ? i1 < i2 : n1;
  if (v1 != v2) return v1 > v2;
  return i1 < i2;
}

// One thread's scan in increasing index order: a later element replaces the candidate only if it is larger,
// or the first NaN after numbers. Ties keep the earlier (lower) index without comparing indices. The caller
// starts from (-inf, none) and, if nothing replaced it (all elements -inf), takes its first index.
__device__ __forceinline__ bool scan_better(float v, float best) { return v > best || (v != v && best == best); }

__device__ __forceinline__ void warp_reduce_am(float& v, int64_t& i) {
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) {
    const float v2 = __shfl_xor_sync(0xffffffffu, v, o);
    const int64_t i2 = __shfl_xor_sync(0xffffffffu, i, o);
    if (am_better(v2, i2, v, i)) {
      v = v2;
      i = i2;
    }
  }
}

// (v, i) of the whole row when NT threads (one warp, or a block of NT / 32 warps) each hold a candidate; the
// result is valid in the first warp. sm_v / sm_i: __shared__ [32] of the calling kernel. An empty candidate is
// (-inf, none).
template <int NT>
__device__ __forceinline__ void row_reduce_am(float& v, int64_t& i, float* sm_v, int64_t* sm_i, int64_t none) {
  warp_reduce_am(v, i);
  if constexpr (NT > 32) {
    constexpr int NW = NT / 32;
    const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    __syncthreads();
    if (l == 0) {
      sm_v[w] = v;
      sm_i[w] = i;
    }
    __syncthreads();
    v = l < NW ? sm_v[l] : -kInf;
    i = l < NW ? sm_i[l] : none;
    warp_reduce_am(v, i);
  }
}

// Launches a row kernel on the current stream: kernel32 (one warp per row, kWarpModeBlock / 32 rows per block)
// for rows of at most warp_max_width entries, else kernel_block (one block of block_threads per row).
template <typename Args>
inline void launch_row_kernel(int64_t width, int64_t rows, int64_t warp_max_width, void (*kernel32)(Args),
                              void (*kernel_block)(Args), int block_threads, const Args& args) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (width <= warp_max_width) {
    const int64_t groups = (rows + kWarpModeBlock / 32 - 1) / (kWarpModeBlock / 32);
    kernel32<<<static_cast<unsigned>(std::min(groups, kMaxGrid)), kWarpModeBlock, 0, stream>>>(args);
  } else {
    kernel_block<<<static_cast<unsigned>(std::min(rows, kMaxGrid)), block_threads, 0, stream>>>(args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace flm_rt::cuda
