// Compile-time facts about this build of the flm_rt kernels (no Python dependency).
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace flm_rt {

// Ordered (key, value) pairs: cuda_compiled, cuda_archs, cuda_compiler, cpu_capabilities_compiled,
// cpu_capability_selected, cpu_kernel, cpu_flags, compiler, torch_version_built, cxx11_abi, build_flags.
std::vector<std::pair<std::string, std::string>> build_info_entries();

#if defined(FLM_RT_WITH_CUDA)
// Defined in cuda/build_info.cu: "nvcc <ver>, CUDA runtime headers <ver>".
std::string cuda_build_description();
#endif

}  // namespace flm_rt
