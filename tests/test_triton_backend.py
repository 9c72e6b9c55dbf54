"""The triton backend's grouped GEMM kernels (forward, dX, dW), on the CPU under TRITON_INTERPRET=1 (set
in conftest where there is no GPU), against the torch backend; and a model compiled with backend="triton"."""

from __future__ import annotations

import pytest
import torch

import moecc
from moecc import ops
from moecc.backends import torch_backend, triton_backend, triton_ep
from moecc.examples import deepseek_style, mixtral_style


@pytest.fixture(autouse=True)
def _needs_triton_device() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not triton_backend.available(device):
        pytest.skip("triton kernels need a GPU or TRITON_INTERPRET=1")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _segments(counts: list[int]) -> torch.Tensor:
    return torch.cumsum(torch.tensor(counts), 0).to(torch.int32).to(_device())


def test_wgrad_tiles_follow_the_rows_an_expert_has() -> None:
    """dW takes 128 x 256 tiles where experts have WGRAD_LONG_ROWS rows or more on average (Mixtral- and
    Qwen3-like), 256 x 128 below (DeepSeek-like, 256 rows an expert); both give the torch backend's result."""
    gen = torch.Generator().manual_seed(3)
    E, K, N = 2, 16, 32
    for rows, long in ((triton_backend.WGRAD_LONG_ROWS, True), (triton_backend.WGRAD_LONG_ROWS // 2, False)):
        x = torch.randn(E * rows, K, generator=gen).to(_device())
        dy = torch.randn(E * rows, N, generator=gen).to(_device())
        offs = _segments([rows - 3, rows + 3])
        before = triton_backend.COUNTERS["grouped_mm_wgrad.long_tiles"]
        want = torch_backend.grouped_mm_wgrad(x, dy, offs)  # sums of ~500 products: float32's order shows
        got = triton_backend.grouped_mm_wgrad(x, dy, offs)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
        assert triton_backend.COUNTERS["grouped_mm_wgrad.long_tiles"] == before + int(long), rows


def test_gluon_wgrad_says_why_it_does_not_run_and_the_triton_kernel_runs_instead(monkeypatch) -> None:
    """Off a Hopper GPU the warp-specialised dW kernel is not taken, for a stated reason, and the Triton dW
    kernel computes the product (counted as such); MOECC_GLUON=0 turns it off on a Hopper GPU too."""
    from moecc.backends import gluon_wgrad

    x, dy = torch.randn(40, 16), torch.randn(40, 32)
    offs = torch.tensor([17, 40], dtype=torch.int32)
    why = gluon_wgrad.supported(x, dy, 2, long=False)
    assert why is not None and ("Hopper" in why or "Gluon" in why), why
    monkeypatch.setenv("MOECC_GLUON", "0")
    assert gluon_wgrad.supported(x, dy, 2, long=False) == "MOECC_GLUON=0"
    monkeypatch.delenv("MOECC_GLUON")
    if not triton_backend.available(x.device):
        pytest.skip("the Triton kernels need TRITON_INTERPRET=1 on the CPU")
    before = dict(triton_backend.COUNTERS)
    got = triton_backend.grouped_mm_wgrad(x, dy, offs)
    torch.testing.assert_close(got, torch_backend.grouped_mm_wgrad(x, dy, offs), rtol=1e-4, atol=1e-4)
    assert triton_backend.COUNTERS["grouped_mm_wgrad.gluon"] == before.get("grouped_mm_wgrad.gluon", 0)
    assert triton_backend.COUNTERS["grouped_mm_wgrad.descriptor"] == before.get("grouped_mm_wgrad.descriptor", 0) + 1


def test_the_gluon_fused_gemms_say_why_they_do_not_run(monkeypatch) -> None:
    """The Gluon gathering and scattering GEMMs state why they do not take a call: off a Hopper GPU, with
    MOECC_GLUON=0, and (past those) for operands they cannot address; operands they can take get None."""
    from moecc.backends import gluon_gemm, gluon_wgrad

    bf = torch.bfloat16
    a, w = torch.randn(256, 128, dtype=bf), torch.randn(2, 128, 256, dtype=bf)
    for check in (gluon_gemm.supported, gluon_gemm.dispatch_supported):
        why = check(a, w, 128)
        assert why is not None and ("Hopper" in why or "Gluon" in why), why
    monkeypatch.setenv("MOECC_GLUON", "0")
    assert gluon_gemm.dispatch_supported(a, w, 128) == gluon_gemm.supported(a, w, 128) == "MOECC_GLUON=0"
    monkeypatch.setenv("MOECC_GLUON", "off")  # not a guess: an error naming the values it takes
    with pytest.raises(ValueError, match=r"MOECC_GLUON='off': expected 1 .* or 0"):
        gluon_gemm.dispatch_supported(a, w, 128)
    monkeypatch.delenv("MOECC_GLUON")
    monkeypatch.setattr(gluon_wgrad, "_common_refusal", lambda t, device=None: None)  # as on a Hopper GPU
    assert gluon_gemm.dispatch_supported(a, w, 128) is None
    assert gluon_gemm.dispatch_supported(a, w.transpose(1, 2).contiguous().transpose(1, 2), 128) is None
    assert "m-tiles are 64 rows" in gluon_gemm.dispatch_supported(a, w, 64)
    assert "dtype" in gluon_gemm.dispatch_supported(a, w.half(), 128)
    a_odd, w_odd = torch.randn(256, 100, dtype=bf), torch.randn(2, 100, 256, dtype=bf)
    assert "K=100 not a multiple of 64" in gluon_gemm.dispatch_supported(a_odd, w_odd, 128)
    assert "weight strides" in gluon_gemm.dispatch_supported(a, w[:, :, :255], 128)


def test_kernel_choices_name_each_fused_gemms_kernel_and_why_not_gluon(monkeypatch) -> None:
    """`triton_ep.kernel_choices` (the fuse pass's record in the dumps) predicts each fused GEMM's kernel from
    meta tensors with the same functions the calls decide by: as on a Hopper GPU, the Qwen3-like layer takes the
    Gluon kernel everywhere, the Mixtral-like one the Triton scattering GEMMs (K above gluon_gemm.MAX_K), a
    hidden size the gathering GEMM cannot tile the Triton one, and a switched-off kernel says so."""
    from moecc.backends import gluon_gemm, gluon_wgrad, triton_ep

    monkeypatch.setattr(gluon_wgrad, "_common_refusal", lambda t, device=None: None)  # as on a Hopper GPU
    bf, cuda = torch.bfloat16, torch.device("cuda")

    def linear(E: int, n_in: int, n_out: int) -> torch.Tensor:  # nn.Linear's layout, seen as [E, in, out]
        return torch.empty(E, n_out, n_in, dtype=bf, device="meta").transpose(1, 2)

    qwen = triton_ep.kernel_choices(cuda, bf, 64, 8, 2, 2048, linear(4, 2048, 1536), linear(4, 768, 2048))
    assert len(qwen) == 6 and set(qwen.values()) == {"gluon"}, qwen
    mixtral = triton_ep.kernel_choices(cuda, bf, 64, 2, 2, 4096, linear(4, 4096, 28672), linear(4, 14336, 4096))
    why_not = f"triton: K=14336 above {gluon_gemm.MAX_K}, where the Triton kernel is as fast"
    assert mixtral["GEMM 2 + combine"] == why_not
    assert mixtral["dX of GEMM 1 + combine"].startswith("triton: K=28672 above")
    assert mixtral["dispatch + GEMM 1"] == mixtral["dW of GEMM 1"] == "gluon"
    odd = triton_ep.kernel_choices(cuda, bf, 64, 8, 2, 2000, linear(4, 2000, 1536), linear(4, 768, 2000))
    assert odd["dispatch + GEMM 1"].startswith("triton: K=2000 not a multiple of 64"), odd
    assert odd["dW of GEMM 2"].startswith("triton: K=2000 not a multiple of"), odd
    monkeypatch.setattr(triton_ep, "GLUON_DISPATCH", False)
    off = triton_ep.kernel_choices(cuda, bf, 64, 8, 2, 2048, linear(4, 2048, 1536), linear(4, 768, 2048))
    assert off["dispatch + GEMM 1"] == "triton: switched off (triton_ep.GLUON_DISPATCH)"
    assert off["GEMM 2 + combine"] == "gluon"


def test_a_gluon_kernel_that_triton_cannot_build_is_named_with_the_way_back() -> None:
    """A Triton error while compiling or fitting a Gluon kernel (another Triton's Gluon) becomes moecc's error,
    naming the kernel, the Triton version and MOECC_GLUON=0; other errors pass through unchanged."""
    from triton.runtime.errors import OutOfResources

    from moecc.backends import gluon_wgrad
    from moecc.options import MoeccError

    def too_big() -> None:
        raise OutOfResources(260000, 232448, "shared memory")

    with pytest.raises(MoeccError, match=r"gluon_wgrad._wgrad_ws_kernel failed with Triton .*MOECC_GLUON=0"):
        gluon_wgrad.launch("gluon_wgrad._wgrad_ws_kernel", too_big)

    def other() -> None:
        raise ValueError("not Triton's")

    with pytest.raises(ValueError, match="not Triton's"):
        gluon_wgrad.launch("gluon_wgrad._wgrad_ws_kernel", other)


@pytest.mark.parametrize(
    "counts,S",
    [([10, 0, 17, 3, 12], 50), ([40, 0, 0, 0], 40), ([0, 0, 0], 8), ([1, 2, 33, 5, 0, 7, 16, 9], 73)],
    ids=["empty-expert-and-dropped-rows", "one-expert", "no-rows", "ragged"],
)
def test_grouped_mm_matches_torch_backend(counts: list[int], S: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_backend, "DESCRIPTOR_MIN_K", 0)  # descriptor loads at these small shapes too
    # both dW tile orders at these small shapes (a GPU's L2 holds them: it would take only one)
    monkeypatch.setattr(triton_backend, "past_half_l2", lambda nbytes, device: True)
    gen = torch.Generator().manual_seed(sum(counts) + S)
    E, K, N = len(counts), 24, 40
    x = torch.randn(S, K, generator=gen).to(_device())
    w = torch.randn(E, K, N, generator=gen).to(_device())
    dy = torch.randn(S, N, generator=gen).to(_device())
    offs = _segments(counts)
    before = dict(triton_backend.COUNTERS)
    torch.testing.assert_close(triton_backend.grouped_mm(x, w, offs), torch_backend.grouped_mm(x, w, offs))
    torch.testing.assert_close(  # dX takes the weights transposed: a strided view
        triton_backend.grouped_mm(dy, w.transpose(1, 2), offs), torch_backend.grouped_mm(dy, w.transpose(1, 2), offs)
    )
    dw = triton_backend.grouped_mm_wgrad(x, dy, offs)  # dy the wider: in bands of n-tiles
    torch.testing.assert_close(dw, torch_backend.grouped_mm_wgrad(x, dy, offs))
    assert triton_backend._wgrad_banded(x, dy, E) and not triton_backend._wgrad_banded(dy, x, E)
    torch.testing.assert_close(  # and k-tile by k-tile
        triton_backend.grouped_mm_wgrad(dy, x, offs), torch_backend.grouped_mm_wgrad(dy, x, offs)
    )
    for e, c in enumerate(counts):
        if c == 0:
            assert not dw[e].any(), "an expert with no rows gets a zero gradient"
    # strides a tensor descriptor cannot address (every other column) take the pointer kernels: the same results
    wide = torch.zeros(S, 2 * N, device=dy.device)
    wide[:, ::2] = dy
    torch.testing.assert_close(triton_backend.grouped_mm_wgrad(x, wide[:, ::2], offs), dw)
    torch.testing.assert_close(
        triton_backend.grouped_mm(wide[:, ::2], w.transpose(1, 2), offs),
        torch_backend.grouped_mm(dy, w.transpose(1, 2), offs),
    )
    monkeypatch.setattr(triton_backend, "DESCRIPTOR_MIN_K", K + 1)  # a short inner dimension: pointer loads
    torch.testing.assert_close(triton_backend.grouped_mm(x, w, offs), torch_backend.grouped_mm(x, w, offs))
    assert triton_backend.COUNTERS["grouped_mm"] == before.get("grouped_mm", 0) + 4
    for kernel, calls in (("grouped_mm.descriptor", 2), ("grouped_mm.pointer", 2), ("grouped_mm_wgrad.descriptor", 2),
                          ("grouped_mm_wgrad.pointer", 1)):  # fmt: skip
        assert triton_backend.COUNTERS[kernel] == before.get(kernel, 0) + calls, kernel
    # a scale (sync_grads' 1/W) is applied in the kernel, in both backends alike
    torch.testing.assert_close(triton_backend.grouped_mm_wgrad(x, dy, offs, 0.375), dw * 0.375)
    torch.testing.assert_close(torch_backend.grouped_mm_wgrad(x, dy, offs, 0.375), dw * 0.375)
    torch.library.opcheck(ops.triton_grouped_mm, (x, w, offs), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.triton_grouped_mm_wgrad, (x, dy, offs), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "grouped_gemms"])
@pytest.mark.parametrize("build", [mixtral_style.build, deepseek_style.build], ids=["mixtral", "deepseek"])
def test_model_on_triton_backend_matches_eager(build, fused: bool) -> None:
    model, (ids,) = build(tokens=16)
    model, ids = model.to(_device()), ids.to(_device())
    # the Triton grouped GEMMs (the default; grouped_gemm="native" / "auto" are tested below)
    cm = moecc.compile(model, backend="triton", disable_passes=[] if fused else ["fuse"], grouped_gemm="triton")
    before, before_ep = dict(triton_backend.COUNTERS), dict(triton_ep.COUNTERS)
    out = cm(ids)
    ref = model(ids)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(cm.parameters()), g, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), g, allow_unused=True)
    for a, b in zip(grads, ref_grads, strict=True):
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

    def ran(counters: dict, name: str, was: dict) -> int:
        return counters[name] - was.get(name, 0)

    regions = len(cm.regions)
    counters = cm.session.counters()
    # the kernels really ran: 2 dW GEMMs per region in both forms
    assert ran(triton_backend.COUNTERS, "grouped_mm_wgrad", before) == 2 * regions
    if fused:  # one fused dispatch+GEMM and one GEMM+combine per region, forward and backward
        assert counters.get("fuse.fused") == regions and counters.get("fuse.refused", 0) == 0
        for name in triton_ep.PHASE_COUNTERS:
            assert ran(triton_ep.COUNTERS, name, before_ep) == regions, name
        assert ran(triton_backend.COUNTERS, "grouped_mm", before) == 0
        # the GLU between the fused ops stops at the plan's row count (both models have GLU experts)
        assert ran(triton_backend.COUNTERS, "glu_rows", before) == regions
        assert ran(triton_backend.COUNTERS, "glu_rows_backward", before) == regions
        assert ran(triton_backend.COUNTERS, "glu", before) == 0
    else:  # 2 GEMMs per region forward, 2 dX backward; the combine and its backward in one pass each
        assert ran(triton_backend.COUNTERS, "grouped_mm", before) == 4 * regions
        # the GLU between the GEMMs reads its row count from their offsets (the last expert's end)
        assert ran(triton_backend.COUNTERS, "glu_rows", before) == regions
        assert ran(triton_backend.COUNTERS, "glu_rows_backward", before) == regions
        assert ran(triton_backend.COUNTERS, "glu", before) == 0 and counters["lower.glu_rows"] == 2 * regions
        assert ran(triton_backend.COUNTERS, "unpermute_combine", before) == regions
        assert ran(triton_backend.COUNTERS, "unpermute_combine_backward", before) == regions
        assert ran(triton_backend.COUNTERS, "route_permute_backward", before) == regions
        assert ran(triton_ep.COUNTERS, "dispatch_gemm.forward", before_ep) == 0
    assert counters["lower.triton"] > 0


def _native_dtype() -> torch.dtype:
    """torch._grouped_mm runs bfloat16 on CUDA, float32 (and bfloat16) on the CPU."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


@pytest.mark.parametrize("counts,S", [([10, 0, 17, 3, 12], 50), ([0, 0, 0], 8), ([5, 7], 12)],
                         ids=["empty-expert-and-room", "no-rows", "full"])  # fmt: skip
def test_native_grouped_mm_keeps_the_triton_kernels_contract(counts: list[int], S: int) -> None:
    """native_grouped_mm(_wgrad): torch._grouped_mm with the rows past the last expert's end zeroed (NaN rows
    there in x do not leak), an expert without rows given a zero gradient, the scale and acc applied."""
    dt, dev = _native_dtype(), _device()
    gen = torch.Generator().manual_seed(S)
    E, K, N, end = len(counts), 32, 48, sum(counts)
    x = torch.randn(S, K, generator=gen).to(dev, dt)
    w = torch.randn(E, K, N, generator=gen).to(dev, dt)
    dy = torch.randn(S, N, generator=gen).to(dev, dt)
    x[end:], dy[end:] = float("nan"), float("nan")  # the room past the end: anything
    acc = torch.randn(E, K, N, generator=gen).to(dev, dt)
    offs = _segments(counts)
    before = dict(triton_backend.COUNTERS)
    y = ops.native_grouped_mm(x, w, offs)
    ref = torch_backend.grouped_mm(x[:end].float(), w.float(), offs)
    tol = dict(atol=3e-2, rtol=2e-2) if dt == torch.bfloat16 else {}
    torch.testing.assert_close(y[:end].float(), ref, **tol)
    assert y.shape == (S, N) and not y[end:].any(), "rows past the end are zero"
    y_t = ops.native_grouped_mm(dy, w.transpose(1, 2), offs)  # dX: the weights as a transposed view
    assert not y_t[end:].any()
    # 12 output columns (24 bytes a row in bfloat16: the native kernel pads its rows), weights in nn.Linear's
    # layout: still a contiguous result, as the op's fake says
    w12 = torch.randn(E, 12, K, generator=gen).to(dev, dt).transpose(1, 2)
    y12 = ops.native_grouped_mm(x, w12, offs)
    assert y12.is_contiguous() and not y12[end:].any()
    torch.testing.assert_close(y12[:end].float(), torch_backend.grouped_mm(x[:end].float(), w12.float(), offs), **tol)
    torch.testing.assert_close(
        y_t[:end].float(), torch_backend.grouped_mm(dy[:end].float(), w.float().transpose(1, 2), offs), **tol
    )
    for scale, a in ((1.0, None), (0.375, None), (0.5, acc)):
        dw = ops.native_grouped_mm_wgrad(x, dy, offs, scale, a)
        want = torch_backend.grouped_mm_wgrad(x[:end].float(), dy[:end].float(), offs, scale)
        if a is not None:
            want = want + a.float()
        assert dw.shape == (E, K, N) and dw.dtype == dt and dw.is_contiguous()
        torch.testing.assert_close(dw.float(), want, **(dict(atol=0.3, rtol=3e-2) if tol else {}))
        for e, c in enumerate(counts):
            if c == 0:
                torch.testing.assert_close(dw[e], a[e] if a is not None else torch.zeros_like(dw[e]))
    assert triton_backend.COUNTERS["native_grouped_mm"] - before.get("native_grouped_mm", 0) == 3
    assert triton_backend.COUNTERS["native_grouped_mm_wgrad"] - before.get("native_grouped_mm_wgrad", 0) == 3
    torch.library.opcheck(ops.native_grouped_mm, (x, w, offs), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.native_grouped_mm_wgrad, (x, dy, offs), test_utils=("test_schema", "test_faketensor"))


def test_native_grouped_mm_on_operands_it_cannot_take_runs_the_triton_kernel_and_says_so() -> None:
    """A base pointer off 16 bytes (what the traced strides cannot show): the Triton kernel of the same contract
    runs, counted, with a warning."""
    dt, dev = _native_dtype(), _device()
    x = torch.randn(33 * 32 + 1, device=dev).to(dt)[1:].view(33, 32)  # 2 or 4 bytes past an aligned base
    w = torch.randn(2, 32, 16, device=dev).to(dt)
    offs = _segments([20, 13])
    before = triton_backend.COUNTERS["native_grouped_mm.refused"]
    with pytest.warns(UserWarning, match=r"native_grouped_mm: torch._grouped_mm cannot take these operands"):
        y = ops.native_grouped_mm(x, w, offs)
    torch.testing.assert_close(y, triton_backend.grouped_mm(x.contiguous(), w, offs))
    assert triton_backend.COUNTERS["native_grouped_mm.refused"] == before + 1


def test_fused_ops_under_dynamic_shapes_match_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """dynamic=True with the fused ops (one rank): one program for every sequence length, the symmetric buffers
    allocated for the largest count so far (twice the old room when it grows), each step's output and
    gradients equal to eager's."""
    monkeypatch.setattr(triton_ep, "_SYMMETRIC", {})
    monkeypatch.setattr(triton_ep, "_ALLOCATED", {})
    torch._dynamo.reset()
    model, (ids,) = mixtral_style.build(tokens=16)
    model = model.to(_device())
    cm = moecc.compile(model, backend="triton", grouped_gemm="triton", dynamic=True)
    before = triton_ep.COUNTERS["symmetric.allocations"]
    gen = torch.Generator().manual_seed(3)
    for n in (8, 6, 12, 4):
        x = torch.randint(0, int(ids.max()) + 1, (2, n), generator=gen).to(_device())
        out, ref = cm(x), model(x)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4, msg=f"length {n}")
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, list(cm.parameters()), g, allow_unused=True)
        ref_grads = torch.autograd.grad(ref, list(model.parameters()), g, allow_unused=True)
        for a, b in zip(grads, ref_grads, strict=True):
            if b is not None:
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"length {n}")
    assert cm.session.counters().get("fuse.fused") == len(cm.regions) > 0
    # the dumps say which kernel each of a fused region's GEMMs takes here, and why not the Gluon one
    chosen = {p: k for c in cm.session.contexts for p, k in c.plan.get("fused_kernels", {}).items()}
    assert set(chosen) == {r.path for r in cm.regions}, chosen
    for kernels in chosen.values():
        assert len(kernels) == 6 and all(v == "gluon" or v.startswith("triton: ") for v in kernels.values()), kernels
        if torch.device(_device()).type == "cpu":
            assert set(kernels.values()) == {"triton: not a Hopper GPU"}, kernels
    notes = [n for c in cm.session.contexts for n in c.notes if n.startswith("kernels of ")]
    assert len(notes) == len(chosen) and all("dW of GEMM 2: " in n for n in notes), notes
    assert len(cm.session.graphs) == 1
    assert triton_ep.COUNTERS["symmetric.allocations"] - before == 2  # 16 tokens, then 32 (at 24)


def _unfused(grouped_gemm: str, **kw) -> tuple[torch.nn.Module, moecc.CompiledModule, torch.Tensor]:
    model, (ids,) = mixtral_style.build(tokens=16)
    model, ids = model.to(_device(), _native_dtype()), ids.to(_device())
    return model, moecc.compile(model, backend="triton", disable_passes=["fuse"], grouped_gemm=grouped_gemm, **kw), ids


def test_grouped_gemm_native_runs_the_model_on_torch_grouped_mm(tmp_path) -> None:
    """grouped_gemm="native": every plain grouped GEMM of the unfused path (2 forward, 2 dX, 2 dW a region) on
    torch._grouped_mm, with the results of the Triton kernels' model; recorded in the plan and the dumps."""
    model, cm, ids = _unfused("native", dump_dir=tmp_path)
    _, tri, _ = _unfused("triton")
    tri.load_state_dict(cm.state_dict())
    before = dict(triton_backend.COUNTERS)
    out = cm(ids)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(cm.parameters()), g)
    native_ran = {k: triton_backend.COUNTERS[k] - before.get(k, 0) for k in ("native_grouped_mm",
                  "native_grouped_mm_wgrad", "grouped_mm", "grouped_mm_wgrad")}  # fmt: skip
    regions = len(cm.regions)
    assert native_ran == {"native_grouped_mm": 4 * regions, "native_grouped_mm_wgrad": 2 * regions,
                          "grouped_mm": 0, "grouped_mm_wgrad": 0}, native_ran  # fmt: skip
    ref = tri(ids)
    ref_grads = torch.autograd.grad(ref, list(tri.parameters()), g)
    tol = dict(atol=5e-2, rtol=5e-2) if _native_dtype() == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, ref, **tol)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, **tol)
    if _native_dtype() == torch.float32:  # and eager's numbers
        torch.testing.assert_close(out, model(ids), atol=1e-4, rtol=1e-4)
    choices = {k: v for ctx in cm.session.contexts for k, v in ctx.plan.get("grouped_gemm", {}).items()}
    assert len(choices) == 6 * regions and {c["kernel"] for c in choices.values()} == {"native"}
    assert cm.session.counters()["lower.native_grouped_mm"] == 6 * regions
    dumped = "\n".join(p.read_text() for p in tmp_path.rglob("*") if p.is_file())
    assert "native_grouped_mm" in dumped and "on torch._grouped_mm" in dumped


def test_grouped_gemm_auto_keeps_native_where_it_times_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """The "auto" rule on timings (patched here; a GPU measures them): native where it takes at most 97 % of the
    Triton kernel's time, Triton otherwise, each choice with its timings in the plan; "triton" times nothing;
    on the CPU nothing is timed and Triton stays."""
    import torch.fx as fx

    from moecc import cost
    from moecc.options import CompileOptions
    from moecc.pass_manager import CompileContext, Mesh
    from moecc.passes import lower_backend

    if not torch.cuda.is_available():
        _, cm, ids = _unfused("auto")
        cm(ids)
        choices = [c for ctx in cm.session.contexts for c in ctx.plan.get("grouped_gemm", {}).values()]
        assert choices and all(c["kernel"] == "triton" and c["why"] == "auto: timed on a GPU only" for c in choices)

    def graph() -> fx.GraphModule:
        g = fx.Graph()
        x, w, offs, dy = (g.placeholder(n) for n in ("x", "w", "offs", "dy"))
        for node, v in ((x, torch.randn(64, 32)), (w, torch.randn(4, 32, 16)), (offs, _segments([16] * 4).cpu()),
                        (dy, torch.randn(64, 16))):  # fmt: skip
            node.meta["val"] = v
        y = g.call_function(torch.ops.moecc.triton_grouped_mm.default, (x, w, offs))
        dw = g.call_function(torch.ops.moecc.triton_grouped_mm_wgrad.default, (x, dy, offs))
        g.output((y, dw))
        return fx.GraphModule(torch.nn.Module(), g)

    timed = []
    timings = {"moecc.triton_grouped_mm.default": (100.0, 96.0), "moecc.triton_grouped_mm_wgrad.default": (100.0, 98.0)}

    def fake_time(n: fx.Node, ep: int) -> tuple[float, float]:
        timed.append(str(n.target))
        return timings[str(n.target)]

    monkeypatch.setattr(lower_backend, "time_grouped_gemm", fake_time)
    for mode, want in (("auto", ["native_grouped_mm", "triton_grouped_mm_wgrad"]),
                       ("triton", ["triton_grouped_mm", "triton_grouped_mm_wgrad"]),
                       ("native", ["native_grouped_mm", "native_grouped_mm_wgrad"])):  # fmt: skip
        timed.clear()
        gm = graph()
        ctx = CompileContext(CompileOptions.make(grouped_gemm=mode), Mesh(), cost.PROFILES["cpu"], 0, {})
        choices = lower_backend.choose_grouped_gemms(gm, ctx)
        got = [str(n.target).split(".")[1] for n in gm.graph.nodes if n.op == "call_function"]
        assert got == want, (mode, got)
        assert len(timed) == (2 if mode == "auto" else 0)
        if mode == "auto":
            fwd, wgrad = choices.values()  # in graph order
            assert fwd == {"kernel": "native", "triton_us": 100.0, "native_us": 96.0,
                           "why": "auto: Triton 100 us, torch._grouped_mm 96 us"}  # fmt: skip
            assert wgrad["kernel"] == "triton"  # 98 %: within the margin


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times the kernels on a GPU")
def test_grouped_gemm_auto_times_both_kernels_on_the_gpu() -> None:
    """On a GPU "auto" times both kernels at every plain grouped GEMM's shape, keeps native exactly where the
    rule says, and the model's numbers match the Triton kernels' model."""
    from moecc.passes import lower_backend

    _, cm, ids = _unfused("auto")
    _, tri, _ = _unfused("triton")
    tri.load_state_dict(cm.state_dict())
    out, ref = cm(ids), tri(ids)
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, list(cm.parameters()), g),
                    torch.autograd.grad(ref, list(tri.parameters()), g), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
    choices = [c for ctx in cm.session.contexts for c in ctx.plan.get("grouped_gemm", {}).values()]
    assert len(choices) == 6 * len(cm.regions)
    for c in choices:
        assert c["triton_us"] > 0 and c["native_us"] > 0, c
        native = c["native_us"] <= lower_backend.NATIVE_MARGIN * c["triton_us"]
        assert c["kernel"] == ("native" if native else "triton"), c


def test_grouped_gemm_auto_does_not_time_symbolic_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    """dynamic=True: a grouped GEMM's rows are symbolic; "auto" keeps Triton there and says why."""
    from moecc.passes import lower_backend

    def never(n, ep):
        raise AssertionError(f"timed {n.name}")

    monkeypatch.setattr(lower_backend, "time_grouped_gemm", never)
    _, cm, ids = _unfused("auto", dynamic=True)
    cm(ids).float().sum().backward()
    choices = [c for ctx in cm.session.contexts for c in ctx.plan.get("grouped_gemm", {}).values()]
    assert choices and {c["kernel"] for c in choices} == {"triton"}
    assert {c["why"] for c in choices} == {"auto: symbolic shapes (dynamic=True) are not timed"}, choices


def test_grouped_gemm_option_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(moecc.MoeccError, match=r"grouped_gemm='cublas'.*not one of \('auto', 'triton', 'native'\)"):
        moecc.compile(torch.nn.Linear(2, 2), grouped_gemm="cublas")
    monkeypatch.setenv("MOECC_GROUPED_GEMM", "fast")
    with pytest.raises(moecc.MoeccError, match=r"MOECC_GROUPED_GEMM"):
        moecc.compile(torch.nn.Linear(2, 2))
    model, (ids,) = mixtral_style.build(tokens=16)  # float64: torch._grouped_mm runs float32 and bfloat16
    cm = moecc.compile(model.to(_device(), torch.float64), backend="triton", disable_passes=["fuse"],
                       grouped_gemm="native")  # fmt: skip
    with pytest.raises(moecc.MoeccError, match=r"grouped_gemm='native'\): node .*moecc.triton_grouped_mm.*float64"):
        cm(ids.to(_device()))


@pytest.mark.parametrize("nin,bm", [(1, 16), (5, 16), (40, 128), (257, 128)])
def test_tile_plan_matches_a_search_of_the_cumulative_tiles(nin: int, bm: int) -> None:
    """The device-made tile table: each m-tile's segment is the one whose m-tiles hold it, empty segments
    (no m-tiles) and the tail of dropped rows included."""
    gen = torch.Generator().manual_seed(nin * bm)
    counts = torch.randint(0, 3 * bm, (nin,), generator=gen) * (torch.rand(nin, generator=gen) > 0.3)
    offs = torch.cumsum(counts, 0)
    S = int(offs[-1]) + int(torch.randint(0, 2 * bm, (1,), generator=gen))
    offs_ext, cum, seg = triton_backend.tile_plan(offs.to(torch.int32).to(_device()), S, bm)
    want_offs = torch.cat([offs, torch.tensor([S])])
    sizes = torch.diff(want_offs, prepend=torch.zeros(1, dtype=torch.int64))
    want_cum = torch.cumsum((sizes + bm - 1) // bm, 0)
    assert offs_ext.tolist() == want_offs.tolist() and cum.tolist() == want_cum.tolist()
    n_tiles = int(want_cum[-1])
    owner = torch.repeat_interleave(torch.arange(nin + 1), (sizes + bm - 1) // bm)
    assert seg.shape[0] >= n_tiles and seg[:n_tiles].cpu().tolist() == owner.tolist()


def test_triton_backend_where_it_cannot_run_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_backend, "available", lambda device: False)
    model, (ids,) = mixtral_style.build()
    with pytest.raises(moecc.MoeccError, match="backend='triton' runs on a CUDA device"):
        moecc.compile(model, backend="triton")(ids)


def _glu_reference(h: torch.Tensor, kind: str) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    act = {
        "silu": torch.nn.functional.silu,
        "relu": torch.relu,
        "gelu": torch.nn.functional.gelu,
        "gelu_tanh": lambda g: torch.nn.functional.gelu(g, approximate="tanh"),
    }[kind]
    return act(gate) * up


@pytest.mark.parametrize("kind", torch_backend.GLU_ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_glu_kernel_and_op_match_autograd(kind: str, dtype: torch.dtype) -> None:
    """moecc.glu (torch backend) and its Triton kernel, forward and backward, against autograd through the
    model's own ops, on random rows with a width that is not a multiple of the block (and no rows at all)."""
    gen = torch.Generator().manual_seed(len(kind))
    for S, F in ((37, 21), (0, 8)):
        h = (torch.randn(S, 2 * F, generator=gen) * 2).to(_device(), dtype)
        da = torch.randn(S, F, generator=gen).to(_device(), dtype)
        ref_h = h.float().requires_grad_()
        ref = _glu_reference(ref_h, kind)
        (ref_dh,) = torch.autograd.grad(ref, ref_h, da.float()) if S else (torch.zeros(0, 2 * F),)
        tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
        before = dict(triton_backend.COUNTERS)
        got = triton_backend.glu(h, kind)
        got_dh = triton_backend.glu_backward(da, h, kind)
        assert triton_backend.COUNTERS["glu"] - before.get("glu", 0) == 1
        torch.testing.assert_close(got.float(), ref.detach().to(dtype).float(), **tol)
        torch.testing.assert_close(got_dh.float(), ref_dh.to(dtype).float().cpu().to(_device()), **tol)
        # the op (torch backend) and its autograd formula
        x = h.detach().requires_grad_()
        out = ops.glu(x, kind)
        torch.testing.assert_close(out.float(), ref.detach().to(dtype).float(), **tol)
        if S:
            (dx,) = torch.autograd.grad(out, x, da)
            torch.testing.assert_close(dx.float(), ref_dh.to(dtype).float().to(_device()), **tol)
            # the torch backend runs the model's own ops (and autograd's for them): eager's results to the bit
            hx = h.detach().requires_grad_()
            eager = _glu_reference(hx, kind)
            (eager_dh,) = torch.autograd.grad(eager, hx, da)
            assert torch.equal(out, eager) and torch.equal(dx, eager_dh)


@pytest.mark.parametrize("rows", [0, 1, 23, 37])
def test_ep_glu_computes_only_the_rows_the_plan_counts(rows: int) -> None:
    """ep_glu (the GLU between the fused expert-parallel ops) reads its row count from the plan's first element
    on the device: those rows match the GLU, forward and backward, and the rows past them, which may hold
    anything (NaN here), do not reach them."""
    gen = torch.Generator().manual_seed(rows)
    S, F = 37, 21
    h = torch.randn(S, 2 * F, generator=gen).to(_device())
    h[rows:] = float("nan")
    da = torch.randn(S, F, generator=gen).to(_device())
    plan = torch.tensor([rows, -5, 7], dtype=torch.int32, device=_device())  # the rest of a plan: not read
    before = dict(triton_backend.COUNTERS)
    x = h.clone().requires_grad_()
    out = ops.ep_glu(x, plan, "silu")
    (dx,) = torch.autograd.grad(out, x, da)
    assert triton_backend.COUNTERS["glu_rows"] - before.get("glu_rows", 0) == 1
    assert triton_backend.COUNTERS["glu_rows_backward"] - before.get("glu_rows_backward", 0) == 1
    ref_h = h[:rows].clone().requires_grad_()
    ref = _glu_reference(ref_h, "silu")
    torch.testing.assert_close(out[:rows], ref.detach(), atol=1e-5, rtol=1e-5)
    if rows:
        (ref_dh,) = torch.autograd.grad(ref, ref_h, da[:rows])
        torch.testing.assert_close(dx[:rows], ref_dh, atol=1e-5, rtol=1e-5)
    assert not out[:rows].isnan().any() and not dx[:rows].isnan().any()
    torch.library.opcheck(ops.ep_glu, (h, plan, "silu"), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("end", [0, 1, 23, 37])
def test_glu_rows_stops_at_the_last_experts_end(end: int) -> None:
    """triton_glu_rows / its backward (the GLU `lower` puts between grouped GEMMs over the same offsets) compute
    the rows before offs[-1] only: those match the GLU; the rows past it (a receive buffer's room, NaN here)
    do not reach them and are not computed."""
    gen = torch.Generator().manual_seed(end)
    S, F = 37, 21
    h = torch.randn(S, 2 * F, generator=gen).to(_device())
    h[end:] = float("nan")
    da = torch.randn(S, F, generator=gen).to(_device())
    da[end:] = float("nan")
    offs = torch.tensor([0, end // 3, end // 2, end], dtype=torch.int32, device=_device())  # an empty expert first
    out = ops.triton_glu_rows(h, offs, "gelu")
    dh = ops.triton_glu_rows_backward(da, h, offs, "gelu")
    torch.testing.assert_close(out[:end], triton_backend.glu(h[:end], "gelu"), atol=0, rtol=0)
    torch.testing.assert_close(dh[:end], triton_backend.glu_backward(da[:end], h[:end], "gelu"), atol=0, rtol=0)
    assert not out[:end].isnan().any() and not dh[:end].isnan().any()
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.triton_glu_rows, (h, offs, "gelu"), test_utils=checks)
    torch.library.opcheck(ops.triton_glu_rows_backward, (da, h, offs, "gelu"), test_utils=checks)


@pytest.mark.parametrize("kind", torch_backend.GLU_ACTS)
def test_ep_act_computes_only_the_rows_the_plan_counts(kind: str) -> None:
    """ep_act (a plain expert activation between the fused ops) over the plan's row count only, forward and
    backward against autograd through the model's own activation; the rows past the count (NaN) reach nothing."""
    gen = torch.Generator().manual_seed(len(kind))
    S, F, rows = 37, 21, 23
    h = torch.randn(S, F, generator=gen).to(_device())
    h[rows:] = float("nan")
    da = torch.randn(S, F, generator=gen).to(_device())
    plan = torch.tensor([rows, -5, 7], dtype=torch.int32, device=_device())
    before = dict(triton_backend.COUNTERS)
    x = h.clone().requires_grad_()
    out = ops.ep_act(x, plan, kind)
    (dx,) = torch.autograd.grad(out, x, da)
    assert triton_backend.COUNTERS["act_rows"] - before.get("act_rows", 0) == 1
    assert triton_backend.COUNTERS["act_rows_backward"] - before.get("act_rows_backward", 0) == 1
    ref_h = h[:rows].clone().requires_grad_()
    ref = torch_backend.act(kind, ref_h)
    (ref_dh,) = torch.autograd.grad(ref, ref_h, da[:rows])
    torch.testing.assert_close(out[:rows], ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx[:rows], ref_dh, atol=1e-5, rtol=1e-5)
    torch.library.opcheck(ops.ep_act, (h, plan, kind), test_utils=("test_schema", "test_faketensor"))
    offs = torch.tensor([0, 9, rows], dtype=torch.int32, device=_device())  # the plain path's bound: offs[-1]
    torch.testing.assert_close(ops.triton_act_rows(h, offs, kind)[:rows], out[:rows].detach(), atol=0, rtol=0)
    torch.testing.assert_close(ops.triton_act_rows_backward(da, h, offs, kind)[:rows], dx[:rows], atol=0, rtol=0)
    for op, args in ((ops.triton_act_rows, (h, offs, kind)), (ops.triton_act_rows_backward, (da, h, offs, kind))):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="activation 'tanh' is not one of silu, gelu, gelu_tanh, relu"):
        ops.ep_act(h, plan, "tanh")


class _PlainMoE(torch.nn.Module):
    """Top-2 MoE over bias-free two-layer MLP experts (act(fc1) -> fc2): no GLU between the expert GEMMs."""

    def __init__(self, act: torch.nn.Module, h: int = 16, f: int = 24, e: int = 4) -> None:
        super().__init__()
        self.router = torch.nn.Linear(h, e, bias=False)
        self.experts = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(h, f, bias=False), act, torch.nn.Linear(f, h, bias=False))
            for _ in range(e)
        )

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        w_TK, idx_TK = torch.topk(self.router(x_TH).softmax(-1), 2, dim=-1)
        out_TH = torch.zeros_like(x_TH)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx_TK == e)
            out_TH.index_add_(0, tok, expert(x_TH[tok]) * w_TK[tok, slot, None])
        return out_TH


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "grouped_gemms"])
@pytest.mark.parametrize("act", [torch.nn.GELU(), torch.nn.GELU("tanh"), torch.nn.ReLU(), torch.nn.SiLU()],
                         ids=["gelu", "gelu_tanh", "relu", "silu"])  # fmt: skip
def test_plain_mlp_experts_run_their_activation_over_the_counted_rows(act: torch.nn.Module, fused: bool) -> None:
    """Plain MLP experts: the activation between the fused ops becomes ep_act (the plan's row count), and between
    plain grouped GEMMs `lower` bounds it by their offsets (triton_act_rows and its backward); the layer still
    matches eager, forward and backward."""
    torch.manual_seed(0)
    model = _PlainMoE(act).to(_device())
    x = torch.randn(12, 16, device=_device(), requires_grad=True)
    before = dict(triton_backend.COUNTERS)
    cm = moecc.compile(model, backend="triton", disable_passes=[] if fused else ["fuse"])
    out = cm(x)
    ref_x = x.detach().clone().requires_grad_()
    ref = model(ref_x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    g = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, g)
    (ref_dx,) = torch.autograd.grad(ref, ref_x, g)
    torch.testing.assert_close(dx, ref_dx, atol=1e-4, rtol=1e-4)
    counters = cm.session.counters()
    assert counters.get("fuse.fused", 0) == int(fused), counters
    assert counters.get("lower.act_rows", 0) == (0 if fused else 2), counters  # forward and backward graphs
    assert triton_backend.COUNTERS["act_rows"] - before.get("act_rows", 0) == 1
    assert triton_backend.COUNTERS["act_rows_backward"] - before.get("act_rows_backward", 0) == 1


def test_glu_of_an_unknown_activation_or_odd_width_is_an_error() -> None:
    h = torch.randn(4, 6)
    with pytest.raises(ValueError, match="activation 'tanh' is not one of silu, gelu, gelu_tanh, relu"):
        ops.glu(h, "tanh")
    with pytest.raises(RuntimeError, match="odd last dimension 5; h must be"):
        ops.glu(torch.randn(4, 5), "silu")
    with pytest.raises(Exception, match="odd last dimension 5"):  # traced: the fake says so too
        torch.compile(lambda x: ops.glu(x, "silu"), backend="eager", fullgraph=True)(torch.randn(4, 5))


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16-rows-fp32-gates"])  # fmt: skip
def test_combine_kernels_match_the_torch_backend(dtypes: tuple[torch.dtype, torch.dtype]) -> None:
    """The unfused path's combine in one pass (triton_unpermute_combine and its backward) against the torch
    backend, with rows past offs[-1] (dropped slots, NaN there) that must reach nothing, and both gradients."""
    ydt, wdt = dtypes
    gen = torch.Generator().manual_seed(5)
    T, K, H = 9, 3, 40
    S = T * K
    src = torch.randperm(S, generator=gen).to(_device())
    offs = torch.tensor([5, 5, 14, 21], dtype=torch.int32, device=_device())  # 6 rows past the end: dropped
    y = torch.randn(S, H, generator=gen).to(_device(), ydt)
    y[21:] = float("nan")
    w = torch.rand(T, K, generator=gen).to(_device(), wdt)
    gout = torch.randn(T, H, generator=gen).to(_device(), ydt)
    before = dict(triton_backend.COUNTERS)
    got = triton_backend.unpermute_combine(y, src, offs, w)
    gy, gw = triton_backend.unpermute_combine_backward(gout, y, src, offs, w, True, True)
    want = torch_backend.unpermute_combine(y.nan_to_num(0.0), src, offs, w)
    want_gy, want_gw = torch_backend.unpermute_combine_backward(gout, y.nan_to_num(0.0), src, offs, w, True, True)
    tol = {"atol": 1e-5, "rtol": 1e-5} if ydt == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(gy, want_gy, **tol)
    torch.testing.assert_close(gw, want_gw, **tol)
    assert not got.isnan().any() and not gy.isnan().any() and not gw.isnan().any()
    assert triton_backend.COUNTERS["unpermute_combine"] - before.get("unpermute_combine", 0) == 1
    # only what is asked for
    gy2, gw2 = triton_backend.unpermute_combine_backward(gout, y, src, offs, w, False, True)
    assert gy2 is None and torch.equal(gw2, gw)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.triton_unpermute_combine, (y, src, offs, w), test_utils=checks)
    backward_args = (gout, y, src, offs, w, False, True)
    torch.library.opcheck(ops.triton_unpermute_combine_backward, backward_args, test_utils=checks)


def test_route_permute_backward_kernel_sums_each_tokens_rows() -> None:
    """route_permute's gradient for x in one pass a token against the torch backend's scatter-add, with a
    dropped slot (its row's gradient still reaches its token: the permutation's adjoint) and bf16 rows summed
    in float32."""
    gen = torch.Generator().manual_seed(9)
    T, K, H, E = 7, 3, 40, 4
    idx = torch.randint(0, E, (T, K), generator=gen)
    idx[2, 1] = -1  # dropped
    x = torch.randn(T, H, generator=gen)
    _x_SH, src, _eid, _offs = torch_backend.route_permute(x, idx, E)
    for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        gx = torch.randn(T * K, H, generator=gen).to(_device(), dt)
        before = triton_backend.COUNTERS["route_permute_backward"]
        got = triton_backend.route_permute_backward(gx, src.to(_device()), T)
        want = torch_backend.route_permute_backward(gx.float(), src.to(_device()), T).to(dt)
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        assert triton_backend.COUNTERS["route_permute_backward"] == before + 1
    with pytest.raises(ValueError, match="20 rows for 7 tokens"):
        triton_backend.route_permute_backward(gx[:20], src[:20].to(_device()), T)
    torch.library.opcheck(ops.triton_route_permute_backward, (gx, src.to(_device()), T),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip
