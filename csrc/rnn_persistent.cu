// Host side of the persistent recurrent kernel for fastnets._C: template dispatch and the
// cooperative launch (which fails, instead of deadlocking at the grid barrier, when the grid
// cannot be resident all at once).
#include <cuda_runtime.h>

#include "rnn_persistent.cuh"
#include "rnn_persistent.h"

namespace fastnets {
namespace {

int elem_size(DType d) { return d == DType::kFloat ? 4 : d == DType::kDouble ? 8 : 2; }

struct Args {
  const void *xg, *h0;
  const float* c0;
  const void *w_hh, *b_hn;
  const long long* lengths;
  void* hseq;
  float* cseq;
  void* save;
  unsigned int* barrier;
  int T, B, H, block_j, reverse;
};

template <typename T, int CELL>
cudaError_t launch(const Args& a, size_t smem, cudaStream_t stream) {
  auto kernel = rnn::rnn_persistent_fwd_kernel<T, CELL>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const int grid = (a.H + a.block_j - 1) / a.block_j;
  const T* xg = static_cast<const T*>(a.xg);
  const T* h0 = static_cast<const T*>(a.h0);
  const T* w = static_cast<const T*>(a.w_hh);
  const T* bhn = static_cast<const T*>(a.b_hn);
  T* hseq = static_cast<T*>(a.hseq);
  T* save = static_cast<T*>(a.save);
  const float* c0 = a.c0;
  const long long* lengths = a.lengths;
  float* cseq = a.cseq;
  unsigned int* barrier = a.barrier;
  int T_steps = a.T, B = a.B, H = a.H, BJ = a.block_j, reverse = a.reverse;
  void* args[] = {&xg, &h0, &c0, &w, &bhn, &lengths, &hseq, &cseq, &save, &barrier, &T_steps, &B, &H, &BJ, &reverse};
  return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(grid), dim3(rnn::kThreads), args,
                                     smem, stream);
}

template <typename T>
cudaError_t launch_cell(int cell, const Args& p, size_t smem, cudaStream_t stream) {
  switch (cell) {
    case rnn::kLSTM: return launch<T, rnn::kLSTM>(p, smem, stream);
    case rnn::kGRU: return launch<T, rnn::kGRU>(p, smem, stream);
    case rnn::kTanh: return launch<T, rnn::kTanh>(p, smem, stream);
    case rnn::kRelu: return launch<T, rnn::kRelu>(p, smem, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

size_t rnn_persistent_smem(int cell, int H, int block_j, DType dtype) {
  return rnn::smem_bytes(cell, H, block_j, elem_size(dtype));
}

const char* rnn_persistent_fwd_launch(DType dtype, int cell, const void* xg, const void* h0, const float* c0,
                                      const void* w_hh, const void* b_hn, const long long* lengths, void* hseq,
                                      float* cseq, void* save, unsigned int* barrier, int T, int B, int H,
                                      int block_j, bool reverse, void* stream_ptr) {
  Args p{xg, h0, c0, w_hh, b_hn, lengths, hseq, cseq, save, barrier, T, B, H, block_j, reverse ? 1 : 0};
  const size_t smem = rnn_persistent_smem(cell, H, block_j, dtype);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  cudaError_t err = cudaMemsetAsync(barrier, 0, 2 * sizeof(unsigned int), stream);
  if (err == cudaSuccess) {
    switch (dtype) {
      case DType::kHalf: err = launch_cell<__half>(cell, p, smem, stream); break;
      case DType::kBFloat16: err = launch_cell<__nv_bfloat16>(cell, p, smem, stream); break;
      case DType::kFloat: err = launch_cell<float>(cell, p, smem, stream); break;
      default: err = cudaErrorInvalidValue;  // float64 takes the per-step Triton path
    }
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace fastnets
