// Launcher interface of the persistent recurrent kernel (rnn_persistent.cu, nvcc, no torch
// headers) for the torch binding (fastnets.cpp). Raw pointers and an opaque stream.
#pragma once
#include <cstddef>

#include "bias_act.h"  // DType

namespace fastnets {

// Shared memory one CTA needs (bytes) for `cell` (0 LSTM, 1 GRU, 2 RNN tanh, 3 RNN relu).
size_t rnn_persistent_smem(int cell, int H, int block_j, DType dtype);

// One cooperative launch of ceil(H / block_j) CTAs running all T steps. `barrier`: two
// zeroed unsigned ints in device memory. Returns nullptr on success, else the CUDA error.
const char* rnn_persistent_fwd_launch(DType dtype, int cell, const void* xg, const void* h0, const float* c0,
                                      const void* w_hh, const void* b_hn, const long long* lengths, void* hseq,
                                      float* cseq, void* save, unsigned int* barrier, int T, int B, int H,
                                      int block_j, bool reverse, void* stream);

}  // namespace fastnets
