// The AVX2 Box-Muller of flm_rt::normal_ (see normal.cpp): ATen's NormalFill16<float, true>
// (ATen/native/cpu/DistributionTemplates.h) on uniforms made from raw mt19937 words.
//
// Compiled on its own with ATen's flags for its AVX2 kernels (-mavx2 -mfma, -DCPU_CAPABILITY_AVX2 for
// avx_mathfun.h, GCC's default -ffp-contract=fast: GCC contracts the _mm256_mul_ps / _mm256_add_ps pairs inside
// log256_ps / sincos256_ps into FMAs as it does in torch's build; with -ffp-contract=off ~8% of the values
// differ in the last bit). ATen runs this code at its AVX512 capability too (normal_ has no AVX512 kernel).
// Only intrinsics and avx_mathfun.h here: no ATen inline function is emitted from this object.
#include <ATen/native/cpu/avx_mathfun.h>

#include <cstdint>

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(CPU_CAPABILITY_AVX2)
#error "csrc/cpu/normal_avx2.cpp must be compiled with -mavx2 -mfma -DCPU_CAPABILITY_AVX2"
#endif
#if defined(__FAST_MATH__)
#error "csrc/cpu/normal_avx2.cpp must not be compiled with -ffast-math: it reproduces ATen bit for bit"
#endif

namespace flm_rt::cpu::avx2 {
namespace {

// mt19937 tempering, then ATen's uniform_real<float>: (y & (2^24 - 1)) * 2^-24 (exact).
inline __m256 uniform8(const uint32_t* src) {
  __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  y = _mm256_xor_si256(y, _mm256_srli_epi32(y, 11));
  y = _mm256_xor_si256(y, _mm256_and_si256(_mm256_slli_epi32(y, 7), _mm256_set1_epi32(0x9d2c5680)));
  y = _mm256_xor_si256(y, _mm256_and_si256(_mm256_slli_epi32(y, 15), _mm256_set1_epi32(static_cast<int>(0xefc60000u))));
  y = _mm256_xor_si256(y, _mm256_srli_epi32(y, 18));
  y = _mm256_and_si256(y, _mm256_set1_epi32(0xffffff));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(y), _mm256_set1_ps(0x1p-24f));
}

}  // namespace

void normal16_from_words(const uint32_t* src, float* dst, int64_t blocks) {
  // NormalFill16<float, true> with mean 0, std 1, its operations in its order.
  const __m256 two_pi = _mm256_set1_ps(static_cast<float>(2.0f * 3.14159265358979323846));
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 minus_two = _mm256_set1_ps(-2.0f);
  const __m256 mean = _mm256_setzero_ps();
  const __m256 std = _mm256_set1_ps(1.0f);
  for (int64_t b = 0; b < blocks; ++b, src += 16, dst += 16) {
    const __m256 u1 = _mm256_sub_ps(one, uniform8(src));
    const __m256 u2 = uniform8(src + 8);
    const __m256 radius = _mm256_sqrt_ps(_mm256_mul_ps(minus_two, log256_ps(u1)));
    const __m256 theta = _mm256_mul_ps(two_pi, u2);
    __m256 sintheta, costheta;
    sincos256_ps(theta, &sintheta, &costheta);
    const __m256 n1 = _mm256_mul_ps(radius, costheta);
    const __m256 n2 = _mm256_mul_ps(radius, sintheta);
    _mm256_storeu_ps(dst, _mm256_fmadd_ps(n1, std, mean));
    _mm256_storeu_ps(dst + 8, _mm256_fmadd_ps(n2, std, mean));
  }
}

}  // namespace flm_rt::cpu::avx2
