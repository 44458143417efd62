// The CUDA part of build_info_entries() (build_info.h): compiled by nvcc, so it can name nvcc's version.
#include "../build_info.h"

#include <cuda_runtime_api.h>

#include <string>

namespace flm_rt {

std::string cuda_build_description() {
  return "nvcc " + std::to_string(__CUDACC_VER_MAJOR__) + "." + std::to_string(__CUDACC_VER_MINOR__) + "." +
         std::to_string(__CUDACC_VER_BUILD__) + ", CUDA runtime headers " + std::to_string(CUDART_VERSION);
}

}  // namespace flm_rt
