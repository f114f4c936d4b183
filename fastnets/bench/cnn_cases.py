"""CNN benchmark cases: conv2d on ResNet-50's layer shapes (cuDNN, torch.compile), the
fused conv + bias + ReLU + residual block, dgrad and wgrad alone, BatchNorm, pooling, and
a ResNet-50 training step. bf16, channels_last on the GPU (what fast CNN training uses)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from .harness import Case, dtype_size, peers


def _conv_kernels():
    """fastnets.kernels.conv, imported on first use (importing fastnets never imports triton)."""
    from ..kernels import conv
    return conv

# ResNet-50 (v1.5) convolutions: (C_in, C_out, input side, kernel, stride)
RESNET50_CONVS = [
    (3, 64, 224, 7, 2),                                          # stem
    (64, 64, 56, 1, 1), (64, 64, 56, 3, 1), (64, 256, 56, 1, 1),  # layer1
    (128, 128, 56, 3, 2), (512, 128, 28, 1, 1), (128, 128, 28, 3, 1), (128, 512, 28, 1, 1),
    (256, 256, 14, 3, 1), (1024, 256, 14, 1, 1), (256, 1024, 14, 1, 1),
    (512, 512, 7, 3, 1), (2048, 512, 7, 1, 1), (512, 2048, 7, 1, 1),
]


def _cl(t, on):
    return t.contiguous(memory_format=torch.channels_last) if on else t


def conv_cases(device: torch.device, quick: bool) -> list[Case]:
    cuda = device.type == "cuda"
    if cuda:
        batch, dtype, cl = (64 if quick else 128), torch.bfloat16, True
        shapes = [RESNET50_CONVS[i] for i in (0, 2, 5, 9, 11)] if quick else RESNET50_CONVS
    else:
        batch, dtype, cl = 1, torch.float32, False
        shapes = [(3, 8, 16, 3, 1), (8, 16, 8, 1, 2)]
    es = dtype_size(dtype)
    cases = []
    for C, K, H, k, s in shapes:
        pad = k // 2
        P = (H + 2 * pad - k) // s + 1
        label = f"{C}>{K} {k}x{k}/{s} @{H}"
        flops = 2 * batch * K * P * P * C * k * k
        x_bytes, w_bytes, y_bytes = batch * C * H * H * es, K * C * k * k * es, batch * K * P * P * es

        def inputs(dev, C=C, K=K, H=H, k=k, P=P):
            x = _cl(torch.randn(batch, C, H, H, device=dev, dtype=dtype), cl).requires_grad_()
            w = _cl(torch.randn(K, C, k, k, device=dev, dtype=dtype) / (C * k * k) ** 0.5, cl).requires_grad_()
            b = torch.randn(K, device=dev, dtype=dtype, requires_grad=True)
            r = _cl(torch.randn(batch, K, P, P, device=dev, dtype=dtype), cl)
            return x, w, b, r

        impls = {"fastnets": lambda x, w, b, r, s=s, p=pad: ops.conv2d(x, w, None, s, p),
                 **peers(lambda x, w, b, r, s=s, p=pad: F.conv2d(x, w, None, s, p), device)}
        # bwd = dgrad + wgrad: each as many FLOPs as the forward.
        cases.append(Case("conv", "conv2d", label, flops, dtype, inputs, impls,
                          x_bytes + w_bytes + y_bytes, 2 * (x_bytes + w_bytes + y_bytes), flops_fwd=flops,
                          flops_bwd=2 * flops))
        fused = {"fastnets": lambda x, w, b, r, s=s, p=pad: ops.conv2d(x, w, b, s, p, activation="relu", residual=r),
                 **peers(lambda x, w, b, r, s=s, p=pad: F.relu(F.conv2d(x, w, b, s, p) + r), device)}
        cases.append(Case("conv", "conv2d_bias_relu_residual", label, flops, dtype, inputs, fused,
                          x_bytes + w_bytes + 2 * y_bytes, 2 * (x_bytes + w_bytes + y_bytes) + y_bytes,
                          flops_fwd=flops, flops_bwd=2 * flops))
        # dgrad / wgrad alone against cuDNN's (aten.convolution_backward with one output masked in).

        def grad_inputs(dev, C=C, K=K, H=H, k=k, P=P):
            x = _cl(torch.randn(batch, C, H, H, device=dev, dtype=dtype), cl)
            w = _cl(torch.randn(K, C, k, k, device=dev, dtype=dtype), cl)
            dy = _cl(torch.randn(batch, K, P, P, device=dev, dtype=dtype), cl)
            return x, w, dy

        def ours_dgrad(x, w, dy, s=s, p=pad):
                        return _conv_kernels().conv2d_dgrad(dy, w, tuple(x.shape), (s, s), (p, p), (1, 1), 1, like=x)[0]

        def ours_wgrad(x, w, dy, s=s, p=pad):
                        return _conv_kernels().conv2d_wgrad(dy, x, tuple(w.shape), (s, s), (p, p), (1, 1), 1, False, w.dtype)[0]

        def cudnn(mask, s=s, p=pad):
            def fn(x, w, dy):
                out = torch.ops.aten.convolution_backward(dy, x, w, None, [s, s], [p, p], [1, 1], False, [0, 0], 1,
                                                          mask)
                return out[0] if mask[0] else out[1]
            return fn

        for op, ours, mask in (("conv2d_dgrad", ours_dgrad, [True, False, False]),
                               ("conv2d_wgrad", ours_wgrad, [False, True, False])):
            cases.append(Case("conv", op, label, flops, dtype, grad_inputs, {"fastnets": ours, "torch": cudnn(mask)},
                              x_bytes + w_bytes + y_bytes, 0, modes=("fwd",), flops_fwd=flops))
    cases += _conv_transpose_cases(device, quick)
    return cases


def _conv_transpose_cases(device: torch.device, quick: bool) -> list[Case]:
    """DCGAN generator up-sampling blocks: 4x4 kernels, stride 2, padding 1, ReLU fused."""
    cuda = device.type == "cuda"
    batch, dtype, cl = (128, torch.bfloat16, True) if cuda else (1, torch.float32, False)
    shapes = ([(512, 256, 8), (256, 128, 16)] if quick else [(512, 256, 8), (256, 128, 16), (128, 64, 32)]) \
        if cuda else [(8, 4, 4)]
    es = dtype_size(dtype)
    cases = []
    for C, K, H in shapes:
        P = 2 * H
        flops = 2 * batch * C * H * H * K * 16    # every input pixel meets every 4x4 tap once
        nbytes = (batch * C * H * H + C * K * 16 + batch * K * P * P) * es

        def inputs(dev, C=C, K=K, H=H):
            x = _cl(torch.randn(batch, C, H, H, device=dev, dtype=dtype), cl).requires_grad_()
            w = (torch.randn(C, K, 4, 4, device=dev, dtype=dtype) / (C * 4) ** 0.5).requires_grad_()
            return x, w, torch.randn(K, device=dev, dtype=dtype, requires_grad=True)

        impls = {"fastnets": lambda x, w, b: ops.conv_transpose2d(x, w, b, 2, 1, activation="relu"),
                 **peers(lambda x, w, b: F.relu(F.conv_transpose2d(x, w, b, 2, 1)), device)}
        cases.append(Case("conv", "conv_transpose2d_relu", f"{C}>{K} 4x4/2 @{H}", flops, dtype, inputs, impls,
                          nbytes, 2 * nbytes, flops_fwd=flops, flops_bwd=2 * flops))
    return cases


def bn_pool_cases(device: torch.device, quick: bool) -> list[Case]:
    cuda = device.type == "cuda"
    if cuda:
        batch, dtype, cl = (64 if quick else 128), torch.bfloat16, True
        bn_shapes = [(64, 112), (256, 56)] if quick else [(64, 112), (256, 56), (512, 28), (1024, 14), (2048, 7)]
    else:
        batch, dtype, cl = 2, torch.float32, False
        bn_shapes = [(8, 8)]
    es = dtype_size(dtype)
    cases = []
    for C, H in bn_shapes:
        numel = batch * C * H * H

        def bn_inputs(dev, C=C, H=H):
            x = _cl(torch.randn(batch, C, H, H, device=dev, dtype=dtype), cl).requires_grad_()
            return (x, torch.ones(C, device=dev, requires_grad=True), torch.zeros(C, device=dev, requires_grad=True))

        impls = {"fastnets": lambda x, w, b: ops.batch_norm(x, None, None, w, b, True, activation="relu"),
                 **peers(lambda x, w, b: F.relu(F.batch_norm(x, None, None, w, b, True)), device)}
        # Minimal traffic: fwd reads x, writes y; bwd reads x and dy, writes dx.
        cases.append(Case("bn_pool", "batch_norm_relu_train", f"{batch}x{C}x{H}x{H}", numel, dtype, bn_inputs, impls,
                          2 * numel * es, 3 * numel * es))
    pool_shapes = ([(64, 112)] if quick else [(64, 112), (128, 56)]) if cuda else [(8, 16)]
    for C, H in pool_shapes:
        numel_in, numel_out = batch * C * H * H, batch * C * ((H - 1) // 2 + 1) ** 2

        def pool_inputs(dev, C=C, H=H):
            return (_cl(torch.randn(batch, C, H, H, device=dev, dtype=dtype), cl).requires_grad_(),)

        impls = {"fastnets": lambda x: ops.max_pool2d(x, 3, 2, 1), **peers(lambda x: F.max_pool2d(x, 3, 2, 1), device)}
        # fwd: read x, write y (+ int64 indices when training, counted: they are real traffic);
        # bwd: read dy and indices, write dx.
        cases.append(Case("bn_pool", "max_pool2d_3x3s2", f"{batch}x{C}x{H}x{H}", numel_in, dtype, pool_inputs, impls,
                          (numel_in + numel_out) * es, numel_out * (es + 8) + numel_in * es))
    gap_c, gap_h = (2048, 7) if cuda else (8, 4)
    numel = batch * gap_c * gap_h * gap_h

    def gap_inputs(dev):
        return (_cl(torch.randn(batch, gap_c, gap_h, gap_h, device=dev, dtype=dtype), cl).requires_grad_(),)

    impls = {"fastnets": lambda x: ops.adaptive_avg_pool2d(x, 1), **peers(lambda x: F.adaptive_avg_pool2d(x, 1), device)}
    cases.append(Case("bn_pool", "global_avg_pool", f"{batch}x{gap_c}x{gap_h}x{gap_h}", numel, dtype, gap_inputs, impls,
                      numel * es, numel * es))
    return cases


def resnet50_cases(device: torch.device, quick: bool) -> list[Case]:
    """One training step (forward + backward, no optimizer) of ResNet-50 at 224x224, bf16
    autocast, channels_last. Peers: torchvision's resnet50 eager and torch.compile'd, when
    torchvision is installed. The 'size' is the batch; images/s = batch / ms * 1000."""
    if device.type != "cuda":
        return []  # minutes per step under the interpreter
    from .. import models
    batch = 32 if quick else 128
    ours = models.resnet50().to(device).to(memory_format=torch.channels_last)

    def step(model):
        def fn(x):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model(x).float()
        return fn

    impls = {"fastnets": step(ours)}
    try:
        import torchvision
        theirs = torchvision.models.resnet50().to(device).to(memory_format=torch.channels_last)
        theirs.load_state_dict(ours.state_dict())
        impls["torch"] = step(theirs)
        impls["torch.compile"] = step(torch.compile(theirs))
    except ImportError:
        pass

    def inputs(dev):
        return (torch.randn(batch, 3, 224, 224, device=dev).contiguous(memory_format=torch.channels_last),)

    flops = 3 * 4.1e9 * batch  # forward ~4.1 GFLOPs/image, backward twice that
    return [Case("model", "resnet50_train_step", f"batch {batch}", batch, torch.bfloat16, inputs, impls,
                 batch * 3 * 224 * 224 * 4, 0, modes=("fwd_bwd",), flops_fwd=int(flops / 3),
                 flops_bwd=int(2 * flops / 3),
                 check_rel=0.05)]
