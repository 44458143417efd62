// Vectorised row kernels for the CPU operators (see vec_kernels.h).
//
// Compiled several times, once per CPU capability, with
//   -DCPU_CAPABILITY=<DEFAULT|AVX2|AVX512> -DCPU_CAPABILITY_<...> and the matching -m flags,
// so at::vec::Vectorized<float> maps to 8 (generic), 8 (AVX2) or 16 (AVX512) lanes and the
// transcendental functions (tanh, exp) come from SLEEF's 1-ULP variants (std:: for DEFAULT).
// Everything here lives in namespace flm_rt::cpu::CPU_CAPABILITY; nothing is shared between copies.

#include "vec_kernels.h"
#include "../fixed_shift.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <type_traits>

#ifndef CPU_CAPABILITY
#error "vec_kernels.cpp must be compiled with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512"
#endif

#define FLM_RT_STR_(x) #x
#define FLM_RT_STR(x) FLM_RT_STR_(x)

namespace flm_rt::cpu::CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr float kInf = std::numeric_limits<float>::infinity();

template <typename T>
inline Vec load_full(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    Vec out;
    at::vec::load_to_float<T>(p, out);
    return out;
  }
}

// Loads n < kW elements; the other lanes are 0.
template <typename T>
inline Vec load_part(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p, n);
  } else {
    alignas(64) float tmp[kW];
    for (int64_t i = 0; i < kW; ++i) tmp[i] = i < n ? static_cast<float>(p[i]) : 0.0f;
    return Vec::loadu(tmp);
  }
}

// Compensated (Kahan) vector accumulator: the row sums of exp(.) stay accurate to ~1e-7 relative even for
// V ~ 1e5 identical terms (a plain per-lane running sum drifts by ~V/lanes ulps).
struct KahanVec {
  Vec sum{0.0f};
  Vec comp{0.0f};
  inline void add(const Vec& v) {
    const Vec y = v - comp;
    const Vec t = sum + y;
    comp = (t - sum) - y;
    sum = t;
  }
  // Lanes combined in double, fixed order: deterministic.
  inline float total() const {
    alignas(64) float s_[kW];
    alignas(64) float c_[kW];
    sum.store(s_);
    comp.store(c_);
    double acc = 0.0;
    for (int64_t i = 0; i < kW; ++i) acc += static_cast<double>(s_[i]) - static_cast<double>(c_[i]);
    return static_cast<float>(acc);
  }
};

// Max over the lanes; NaN if any lane is NaN.
inline float reduce_max(const Vec& v) {
  alignas(64) float t[kW];
  v.store(t);
  float m = t[0];
  for (int64_t i = 0; i < kW; ++i) {
    if (std::isnan(t[i])) return t[i];
    if (t[i] > m) m = t[i];
  }
  return m;
}

// cap * tanh(x / cap), written exactly as the reference (division, then tanh, then multiply).
inline Vec soft_cap(const Vec& x, const Vec& vcap) { return (x / vcap).tanh() * vcap; }

// ---------------------------------------------------------------------------------------------
// flow_map_step:  out = a*z + b*softmax(cap*tanh(logits/cap)) + c*eps      (per row)
//
// Pass 1 reads the logits row once and leaves e = exp(y - shift) in `buf` (V floats, stays in L2),
// summing it on the way. For 0 < cap <= kFixedShiftMaxCap the capped logits are bounded, so shift = 0
// needs no max (one read, one tanh and one exp per element). Otherwise y is staged in `buf` while the
// (NaN-propagating) max is taken, then turned into e in place from cache.
// Pass 2 reads z (and eps) and writes the output row.
// ---------------------------------------------------------------------------------------------
template <typename T>
void step_row(const T* __restrict__ lg, const float* z, const float* __restrict__ eps, float* out, float a,
              float b, float c, int64_t V, float cap, float* __restrict__ buf) {
  const bool capped = cap > 0.0f;
  const bool fixed_shift = capped && cap <= kFixedShiftMaxCap;
  const Vec vcap(capped ? cap : 1.0f);
  const Vec zero(0.0f);
  float sum;

  if (fixed_shift) {
    KahanVec acc;
    int64_t j = 0;
    for (; j + 2 * kW <= V; j += 2 * kW) {
      Vec e0 = soft_cap(load_full(lg + j), vcap).exp();
      Vec e1 = soft_cap(load_full(lg + j + kW), vcap).exp();
      e0.store(buf + j);
      e1.store(buf + j + kW);
      acc.add(e0);
      acc.add(e1);
    }
    for (; j + kW <= V; j += kW) {
      Vec e0 = soft_cap(load_full(lg + j), vcap).exp();
      e0.store(buf + j);
      acc.add(e0);
    }
    if (j < V) {
      const int64_t n = V - j;
      Vec e0 = soft_cap(load_part(lg + j, n), vcap).exp();
      e0.store(buf + j, n);
      acc.add(Vec::set(zero, e0, n));
    }
    sum = acc.total();
  } else {
    const Vec ninf(-kInf);
    Vec mx0(-kInf), mx1(-kInf);
    int64_t j = 0;
    for (; j + kW <= V; j += kW) {
      Vec y = load_full(lg + j);
      if (capped) y = soft_cap(y, vcap);
      y.store(buf + j);
      mx0 = at::vec::maximum(mx0, y);
    }
    if (j < V) {
      const int64_t n = V - j;
      Vec y = load_part(lg + j, n);
      if (capped) y = soft_cap(y, vcap);
      y.store(buf + j, n);
      mx1 = at::vec::maximum(mx1, Vec::set(ninf, y, n));
    }
    const Vec m(reduce_max(at::vec::maximum(mx0, mx1)));
    KahanVec acc;
    j = 0;
    for (; j + kW <= V; j += kW) {
      Vec e = (Vec::loadu(buf + j) - m).exp();
      e.store(buf + j);
      acc.add(e);
    }
    if (j < V) {
      const int64_t n = V - j;
      Vec e = (Vec::loadu(buf + j, n) - m).exp();
      e.store(buf + j, n);
      acc.add(Vec::set(zero, e, n));
    }
    sum = acc.total();
  }

  const Vec va(a), vc(c), vinv(1.0f / sum), vb(b);
  int64_t j = 0;
  if (eps != nullptr) {
    for (; j + kW <= V; j += kW) {
      Vec p = Vec::loadu(buf + j) * vinv;
      Vec r = va * Vec::loadu(z + j) + vb * p + vc * Vec::loadu(eps + j);
      r.store(out + j);
    }
    if (j < V) {
      const int64_t n = V - j;
      Vec p = Vec::loadu(buf + j, n) * vinv;
      Vec r = va * Vec::loadu(z + j, n) + vb * p + vc * Vec::loadu(eps + j, n);
      r.store(out + j, n);
    }
  } else {
    for (; j + kW <= V; j += kW) {
      Vec p = Vec::loadu(buf + j) * vinv;
      Vec r = va * Vec::loadu(z + j) + vb * p;
      r.store(out + j);
    }
    if (j < V) {
      const int64_t n = V - j;
      Vec p = Vec::loadu(buf + j, n) * vinv;
      Vec r = va * Vec::loadu(z + j, n) + vb * p;
      r.store(out + j, n);
    }
  }
}

template <typename T>
void step_rows_t(const StepParams& p, int64_t r0, int64_t r1, float* scratch) {
  const T* lg = static_cast<const T*>(p.logits);
  const int64_t V = p.V;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * V;
    step_row<T>(lg + off, p.z + off, p.eps ? p.eps + off : nullptr, p.out + off, p.a[r * p.a_stride],
                p.b[r * p.b_stride], p.c[r * p.c_stride], V, p.cap, scratch);
  }
}

// ---------------------------------------------------------------------------------------------
// vocab_argmax: torch.max(x, -1) semantics. First maximal index; NaN counts as larger than anything
// and the first NaN wins. One pass over the row: per chunk (in L1) a vector max, and only when the
// chunk beats the running best, a scalar search of that chunk for the first index attaining it.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kArgmaxChunk = 2048;

template <typename T>
void argmax_row(const T* x, int64_t V, int64_t* idx_out, T* val_out) {
  const Vec ninf(-kInf);
  float best = -kInf;
  int64_t best_i = -1;
  for (int64_t start = 0; start < V; start += kArgmaxChunk) {
    const int64_t n = std::min(kArgmaxChunk, V - start);
    const T* p = x + start;
    Vec mx0(-kInf), mx1(-kInf);
    int64_t j = 0;
    for (; j + 2 * kW <= n; j += 2 * kW) {
      mx0 = at::vec::maximum(mx0, load_full(p + j));
      mx1 = at::vec::maximum(mx1, load_full(p + j + kW));
    }
    for (; j + kW <= n; j += kW) mx0 = at::vec::maximum(mx0, load_full(p + j));
    if (j < n) mx1 = at::vec::maximum(mx1, Vec::set(ninf, load_part(p + j, n - j), n - j));
    const float cm = reduce_max(at::vec::maximum(mx0, mx1));
    if (std::isnan(cm)) {
      for (int64_t k = 0; k < n; ++k) {
        if (std::isnan(static_cast<float>(p[k]))) {
          best_i = start + k;
          break;
        }
      }
      break;  // the first NaN is final
    }
    if (best_i < 0 || cm > best) {
      for (int64_t k = 0; k < n; ++k) {
        if (static_cast<float>(p[k]) == cm) {
          best_i = start + k;
          best = cm;
          break;
        }
      }
    }
  }
  *idx_out = best_i;
  *val_out = x[best_i];
}

// (defined below, with the cap's helpers)
template <typename T>
void capped_argmax_row(const T* x, int64_t V, float cap, int64_t* idx_out, T* val_out);

template <typename T>
void argmax_rows_t(const ArgmaxParams& p, int64_t r0, int64_t r1) {
  const T* x = static_cast<const T*>(p.x);
  T* vals = static_cast<T*>(p.values);
  if constexpr (!std::is_same_v<T, float>) {
    if (p.cap > 0) {
      for (int64_t r = r0; r < r1; ++r) capped_argmax_row<T>(x + r * p.V, p.V, p.cap, p.indices + r, vals + r);
      return;
    }
  }
  for (int64_t r = r0; r < r1; ++r) argmax_row<T>(x + r * p.V, p.V, p.indices + r, vals + r);
}

// ---------------------------------------------------------------------------------------------
// softcap_softmax: out[r, :] = softmax(cap * tanh(scale * x[r, :]))   (attention probabilities)
// In float32 whatever the storage dtype, and in the reference's order of operations (multiply by scale,
// tanh, multiply by cap, then softmax: max, exp(y - max), sum, multiply by 1 / sum). Pass 1 stages y in
// `scratch` (L floats, in L1/L2) with its max, pass 2 turns it into exp(y - max) with the sum, pass 3
// writes the normalised row. A NaN anywhere in the row makes the whole row NaN, as torch.softmax.
// float32 storage: SLEEF's 1-ULP tanh and exp. bf16/fp16 storage, whose 8/11-bit results hide anything
// below ~1e-5 relative: the faster exp_u20 (ATen's own fast exp, ~20 ULP = 1.2e-6 relative) for both the
// softmax and tanh, tanh(|y|) = (1 - t) / (1 + t) with t = exp(-2|y|) (>= 2e-6 relative for |y| >= 1/4)
// and its Taylor series below 1/4 (truncation < 1e-10), where 1 - t would cancel.
// ---------------------------------------------------------------------------------------------
inline Vec fast_tanh(const Vec& y) {
  const Vec a = y.abs();
  const Vec y2 = y * y;
  // y (1 - y^2/3 + 2y^4/15 - 17y^6/315 + 62y^8/2835 - 1382y^10/155925)
  Vec p = at::vec::fmadd(y2, Vec(-1382.0f / 155925.0f), Vec(62.0f / 2835.0f));
  p = at::vec::fmadd(p, y2, Vec(-17.0f / 315.0f));
  p = at::vec::fmadd(p, y2, Vec(2.0f / 15.0f));
  p = at::vec::fmadd(p, y2, Vec(-1.0f / 3.0f));
  const Vec small = at::vec::fmadd(p * y2, y, y);
  const Vec is_big = a >= Vec(0.25f);  // all-ones lanes where true (NaN: false, and the series keeps it NaN)
  if (is_big.zero_mask() == (1 << kW) - 1) return small;  // typical attention scores: no lane needs the exp
  const Vec t = (a * Vec(-2.0f)).exp_u20();
  const Vec big = (Vec(1.0f) - t) / (Vec(1.0f) + t);
  // copysign(big, y) for |y| >= 1/4
  const Vec signed_big = Vec::blendv(big, Vec(0.0f) - big, y < Vec(0.0f));
  return Vec::blendv(small, signed_big, is_big);
}

template <bool kFast>
inline Vec exp_of(const Vec& v) {
  if constexpr (kFast) {
    return v.exp_u20();
  } else {
    return v.exp();
  }
}
template <typename T>
inline void store_row(T* dst, const float* src, int64_t L, float mul) {
  const Vec vm(mul);
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; j + kW <= L; j += kW) (Vec::loadu(src + j) * vm).store(dst + j);
    if (j < L) (Vec::loadu(src + j, L - j) * vm).store(dst + j, L - j);
  } else {
    for (; j + 2 * kW <= L; j += 2 * kW) {
      const Vec a = Vec::loadu(src + j) * vm;
      const Vec b = Vec::loadu(src + j + kW) * vm;
      at::vec::convert_from_float<T>(a, b).store(dst + j);
    }
    for (; j < L; ++j) dst[j] = static_cast<T>(src[j] * mul);
  }
}

template <typename T>
void softcap_softmax_row(const T* x, T* out, int64_t L, float scale, float cap, float* buf) {
  constexpr bool kFast = !std::is_same_v<T, float>;
  const auto tanh_of = [](const Vec& v) { return kFast ? fast_tanh(v) : v.tanh(); };
  const Vec vscale(scale), vcap(cap), ninf(-kInf);
  const bool capped = cap > 0;
  Vec mx(-kInf);
  int64_t j = 0;
  for (; j + kW <= L; j += kW) {
    Vec y = load_full(x + j) * vscale;
    if (capped) y = tanh_of(y) * vcap;
    y.store(buf + j);
    mx = at::vec::maximum(mx, y);
  }
  if (j < L) {
    const int64_t n = L - j;
    Vec y = load_part(x + j, n) * vscale;
    if (capped) y = tanh_of(y) * vcap;
    y.store(buf + j, n);
    mx = at::vec::maximum(mx, Vec::set(ninf, y, n));
  }
  const float mf = reduce_max(mx);
  const Vec m(mf);
  Vec sum(0.0f);
  // exp_u20 is only valid for finite arguments; a NaN or infinite max (no cap) takes SLEEF's exp, whose
  // NaN(inf - inf) makes the row NaN as in torch.softmax.
  const auto exp_pass = [&](auto fast) {
    j = 0;
    for (; j + kW <= L; j += kW) {
      const Vec e = exp_of<decltype(fast)::value>(Vec::loadu(buf + j) - m);
      e.store(buf + j);
      sum = sum + e;
    }
    if (j < L) {
      const int64_t n = L - j;
      const Vec e = exp_of<decltype(fast)::value>(Vec::loadu(buf + j, n) - m);
      e.store(buf + j, n);
      sum = sum + Vec::set(Vec(0.0f), e, n);
    }
  };
  if (kFast && std::isfinite(mf)) {
    exp_pass(std::true_type{});
  } else {
    exp_pass(std::false_type{});
  }
  alignas(64) float lanes[kW];
  sum.store(lanes);
  float total = 0.0f;
  for (int64_t i = 0; i < kW; ++i) total += lanes[i];
  store_row<T>(out, buf, L, 1.0f / total);
}

template <typename T>
void softcap_softmax_rows_t(const SoftmaxParams& p, int64_t r0, int64_t r1, float* scratch) {
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  for (int64_t r = r0; r < r1; ++r) softcap_softmax_row<T>(x + r * p.L, out + r * p.L, p.L, p.scale, p.cap, scratch);
}

// ---------------------------------------------------------------------------------------------
// soft_cap in bf16 / fp16: cap * tanh(x / cap), bit for bit what the three ATen ops x.div_(cap).tanh_().mul_(cap)
// give in x's dtype: each op computed in float32 (true division; SLEEF's 1-ULP tanh, which ATen's vectorised
// tanh uses too) and rounded to the storage dtype (round to nearest even) before the next.
//
// The argmax of the capped row without capping it (argmax_row with cap > 0): the cap is non-decreasing, also
// with its roundings, so the capped row's maximum is c = cap(m), m the raw maximum, and its first index is the
// first element >= t, t the smallest value of the dtype with cap(t) == c (a binary search over the dtype's
// ordered bit patterns, ~16 evaluations). Ties that the rounding creates resolve as in the reference (first
// index); a NaN anywhere is the raw pass's first NaN, as cap(NaN) = NaN. One raw pass and a short scan instead
// of a tanh per element (tests/test_vocab_pass.py checks the bits of cap and the ids against ATen's).
// ---------------------------------------------------------------------------------------------
template <typename T>
inline Vec round_to(const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v, v)));
  }
}

template <typename T>
inline Vec soft_cap_rounded(const Vec& x, const Vec& vcap) {
  const Vec a = round_to<T>(x / vcap);
  const Vec b = round_to<T>(a.tanh());
  return round_to<T>(b * vcap);
}

// bf16 / fp16 bit patterns <-> an integer key in the order of their values (both zeros -> 0)
inline int32_t order_key(uint16_t bits) { return (bits & 0x8000) ? -int32_t(bits & 0x7FFF) : int32_t(bits); }
inline uint16_t key_bits(int32_t key) { return key >= 0 ? uint16_t(key) : uint16_t(0x8000 | uint16_t(-key)); }

template <typename T>
inline T from_bits(uint16_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(v));
  return v;
}

template <typename T>
inline uint16_t to_bits(T v) {
  uint16_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
}

template <typename T>
inline float cap_one(float x, const Vec& vcap) {  // the vector code's bits for one value
  alignas(64) float out[kW];
  soft_cap_rounded<T>(Vec(x), vcap).store(out);
  return out[0];
}

template <typename T>
void capped_argmax_row(const T* x, int64_t V, float cap, int64_t* idx_out, T* val_out) {
  int64_t i_raw;
  T m;
  argmax_row<T>(x, V, &i_raw, &m);
  if (std::isnan(static_cast<float>(m))) {  // the first NaN, as for the capped row
    *idx_out = i_raw;
    *val_out = m;
    return;
  }
  const Vec vcap(cap);
  const float c = cap_one<T>(static_cast<float>(m), vcap);
  // smallest key in [key(-inf), key(m)] whose value caps to c (cap is non-decreasing: a binary search)
  int32_t lo = order_key(to_bits(static_cast<T>(-kInf))), hi = order_key(to_bits(m));
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo) / 2;
    if (cap_one<T>(static_cast<float>(from_bits<T>(key_bits(mid))), vcap) >= c) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  const float t = static_cast<float>(from_bits<T>(key_bits(lo)));
  int64_t first = i_raw;  // the first index with x >= t lies at or before the raw maximum's
  if (t < static_cast<float>(m)) {
    const Vec vt(t);
    for (int64_t j = 0; j < i_raw; j += kW) {
      const int64_t n = std::min<int64_t>(kW, i_raw - j);
      const Vec v = n == kW ? load_full(x + j) : load_part(x + j, n);
      alignas(64) float ge[kW];
      Vec::blendv(Vec(0.0f), Vec(1.0f), v >= vt).store(ge);
      int64_t k = 0;
      while (k < n && ge[k] == 0.0f) ++k;
      if (k < n) {
        first = j + k;
        break;
      }
    }
  }
  *idx_out = first;
  *val_out = static_cast<T>(c);
}

// ----------------------------------------------------------------------------- screened argmax
// Lanes [0, n) of the screen's score s and bound e at g[v0 ..] (n <= kW; other lanes: s = 0, e = 0).
struct ScreenLanes {
  Vec s, e;
};

inline ScreenLanes screen_lanes(const ScreenRow& p, int64_t v0, int64_t n) {
  const bool full = n == kW;
  Vec g = p.g_kind == FloatKind::BF16
              ? (full ? load_full(static_cast<const c10::BFloat16*>(p.g) + v0)
                      : load_part(static_cast<const c10::BFloat16*>(p.g) + v0, n))
              : (full ? Vec::loadu(static_cast<const float*>(p.g) + v0)
                      : Vec::loadu(static_cast<const float*>(p.g) + v0, n));
  if (p.bias) g = g + (full ? Vec::loadu(p.bias + v0) : Vec::loadu(p.bias + v0, n));
  const Vec a = full ? Vec::loadu(p.colA + v0) : Vec::loadu(p.colA + v0, n);
  const Vec b = full ? Vec::loadu(p.colB + v0) : Vec::loadu(p.colB + v0, n);
  // every term >= 0, so the computed e is within 3 roundings of the exact one (the bound's margin covers that)
  return {g, Vec(p.ny) * a + b + Vec(p.tau)};
}

// Scalar round_to: v rounded to T and back.
template <typename T>
inline float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// The first n lanes of v stored as T (rounded to nearest even).
template <typename T>
inline void store_n(T* dst, const Vec& v, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(dst, n);
  } else {
    at::vec::convert_from_float<T>(v, v).store(dst, n);
  }
}

// x = [x1, x2] -> [x1 c - x2 s, x1 s + x2 c], each product and sum rounded to T (ATen's mul, mul, sub / add on
// T tensors: the same bits as the plain-PyTorch ops.rotary_reference). n = hd / 2.
template <typename T>
inline void rotate_head(const T* x, T* out, const float* c, const float* s, int64_t n) {
  int64_t j = 0;
  for (; j + kW <= n; j += kW) {
    const Vec x1 = load_full(x + j), x2 = load_full(x + n + j);
    const Vec cv = Vec::loadu(c + j), sv = Vec::loadu(s + j);
    store_n<T>(out + j, round_to<T>(x1 * cv) - round_to<T>(x2 * sv), kW);  // the store rounds the sum to T
    store_n<T>(out + n + j, round_to<T>(x1 * sv) + round_to<T>(x2 * cv), kW);
  }
  for (; j < n; ++j) {
    const float x1 = static_cast<float>(x[j]), x2 = static_cast<float>(x[n + j]);
    out[j] = static_cast<T>(round_to<T>(x1 * c[j]) - round_to<T>(x2 * s[j]));
    out[n + j] = static_cast<T>(round_to<T>(x1 * s[j]) + round_to<T>(x2 * c[j]));
  }
}

template <typename T>
void rotary_rows_t(const RotaryParams& p, int64_t r0, int64_t r1) {
  const T* qkv = static_cast<const T*>(p.qkv);
  T* out = static_cast<T*>(p.out);
  const int64_t H = p.H, hd = p.hd, L = p.L, n = hd / 2;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / L, l = r % L;
    const T* src = qkv + r * 3 * H * hd;
    for (int64_t part = 0; part < 3; ++part) {
      for (int64_t h = 0; h < H; ++h) {
        const T* x = src + (part * H + h) * hd;
        T* dst = out + (((part * p.B + b) * H + h) * L + l) * hd;
        if (part == 2) {
          std::memcpy(dst, x, static_cast<size_t>(hd) * sizeof(T));
        } else {
          rotate_head<T>(x, dst, p.cos + l * n, p.sin + l * n, n);
        }
      }
    }
  }
}

template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + kW <= n; j += kW) load_full(src + j).store(dst + j);
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

// The float32 values of operand o's row at element offset off: the row itself when o is float32, else its
// conversion in buf (kept while the offset repeats: a [B, 1, D] operand is converted once per batch).
inline const float* float_row(const ScaledAddOperand& o, int64_t off, int64_t D, float* buf, int64_t& cached) {
  if (o.kind == FloatKind::F32) return static_cast<const float*>(o.p) + off;
  if (cached != off) {
    if (o.kind == FloatKind::BF16) {
      to_float(static_cast<const c10::BFloat16*>(o.p) + off, buf, D);
    } else {
      to_float(static_cast<const c10::Half*>(o.p) + off, buf, D);
    }
    cached = off;
  }
  return buf;
}

// ATen's float32 addcmul, self + t1 * t2: one fused multiply-add where the capability has FMA (ATen's own AVX2 /
// AVX512 kernels contract it), a product and a sum in the DEFAULT copy (as ATen's DEFAULT kernels).
inline Vec scaled_add_lanes(const float* base, const float* x, const float* w, int64_t j, int64_t n) {
  if (n == kW) return at::vec::fmadd(Vec::loadu(x + j), Vec::loadu(w + j), Vec::loadu(base + j));
  return at::vec::fmadd(Vec::loadu(x + j, n), Vec::loadu(w + j, n), Vec::loadu(base + j, n));
}

template <typename T>
void scaled_add_rows_t(const ScaledAddParams& p, int64_t r0, int64_t r1, float* scratch) {
  T* out = static_cast<T*>(p.out);
  const int64_t D = p.D;
  int64_t cached[3] = {-1, -1, -1};
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / p.L, l = r % p.L;
    const float* base = float_row(p.base, b * p.base.sb + l * p.base.sl, D, scratch, cached[0]);
    const float* x = float_row(p.x, b * p.x.sb + l * p.x.sl, D, scratch + D, cached[1]);
    const float* w = float_row(p.w, b * p.w.sb + l * p.w.sl, D, scratch + 2 * D, cached[2]);
    T* dst = out + r * D;
    int64_t j = 0;
    if constexpr (std::is_same_v<T, float>) {
      for (; j + kW <= D; j += kW) scaled_add_lanes(base, x, w, j, kW).store(dst + j);
    } else {
      for (; j + 2 * kW <= D; j += 2 * kW) {
        at::vec::convert_from_float<T>(scaled_add_lanes(base, x, w, j, kW), scaled_add_lanes(base, x, w, j + kW, kW))
            .store(dst + j);
      }
    }
    for (; j < D; j += kW) {
      const int64_t n = D - j < kW ? D - j : kW;
      store_n<T>(dst + j, scaled_add_lanes(base, x, w, j, n), n);
    }
  }
}

// gelu_tanh(x) = 0.5 x (1 + tanh(u)), u = sqrt(2 / pi) (x + 0.044715 x^3), computed as x / (1 + exp(-2 u)): the
// same function without the cancellation of 1 + tanh(u) for negative u, on ATen's fast exp (exp_u20, 20 ulp; the
// libm exp in the DEFAULT copy). Large |x|: exp overflows to inf (x / inf = -0) or underflows to 0 (x); NaN stays NaN.
inline Vec gelu_tanh_lanes(const Vec& x) {
  const Vec k1(-1.5957691216057308f);   // -2 sqrt(2 / pi)
  const Vec k3(-0.07135481627159466f);  // -2 sqrt(2 / pi) * 0.044715
  const Vec minus_2u = x * at::vec::fmadd(x * x, k3, k1);
  return x / (Vec(1.0f) + minus_2u.exp_u20());
}

template <typename T>
void gelu_tanh_range_t(T* x, int64_t begin, int64_t end) {
  int64_t i = begin;
  if constexpr (std::is_same_v<T, float>) {
    for (; i + kW <= end; i += kW) gelu_tanh_lanes(Vec::loadu(x + i)).store(x + i);
  } else {
    for (; i + 2 * kW <= end; i += 2 * kW) {
      at::vec::convert_from_float<T>(gelu_tanh_lanes(load_full(x + i)), gelu_tanh_lanes(load_full(x + i + kW)))
          .store(x + i);
    }
  }
  for (; i < end; i += kW) {
    const int64_t n = end - i < kW ? end - i : kW;
    store_n<T>(x + i, gelu_tanh_lanes(load_part(x + i, n)), n);
  }
}

}  // namespace

void step_rows(const StepParams& p, int64_t row_begin, int64_t row_end, float* scratch) {
  switch (p.logits_kind) {
    case FloatKind::F32: step_rows_t<float>(p, row_begin, row_end, scratch); break;
    case FloatKind::BF16: step_rows_t<c10::BFloat16>(p, row_begin, row_end, scratch); break;
    case FloatKind::F16: step_rows_t<c10::Half>(p, row_begin, row_end, scratch); break;
  }
}

void argmax_rows(const ArgmaxParams& p, int64_t row_begin, int64_t row_end) {
  switch (p.kind) {
    case FloatKind::F32: argmax_rows_t<float>(p, row_begin, row_end); break;
    case FloatKind::BF16: argmax_rows_t<c10::BFloat16>(p, row_begin, row_end); break;
    case FloatKind::F16: argmax_rows_t<c10::Half>(p, row_begin, row_end); break;
  }
}

void softcap_softmax_rows(const SoftmaxParams& p, int64_t row_begin, int64_t row_end, float* scratch) {
  switch (p.kind) {
    case FloatKind::F32: softcap_softmax_rows_t<float>(p, row_begin, row_end, scratch); break;
    case FloatKind::BF16: softcap_softmax_rows_t<c10::BFloat16>(p, row_begin, row_end, scratch); break;
    case FloatKind::F16: softcap_softmax_rows_t<c10::Half>(p, row_begin, row_end, scratch); break;
  }
}

void rotary_rows(const RotaryParams& p, int64_t row_begin, int64_t row_end) {
  switch (p.kind) {
    case FloatKind::F32: rotary_rows_t<float>(p, row_begin, row_end); break;
    case FloatKind::BF16: rotary_rows_t<c10::BFloat16>(p, row_begin, row_end); break;
    case FloatKind::F16: rotary_rows_t<c10::Half>(p, row_begin, row_end); break;
  }
}

void scaled_add_rows(const ScaledAddParams& p, int64_t row_begin, int64_t row_end, float* scratch) {
  switch (p.out_kind) {
    case FloatKind::F32: scaled_add_rows_t<float>(p, row_begin, row_end, scratch); break;
    case FloatKind::BF16: scaled_add_rows_t<c10::BFloat16>(p, row_begin, row_end, scratch); break;
    case FloatKind::F16: scaled_add_rows_t<c10::Half>(p, row_begin, row_end, scratch); break;
  }
}

void gelu_tanh_range(void* x, FloatKind kind, int64_t begin, int64_t end) {
  switch (kind) {
    case FloatKind::F32: gelu_tanh_range_t(static_cast<float*>(x), begin, end); break;
    case FloatKind::BF16: gelu_tanh_range_t(static_cast<c10::BFloat16*>(x), begin, end); break;
    case FloatKind::F16: gelu_tanh_range_t(static_cast<c10::Half*>(x), begin, end); break;
  }
}

bool screen_max(const ScreenRow& p, float* lo_max, float* block_hi) {
  Vec m(-kInf), nonfinite(0.0f);  // s * 0 is NaN exactly where s is inf or NaN
  for (int64_t b0 = 0; b0 < p.n; b0 += kScreenBlock) {
    const int64_t b1 = b0 + kScreenBlock < p.n ? b0 + kScreenBlock : p.n;
    Vec h(-kInf);
    for (int64_t v = b0; v < b1; v += kW) {
      const int64_t n = b1 - v < kW ? b1 - v : kW;
      const ScreenLanes l = screen_lanes(p, v, n);
      nonfinite = nonfinite + l.s * Vec(0.0f);
      // clamp_min: a plain max (NaN handling is not needed: a NaN s makes the row non-finite anyway)
      if (n == kW) {
        m = at::vec::clamp_min(l.s - l.e, m);
        h = at::vec::clamp_min(l.s + l.e, h);
      } else {
        m = at::vec::clamp_min(Vec::set(Vec(-kInf), l.s - l.e, n), m);
        h = at::vec::clamp_min(Vec::set(Vec(-kInf), l.s + l.e, n), h);
      }
    }
    alignas(64) float hh[kW];
    h.store(hh);
    float bh = -kInf;
    for (int64_t i = 0; i < kW; ++i) bh = hh[i] > bh ? hh[i] : bh;
    block_hi[b0 / kScreenBlock] = bh;
  }
  alignas(64) float mm[kW];
  alignas(64) float nf[kW];
  m.store(mm);
  nonfinite.store(nf);
  float best = -kInf;
  bool finite = true;
  for (int64_t i = 0; i < kW; ++i) {
    best = mm[i] > best ? mm[i] : best;
    finite = finite && nf[i] == nf[i];
  }
  *lo_max = best;
  return finite;
}

int64_t screen_collect(const ScreenRow& p, float T, const float* block_hi, int64_t v_offset, int32_t* idx, float* hi,
                       int64_t count, int64_t cap) {
  const Vec t(T);
  for (int64_t b0 = 0; b0 < p.n; b0 += kScreenBlock) {
    if (!(block_hi[b0 / kScreenBlock] >= T)) continue;  // no candidate in this block
    const int64_t b1 = b0 + kScreenBlock < p.n ? b0 + kScreenBlock : p.n;
    for (int64_t v = b0; v < b1; v += kW) {
      const int64_t n = b1 - v < kW ? b1 - v : kW;
      const ScreenLanes l = screen_lanes(p, v, n);
      const Vec h = l.s + l.e;
      // zero_mask: bit i set where lane i compared false (the comparison's true lanes are all-ones bit patterns)
      uint64_t hit = ~static_cast<uint64_t>(static_cast<uint32_t>((h >= t).zero_mask())) &
                     ((n >= 64 ? 0 : (uint64_t{1} << n)) - 1);
      if (hit == 0) continue;
      alignas(64) float hv[kW];
      h.store(hv);
      while (hit) {
        const int i = __builtin_ctzll(hit);
        hit &= hit - 1;
        if (count >= cap) return -1;
        idx[count] = static_cast<int32_t>(v_offset + v + i);
        hi[count] = hv[i];
        ++count;
      }
    }
  }
  return count;
}

float dot_f32(const float* a, const float* b, int64_t n) {
  Vec acc(0.0f);
  int64_t k = 0;
  for (; k + kW <= n; k += kW) acc = at::vec::fmadd(Vec::loadu(a + k), Vec::loadu(b + k), acc);
  if (k < n) acc = at::vec::fmadd(Vec::loadu(a + k, n - k), Vec::loadu(b + k, n - k), acc);
  alignas(64) float lanes[kW];
  acc.store(lanes);
  float sum = 0.0f;
  for (int64_t i = 0; i < kW; ++i) sum += lanes[i];
  return sum;
}

const char* describe() {
#ifndef FLM_RT_CPU_FLAGS
#define FLM_RT_CPU_FLAGS "none"
#endif
  // Plain C formatting only: this object is compiled with ISA flags, keep it free of inline C++ library code.
  static char text[256] = {0};
  if (text[0] == 0) {
    std::snprintf(text, sizeof(text), "%s (flags: %s; Vectorized<float> lanes: %d)", FLM_RT_STR(CPU_CAPABILITY),
                  FLM_RT_CPU_FLAGS, static_cast<int>(kW));
  }
  return text;
}

}  // namespace flm_rt::cpu::CPU_CAPABILITY
