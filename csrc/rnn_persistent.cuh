// Persistent recurrent kernel: one launch runs a whole sequence of one layer and direction.
//
// Device code only, and only CUDA's own half/bfloat16 headers: the same text is compiled by
// nvcc into fastnets._C (csrc/rnn_persistent.cu) and at run time by NVRTC through CuPy
// (fastnets/ops/rnn_persistent.py), which needs no toolkit on the user's machine.
//
// Why persistent: the per-step path relaunches and rereads W_hh (G*H x H) from L2/HBM
// every step; at small batch each step is a few microseconds of math behind a launch and a
// full weight read. Here each CTA owns BJ hidden units (all G gates of them), keeps their
// G*BJ rows of W_hh in shared memory for the whole sequence, and the CTAs meet at a
// grid-wide barrier between steps (every CTA must be resident: the launcher uses a
// cooperative launch, and dispatch keeps the grid within one CTA per SM).
//
// Per step and per chunk of BB batch rows: the previous state h_{t-1}[b0:b0+BB, :] is
// staged in shared memory (read with ld.global.cg: it was written by other SMs, so L1 must
// not serve it); each warp takes gate rows and each lane a strided run of k, accumulating
// BB dot products in float32 registers (one W element feeds BB FMAs), then reduces across
// the warp with shuffles; the pointwise cell update (the same formulas, outputs and saved
// activations as kernels/rnn.py's per-step kernel, so one backward serves both) runs on
// (unit, row) threads. Variable lengths freeze finished rows' state, as there.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastnets {
namespace rnn {

enum Cell : int { kLSTM = 0, kGRU = 1, kTanh = 2, kRelu = 3 };
constexpr int kThreads = 256;
constexpr int kBB = 8;  // batch rows per chunk: the number of accumulators per lane

template <typename T> __device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// L2-only load: data written by other SMs during this launch.
template <typename T> __device__ __forceinline__ T load_cg(const T* p) {
  const unsigned short bits = __ldcg(reinterpret_cast<const unsigned short*>(p));
  return *reinterpret_cast<const T*>(&bits);
}
template <> __device__ __forceinline__ float load_cg<float>(const float* p) { return __ldcg(p); }

__device__ __forceinline__ float sigmoid_f(float z) { return 1.f / (1.f + __expf(-z)); }
__device__ __forceinline__ float tanh_f(float z) { return tanhf(z); }

constexpr __host__ __device__ int gates_of(int cell) { return cell == kLSTM ? 4 : cell == kGRU ? 3 : 1; }
constexpr __host__ __device__ int saved_of(int cell) { return cell <= kGRU ? 4 : 1; }

// Sense-reversing grid barrier on two global counters (zeroed before the launch).
__device__ __forceinline__ void grid_barrier(unsigned int* count, volatile unsigned int* generation,
                                             unsigned int nblocks) {
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int gen = *generation;
    __threadfence();  // this CTA's writes of h_t / c_t before its arrival
    if (atomicAdd(count, 1u) == nblocks - 1) {
      *count = 0;
      __threadfence();
      atomicAdd(const_cast<unsigned int*>(generation), 1u);
    } else {
      while (*generation == gen) __nanosleep(20);
    }
    __threadfence();
  }
  __syncthreads();
}

// Byte offset of the float gate sums: after W_hh's rows and the staged state, 16-aligned.
constexpr __host__ __device__ size_t gate_sums_offset(int cell, int H, int block_j, int elem) {
  return ((static_cast<size_t>(gates_of(cell)) * block_j + kBB) * H * elem + 15) / 16 * 16;
}

// Flat arguments (no struct), so NVRTC callers pass plain pointers and ints:
//   xg (T, B, G*H) input projections, biases folded (GRU's b_hn aside); h0 (B, H);
//   c0 (B, H) float32 (LSTM, else null); w_hh (G*H, H); b_hn (H,) GRU or null; lengths (B,)
//   int64 or null; out: hseq (T, B, H), cseq (T, B, H) float32 (LSTM), save (T, B, S*H)
//   (LSTM i f g o, GRU r z n hn, RNN h); barrier: two zeroed counters.
template <typename T, int CELL>
__global__ void __launch_bounds__(kThreads)
    rnn_persistent_fwd_kernel(const T* __restrict__ xg, const T* __restrict__ h0, const float* c0,
                              const T* __restrict__ w, const T* __restrict__ bhn, const long long* lengths, T* hseq,
                              float* cseq, T* save, unsigned int* barrier, int T_steps, int B, int H, int BJ,
                              int reverse) {
  constexpr int G = gates_of(CELL);
  constexpr int S = saved_of(CELL);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int rows = G * BJ;
  T* w_s = reinterpret_cast<T*>(smem_raw);                 // (G*BJ, H): gate g, unit jj at row g*BJ + jj
  T* h_s = w_s + static_cast<size_t>(rows) * H;           // (BB, H)
  float* g_s = reinterpret_cast<float*>(smem_raw + gate_sums_offset(CELL, H, BJ, sizeof(T)));  // (G*BJ, BB)
  const int j0 = blockIdx.x * BJ;

  for (int e = threadIdx.x; e < rows * H; e += kThreads) {
    const int r = e / H, k = e - r * H, g = r / BJ, jj = r - g * BJ;
    const int j = j0 + jj;
    w_s[e] = j < H ? w[static_cast<size_t>(g * H + j) * H + k] : from_f<T>(0.f);
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const size_t step_bh = static_cast<size_t>(B) * H;
  for (int s = 0; s < T_steps; ++s) {
    const int t = reverse ? T_steps - 1 - s : s;
    const int tp = reverse ? t + 1 : t - 1;
    const T* hp = s == 0 ? h0 : hseq + static_cast<size_t>(tp) * step_bh;
    const float* cp = s == 0 ? c0 : cseq + static_cast<size_t>(tp) * step_bh;
    for (int b0 = 0; b0 < B; b0 += kBB) {
      for (int e = threadIdx.x; e < kBB * H; e += kThreads) {
        const int bb = e / H, k = e - bb * H;
        h_s[e] = b0 + bb < B ? load_cg(hp + static_cast<size_t>(b0 + bb) * H + k) : from_f<T>(0.f);
      }
      __syncthreads();
      for (int r = warp; r < rows; r += kThreads / 32) {
        float acc[kBB];
#pragma unroll
        for (int bb = 0; bb < kBB; ++bb) acc[bb] = 0.f;
        const T* wr = w_s + static_cast<size_t>(r) * H;
        for (int k = lane; k < H; k += 32) {
          const float wv = to_f(wr[k]);
#pragma unroll
          for (int bb = 0; bb < kBB; ++bb) acc[bb] += wv * to_f(h_s[bb * H + k]);
        }
#pragma unroll
        for (int bb = 0; bb < kBB; ++bb) {
          float v = acc[bb];
#pragma unroll
          for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
          if (lane == 0) g_s[r * kBB + bb] = v;
        }
      }
      __syncthreads();
      for (int e = threadIdx.x; e < BJ * kBB; e += kThreads) {
        const int jj = e / kBB, bb = e - jj * kBB;
        const int j = j0 + jj, b = b0 + bb;
        if (j >= H || b >= B) continue;
        const bool live = lengths == nullptr || t < lengths[b];
        const T* x = xg + (static_cast<size_t>(t) * B + b) * (G * H) + j;
        T* sv = save + (static_cast<size_t>(t) * B + b) * (S * H) + j;
        const size_t o = static_cast<size_t>(t) * step_bh + static_cast<size_t>(b) * H + j;
        const float hprev = to_f(h_s[bb * H + j]);
        float h;
        if (CELL == kLSTM) {
          const float i = sigmoid_f(g_s[(0 * BJ + jj) * kBB + bb] + to_f(x[0]));
          const float f = sigmoid_f(g_s[(1 * BJ + jj) * kBB + bb] + to_f(x[H]));
          const float gg = tanh_f(g_s[(2 * BJ + jj) * kBB + bb] + to_f(x[2 * H]));
          const float og = sigmoid_f(g_s[(3 * BJ + jj) * kBB + bb] + to_f(x[3 * H]));
          const float c_prev = cp[static_cast<size_t>(b) * H + j];
          float c = f * c_prev + i * gg;
          h = og * tanh_f(c);
          if (!live) c = c_prev;
          cseq[o] = c;
          sv[0] = from_f<T>(i); sv[H] = from_f<T>(f); sv[2 * H] = from_f<T>(gg); sv[3 * H] = from_f<T>(og);
        } else if (CELL == kGRU) {
          float hn = g_s[(2 * BJ + jj) * kBB + bb];
          if (bhn != nullptr) hn += to_f(bhn[j]);
          const float r = sigmoid_f(g_s[(0 * BJ + jj) * kBB + bb] + to_f(x[0]));
          const float z = sigmoid_f(g_s[(1 * BJ + jj) * kBB + bb] + to_f(x[H]));
          const float n = tanh_f(to_f(x[2 * H]) + r * hn);
          h = (1.f - z) * n + z * hprev;
          sv[0] = from_f<T>(r); sv[H] = from_f<T>(z); sv[2 * H] = from_f<T>(n); sv[3 * H] = from_f<T>(hn);
        } else {
          const float a = g_s[jj * kBB + bb] + to_f(x[0]);
          h = CELL == kTanh ? tanh_f(a) : (a < 0.f ? 0.f : a);
          sv[0] = from_f<T>(h);
        }
        hseq[o] = from_f<T>(live ? h : hprev);
      }
      __syncthreads();
    }
    grid_barrier(barrier, barrier + 1, gridDim.x);
  }
}

// Shared memory a launch needs: the CTA's W_hh rows, one staged state chunk, the gate sums.
constexpr __host__ __device__ size_t smem_bytes(int cell, int H, int block_j, int elem) {
  return gate_sums_offset(cell, H, block_j, elem) + static_cast<size_t>(gates_of(cell)) * block_j * kBB * sizeof(float);
}

}  // namespace rnn
}  // namespace fastnets
