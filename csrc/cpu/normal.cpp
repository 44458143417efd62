// CPU implementation of flm_rt::normal_ (see docs/KERNELS.md): standard-normal draws into a contiguous float32
// tensor, equal bit for bit to out.normal_(0, 1, generator) (= torch.randn(..., generator=g, out=out)) and leaving
// the generator in the state ATen leaves it in.
//
// ATen (DistributionTemplates.h, normal_fill, numel >= 16) draws one 24-bit uniform per element from the mt19937
// engine in one serial loop, applies NormalFill16 (Box-Muller) to blocks of 16 (8 pairs) and, when numel % 16 != 0,
// draws 16 more uniforms for the last 16 elements and transforms them again. NormalFill16 depends on the CPU
// capability: the scalar one (libm log, sqrt, cos, sin; box_muller16 below) at DEFAULT, NormalFill16<float, true>
// (avx_mathfun.h log256_ps / sincos256_ps; normal_avx2.cpp) at AVX2 and, in torch 2.14.1, at AVX512 (normal_ has
// no AVX512 kernel). Only the words are drawn serially, straight into the output (the mt19937 recurrence, auto-
// vectorised); tempering, the uniform conversion and Box-Muller run in parallel, overlapping the drawing.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/DistributionsHelper.h>
#include <ATen/core/MT19937RNGEngine.h>
#include <c10/util/MathConstants.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#if defined(__FAST_MATH__)
#error "csrc/cpu/normal.cpp must not be compiled with -ffast-math: it reproduces ATen's libm calls bit for bit"
#endif

namespace flm_rt {
#if defined(FLM_RT_HAVE_CPU_AVX2)
namespace cpu::avx2 {
void normal16_from_words(const uint32_t* src, float* dst, int64_t blocks);  // normal_avx2.cpp
}
#endif
namespace {

constexpr const char* kOp = "flm_rt::normal_";
constexpr int kN = at::MERSENNE_STATE_N;  // 624
constexpr int kM = at::MERSENNE_STATE_M;  // 397

inline uint32_t twist(uint32_t u, uint32_t v) {
  return (((u & at::UMASK) | (v & at::LMASK)) >> 1) ^ ((0u - (v & 1u)) & at::MATRIX_A);
}

// The engine's next 624 words (mt19937_engine::next_state) from its current ones: out[i] = x[i + 624] for the
// word stream x with x[k + 624] = x[k + 397] ^ twist(x[k], x[k + 1]) and prev = x[0, 624). out may be prev
// (the state regenerated in place) or a separate buffer; each loop has no carried dependence shorter than 227.
void next_block(const uint32_t* prev, uint32_t* out) {
  if (out == prev) {
    uint32_t* p = out;
    for (int i = 0; i < kN - kM; ++i) p[i] = p[i + kM] ^ twist(p[i], p[i + 1]);
    for (int i = kN - kM; i < kN - 1; ++i) p[i] = p[i + kM - kN] ^ twist(p[i], p[i + 1]);
    p[kN - 1] = p[kM - 1] ^ twist(p[kN - 1], p[0]);
    return;
  }
  const uint32_t* __restrict x = prev;
  uint32_t* __restrict y = out;
  for (int i = 0; i < kN - kM; ++i) y[i] = x[i + kM] ^ twist(x[i], x[i + 1]);
  for (int i = kN - kM; i < kN - 1; ++i) y[i] = y[i + kM - kN] ^ twist(x[i], x[i + 1]);
  y[kN - 1] = y[kM - 1] ^ twist(x[kN - 1], y[0]);
}

// The next n untempered words of the engine into dst, advancing the state as n calls of
// mt19937_engine::operator() do (`--left_ == 0` regenerates the state and restarts at word 0). Whole blocks of
// 624 words are generated straight into dst from the block before them; state_ receives the last block.
void draw_words(at::mt19937_data_pod& s, uint32_t* dst, int64_t n) {
  uint32_t* state = s.state_.data();
  const int64_t k = std::min<int64_t>(n, s.left_ - 1);  // words still in the state
  std::memcpy(dst, state + s.next_, static_cast<size_t>(k) * sizeof(uint32_t));
  dst += k;
  n -= k;
  s.left_ -= static_cast<int>(k);
  s.next_ += static_cast<uint32_t>(k);
  const uint32_t* prev = state;
  for (; n >= kN; n -= kN, dst += kN) {
    next_block(prev, dst);
    prev = dst;
  }
  if (n > 0) {
    next_block(prev, state);
    std::memcpy(dst, state, static_cast<size_t>(n) * sizeof(uint32_t));
    s.left_ = kN + 1 - static_cast<int>(n);
    s.next_ = static_cast<uint32_t>(n);
  } else if (prev != state) {
    std::memcpy(state, prev, kN * sizeof(uint32_t));
    s.left_ = 1;
    s.next_ = kN;
  }
}

// A state that operator() walks without reading past the 624 words (ATen never produces another).
bool walkable(const at::mt19937_data_pod& s) {
  return s.left_ >= 1 && s.left_ <= kN + 1 && static_cast<int64_t>(s.next_) + s.left_ - 1 <= kN;
}

// 16 raw words (src) -> 16 standard-normal floats (dst; may alias src): tempering, ATen's uniform_real for float
// ((y & (2^24 - 1)) * 2^-24, exact in float), then NormalFill16 with mean 0 and std 1 in ATen's types.
void box_muller16(const uint32_t* src, float* dst) {
  uint32_t w[16];
  std::memcpy(w, src, sizeof(w));
  float u[16];
  for (int j = 0; j < 16; ++j) {
    uint32_t y = w[j];
    y ^= (y >> 11);
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= (y >> 18);
    u[j] = static_cast<float>(static_cast<int32_t>(y & 0xffffffu)) * 0x1p-24f;
  }
  for (int j = 0; j < 8; ++j) {
    const float u1 = 1 - u[j];
    const float u2 = u[j + 8];
    const float radius = std::sqrt(-2 * std::log(u1));
    const float theta = 2.0f * c10::pi<double> * u2;  // computed in double, rounded to float, as in ATen
    // ATen: std::fma(radius * cos(theta), std, mean); with std 1 and mean 0 that is exactly this sum (+0 for -0).
    dst[j] = radius * std::cos(theta) + 0.0f;
    dst[j + 8] = radius * std::sin(theta) + 0.0f;
  }
}

inline void pause() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#endif
}

// blocks x (16 raw words at src -> 16 floats at dst); dst may be src.
using Blocks16 = void (*)(const uint32_t* src, float* dst, int64_t blocks);
constexpr int64_t kUnit = 256;         // blocks a thread transforms at a time (16 KiB)
constexpr int64_t kDrawBlocks = 1024;  // blocks whose words are drawn at a time (64 KiB)

void scalar_blocks16(const uint32_t* src, float* dst, int64_t blocks) {
  for (int64_t b = 0; b < blocks; ++b) box_muller16(src + 16 * b, dst + 16 * b);
}

// Fills data[0, size), size >= 16, from gen as ATen's normal_fill does, with box_muller for its NormalFill16;
// false (nothing done) for a state that is not walkable.
bool fill_standard_normal(float* data, int64_t size, at::CPUGeneratorImpl* gen, Blocks16 box_muller) {
  const int64_t blocks = size / 16;
  const bool tail = size % 16 != 0;
  uint32_t tail_words[16];
  static_assert(sizeof(float) == sizeof(uint32_t));
  uint32_t* words = reinterpret_cast<uint32_t*>(data);  // raw words, turned into floats in place below
  std::lock_guard<std::mutex> lock(gen->mutex_);
  at::mt19937 engine = gen->engine();
  at::mt19937_data_pod s = engine.data();
  if (!walkable(s)) return false;
  // The threads take units of kUnit blocks in order; one that finds a unit's words not drawn yet draws the next
  // kDrawBlocks blocks' words itself if no other thread is drawing, so word drawing (serial, in stream order)
  // overlaps the transforms, in cache, under any schedule of the parallel_for bodies.
  const int64_t units = (blocks + kUnit - 1) / kUnit;
  std::atomic<int64_t> next_unit{0};
  std::atomic<int64_t> drawn{0};  // blocks whose words are in place
  std::atomic<bool> drawing{false};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), (blocks + kDrawBlocks - 1) / kDrawBlocks);
  at::parallel_for(0, std::max<int64_t>(workers, 1), 1, [&](int64_t, int64_t) {
    for (int64_t u; (u = next_unit.fetch_add(1)) < units;) {
      const int64_t b0 = u * kUnit;
      const int64_t b1 = std::min(blocks, b0 + kUnit);
      while (drawn.load(std::memory_order_acquire) < b1) {
        if (drawing.load(std::memory_order_relaxed) || drawing.exchange(true, std::memory_order_acquire)) {
          pause();
        } else {
          const int64_t d0 = drawn.load(std::memory_order_relaxed);
          const int64_t d1 = std::min(blocks, d0 + kDrawBlocks);
          draw_words(s, words + 16 * d0, 16 * (d1 - d0));
          drawn.store(d1, std::memory_order_release);
          drawing.store(false, std::memory_order_release);
        }
      }
      box_muller(words + 16 * b0, data + 16 * b0, b1 - b0);
    }
  });
  draw_words(s, words + 16 * blocks, size - 16 * blocks);
  if (tail) draw_words(s, tail_words, 16);
  engine.set_data(s);
  gen->set_engine(engine);
  // ATen transforms the full blocks, then overwrites the last 16 elements with 16 fresh draws.
  if (tail) box_muller(tail_words, data + size - 16, 1);
  return true;
}

at::CPUGeneratorImpl* cpu_generator(const std::optional<at::Generator>& generator) {
  if (generator.has_value() && generator->defined()) {
    TORCH_CHECK(generator->device().is_cpu(), kOp, ": expected a CPU generator, got one on ",
                generator->device());
  }
  return at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
}

// ATen's float32 NormalFill16 at this CPU capability, where this build has it (x86-64 only; other architectures
// were not checked): the scalar one (libm) at DEFAULT, NormalFill16<float, true> (avx_mathfun.h) at AVX2 and
// AVX512; nullptr elsewhere ...
Blocks16 aten_box_muller() {
#if defined(__x86_64__) || defined(_M_X64)
  const std::string cap = at::get_cpu_capability();
  if (cap == "DEFAULT") return &scalar_blocks16;
#if defined(FLM_RT_HAVE_CPU_AVX2)
  if (cap == "AVX2" || cap == "AVX512") return &cpu::avx2::normal16_from_words;
#endif
#endif
  return nullptr;
}

// ... and whether this kernel then matches ATen, checked once on 16 * 40 + 5 draws (two state regenerations, a
// tail, a generator with a cached normal sample) against ATen itself.
bool agrees_with_aten(Blocks16 box_muller) {
  auto g_ref = at::detail::createCPUGenerator(20241);
  at::randn({3}, g_ref);  // leaves a cached double normal sample and left_ / next_ mid-state
  at::Generator g_own = g_ref.clone();
  const int64_t n = 16 * 40 + 5;
  at::Tensor ref = at::empty({n}, at::kFloat);
  ref.normal_(0.0, 1.0, g_ref);
  at::Tensor own = at::empty({n}, at::kFloat);
  return fill_standard_normal(own.data_ptr<float>(), n, g_own.get<at::CPUGeneratorImpl>(), box_muller) &&
         at::equal(own.view(at::kInt), ref.view(at::kInt)) &&
         at::equal(g_own.get_state(), g_ref.get_state());
}

// The Box-Muller to use, nullptr for none (ATen's normal_ then runs); decided once per process.
Blocks16 kernel_box_muller() {
  static const Blocks16 fn = [] {
    const Blocks16 f = aten_box_muller();
    return f != nullptr && agrees_with_aten(f) ? f : nullptr;
  }();
  return fn;
}

void normal_inplace_cpu(at::Tensor& out, const std::optional<at::Generator>& generator) {
  TORCH_CHECK(out.defined(), kOp, ": out must be a defined tensor");
  TORCH_CHECK(out.device().is_cpu(), kOp, ": expected a CPU tensor, got out on ", out.device());
  TORCH_CHECK(out.scalar_type() == at::kFloat, kOp, ": out must be float32, got ", out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), kOp, ": out must be contiguous, got sizes ", out.sizes(), " and strides ",
              out.strides());
  at::CPUGeneratorImpl* gen = cpu_generator(generator);
  const int64_t size = out.numel();
  if (size == 0) return;
  // Otherwise ATen's own kernel: small tensors (normal_distribution<double>, another stream), other CPU
  // capabilities, a corrupt engine state.
  const Blocks16 box_muller = size < 16 ? nullptr : kernel_box_muller();
  if (box_muller == nullptr || !fill_standard_normal(out.mutable_data_ptr<float>(), size, gen, box_muller)) {
    out.normal_(0.0, 1.0, generator);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(flm_rt, CPU, m) {
  m.impl("normal_", &normal_inplace_cpu);
}

}  // namespace flm_rt
