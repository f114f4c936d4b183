// Fused bias + activation (and gated SwiGLU / GeGLU), forward and backward.
//
// Memory-bound: one read of x (+ the bias, which stays in L1/L2) and one write per element.
// Each thread handles VEC contiguous elements with 16-byte loads/stores when the pointers
// are 16-byte aligned, else scalar accesses. A grid-stride loop keeps the grid at a few
// waves of the SMs. Math is float32 (float64 for double).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "bias_act.h"

namespace fastnets {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename A>
__device__ __forceinline__ A act_fwd(A z, int act, A slope) {
  switch (act) {
    // Comparisons are written so a NaN falls through to the branch that propagates it.
    case kRelu: return z < A(0) ? A(0) : z;
    case kLeakyRelu: return z < A(0) ? z * slope : z;
    case kGelu: return A(0.5) * z * (A(1) + erf(z * A(0.7071067811865476)));
    case kGeluTanh: return A(0.5) * z * (A(1) + tanh(A(0.7978845608028654) * (z + A(0.044715) * z * z * z)));
    case kSilu: return z / (A(1) + exp(-z));
    case kTanh: return tanh(z);
    case kSigmoid: return A(1) / (A(1) + exp(-z));
    case kQuickGelu: return z / (A(1) + exp(A(-1.702) * z));
    default: return z;
  }
}

template <typename A>
__device__ __forceinline__ A act_grad(A z, int act, A slope) {
  switch (act) {
    case kRelu: return z <= A(0) ? A(0) : A(1);
    case kLeakyRelu: return z <= A(0) ? slope : A(1);
    case kGelu:
      return A(0.5) * (A(1) + erf(z * A(0.7071067811865476))) + z * exp(A(-0.5) * z * z) * A(0.3989422804014327);
    case kGeluTanh: {
      A t = tanh(A(0.7978845608028654) * (z + A(0.044715) * z * z * z));
      return A(0.5) * (A(1) + t) + A(0.5) * z * (A(1) - t * t) * A(0.7978845608028654) * (A(1) + A(0.134145) * z * z);
    }
    case kSilu: {
      A s = A(1) / (A(1) + exp(-z));
      return s * (A(1) + z * (A(1) - s));
    }
    case kTanh: {
      A t = tanh(z);
      return A(1) - t * t;
    }
    case kSigmoid: {
      A s = A(1) / (A(1) + exp(-z));
      return s * (A(1) - s);
    }
    case kQuickGelu: {
      A s = A(1) / (A(1) + exp(A(-1.702) * z));
      return s + A(1.702) * z * s * (A(1) - s);
    }
    default: return A(1);
  }
}

template <typename A, typename T> __device__ __forceinline__ A to_acc(T v) { return static_cast<A>(v); }
template <> __device__ __forceinline__ float to_acc<float, __half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T, typename A> __device__ __forceinline__ T from_acc(A v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) { return __float2bfloat16_rn(v); }

// Non-gated: x, dy, out are (M, C) contiguous; element e has column e % C.
template <typename T, int VEC, bool BACKWARD>
__global__ void bias_act_kernel(const T* __restrict__ x, const T* __restrict__ bias, const T* __restrict__ dy,
                                T* __restrict__ out, int64_t numel, int64_t C, int act, float slope) {
  using A = typename Acc<T>::type;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x * VEC;
  for (int64_t base = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; base < numel; base += stride) {
    T xv[VEC], dv[VEC], ov[VEC];
    const bool full = VEC > 1 && base + VEC <= numel;
    if constexpr (VEC > 1) {
      if (full) {  // VEC * sizeof(T) == 16: one 128-bit transaction per operand
        *reinterpret_cast<uint4*>(xv) = *reinterpret_cast<const uint4*>(x + base);
        if (BACKWARD) *reinterpret_cast<uint4*>(dv) = *reinterpret_cast<const uint4*>(dy + base);
      }
    }
    if (!full) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        xv[i] = base + i < numel ? x[base + i] : x[0];
        if (BACKWARD) dv[i] = base + i < numel ? dy[base + i] : dy[0];
      }
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      A z = to_acc<A>(xv[i]);
      if (bias != nullptr) z += to_acc<A>(bias[(base + i) % C]);
      const A r = BACKWARD ? to_acc<A>(dv[i]) * act_grad<A>(z, act, A(slope)) : act_fwd<A>(z, act, A(slope));
      ov[i] = from_acc<T>(r);
    }
    if constexpr (VEC > 1) {
      if (full) *reinterpret_cast<uint4*>(out + base) = *reinterpret_cast<const uint4*>(ov);
    }
    if (!full) {
#pragma unroll
      for (int i = 0; i < VEC; ++i)
        if (base + i < numel) out[base + i] = ov[i];
    }
  }
}

// Gated: x / dx are (M, 2H) rows [gate | up]; y / dy are (M, H). Scalar accesses: the two
// halves are contiguous runs, so each warp still reads whole sectors.
template <typename T, bool BACKWARD>
__global__ void gated_act_kernel(const T* __restrict__ x, const T* __restrict__ bias, const T* __restrict__ dy,
                                 T* __restrict__ out, int64_t numel, int64_t H, int act, float slope) {
  using A = typename Acc<T>::type;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < numel; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = e / H, col = e - row * H, g = row * 2 * H + col;
    A a = to_acc<A>(x[g]), u = to_acc<A>(x[g + H]);
    if (bias != nullptr) {
      a += to_acc<A>(bias[col]);
      u += to_acc<A>(bias[H + col]);
    }
    if (BACKWARD) {
      const A d = to_acc<A>(dy[e]);
      out[g] = from_acc<T>(d * u * act_grad<A>(a, act, A(slope)));
      out[g + H] = from_acc<T>(d * act_fwd<A>(a, act, A(slope)));
    } else {
      out[e] = from_acc<T>(act_fwd<A>(a, act, A(slope)) * u);
    }
  }
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
cudaError_t launch(const void* xv, const void* biasv, const void* dyv, void* outv, int64_t M, int64_t C, int act,
                   bool gated, float slope, cudaStream_t stream) {
  const T* x = static_cast<const T*>(xv);
  const T* bias = static_cast<const T*>(biasv);
  const T* dy = static_cast<const T*>(dyv);
  T* out = static_cast<T*>(outv);
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  constexpr int threads = 256;
  auto grid_for = [&](int64_t work) {
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, int64_t(sms) * 8)));
  };
  if (gated) {
    const int64_t numel = M * (C / 2);
    if (numel == 0) return cudaSuccess;
    if (dy) gated_act_kernel<T, true><<<grid_for(numel), threads, 0, stream>>>(x, bias, dy, out, numel, C / 2, act, slope);
    else gated_act_kernel<T, false><<<grid_for(numel), threads, 0, stream>>>(x, bias, dy, out, numel, C / 2, act, slope);
  } else {
    const int64_t numel = M * C;
    if (numel == 0) return cudaSuccess;
    constexpr int VEC = 16 / sizeof(T);
    if (aligned16(x) && aligned16(dy) && aligned16(out)) {
      const int grid = grid_for((numel + VEC - 1) / VEC);
      if (dy) bias_act_kernel<T, VEC, true><<<grid, threads, 0, stream>>>(x, bias, dy, out, numel, C, act, slope);
      else bias_act_kernel<T, VEC, false><<<grid, threads, 0, stream>>>(x, bias, dy, out, numel, C, act, slope);
    } else {
      const int grid = grid_for(numel);
      if (dy) bias_act_kernel<T, 1, true><<<grid, threads, 0, stream>>>(x, bias, dy, out, numel, C, act, slope);
      else bias_act_kernel<T, 1, false><<<grid, threads, 0, stream>>>(x, bias, dy, out, numel, C, act, slope);
    }
  }
  return cudaGetLastError();
}

}  // namespace

const char* bias_act_launch(DType dtype, const void* x, const void* bias, const void* dy, void* out, int64_t M,
                            int64_t C, int act, bool gated, float slope, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  cudaError_t err = cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kHalf: err = launch<__half>(x, bias, dy, out, M, C, act, gated, slope, stream); break;
    case DType::kBFloat16: err = launch<__nv_bfloat16>(x, bias, dy, out, M, C, act, gated, slope, stream); break;
    case DType::kFloat: err = launch<float>(x, bias, dy, out, M, C, act, gated, slope, stream); break;
    case DType::kDouble: err = launch<double>(x, bias, dy, out, M, C, act, gated, slope, stream); break;
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace fastnets
