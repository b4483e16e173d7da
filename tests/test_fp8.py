"""FP8 base matmuls (`model.base_matmul: fp8`): quantisation, the frozen linear's forward and input gradient
against dequantised references, the error against bf16, and the One4D model with its block linears in FP8."""
import copy

import pytest
import torch
from torch import nn

from one4d_train.model.config import ModelConfig
from one4d_train.model.dlc import BranchLoRALinear
from one4d_train.model.fp8 import (E4M3_MAX, FP8Linear, convert_frozen_linears, quantize_rows,
                                   require_fp8_tensor_cores)
from one4d_train.model.one4d import build_one4d

from test_dlc import model_inputs, randomise_trainable, tiny_cfg, tiny_one4d


def reference_linear(x, weight, bias=None):
    """What `FP8Linear` computes, from dequantised operands in fp32: the same rounding of the inputs, an exact
    product."""
    qx, sx = quantize_rows(x.reshape(-1, x.shape[-1]))
    qw, sw = quantize_rows(weight)
    y = torch.nn.functional.linear(qx.float() * sx, qw.float() * sw).to(x.dtype).view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias.to(y.dtype)


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def frozen_linear(k=64, n=96, seed=0, bias=True) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    if bias:
        with torch.no_grad():
            lin.bias.normal_()
    return lin.requires_grad_(False)


def test_quantize_rows_scales_each_row_to_the_fp8_range():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 256, generator=g) * torch.logspace(-3, 3, 8)[:, None]  # rows six decades apart
    x[3] = 0.0
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and q.is_contiguous() and scale.shape == (8, 1)
    back = q.float() * scale
    live = [i for i in range(8) if i != 3]
    assert torch.equal(q[3].float(), torch.zeros(256))
    for i in live:
        assert q[i].float().abs().max() == E4M3_MAX  # each row's largest value lands on the top of the range
        normal = x[i].abs() > x[i].abs().max() / 2 ** 6  # e4m3: 3 mantissa bits, <= 2^-4 relative rounding
        err = ((back[i] - x[i]).abs() / x[i].abs())[normal]
        assert err.max() <= 2 ** -4 + 1e-6


def skewed_linear(k=64, n=96, seed=0, bias=True) -> nn.Linear:
    """A frozen bf16 linear whose rows and columns differ in magnitude by decades, so scaling along the wrong axis
    shows up as a large error."""
    lin = frozen_linear(k, n, seed, bias).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-2, 2, n)[:, None] * torch.logspace(2, -2, k)[None, :])
    return lin


def test_fp8_linear_matches_the_dequantised_reference():
    lin = skewed_linear()
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(3, 10, 64, generator=g) * torch.logspace(-3, 3, 10)[None, :, None]).to(torch.bfloat16)
    fp8 = FP8Linear.from_linear(copy.deepcopy(lin))
    product = FP8Linear.from_linear(skewed_linear(bias=False))(x)
    assert product.shape == (3, 10, 96) and product.dtype == torch.bfloat16
    want = reference_linear(x, lin.weight)
    for row in range(10):  # each token row on its own: rows six decades apart
        assert rel(product[:, row], want[:, row]) < 3e-3, row  # same rounded operands, bf16 output rounding
    assert torch.equal(fp8(x), product + lin.bias)  # the bias, once, in the input's dtype
    assert torch.equal(fp8(torch.zeros_like(x)), lin.bias.expand(3, 10, 96))
    assert fp8(x[:0]).shape == (0, 10, 96)  # no rows: nothing to scale, still a linear


def test_fp8_where_there_are_no_fp8_tensor_cores_is_refused_by_key(monkeypatch):
    """An FP8 run or an export trained in FP8 on an A100 (8.0): a ValueError from the model's build, after the
    process group had started; `one4d train` and `one4d eval` refuse it by key before."""
    from one4d_train.model.fp8 import fp8_problems

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    ((key, why),) = fp8_problems("fp8", torch.device("cuda", 0))
    assert key == "model.base_matmul" and why.startswith("fp8: needs FP8 tensor cores (compute capability >= 8.9)")
    assert fp8_problems("bf16", torch.device("cuda", 0)) == fp8_problems("fp8", torch.device("cpu")) == []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8_problems("fp8", torch.device("cuda", 0)) == []


def test_fp8_linear_in_fp32_models_returns_fp32():
    lin = skewed_linear(bias=False).float()
    x = torch.randn(5, 64)
    y = FP8Linear.from_linear(copy.deepcopy(lin))(x)
    assert y.dtype == torch.float32
    assert rel(y, reference_linear(x, lin.weight)) < 3e-3


def test_fp8_input_gradient_is_the_fp8_product_with_the_weight():
    lin = skewed_linear()
    w = lin.weight
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 64, dtype=torch.bfloat16, requires_grad=True)
    grad = (torch.randn(40, 96, generator=g) * torch.logspace(-3, 3, 40)[:, None]).to(torch.bfloat16)
    FP8Linear.from_linear(copy.deepcopy(lin))(x).backward(grad)
    qg, sg = quantize_rows(grad)
    qw, sw = quantize_rows(w.t())  # the backward scales the weight per input channel
    want = (qg.float() * sg) @ (qw.float() * sw).t()
    for row in range(40):
        assert rel(x.grad[row], want[row]) < 3e-3, row
    exact = grad.float() @ w.float()
    assert 5e-3 < rel(x.grad, exact) < 6e-2  # FP8 rounding is there, and bounded


def test_fp8_error_against_bf16_is_bounded_and_real():
    torch.manual_seed(1)
    lin = nn.Linear(512, 512).requires_grad_(False)
    x = torch.randn(256, 512)
    exact = lin(x)
    low = copy.deepcopy(lin).to(torch.bfloat16)
    fp8 = FP8Linear.from_linear(copy.deepcopy(low))(x.to(torch.bfloat16))
    bf16 = low(x.to(torch.bfloat16))
    assert rel(bf16, exact) < 1e-2
    assert 1e-2 < rel(fp8, exact) < 6e-2  # ~3.7% on Gaussian data: FP8 really ran, within its rounding


def test_from_linear_shares_parameters_and_keys():
    lin = frozen_linear()
    fp8 = FP8Linear.from_linear(lin, "blocks.0.ffn.0")
    assert fp8.weight is lin.weight and fp8.bias is lin.bias
    assert list(fp8.state_dict()) == list(lin.state_dict())


def test_from_linear_rejects_trainable_and_unaligned_layers():
    with pytest.raises(ValueError, match=r"blocks\.1\.ffn\.2 \(64 -> 96\).*frozen"):
        FP8Linear.from_linear(nn.Linear(64, 96), "blocks.1.ffn.2")
    with pytest.raises(ValueError, match=r"self_attn\.q \(60 -> 96\).*multiples of 16"):
        FP8Linear.from_linear(frozen_linear(60, 96), "self_attn.q")


def test_fp8_needs_fp8_tensor_cores(monkeypatch):
    require_fp8_tensor_cores(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    require_fp8_tensor_cores(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # A100
    with pytest.raises(ValueError, match=r"compute capability >= 8\.9.*cuda:0 has 8\.0"):
        require_fp8_tensor_cores(torch.device("cuda", 0))


def test_config_accepts_only_known_base_matmuls():
    assert not ModelConfig(base_matmul="fp8").validate()
    problems = ModelConfig(base_matmul="fp16").validate()
    assert [key for key, _ in problems] == ["base_matmul"]


def test_one4d_with_fp8_base_converts_only_frozen_block_linears():
    model, _ = tiny_one4d(base_matmul="fp8")
    reference, _ = tiny_one4d()
    fp8_names = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    branch = {n for n, m in model.named_modules() if isinstance(m, BranchLoRALinear)}
    assert fp8_names == {f"{n}.base_layer" for n in branch}  # every block linear is a LoRA target by default
    assert all(n.startswith("base.blocks.") for n in fp8_names)
    assert not any(isinstance(m, FP8Linear) for m in model.base.head.modules())
    assert list(model.state_dict()) == list(reference.state_dict())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in reference.named_parameters() if p.requires_grad}
    assert convert_frozen_linears(model.base.blocks) == []  # nothing left to convert


def test_one4d_fp8_forward_and_gradients_track_the_bf16_model():
    """Same seeded bf16 model with and without FP8 base matmuls: outputs within FP8's rounding, and the
    trainable parameters' gradients pointing the same way."""
    results = []
    for base_matmul in ("bf16", "fp8"):
        model = build_one4d(tiny_cfg(base_matmul=base_matmul), "cpu", torch.bfloat16, seed=3)
        randomise_trainable(model)
        v_rgb, v_xyz = model(*model_inputs())
        (v_rgb.float().square().mean() + v_xyz.float().square().mean()).backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad])
        results.append((torch.cat([v_rgb.flatten(), v_xyz.flatten()]), grads))
    (out16, grad16), (out8, grad8) = results
    assert torch.isfinite(out8).all() and torch.isfinite(grad8).all()
    assert 1e-3 < rel(out8, out16) < 0.1, rel(out8, out16)
    cosine = torch.nn.functional.cosine_similarity(grad8, grad16, dim=0).item()
    assert cosine > 0.99, cosine
