// What the CUDA entry points return after their launches: nullptr, or the message of the calling
// thread's last CUDA error (which reading clears).
#pragma once
#include <cuda_runtime.h>

namespace pq {
namespace cuda {

inline const char* last_error() {
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace cuda
}  // namespace pq
