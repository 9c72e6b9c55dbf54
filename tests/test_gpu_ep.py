"""Expert parallelism over real symmetric memory (run on a node with 2 or more GPUs; skipped elsewhere): a
model compiled with backend="triton" and ep = world size takes the fused kernels, and a training step gives
eager's losses and gradients (the DDP contract), over several steps that reuse the buffers."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import moecc
from moecc import testing
from moecc.backends import torch_backend, triton_ep
from moecc.examples import deepseek_style, mixtral_style

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more CUDA devices"),
]


def _close(got: torch.Tensor, want: torch.Tensor, what: str, rel: float = 2e-3) -> None:
    scale = want.float().abs().max().item() + 1e-6
    err = (got.float() - want.float()).abs().max().item()
    assert err <= rel * scale + 1e-6, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def _train(rank: int, world: int, build_name: str, lengths: tuple[int, ...] = ()) -> None:
    """lengths: one sequence length a step, under dynamic shapes (default: 3 steps of the example's)."""
    os.environ.pop("MOECC_FUSED_EP", None)  # the default, fused across ranks, is what this test validates
    build = {"mixtral": mixtral_style.build, "deepseek": deepseek_style.build}[build_name]
    torch.manual_seed(0)
    model, (ids,) = build(tokens=64)
    model = model.cuda()
    ref = build(tokens=64)[0].cuda()
    ref.load_state_dict(model.state_dict())
    cm = moecc.compile(model, ep=world, backend="triton", dynamic=bool(lengths))
    gen = torch.Generator().manual_seed(1)
    allocations = triton_ep.COUNTERS["symmetric.allocations"]
    for step, n in enumerate(lengths or (ids.shape[1],) * 3):
        shape = (ids.shape[0], n)
        batches = [torch.randint(0, int(ids.max()) + 1, shape, generator=gen).cuda() for _ in range(world)]
        loss = testing.lm_loss(cm(batches[rank]), batches[rank])
        ref_losses = [testing.lm_loss(ref(b), b) for b in batches]
        _close(loss, ref_losses[rank], f"rank {rank} step {step} loss")
        # by name: a rank's compiled model holds only its own experts, so its parameter list is not eager's
        params = dict(cm.named_parameters())
        ref_params = dict(ref.named_parameters())
        assert set(params) <= set(ref_params), set(params) - set(ref_params)
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True), strict=True))
        ref_grads = torch.autograd.grad(torch.stack(ref_losses).mean(), [ref_params[n] for n in params],
                                        allow_unused=True)  # fmt: skip
        for (name, p), r in zip(params.items(), ref_grads, strict=True):
            if r is not None:
                assert grads[name] is not None, name
                _close(grads[name], testing.local_slice(r, p, rank), f"rank {rank} step {step} grad {name}")
    counters = cm.session.counters()
    assert counters.get("fuse.fused", 0) == len(cm.regions) > 0, counters
    steps = len(lengths) or 3
    assert triton_ep.COUNTERS["dispatch_gemm.backward"] == steps * len(cm.regions)
    if lengths:  # one program; token counts up to the largest share an allocation, which grows by doubling
        assert len(cm.session.graphs) == 1, cm.session.graphs
        assert triton_ep.COUNTERS["symmetric.allocations"] - allocations == 2


@pytest.mark.parametrize("build_name", ["mixtral", "deepseek"])
def test_fused_expert_parallel_training_matches_eager(build_name: str) -> None:
    testing.spawn(_train, 2, build_name, timeout_s=300)


def test_fused_expert_parallel_training_with_changing_token_counts() -> None:
    """dynamic=True: sequence lengths 32, 24, 40, 32, 16 (64, 48, 80, 64, 32 tokens a rank) through one program;
    the symmetric buffers are allocated for 64 tokens, then for 128 (at 80), and every other count runs in a
    view of one of them, the ranks' signals compared with the allocation's shared call counters."""
    testing.spawn(_train, 2, "mixtral", (32, 24, 40, 32, 16), timeout_s=300)


def _capture(rank: int, world: int) -> None:
    """The fused expert-parallel layer's forward and backward, captured in a CUDA graph and replayed with new
    inputs: no device-to-host synchronisation anywhere in them (the ranks meet through symmetric-memory
    signals, not the host)."""
    os.environ.pop("MOECC_FUSED_EP", None)
    torch.manual_seed(0)
    model, _ = mixtral_style.build(dtype=torch.bfloat16, tokens=256)
    moe = model.layers[0].moe.cuda()
    ref = copy.deepcopy(moe)
    cm = moecc.compile(moe, ep=world, backend="triton")
    gen = torch.Generator(device="cuda").manual_seed(rank)  # every rank its own tokens
    x = torch.randn(2, 128, moe.router.in_features, device="cuda", dtype=torch.bfloat16, generator=gen)
    x.requires_grad_()
    g = torch.randn(x.shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    new_x = torch.randn(x.shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    out = testing.replay_in_cuda_graph(cm, x, g, new_x)
    assert cm.session.counters().get("fuse.fused") == 1, "the fused kernels were not in the captured graph"
    ref_x = new_x.clone().requires_grad_()
    want = ref(ref_x)
    want.backward(g)
    bf16 = 3e-2  # both sides round to bf16 after every op, in different orders
    _close(out, want.detach(), f"rank {rank} replayed output", bf16)
    _close(x.grad, ref_x.grad, f"rank {rank} replayed input gradient", bf16)


def test_fused_expert_parallel_layer_captures_in_a_cuda_graph() -> None:
    testing.spawn(_capture, 2, timeout_s=300)


def _graph_step(rank: int, world: int, fused: bool = True) -> None:
    """A training step of the fused expert-parallel model (all-reduces of the replicated gradients included)
    with a capturable AdamW, replayed from a CUDA graph by `moecc.graph_step`, follows eager's losses,
    gradients and updates step after step. fused=False: the all-to-all path, whose exchange cuda_graph=True
    pads (split sizes known without the device)."""
    if fused:
        os.environ.pop("MOECC_FUSED_EP", None)
    else:
        os.environ["MOECC_FUSED_EP"] = "0"
    torch.manual_seed(0)
    model, (ids,) = mixtral_style.build(tokens=64)
    model = model.cuda()
    ref = mixtral_style.build(tokens=64)[0].cuda()
    ref.load_state_dict(model.state_dict())
    cm = moecc.compile(model, ep=world, backend="triton", cuda_graph=True)
    opt = torch.optim.AdamW(cm.parameters(), lr=torch.tensor(1e-3, device="cuda"), capturable=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=torch.tensor(1e-3, device="cuda"), capturable=True)

    def train(ids: torch.Tensor) -> torch.Tensor:
        loss = testing.lm_loss(cm(ids), ids)
        loss.backward()
        opt.step()
        return loss.detach()

    step = moecc.graph_step(train, cm, optimizers=[opt], warmup=1)
    gen = torch.Generator().manual_seed(1)
    for i in range(4):
        batches = [torch.randint(0, int(ids.max()) + 1, ids.shape, generator=gen).cuda() for _ in range(world)]
        got = step(batches[rank])
        ref_opt.zero_grad(set_to_none=True)
        ref_losses = [testing.lm_loss(ref(b), b) for b in batches]
        _close(got, ref_losses[rank].detach(), f"rank {rank} step {i} loss")
        torch.stack(ref_losses).mean().backward()
        ref_params = dict(ref.named_parameters())
        for name, p in cm.named_parameters():
            r = ref_params[name].grad
            if r is not None:
                assert p.grad is not None, f"rank {rank} step {i}: {name} has no gradient"
                _close(p.grad, testing.local_slice(r, p, rank), f"rank {rank} step {i} grad {name}")
        ref_opt.step()
    assert step.replays == 3
    step.close()  # before the process group goes: NCCL cannot tear down a communicator a live graph holds
    ref_params = dict(ref.named_parameters())
    for name, p in cm.named_parameters():  # 4 AdamW steps of lr 1e-3 each: every weight within 2 steps' size
        err = (p.detach() - testing.local_slice(ref_params[name].detach(), p, rank)).abs().max().item()
        assert err <= 2e-3, f"rank {rank} weight {name} after 4 steps: {err:.3g} off"
    if fused:
        assert cm.session.counters().get("fuse.fused", 0) == len(cm.regions) > 0
    else:
        assert not cm.session.counters().get("fuse.fused") and torch_backend.COUNTERS["ep.plans_padded"] > 0
        assert not torch_backend.COUNTERS["ep.plans"]


def test_graph_step_replays_the_fused_expert_parallel_training_step() -> None:
    testing.spawn(_graph_step, 2, timeout_s=300)


def test_graph_step_replays_the_unfused_step_with_a_padded_exchange() -> None:
    testing.spawn(_graph_step, 2, False, timeout_s=300)


def test_calibrate_measures_the_fused_ops_across_the_ranks() -> None:
    """`moecc calibrate` times the fused layer over the node's ranks (transfers and waits included) and saves
    that rate by world size, beside the one-rank rate, for the cost model to charge the fused ops at ep > 1."""
    from moecc import calibrate

    across = calibrate.measure_collectives(2, quick=True)
    rate = across["fused_ep_gemm_flops"]["2"]  # by world size; JSON keys are strings
    assert 1e12 < rate < 2e15, rate  # a real rate in FLOP/s, below any GPU's peak
    # the rows per expert it was measured at, which the cost model moves the rate from along the one-rank curve:
    # the quick layer's 2048 tokens x top-4 per rank over each rank's 16 of 32 experts
    assert across["fused_ep_rows"] == {"2": 2048 * 4 / 16}
    assert {"all_to_all", "all_reduce"} <= set(across["curves"])
