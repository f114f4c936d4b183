// fastnets._C: argument checks, allocation and the Python bindings. Host code only, against
// torch's CPU-side headers; the CUDA kernels sit behind plain launchers (bias_act.h). The
// caller passes the current CUDA stream handle and has made x's device current.
#include <torch/extension.h>

#include <string>

#include "bias_act.h"

#define FN_CHECK(cond, ...) TORCH_CHECK(cond, __VA_ARGS__)
#define FN_CHECK_CUDA(x, name) FN_CHECK((x).is_cuda(), name " must be a CUDA tensor")
#define FN_CHECK_CONTIGUOUS(x, name) FN_CHECK((x).is_contiguous(), name " must be contiguous")
#define FN_CHECK_SAME(x, y, xname, yname)                                                        \
  FN_CHECK((x).scalar_type() == (y).scalar_type() && (x).device() == (y).device(), xname " and " \
           yname " must have the same dtype and device")

namespace fastnets {
namespace {

int act_id(const std::string& name, bool* gated) {
  static const char* names[] = {"identity", "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid"};
  *gated = name == "swiglu" || name == "geglu" || name == "geglu_tanh";
  const std::string base = name == "swiglu" ? "silu" : name == "geglu" ? "gelu" : name == "geglu_tanh" ? "gelu_tanh" : name;
  for (int i = 0; i < 8; ++i)
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

}  // namespace fastnets

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastnets CUDA kernels";
  m.def("bias_act_fwd", &fastnets::bias_act_fwd, "act(x + bias): (M, C) -> (M, C), or (M, C/2) when gated",
        py::arg("x"), py::arg("bias"), py::arg("activation"), py::arg("slope"), py::arg("stream"));
  m.def("bias_act_bwd", &fastnets::bias_act_bwd, "gradient of the pre-activation x + bias",
        py::arg("dy"), py::arg("x"), py::arg("bias"), py::arg("activation"), py::arg("slope"), py::arg("stream"));
}
