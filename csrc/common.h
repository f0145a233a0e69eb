// Shared helpers for fm_engine's CUDA kernels: dtype codes agreed with the Python side
// (fm_engine/ops/_cuda.py) and error checking that names the failing call.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_runtime.h>

namespace fm_engine {

// Must match DTYPE_CODES in fm_engine/ops/_cuda.py.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
  }
}

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace fm_engine
