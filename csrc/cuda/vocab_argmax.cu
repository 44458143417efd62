// CUDA implementation of flm_rt::vocab_argmax: (indices int64, values x.dtype) over the last dimension with
// torch.max semantics (first maximal index; NaN is the maximum, first NaN wins).
//
// One warp per row for V <= 4096, otherwise one 512-thread block per row; grid-stride over rows. Each
// thread scans its elements in increasing index order with one compare per element (scan_better: larger,
// or the first NaN), then the per-thread candidates are combined with a total order (am_better), so the
// result is exact and independent of the reduction tree. One read of x (16-byte vector loads, scalar
// head/tail), no atomics, no host synchronisation.
#include "../op_wrappers.h"
#include "kernel_utils.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

namespace flm_rt::cuda {
namespace {

template <typename T>
struct ArgmaxArgs {
  const T* x;
  int64_t* indices;
  T* values;
  int64_t rows, V;
  bool aligned;
};

template <typename T, int NT>
__global__ void __launch_bounds__(NT == 32 ? kWarpModeBlock : NT) argmax_kernel(const ArgmaxArgs<T> p) {
  constexpr int W = VecWidth<T>::value;
  constexpr int kRowsPerBlock = NT == 32 ? kWarpModeBlock / 32 : 1;
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  __shared__ float sm_v[32];
  __shared__ int64_t sm_i[32];
  const int lane = NT == 32 ? (threadIdx.x & 31) : threadIdx.x;
  const int64_t row_in_block = NT == 32 ? (threadIdx.x >> 5) : 0;

  for (int64_t g = blockIdx.x; g * kRowsPerBlock < p.rows; g += gridDim.x) {
    const int64_t row = g * kRowsPerBlock + row_in_block;
    if (NT == 32 && row >= p.rows) continue;
    const int64_t off = row * p.V;
    const int64_t V = p.V;
    const T* xr = p.x + off;
    const RowSplit sp = split_row(off, V, W, p.aligned);

    float bv = -kInf;
    int64_t bi = kNone;
    auto consider = [&](float v, int64_t k) {
      if (scan_better(v, bv)) {
        bv = v;
        bi = k;
      }
    };
    for (int64_t k = lane; k < sp.head; k += NT) consider(static_cast<float>(xr[k]), k);
    for (int64_t v = lane; v < sp.nvec; v += NT) {
      float x[W];
      const int64_t base = sp.head + v * W;
      load16_to_float<T>(xr + base, x);
#pragma unroll
      for (int i = 0; i < W; ++i) consider(x[i], base + i);
    }
    for (int64_t k = sp.tail_begin + lane; k < V; k += NT) consider(static_cast<float>(xr[k]), k);
    if (bi == kNone) {  // every element this thread saw was -inf (or it saw none): its first index, if any
      if (lane < sp.head) {
        bi = lane;
      } else if (lane < sp.nvec) {
        bi = sp.head + static_cast<int64_t>(lane) * W;
      } else if (sp.tail_begin + lane < V) {
        bi = sp.tail_begin + lane;
      }
    }

    row_reduce_am<NT>(bv, bi, sm_v, sm_i, kNone);
    if (lane == 0) {
      p.indices[row] = bi;
      p.values[row] = xr[bi];  // the stored element itself (exact, original NaN payload)
    }
  }
}

template <typename T>
void run_argmax(const at::Tensor& xc, const at::Tensor& idx, const at::Tensor& val, const RowShape& shape) {
  ArgmaxArgs<T> args{};
  args.x = reinterpret_cast<const T*>(xc.const_data_ptr());
  args.indices = idx.mutable_data_ptr<int64_t>();
  args.values = reinterpret_cast<T*>(val.mutable_data_ptr());
  args.rows = shape.rows;
  args.V = shape.V;
  args.aligned = aligned16(args.x);
  launch_row_kernel<ArgmaxArgs<T>>(args.V, args.rows, 4096, argmax_kernel<T, 32>, argmax_kernel<T, 512>, 512, args);
}

struct CudaArgmax {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;
  using Guard = c10::cuda::CUDAGuard;

  static void run(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& val, const RowShape& shape) {
    FLM_RT_DISPATCH_LOGITS_TYPES(x.scalar_type(), "flm_rt::vocab_argmax",
                                 [&] { run_argmax<scalar_t>(x, idx, val, shape); });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(flm_rt, CUDA, m) { m.impl("vocab_argmax", &VocabArgmaxOp<CudaArgmax>::call); }

}  // namespace flm_rt::cuda
