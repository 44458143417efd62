// Row kernels of the CPU operators, compiled once per CPU capability (DEFAULT, AVX2, AVX512) from
// vec_kernels.cpp with different compiler flags, each copy in its own namespace. The operator files
// (flow_map_step.cpp, vocab_argmax.cpp) pick a copy at run time from at::get_cpu_capability(), which
// honours the ATEN_CPU_CAPABILITY environment variable exactly as PyTorch's own kernels do.
//
// This header is deliberately free of ATen tensor types: the per-capability objects only see raw pointers.
#pragma once

#include <cstdint>

namespace flm_rt::cpu {

enum class FloatKind : int { F32 = 0, BF16 = 1, F16 = 2 };

struct StepParams {
  const void* logits;      // [rows, V], FloatKind logits_kind
  FloatKind logits_kind;
  const float* z;          // [rows, V]
  const float* eps;        // [rows, V] or nullptr (then the c term is dropped)
  float* out;              // [rows, V]; may alias z (in-place variant)
  const float* a;          // a[row * a_stride]
  const float* b;
  const float* c;
  int64_t a_stride, b_stride, c_stride;
  int64_t V;
  float cap;               // <= 0: no soft-cap
};

struct ArgmaxParams {
  const void* x;           // [rows, V]
  FloatKind kind;
  int64_t V;
  int64_t* indices;        // [rows]
  void* values;            // [rows], same dtype as x
  float cap = 0.0f;        // > 0 (bf16 / fp16 x only): of cap * tanh(x / cap) as computed in x's dtype
};

struct SoftmaxParams {
  const void* x;           // [rows, L], FloatKind kind
  void* out;               // [rows, L], same dtype; may alias x (in-place variant)
  FloatKind kind;
  int64_t L;
  float scale;             // y = cap * tanh(scale * x)   (cap <= 0: y = scale * x)
  float cap;
};

struct RotaryParams {
  const void* qkv;         // [B, L, 3, H, hd] (the qkv Linear's output), FloatKind kind
  void* out;               // [3, B, H, L, hd], same dtype: rotated q, rotated k, v
  FloatKind kind;
  const float* cos;        // [L, hd / 2], already rounded to kind
  const float* sin;
  int64_t B, L, H, hd;
};

// out[b, l, :] = base + x * w in float32 (then rounded to out_kind), each operand [B, L, D] or [B, 1, D]: element
// strides per batch (sb) and per position (sl, 0 for a [B, 1, D] operand); the last dimension is contiguous.
struct ScaledAddOperand {
  const void* p;
  FloatKind kind;
  int64_t sb, sl;
};
struct ScaledAddParams {
  ScaledAddOperand base, x, w;
  void* out;               // [B, L, D] contiguous
  FloatKind out_kind;
  int64_t L, D;
};

// One row of one chunk of the screened argmax (vocab_pass.cpp): the screen score of entry v is
// s = g[v] + bias[v] (fp32; g the bf16 or fp32 GEMM output), its error bound e = ny * colA[v] + colB[v] + tau.
struct ScreenRow {
  const void* g;           // [n], FloatKind g_kind (BF16 or F32)
  FloatKind g_kind;
  int64_t n;
  const float* bias;       // [n] or nullptr
  const float* colA;       // [n] >= 0
  const float* colB;       // [n] >= 0
  float ny, tau;           // >= 0, finite
};

constexpr int64_t kScreenBlock = 256;  // entries per block_hi element (a multiple of every vector width)

#define FLM_RT_DECLARE_CPU_KERNELS(CAP)                                                              \
  namespace CAP {                                                                                    \
  /* scratch: at least V floats, private to the calling thread */                                    \
  void step_rows(const StepParams& p, int64_t row_begin, int64_t row_end, float* scratch);           \
  void argmax_rows(const ArgmaxParams& p, int64_t row_begin, int64_t row_end);                       \
  /* scratch: at least L floats, private to the calling thread */                                    \
  void softcap_softmax_rows(const SoftmaxParams& p, int64_t row_begin, int64_t row_end, float* scratch); \
  /* max over v of fl(s - e) into *lo_max (-inf for none), max of fl(s + e) over each kScreenBlock   */ \
  /* entries into block_hi[ceil(n / kScreenBlock)]; false when some s is not finite                 */ \
  /* rows r = b * L + l of rotary_split (see RotaryParams) */                                         \
  void rotary_rows(const RotaryParams& p, int64_t row_begin, int64_t row_end);                       \
  /* rows r = b * L + l of scaled_add (see ScaledAddParams); scratch: 3 * D floats, private */       \
  void scaled_add_rows(const ScaledAddParams& p, int64_t row_begin, int64_t row_end, float* scratch); \
  /* x[i] <- gelu_tanh(x[i]) for i in [begin, end) of a contiguous float32 / bf16 / fp16 array     */ \
  void gelu_tanh_range(void* x, FloatKind kind, int64_t begin, int64_t end);                         \
  bool screen_max(const ScreenRow& p, float* lo_max, float* block_hi);                               \
  /* appends the v (ascending, + v_offset) with fl(s + e) >= T to idx/hi from position count,        */ \
  /* skipping blocks whose block_hi < T; returns the new count, or -1 as soon as it would exceed cap */ \
  int64_t screen_collect(const ScreenRow& p, float T, const float* block_hi, int64_t v_offset,        \
                         int32_t* idx, float* hi, int64_t count, int64_t cap);                       \
  /* fp32 dot product (vectorised fused multiply-adds, lanes summed in a fixed order) */             \
  float dot_f32(const float* a, const float* b, int64_t n);                                          \
  /* "AVX512 (-mavx512f ...), Vectorized<float> width 16" */                                         \
  const char* describe();                                                                            \
  }

FLM_RT_DECLARE_CPU_KERNELS(DEFAULT)
#if defined(FLM_RT_HAVE_CPU_AVX2)
FLM_RT_DECLARE_CPU_KERNELS(AVX2)
#endif
#if defined(FLM_RT_HAVE_CPU_AVX512)
FLM_RT_DECLARE_CPU_KERNELS(AVX512)
#endif

#undef FLM_RT_DECLARE_CPU_KERNELS

}  // namespace flm_rt::cpu
