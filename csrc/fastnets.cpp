// fastnets._C: argument checks, allocation and the Python bindings. Host code only, against
// torch's CPU-side headers; the CUDA kernels sit behind plain launchers (bias_act.h). The
// caller passes the current CUDA stream handle and has made x's device current.
#include <torch/extension.h>

#include <string>

#include "bias_act.h"
#include "rnn_persistent.h"

#define FN_CHECK(cond, ...) TORCH_CHECK(cond, __VA_ARGS__)
#define FN_CHECK_CUDA(x, name) FN_CHECK((x).is_cuda(), name " must be a CUDA tensor")
#define FN_CHECK_CONTIGUOUS(x, name) FN_CHECK((x).is_contiguous(), name " must be contiguous")
#define FN_CHECK_SAME(x, y, xname, yname)                                                        \
  FN_CHECK((x).scalar_type() == (y).scalar_type() && (x).device() == (y).device(), xname " and " \
           yname " must have the same dtype and device")

namespace fastnets {
namespace {

int act_id(const std::string& name, bool* gated) {
  static const char* names[] = {"identity", "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "quick_gelu"};
  *gated = name == "swiglu" || name == "geglu" || name == "geglu_tanh";
  const std::string base = name == "swiglu" ? "silu" : name == "geglu" ? "gelu" : name == "geglu_tanh" ? "gelu_tanh" : name;
  for (int i = 0; i < 9; ++i)
    if (base == names[i]) return i;
  FN_CHECK(false, "activation: unknown name '", name, "'");
  return 0;
}

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat;
    case at::kDouble: return DType::kDouble;
    default: FN_CHECK(false, "input must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  }
  return DType::kFloat;
}

void run(const at::Tensor& x, const c10::optional<at::Tensor>& bias, const at::Tensor* dy, at::Tensor& out,
         const std::string& activation, double slope, int64_t stream) {
  FN_CHECK_CUDA(x, "input");
  FN_CHECK_CONTIGUOUS(x, "input");
  FN_CHECK(x.dim() == 2, "input must be 2-D (rows, C), got ", x.dim(), " dims");
  bool gated = false;
  const int act = act_id(activation, &gated);
  FN_CHECK(!gated || x.size(1) % 2 == 0, "input: gated activation '", activation, "' needs an even last dim");
  if (bias.has_value()) {
    FN_CHECK_SAME(x, *bias, "input", "bias");
    FN_CHECK_CONTIGUOUS(*bias, "bias");
    FN_CHECK(bias->numel() == x.size(1), "bias must have ", x.size(1), " elements, got ", bias->numel());
  }
  const char* err = bias_act_launch(dtype_of(x), x.data_ptr(), bias.has_value() ? bias->data_ptr() : nullptr,
                                    dy ? dy->data_ptr() : nullptr, out.data_ptr(), x.size(0), x.size(1), act, gated,
                                    static_cast<float>(slope), reinterpret_cast<void*>(stream));
  FN_CHECK(err == nullptr, "bias_act CUDA launch failed: ", err ? err : "");
}

}  // namespace

at::Tensor bias_act_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& bias, const std::string& activation,
                        double slope, int64_t stream) {
  bool gated = false;
  act_id(activation, &gated);
  auto out = at::empty({x.size(0), gated ? x.size(1) / 2 : x.size(1)}, x.options());
  run(x, bias, nullptr, out, activation, slope, stream);
  return out;
}

at::Tensor bias_act_bwd(const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                        const std::string& activation, double slope, int64_t stream) {
  bool gated = false;
  act_id(activation, &gated);
  FN_CHECK_CUDA(dy, "grad_output");
  FN_CHECK_CONTIGUOUS(dy, "grad_output");
  FN_CHECK_SAME(x, dy, "input", "grad_output");
  FN_CHECK(dy.numel() == x.size(0) * (gated ? x.size(1) / 2 : x.size(1)), "grad_output has ", dy.numel(),
           " elements, which does not match the output for input of shape ", x.sizes());
  auto dx = at::empty_like(x);
  run(x, bias, &dy, dx, activation, slope, stream);
  return dx;
}

// The persistent recurrent kernel writes into buffers fastnets/ops/rnn_persistent.py
// allocated (the same ones the per-step Triton path fills), so the backward is shared.
void rnn_persistent_fwd(const at::Tensor& xg, const at::Tensor& h0, const c10::optional<at::Tensor>& c0,
                        const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hn,
                        const c10::optional<at::Tensor>& lengths, at::Tensor& hseq,
                        const c10::optional<at::Tensor>& cseq, at::Tensor& save, at::Tensor& barrier, int64_t cell,
                        int64_t block_j, bool reverse, int64_t stream) {
  FN_CHECK(cell >= 0 && cell <= 3, "cell must be 0 (LSTM), 1 (GRU), 2 (RNN tanh) or 3 (RNN relu), got ", cell);
  for (const at::Tensor* t : {&xg, &h0, &w_hh, static_cast<const at::Tensor*>(&hseq), static_cast<const at::Tensor*>(&save)}) {
    FN_CHECK_CUDA(*t, "rnn_persistent_fwd tensors");
    FN_CHECK_CONTIGUOUS(*t, "rnn_persistent_fwd tensors");
    FN_CHECK_SAME(xg, *t, "xg", "every state / weight tensor");
  }
  FN_CHECK(xg.dim() == 3, "xg must be (T, B, G*H)");
  const int64_t T = xg.size(0), B = xg.size(1), H = w_hh.size(1);
  const int64_t G = cell == 0 ? 4 : cell == 1 ? 3 : 1;
  FN_CHECK(w_hh.size(0) == G * H && xg.size(2) == G * H, "w_hh must be (G*H, H) and xg (T, B, G*H)");
  FN_CHECK(h0.numel() == B * H && hseq.numel() == T * B * H, "h0 must be (B, H) and hseq (T, B, H)");
  FN_CHECK(cell != 0 || (c0.has_value() && cseq.has_value()), "LSTM needs c0 and cseq");
  if (cell == 0) {
    FN_CHECK(c0->scalar_type() == at::kFloat && cseq->scalar_type() == at::kFloat && c0->is_contiguous() &&
             cseq->is_contiguous(), "c0 and cseq must be contiguous float32");
  }
  FN_CHECK(barrier.scalar_type() == at::kInt && barrier.numel() >= 2, "barrier must hold two int32");
  if (lengths.has_value()) FN_CHECK(lengths->scalar_type() == at::kLong && lengths->numel() == B, "lengths: (B,) int64");
  const char* err = rnn_persistent_fwd_launch(
      dtype_of(xg), static_cast<int>(cell), xg.data_ptr(), h0.data_ptr(),
      cell == 0 ? c0->data_ptr<float>() : nullptr, w_hh.data_ptr(), b_hn.has_value() ? b_hn->data_ptr() : nullptr,
      lengths.has_value() ? reinterpret_cast<const long long*>(lengths->data_ptr<int64_t>()) : nullptr, hseq.data_ptr(),
      cell == 0 ? cseq->data_ptr<float>() : nullptr, save.data_ptr(),
      reinterpret_cast<unsigned int*>(barrier.data_ptr<int32_t>()), static_cast<int>(T), static_cast<int>(B),
      static_cast<int>(H), static_cast<int>(block_j), reverse, reinterpret_cast<void*>(stream));
  FN_CHECK(err == nullptr, "rnn_persistent_fwd CUDA launch failed: ", err ? err : "");
}

int64_t rnn_persistent_smem_bytes(int64_t cell, int64_t H, int64_t block_j, int64_t elem) {
  return static_cast<int64_t>(rnn_persistent_smem(static_cast<int>(cell), static_cast<int>(H), static_cast<int>(block_j),
                                                  elem == 4 ? DType::kFloat : DType::kHalf));
}

}  // namespace fastnets

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastnets CUDA kernels";
  m.def("bias_act_fwd", &fastnets::bias_act_fwd, "act(x + bias): (M, C) -> (M, C), or (M, C/2) when gated",
        py::arg("x"), py::arg("bias"), py::arg("activation"), py::arg("slope"), py::arg("stream"));
  m.def("bias_act_bwd", &fastnets::bias_act_bwd, "gradient of the pre-activation x + bias",
        py::arg("dy"), py::arg("x"), py::arg("bias"), py::arg("activation"), py::arg("slope"), py::arg("stream"));
  m.def("rnn_persistent_fwd", &fastnets::rnn_persistent_fwd,
        "whole-sequence recurrent forward of one layer and direction in one cooperative launch",
        py::arg("xg"), py::arg("h0"), py::arg("c0"), py::arg("w_hh"), py::arg("b_hn"), py::arg("lengths"),
        py::arg("hseq"), py::arg("cseq"), py::arg("save"), py::arg("barrier"), py::arg("cell"), py::arg("block_j"),
        py::arg("reverse"), py::arg("stream"));
  m.def("rnn_persistent_smem_bytes", &fastnets::rnn_persistent_smem_bytes, "shared memory per CTA",
        py::arg("cell"), py::arg("H"), py::arg("block_j"), py::arg("elem"));
}
