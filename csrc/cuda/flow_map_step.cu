// CUDA implementation of flm_rt::flow_map_step and flm_rt::flow_map_step_ (see docs/KERNELS.md).
//
//   out[r, :] = a[r] * z[r, :] + b[r] * softmax(cap * tanh(logits[r, :] / cap)) + c[r] * eps[r, :]
//
// One warp per row for V <= 2048, otherwise one block (256 or 512 threads) per row; rows are walked with
// a grid-stride loop, so any number of rows works with a bounded grid. Per row:
//   pass 1: read the logits once (16-byte vector loads, scalar head/tail for misaligned rows) and build
//           the softmax statistics in fp32: with a soft-cap <= 60 the capped logits are bounded and the
//           plain sum of exp needs no max; otherwise an online (max, sum) pair per thread. Then a
//           deterministic warp-shuffle (+ shared memory) reduction inside the block;
//   pass 2: re-read the logits (mostly from L2), read z / eps and write out with streaming 16-byte
//           accesses (__ldcs / __stcs: touched once, so they do not evict the logits from L2).
// No cross-block reductions, no atomics, no host synchronisation; launched on the current stream.
// The soft-cap multiplies by a precomputed 1/cap (no per-element IEEE divide).
#include "../op_wrappers.h"
#include "kernel_utils.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

namespace flm_rt::cuda {
namespace {

template <typename T>
struct StepArgs {
  const T* logits;
  const float* z;
  const float* eps;  // nullptr: no c*eps term
  float* out;        // may equal z
  const float* a;
  const float* b;
  const float* c;
  int64_t a_stride, b_stride, c_stride;
  int64_t rows, V;
  float cap;         // only used when capped
  float inv_cap;     // 1 / cap
  bool capped;
  bool fixed_shift;  // capped and cap <= kFixedShiftMaxCap: s = sum exp(y), m = 0
  bool aligned;      // every base pointer 16-byte aligned
};

// Launch bounds: threads per block, and enough resident blocks for 1536 of an SM's 2048 threads (75%
// occupancy) in block mode, which caps the registers at 40 per thread; a cap of 32 (full occupancy) made
// ptxas spill. Warp mode (small V, several rows per block) needs more registers: 1024 threads, 64 at most.
// FLM_RT_PTXAS_VERBOSE=1 at build time (and `make gpu-check`) reports registers and spills per kernel.
template <int NT>
struct StepBounds {
  static constexpr int kThreads = NT == 32 ? kWarpModeBlock : NT;
  static constexpr int kMinBlocks = (NT == 32 ? 1024 : 1536) / kThreads;
};

template <typename T, int NT>
__global__ void __launch_bounds__(StepBounds<NT>::kThreads, StepBounds<NT>::kMinBlocks)
    step_kernel(const StepArgs<T> p) {
  constexpr int W = VecWidth<T>::value;
  constexpr int kRowsPerBlock = NT == 32 ? kWarpModeBlock / 32 : 1;
  __shared__ float sm_m[32];
  __shared__ float sm_s[32];
  const int lane = NT == 32 ? (threadIdx.x & 31) : threadIdx.x;
  const int64_t row_in_block = NT == 32 ? (threadIdx.x >> 5) : 0;
  const float cap = p.cap;
  const float inv_cap = p.inv_cap;

  for (int64_t g = blockIdx.x; g * kRowsPerBlock < p.rows; g += gridDim.x) {  // uniform across the block
    const int64_t row = g * kRowsPerBlock + row_in_block;
    if (NT == 32 && row >= p.rows) continue;  // uniform across the warp; warp mode has no block barrier
    const int64_t off = row * p.V;
    const int64_t V = p.V;
    const T* lg = p.logits + off;
    const RowSplit sp = split_row(off, V, W, p.aligned);

    // ---- pass 1: softmax statistics -------------------------------------------------------------
    float m = p.fixed_shift ? 0.0f : -kInf;
    float s = 0.0f, comp = 0.0f;
    auto accumulate = [&](float x) {
      const float y = p.capped ? cap * tanhf(x * inv_cap) : x;
      if (p.fixed_shift) {
        kahan_add(s, comp, expf(y));
      } else {
        ms_add(m, s, comp, y);
      }
    };
    for (int64_t k = lane; k < sp.head; k += NT) accumulate(static_cast<float>(lg[k]));
    for (int64_t v = lane; v < sp.nvec; v += NT) {
      float x[W];
      load16_to_float<T>(lg + sp.head + v * W, x);
#pragma unroll
      for (int i = 0; i < W; ++i) accumulate(x[i]);
    }
    for (int64_t k = sp.tail_begin + lane; k < V; k += NT) accumulate(static_cast<float>(lg[k]));

    s = s - comp;
    if (p.fixed_shift) {
      s = warp_reduce_sum(s);
    } else {
      warp_reduce_ms(m, s);
    }
    if constexpr (NT > 32) {
      constexpr int NW = NT / 32;
      const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
      __syncthreads();  // the previous row's readers are done with sm_*
      if (l == 0) {
        sm_m[w] = m;
        sm_s[w] = s;
      }
      __syncthreads();
      if (p.fixed_shift) {
        s = warp_reduce_sum(l < NW ? sm_s[l] : 0.0f);
      } else {
        m = l < NW ? sm_m[l] : -kInf;
        s = l < NW ? sm_s[l] : 0.0f;
        warp_reduce_ms(m, s);
      }
    }

    // ---- pass 2: write --------------------------------------------------------------------------
    const float inv = 1.0f / s;
    const float ca = p.a[row * p.a_stride];
    const float cb = p.b[row * p.b_stride];
    const float cc = p.c[row * p.c_stride];
    const float* zr = p.z + off;
    const float* er = p.eps != nullptr ? p.eps + off : nullptr;
    float* orow = p.out + off;
    auto value = [&](float x, float zz, float ee) -> float {
      const float y = p.capped ? cap * tanhf(x * inv_cap) : x;
      const float prob = expf(y - m) * inv;
      float r = ca * zz + cb * prob;
      if (er != nullptr) r = r + cc * ee;
      return r;
    };
    for (int64_t k = lane; k < sp.head; k += NT) {
      __stcs(orow + k, value(static_cast<float>(lg[k]), __ldcs(zr + k), er != nullptr ? __ldcs(er + k) : 0.0f));
    }
    for (int64_t v = lane; v < sp.nvec; v += NT) {
      const int64_t base = sp.head + v * W;
      float x[W];
      load16_to_float<T>(lg + base, x);
#pragma unroll
      for (int q = 0; q < W; q += 4) {  // 4 floats (16 bytes) of z / eps / out at a time: fewer live registers
        float zz[4], ee[4] = {0.0f, 0.0f, 0.0f, 0.0f}, o[4];
        load_floats_streaming<4>(zr + base + q, zz);
        if (er != nullptr) load_floats_streaming<4>(er + base + q, ee);
#pragma unroll
        for (int i = 0; i < 4; ++i) o[i] = value(x[q + i], zz[i], ee[i]);
        store_floats_streaming<4>(orow + base + q, o);
      }
    }
    for (int64_t k = sp.tail_begin + lane; k < V; k += NT) {
      __stcs(orow + k, value(static_cast<float>(lg[k]), __ldcs(zr + k), er != nullptr ? __ldcs(er + k) : 0.0f));
    }
  }
}

template <typename T>
void launch_step(const StepArgs<T>& args) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (args.V <= 2048) {
    const int64_t groups = (args.rows + kWarpModeBlock / 32 - 1) / (kWarpModeBlock / 32);
    const dim3 grid(static_cast<unsigned>(std::min(groups, kMaxGrid)));
    step_kernel<T, 32><<<grid, kWarpModeBlock, 0, stream>>>(args);
  } else if (args.V <= 16384) {
    const dim3 grid(static_cast<unsigned>(std::min(args.rows, kMaxGrid)));
    step_kernel<T, 256><<<grid, 256, 0, stream>>>(args);
  } else {
    const dim3 grid(static_cast<unsigned>(std::min(args.rows, kMaxGrid)));
    step_kernel<T, 512><<<grid, 512, 0, stream>>>(args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void run_step(const at::Tensor& out, const StepOperands& in, double cap, const RowShape& shape) {
  StepArgs<T> args{};
  args.logits = reinterpret_cast<const T*>(in.logits.const_data_ptr());
  set_step_params(args, out, in, cap, shape);
  args.rows = shape.rows;
  args.inv_cap = cap > 0.0 ? static_cast<float>(1.0 / cap) : 0.0f;
  args.capped = cap > 0.0;
  args.fixed_shift = args.capped && args.cap <= kFixedShiftMaxCap;
  args.aligned = aligned16(args.logits) && aligned16(args.z) && aligned16(args.out) &&
                 (args.eps == nullptr || aligned16(args.eps));
  launch_step<T>(args);
}

struct CudaStep {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;
  using Guard = c10::cuda::CUDAGuard;

  static void run(const at::Tensor& out, const StepOperands& in, double cap, const RowShape& shape) {
    FLM_RT_DISPATCH_LOGITS_TYPES(in.logits.scalar_type(), "flm_rt::flow_map_step",
                                 [&] { run_step<scalar_t>(out, in, cap, shape); });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(flm_rt, CUDA, m) {
  m.impl("flow_map_step", &FlowMapStepOp<CudaStep>::functional);
  m.impl("flow_map_step_", &FlowMapStepOp<CudaStep>::inplace);
}

}  // namespace flm_rt::cuda
