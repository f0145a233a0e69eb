// Element-wise ReLU²: y = relu(x)^2 and its backward dx = 2 * relu(x) * dy.
//
// Memory-bound: one read (two in backward) and one write per element, so the kernel moves 16 bytes
// per thread per access (float4 / 8 halves) when every pointer is 16-byte aligned, and falls back to
// scalar accesses otherwise. Arithmetic is done in fp32 and rounded once to the storage dtype, which
// is what the eager reference does for fp16/bf16 (relu is exact; the square rounds once).
#include <algorithm>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.h"
#include "relu2.h"

namespace fm_engine {
namespace {

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// One 16-byte vector of T.
template <typename T>
struct alignas(16) Vec {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

// NaN propagates as in torch.relu; fmaxf(NaN, 0) alone would return 0.
__device__ __forceinline__ float relu_nan(float x) { return x != x ? x : fmaxf(x, 0.0f); }

template <typename T, bool kVec>
__global__ void relu2_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n) {
  constexpr int N = Vec<T>::N;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (kVec) {
    const int64_t nvec = n / N;
    const Vec<T>* xv = reinterpret_cast<const Vec<T>*>(x);
    Vec<T>* yv = reinterpret_cast<Vec<T>*>(y);
    for (int64_t j = i; j < nvec; j += stride) {
      Vec<T> a = xv[j];
#pragma unroll
      for (int k = 0; k < N; ++k) {
        float r = relu_nan(to_f(a.v[k]));
        a.v[k] = from_f<T>(r * r);
      }
      yv[j] = a;
    }
    for (int64_t j = nvec * N + i; j < n; j += stride) {
      float r = relu_nan(to_f(x[j]));
      y[j] = from_f<T>(r * r);
    }
  } else {
    for (int64_t j = i; j < n; j += stride) {
      float r = relu_nan(to_f(x[j]));
      y[j] = from_f<T>(r * r);
    }
  }
}

template <typename T, bool kVec>
__global__ void relu2_bwd_kernel(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx,
                                 int64_t n) {
  constexpr int N = Vec<T>::N;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t start_tail = 0;
  if (kVec) {
    const int64_t nvec = n / N;
    const Vec<T>* xv = reinterpret_cast<const Vec<T>*>(x);
    const Vec<T>* gv = reinterpret_cast<const Vec<T>*>(dy);
    Vec<T>* dv = reinterpret_cast<Vec<T>*>(dx);
    for (int64_t j = i; j < nvec; j += stride) {
      Vec<T> a = xv[j];
      Vec<T> g = gv[j];
#pragma unroll
      for (int k = 0; k < N; ++k) {
        a.v[k] = from_f<T>(2.0f * relu_nan(to_f(a.v[k])) * to_f(g.v[k]));
      }
      dv[j] = a;
    }
    start_tail = nvec * N;
  }
  for (int64_t j = start_tail + i; j < n; j += stride) {
    dx[j] = from_f<T>(2.0f * relu_nan(to_f(x[j])) * to_f(dy[j]));
  }
}

inline bool aligned16(std::uintptr_t p) { return (p & 15u) == 0; }

template <typename T>
void launch_fwd(std::uintptr_t x, std::uintptr_t y, int64_t n, cudaStream_t stream) {
  const int threads = 256;
  const bool vec = aligned16(x) && aligned16(y);
  const int64_t work = vec ? (n + Vec<T>::N - 1) / Vec<T>::N : n;
  // A grid-stride loop with enough blocks to fill every SM several times over.
  const int blocks = static_cast<int>(std::min<int64_t>((work + threads - 1) / threads, 65535));
  if (blocks == 0) return;
  if (vec) {
    relu2_fwd_kernel<T, true><<<blocks, threads, 0, stream>>>(reinterpret_cast<const T*>(x), reinterpret_cast<T*>(y), n);
  } else {
    relu2_fwd_kernel<T, false><<<blocks, threads, 0, stream>>>(reinterpret_cast<const T*>(x), reinterpret_cast<T*>(y), n);
  }
  check_cuda(cudaGetLastError(), "relu2_fwd launch");
}

template <typename T>
void launch_bwd(std::uintptr_t x, std::uintptr_t dy, std::uintptr_t dx, int64_t n, cudaStream_t stream) {
  const int threads = 256;
  const bool vec = aligned16(x) && aligned16(dy) && aligned16(dx);
  const int64_t work = vec ? (n + Vec<T>::N - 1) / Vec<T>::N : n;
  const int blocks = static_cast<int>(std::min<int64_t>((work + threads - 1) / threads, 65535));
  if (blocks == 0) return;
  if (vec) {
    relu2_bwd_kernel<T, true><<<blocks, threads, 0, stream>>>(
        reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(dy), reinterpret_cast<T*>(dx), n);
  } else {
    relu2_bwd_kernel<T, false><<<blocks, threads, 0, stream>>>(
        reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(dy), reinterpret_cast<T*>(dx), n);
  }
  check_cuda(cudaGetLastError(), "relu2_bwd launch");
}

}  // namespace

void relu2_forward(std::uintptr_t x, std::uintptr_t y, int64_t n, int dtype, std::uintptr_t stream) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: launch_fwd<float>(x, y, n, as_stream(stream)); break;
    case DType::kFloat16: launch_fwd<__half>(x, y, n, as_stream(stream)); break;
    case DType::kBFloat16: launch_fwd<__nv_bfloat16>(x, y, n, as_stream(stream)); break;
    default: throw std::invalid_argument("relu2_forward: dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  }
}

void relu2_backward(std::uintptr_t x, std::uintptr_t dy, std::uintptr_t dx, int64_t n, int dtype,
                    std::uintptr_t stream) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: launch_bwd<float>(x, dy, dx, n, as_stream(stream)); break;
    case DType::kFloat16: launch_bwd<__half>(x, dy, dx, n, as_stream(stream)); break;
    case DType::kBFloat16: launch_bwd<__nv_bfloat16>(x, dy, dx, n, as_stream(stream)); break;
    default: throw std::invalid_argument("relu2_backward: dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  }
}

}  // namespace fm_engine
