#include "dispatch.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include <algorithm>

namespace flm_rt::cpu {

namespace {
KernelTable make_table() {
  const std::string cap = at::get_cpu_capability();
#if defined(FLM_RT_HAVE_CPU_AVX512)
  if (cap.find("AVX512") != std::string::npos) {
    return {"AVX512", &AVX512::step_rows, &AVX512::argmax_rows, &AVX512::softcap_softmax_rows,
            &AVX512::rotary_rows, &AVX512::scaled_add_rows, &AVX512::gelu_tanh_range,
            &AVX512::screen_max, &AVX512::screen_collect, &AVX512::dot_f32, &AVX512::describe};
  }
#endif
#if defined(FLM_RT_HAVE_CPU_AVX2)
  if (cap.find("AVX2") != std::string::npos || cap.find("AVX512") != std::string::npos) {
    return {"AVX2", &AVX2::step_rows, &AVX2::argmax_rows, &AVX2::softcap_softmax_rows,
            &AVX2::rotary_rows, &AVX2::scaled_add_rows, &AVX2::gelu_tanh_range,
            &AVX2::screen_max, &AVX2::screen_collect, &AVX2::dot_f32, &AVX2::describe};
  }
#endif
  (void)cap;
  return {"DEFAULT", &DEFAULT::step_rows, &DEFAULT::argmax_rows, &DEFAULT::softcap_softmax_rows,
            &DEFAULT::rotary_rows, &DEFAULT::scaled_add_rows, &DEFAULT::gelu_tanh_range,
            &DEFAULT::screen_max, &DEFAULT::screen_collect, &DEFAULT::dot_f32, &DEFAULT::describe};
}
}  // namespace

const KernelTable& kernels() {
  static const KernelTable table = make_table();
  return table;
}

void argmax_rows_parallel(const ArgmaxParams& p, int64_t rows) {
  const auto& k = kernels();
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / p.V), [&](int64_t r0, int64_t r1) {
    k.argmax_rows(p, r0, r1);
  });
}

std::vector<std::string> compiled_capabilities() {
  std::vector<std::string> caps{"DEFAULT"};
#if defined(FLM_RT_HAVE_CPU_AVX2)
  caps.emplace_back("AVX2");
#endif
#if defined(FLM_RT_HAVE_CPU_AVX512)
  caps.emplace_back("AVX512");
#endif
  return caps;
}

}  // namespace flm_rt::cpu
