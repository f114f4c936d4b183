// Launcher interface between the torch binding (fastnets.cpp, compiled by the host C++
// compiler against torch headers) and the CUDA kernels (bias_act.cu, compiled by nvcc
// with no torch headers). Raw pointers and an opaque stream keep the two independent.
#pragma once
#include <cstdint>

namespace fastnets {

enum class DType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };

// Activation ids, shared with kernels/activation.py's ACTIVATIONS.
enum Act : int { kIdentity = 0, kRelu, kLeakyRelu, kGelu, kGeluTanh, kSilu, kTanh, kSigmoid, kQuickGelu };

// Forward when dy == nullptr (out = act(x + bias), or act(gate) * up when gated), else the
// gradient of the pre-activation x + bias (out shaped like x). x: (M, C) contiguous; bias:
// (C,) of x's dtype or nullptr. Returns nullptr on success, else the CUDA error string.
const char* bias_act_launch(DType dtype, const void* x, const void* bias, const void* dy, void* out, int64_t M,
                            int64_t C, int act, bool gated, float slope, void* stream);

}  // namespace fastnets
