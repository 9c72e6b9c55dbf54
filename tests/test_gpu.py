"""GPU checks (run on a CUDA machine; skipped elsewhere): the torch backend's native grouped GEMM path
really runs on the GPU, and compiled bf16 models match eager there."""

from __future__ import annotations

import pytest
import torch

import moecc
from moecc.backends import torch_backend, triton_backend
from moecc.examples import deepseek_style, mixtral_style

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


@pytest.mark.parametrize("build", [mixtral_style.build, deepseek_style.build], ids=["mixtral", "deepseek"])
def test_bf16_on_gpu_matches_eager_and_uses_native_grouped_mm(build) -> None:
    model, (ids,) = build(dtype=torch.bfloat16, tokens=256)
    model, ids = model.cuda(), ids.cuda()
    before = torch_backend.COUNTERS["grouped_mm.native"] + torch_backend.COUNTERS["grouped_mm_wgrad.native"]
    loops = torch_backend.COUNTERS["grouped_mm.loop"]
    cm = moecc.compile(model, backend="torch")
    out = cm(ids)
    ref = model(ids)
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)
    grads = torch.autograd.grad(_lm_loss(out, ids), list(cm.parameters()), allow_unused=True)
    ref_grads = torch.autograd.grad(_lm_loss(ref, ids), list(model.parameters()), allow_unused=True)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads, strict=True):
        if r is None:
            continue
        scale = r.float().abs().max().item() + 1e-6
        assert (g.float() - r.float()).abs().max().item() <= 5e-2 * scale + 1e-4, name
    after = torch_backend.COUNTERS["grouped_mm.native"] + torch_backend.COUNTERS["grouped_mm_wgrad.native"]
    assert after > before, "torch._grouped_mm did not run on the GPU"
    assert torch_backend.COUNTERS["grouped_mm.loop"] == loops, "the per-expert loop fallback ran on the GPU"
    assert all(r.status == "lifted" for r in cm.regions)


def test_auto_backend_on_gpu_is_triton_and_matches_eager() -> None:
    model, (ids,) = mixtral_style.build(dtype=torch.bfloat16, tokens=256)
    model, ids = model.cuda(), ids.cuda()
    before = triton_backend.COUNTERS["grouped_mm"]
    cm = moecc.compile(model)
    out = cm(ids)
    torch.testing.assert_close(out.float(), model(ids).float(), atol=3e-2, rtol=3e-2)
    _lm_loss(out, ids).backward()
    assert triton_backend.COUNTERS["grouped_mm"] - before == 2 * 2 * len(cm.regions), "Triton kernels did not run"
    assert cm.session.counters()["lower.triton"] > 0


def test_moe_layer_forward_and_backward_capture_in_a_cuda_graph() -> None:
    """No device-to-host synchronisation in a compiled MoE layer (triton backend, one GPU): its forward and
    backward are captured in a CUDA graph and replayed with new inputs, matching eager."""
    torch.manual_seed(0)
    model, (ids,) = mixtral_style.build(dtype=torch.bfloat16, tokens=256)
    moe = model.layers[0].moe.cuda()
    cm = moecc.compile(moe, backend="triton")
    x = torch.randn(2, 128, moe.router.in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    for _ in range(3):  # compile and warm up on a side stream, as CUDA graph capture requires
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            cm(x).backward(g)
        torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        out = cm(x)
        out.backward(g)
    new_x = torch.randn_like(x)
    x.data.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    ref_x = new_x.detach().clone().requires_grad_()
    ref = moe(ref_x)
    ref.backward(g)
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(x.grad.float(), ref_x.grad.float(), atol=3e-2, rtol=3e-2)
