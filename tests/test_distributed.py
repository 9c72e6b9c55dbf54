"""Expert parallelism across processes (gloo on CPU): the DDP contract against single-process eager.

Training on W ranks with per-rank batch b must give the gradients of eager training on the concatenated
batch with loss = mean of the per-rank losses, for replicated and expert-sharded parameters alike.
Each test spawns a local world; the workers below run in every rank.
"""

from __future__ import annotations

import copy
import os
import time

import pytest
import torch
import torch.nn as nn

import moecc
from moecc import testing
from moecc.backends import torch_backend, triton_backend


def _builds() -> dict:
    import hf_models

    from moecc.examples import deepseek_style, mixtral_style, switch_style

    return {
        "mixtral": mixtral_style.build,
        "deepseek": deepseek_style.build,
        "switch": switch_style.build,
        "hf_mixtral": hf_models.tiny_mixtral,
        "hf_deepseek_v3": hf_models.tiny_deepseek_v3,
    }


def _batches(ids: torch.Tensor, world: int, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randint(0, 64, ids.shape, generator=gen) for _ in range(world)]


def _check_exchange(exchange: str, before: dict, cm) -> None:
    """The plans the exchange option asked for ran, and no other kind ("auto": the kind compile recorded for
    every region; its rule is tested in test_schedule)."""
    plans = {k: torch_backend.COUNTERS[k] - before.get(k, 0) for k in ("ep.plans", "ep.plans_padded")}
    (chosen,) = {kind for c in cm.session.contexts for kind in c.plan.get("exchange", {}).values()}
    assert exchange == "auto" or chosen == exchange, (exchange, chosen)
    want = "ep.plans_padded" if chosen == "padded" else "ep.plans"
    assert plans[want] > 0 and sum(plans.values()) == plans[want], (exchange, plans)


def train_matches_eager(
    rank: int, world: int, names: list[str], ep: int, steps: int, backend: str = "auto", exchange: str = "auto"
) -> None:
    """Per model: losses and every gradient of `steps` AdamW steps match the eager global-batch reference,
    and so do the parameters afterwards."""
    builds = _builds()
    for name in names:
        model, (ids,) = builds[name](seed=0)
        ref = copy.deepcopy(model)
        full_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        before = dict(torch_backend.COUNTERS)
        cm = moecc.compile(model, ep=ep, backend=backend, exchange=exchange)
        mesh = cm.session.mesh
        assert (mesh.dp, mesh.ep) == (world // ep, ep)
        opt = torch.optim.AdamW(cm.parameters(), lr=1e-2)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
        for step in range(steps):
            batches = _batches(ids, world, step)
            testing.step_against_eager(cm, ref, (opt, ref_opt), batches, rank, mesh.ep_index, f"{name} step {step}")
        ref_params = dict(ref.named_parameters())
        for pname, p in cm.named_parameters():
            # Adam's normalised update turns ~1e-7 gradient differences on near-zero gradients into ~1e-5
            torch.testing.assert_close(
                p,
                testing.local_slice(ref_params[pname], p, mesh.ep_index),
                rtol=1e-4,
                atol=1e-4,
                msg=lambda m, n=pname, model_name=name: f"{model_name}: {n} after {steps} steps: {m}",
            )
        _check_exchange(exchange, before, cm)
        counters = cm.session.counters()
        # every expert weight's 1/W is applied inside the kernel that computes its gradient (biases: a mul)
        weights = sum(1 for n, p in cm.named_parameters() if ".experts." in n and not n.endswith("bias"))
        assert counters["sync_grads.scale_folded"] == weights, (name, weights, dict(counters))
        if backend == "triton":  # the Triton kernels ran, with the fused ones not selected across ranks
            assert counters["lower.triton"] > 0 and not counters.get("fuse.fused"), (name, dict(counters))
            # the GLUs stop at the received rows (the receive buffer has room for ep times a rank's average)
            names = ("grouped_mm", "grouped_mm_wgrad", "glu_rows", "glu_rows_backward", "glu", "glu_backward")
            kernels = [k for k in names if triton_backend.COUNTERS[k]]
            assert kernels == ["grouped_mm", "grouped_mm_wgrad", "glu_rows", "glu_rows_backward"], (name, kernels)
            assert counters["lower.glu_rows"] == 2 * len(cm.regions), (name, dict(counters))
        # expert parameter memory per rank is 1/ep of the model's
        local_expert = sum(p.numel() for n, p in cm.named_parameters() if ".experts." in n)
        assert local_expert * ep == full_expert, (name, local_expert, full_expert)
        kept = {id(p) for p in cm.parameters()}
        for n, p in model.named_parameters():  # the model's other experts are released, not copied
            if ".experts." in n and id(p) not in kept:
                assert p.untyped_storage().nbytes() <= p.element_size(), f"{name}: {n} still holds its weights"
        torch._dynamo.reset()


CONFIGS = [  # (world, ep): ep x dp = world
    pytest.param(2, 2, ["mixtral", "deepseek", "switch", "hf_mixtral", "hf_deepseek_v3"], id="ep2-dp1"),
    pytest.param(4, 2, ["mixtral", "deepseek", "switch", "hf_mixtral", "hf_deepseek_v3"], id="ep2-dp2"),
    pytest.param(4, 4, ["mixtral", "deepseek", "switch", "hf_mixtral", "hf_deepseek_v3"], id="ep4-dp1"),
]


@pytest.mark.parametrize("world,ep,names", CONFIGS)
def test_ep_training_matches_eager(world: int, ep: int, names: list[str]) -> None:
    testing.spawn(train_matches_eager, world, names, ep, 3, backend="gloo")


def test_padded_exchange_training_matches_eager() -> None:
    """exchange="padded": every token travels to every rank of its ep-group (those with no expert there as
    padding, dropped by the receiver), with split sizes known without the device. ep = 2 within dp = 2:
    the same losses, gradients and parameters as eager, as the counted exchange gives."""
    testing.spawn(train_matches_eager, 4, ["mixtral", "deepseek"], 2, 2, "auto", "padded", backend="gloo")


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton kernels on the CPU need TRITON_INTERPRET=1")  # fmt: skip
def test_ep_training_on_the_triton_backend_matches_eager() -> None:
    """ep = 2 with backend="triton" on the CPU, where fusion across ranks is refused (no symmetric memory; a
    multi-GPU run gets this path with MOECC_FUSED_EP=0): row all-to-alls over the process group, the Triton
    grouped GEMMs and GLU kernels on the padded rows a rank receives. Two steps against the eager global batch."""
    testing.spawn(train_matches_eager, 2, ["mixtral", "deepseek"], 2, 2, "triton", backend="gloo")
    testing.spawn(train_matches_eager, 2, ["mixtral"], 2, 1, "triton", "padded", backend="gloo")


# ---------------------------------------------------------------------------------------------------------
# routing extremes: every token to one expert, experts with no tokens, ranks that send nothing


class _Skewed(nn.Module):
    """A top-k MoE whose router strongly prefers `favourite` (and so leaves most experts empty)."""

    def __init__(self, num_experts: int = 4, k: int = 1, favourite: int = 0, h: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, h)
        self.router = nn.Linear(h, num_experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(h, 32), nn.GELU(), nn.Linear(32, h)) for _ in range(num_experts)
        )
        self.k, self.favourite = k, favourite
        self.head = nn.Linear(h, 64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        x_TH = x.reshape(-1, x.shape[-1])
        logits = self.router(x_TH)
        bias = torch.zeros(logits.shape[-1])
        bias[self.favourite] = 100.0
        w_TK, idx_TK = torch.topk((logits + bias).softmax(-1), self.k, dim=-1)
        out_TH = torch.zeros_like(x_TH)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx_TK == e)
            out_TH.index_add_(0, tok, expert(x_TH[tok]) * w_TK[tok, slot, None])
        return self.head(out_TH.reshape(x.shape) + x)


def skewed_matches_eager(rank: int, world: int, k: int, favourite: int, exchange: str) -> None:
    torch.manual_seed(0)
    model = _Skewed(k=k, favourite=favourite)
    ref = copy.deepcopy(model)
    before = dict(torch_backend.COUNTERS)
    cm = moecc.compile(model, ep=world, exchange=exchange)
    batches = _batches(torch.zeros(2, 8, dtype=torch.long), world, 0)
    loss = testing.lm_loss(cm(batches[rank]), batches[rank])
    assert [(r.status, r.expert_fn) for r in cm.regions] == [("lifted", "mlp_gelu")]
    ref_losses = [testing.lm_loss(ref(b), b) for b in batches]
    torch.testing.assert_close(loss, ref_losses[rank], rtol=1e-5, atol=1e-5)
    loss.backward()
    (sum(ref_losses) / world).backward()
    testing.assert_grads_match(cm, ref, cm.session.mesh.ep_index, f"skewed k={k}")
    _check_exchange(exchange, before, cm)


@pytest.mark.parametrize("exchange", ["counted", "padded"])
@pytest.mark.parametrize("k,favourite", [(1, 0), (2, 3)], ids=["all-to-expert-0", "top2-favour-3"])
def test_skewed_routing_and_empty_experts(k: int, favourite: int, exchange: str) -> None:
    """Every token to one expert leaves a rank with nothing to receive (padded: padding rows only)."""
    testing.spawn(skewed_matches_eager, 2, k, favourite, exchange, backend="gloo")


# ---------------------------------------------------------------------------------------------------------
# traffic: each token goes at most once to each destination rank


def dispatch_traffic_is_deduplicated(rank: int, world: int) -> None:
    from moecc import ops

    gen = torch.Generator().manual_seed(rank)
    T, K, E, H = 40, 4, 8, 12
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    x = torch.randn(T, H, generator=gen)
    group = torch.distributed.group.WORLD.group_name
    before = dict(torch_backend.COUNTERS)
    tok_R, idx_RK, sel_RK, n_P, m_P = ops.ep_plan(idx, E, world, group)
    recv = ops.all_to_all_rows(x.index_select(0, tok_R), n_P, m_P, group)
    sent_rows = torch_backend.COUNTERS["a2a.rows_remote"] - before.get("a2a.rows_remote", 0)
    sent_bytes = torch_backend.COUNTERS["a2a.bytes_remote"] - before.get("a2a.bytes_remote", 0)
    dest = idx // (E // world)
    bound = sum(len(set(dest[t].tolist()) - {rank}) for t in range(T))  # distinct remote ranks per token
    assert sent_rows == bound, (sent_rows, bound)
    assert sent_bytes == bound * H * x.element_size()
    # what arrived is what was meant: rows of the sender's tokens whose experts live here
    counts = [torch.zeros_like(n_P) for _ in range(world)]
    torch.distributed.all_gather(counts, n_P)
    assert m_P.tolist() == [int(c[rank]) for c in counts]  # peer p sends me what its plan says
    assert not recv[int(m_P.sum()) :].any(), "padding rows must stay zero"
    # fake implementations and the autograd formula agree with the real ops (every rank runs the same checks)
    torch.library.opcheck(ops.ep_plan, (idx, E, world, group))
    torch.library.opcheck(ops.all_to_all_rows, (x.index_select(0, tok_R).requires_grad_(), n_P, m_P, group))
    # the split sizes live on the host: issuing an all-to-all never waits for the device
    assert n_P.device.type == "cpu" and m_P.device.type == "cpu"
    # the schedule pass's start / wait pair gives what the blocking all-to-all gives
    started = ops.all_to_all_rows_start(x.index_select(0, tok_R), n_P, m_P, group)
    torch.testing.assert_close(torch.ops._c10d_functional.wait_tensor(started), recv, rtol=0, atol=0)
    send = x.index_select(0, tok_R)
    with torch._subclasses.FakeTensorMode() as mode:
        fake = ops.all_to_all_rows_start(mode.from_tensor(send), mode.from_tensor(n_P), mode.from_tensor(m_P), group)
    assert fake.shape == recv.shape and fake.dtype == recv.dtype


def test_dispatch_traffic_matches_dedup_bound() -> None:
    testing.spawn(dispatch_traffic_is_deduplicated, 4, backend="gloo")


# ---------------------------------------------------------------------------------------------------------
# faults: disagreeing ranks, dead or stalled ranks


def options_differ(rank: int, world: int) -> None:
    from moecc.examples import switch_style

    model, _ = switch_style.build()
    with pytest.raises(moecc.MoeccError, match=r"differs across ranks: rank\(s\) \[1\] differ from rank 0"):
        moecc.compile(model, verify=(rank == 1))


def test_options_that_differ_across_ranks_are_named() -> None:
    testing.spawn(options_differ, 2, timeout_s=60, backend="gloo")


def inputs_differ(rank: int, world: int) -> None:
    from moecc.examples import switch_style

    # a rank that alone sees a new shape would recompile alone (dp only, static shapes), or send rows its
    # peers sized no buffer for (an expert all-to-all, dynamic shapes): both waited out the timeout before
    for ep, dynamic in ((1, False), (2, True)):
        model, (ids,) = switch_style.build()
        cm = moecc.compile(model, ep=ep, dynamic=dynamic, exchange="padded")
        testing.lm_loss(cm(ids), ids).backward()
        mine = ids[:, : ids.shape[1] - 2 * rank]  # rank 1 holds fewer tokens
        t0 = time.time()
        want = r"args\[0\] is int64\[2, 16\] on rank\(s\) \[0\], int64\[2, 14\] on rank\(s\) \[1\]"
        with pytest.raises(moecc.MoeccError, match=rf"moecc.compile\(SwitchStyleLM\): the ranks' calls differ: {want}"):
            cm(mine)
        assert time.time() - t0 < 5, "refused at once, not after the process group's timeout"
        testing.lm_loss(cm(ids[:, :-2]), ids[:, :-2]).backward()  # the same new shape everywhere still runs
    # the same shapes, but rank 1 without autograd (it would compile an inference graph alone)
    modes = r"grad mode is True on rank\(s\) \[0\], False on rank\(s\) \[1\]"
    with torch.set_grad_enabled(rank == 0), pytest.raises(moecc.MoeccError, match=modes):
        cm(ids)


def test_inputs_of_different_shapes_across_ranks_are_refused_at_once() -> None:
    testing.spawn(inputs_differ, 2, timeout_s=30, backend="gloo")


def unchecked_inputs_differ(rank: int, world: int) -> None:
    torch.manual_seed(0)
    cm = moecc.compile(_Skewed(k=1, favourite=0), ep=2, dynamic=True, exchange="counted", check_inputs=False)
    ids = torch.zeros(2, 8, dtype=torch.long)
    testing.lm_loss(cm(ids), ids).backward()
    # every token goes to expert 0, on rank 0: 16 of its own and 32 of rank 1's rows, room for ep * 16
    mine = torch.zeros(2, 8 * (1 + rank), dtype=torch.long)
    if rank == 0:
        with pytest.raises(RuntimeError, match=r"48 to receive exceed the buffer of 32 rows .*different token counts"):
            cm(mine)
    else:  # what the rank that fits sees is not defined (a timeout, or rows it never got): check_inputs' job
        try:
            cm(mine)
        except RuntimeError:
            pass


def test_check_inputs_off_leaves_the_exchange_to_name_different_token_counts() -> None:
    """check_inputs=False: ranks with different token counts reach the counted exchange, where the rank that
    would receive more rows than its buffer holds refuses and says why."""
    testing.spawn(unchecked_inputs_differ, 2, timeout_s=8, backend="gloo")


def peer_dies_or_stalls(rank: int, world: int, mode: str) -> None:
    from moecc.examples import switch_style

    model, (ids,) = switch_style.build()
    cm = moecc.compile(model, ep=2)
    testing.lm_loss(cm(ids), ids).backward()  # compiled and working on both ranks
    loss = testing.lm_loss(cm(ids), ids) if mode == "dies_before_backward" else None
    if rank == 1:
        if mode.startswith("dies"):
            os._exit(0)
        time.sleep(14)  # stalls past rank 0's timeout
        return
    t0 = time.time()
    where = "backward" if loss is not None else "step"
    with pytest.raises(RuntimeError, match=f"rank 0: a collective of SwitchStyleLM's {where} failed .*a peer rank may"):
        if loss is None:
            cm(ids)
        else:
            loss.backward()  # run by the autograd engine, outside the compiled module's call
    assert time.time() - t0 < 12, "the failure must come from the timeout (8 s), not from rank 1 leaving"


@pytest.mark.parametrize("mode", ["dies", "stalls", "dies_before_backward"])
def test_dead_or_stalled_rank_fails_with_a_clear_error(mode: str) -> None:
    testing.spawn(peer_dies_or_stalls, 2, mode, timeout_s=8, backend="gloo")


# ---------------------------------------------------------------------------------------------------------
# parameters used outside the compiled graphs still get synchronised gradients


class _EagerHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 64)

    @torch._dynamo.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def graph_break_params_sync(rank: int, world: int) -> None:
    from moecc.examples import switch_style

    model, (ids,) = switch_style.build()
    model.lm_head = nn.Sequential(model.lm_head, _EagerHead())
    ref = copy.deepcopy(model)
    cm = moecc.compile(model, ep=2)
    batches = _batches(ids, world, 0)
    with pytest.warns(UserWarning, match="used outside the compiled graphs"):
        loss = testing.lm_loss(cm(batches[rank]), batches[rank])
    loss.backward()
    (sum(testing.lm_loss(ref(b), b) for b in batches) / world).backward()
    assert testing.assert_grads_match(cm, ref, cm.session.mesh.ep_index, "graph break") > 0
    # Dynamo runs the nn.Sequential holding the disabled module eagerly, so lm_head.0 is outside too
    assert cm.session.hooked == ["lm_head.0.weight", "lm_head.1.proj.weight", "lm_head.1.proj.bias"]


def test_parameters_outside_graphs_are_synchronised() -> None:
    testing.spawn(graph_break_params_sync, 2, backend="gloo")


def test_ep_that_does_not_divide_is_a_clear_error() -> None:
    testing.spawn(_ep_does_not_divide, 2, timeout_s=60, backend="gloo")


def _ep_does_not_divide(rank: int, world: int) -> None:
    from moecc.examples import switch_style

    model, _ = switch_style.build()
    with pytest.raises(moecc.MoeccError, match=r"ep=3 does not divide the world size 2; pick ep in \[1, 2\]"):
        moecc.compile(model, ep=3)


def _mesh_hosts(rank: int, world: int) -> None:
    import socket

    from moecc import dist as moecc_dist
    from moecc.passes.fuse_experts import fusion_refusal

    assert moecc_dist.make_mesh(2).ep_hosts == 1  # every rank on this machine
    moecc_dist._GROUPS.clear()
    socket.gethostname = lambda: f"node{rank // 2}"  # ranks 0, 1 on one "host", 2, 3 on another
    assert moecc_dist.make_mesh(2).ep_hosts == 1  # ep-groups [0, 1] and [2, 3]: each within a host
    assert moecc_dist.make_mesh(4).ep_hosts == 2  # one ep-group over both hosts
    why = fusion_refusal("triton", torch.device("cuda"), 4, moecc_dist.make_mesh(4).ep_hosts)
    assert why is not None and "spans 2 hosts" in why and "all-to-alls instead" in why


def test_ep_groups_across_hosts_are_counted_alike_on_every_rank() -> None:
    """The fused kernels reach their peers through symmetric memory, so an ep-group spread over several hosts
    must not take them: the mesh counts the hosts of the widest ep-group, the same number on every rank."""
    from moecc.dist import hosts_per_group

    assert hosts_per_group(["a", "a", "b", "b"], [[0, 1], [2, 3]]) == 1
    assert hosts_per_group(["a", "a", "b", "b"], [[0, 2], [1, 3]]) == 2
    assert hosts_per_group(["a", "b", "b", "b"], [[0, 1], [2, 3]]) == 2  # the widest group counts
    testing.spawn(_mesh_hosts, 4, timeout_s=120, backend="gloo")


def test_gpus_without_peer_access_are_found() -> None:
    """Ranks whose GPUs cannot reach each other's memory directly: found by GPU UUID among the GPUs a process
    sees, only on its own host; and the fuse pass refuses fusion across them, naming why."""
    from moecc.dist import unreachable
    from moecc.passes.fuse_experts import fusion_refusal

    places = [("a", "gpu0"), ("a", "gpu1"), ("a", "gpu2"), ("b", "gpu9"), ("a", "gpu7")]
    visible = {"gpu0": 0, "gpu1": 1, "gpu2": 2}  # gpu7 is on this host but not visible to this process
    no_p2p = {(0, 2)}  # gpu0 cannot access gpu2
    can = lambda mine, theirs: (mine, theirs) not in no_p2p  # noqa: E731
    assert unreachable(places, [0, 1, 2, 3, 4], 0, visible, 0, can) == [2]  # rank 3 is on another host
    assert unreachable(places, [0, 1], 0, visible, 0, can) == []  # only its ep-group's ranks count
    assert unreachable(places, [0, 1, 2], 1, visible, 1, can) == []
    why = fusion_refusal("triton", torch.device("cuda"), 2, 1, peer_access=False)
    assert why is not None and "cannot access each other's memory directly" in why
    assert fusion_refusal("triton", torch.device("cuda"), 2, 1, peer_access=True) is None


def test_single_process_mesh_is_one_by_one() -> None:
    from moecc.examples import switch_style

    model, (ids,) = switch_style.build()
    cm = moecc.compile(model)
    cm(ids)
    assert (cm.session.mesh.dp, cm.session.mesh.ep, cm.session.mesh.world) == (1, 1, 1)


# ---------------------------------------------------------------------------------------------------------
# capacity factor: the same drops as one process on the concatenated batch


def capacity_matches_single_process(rank: int, world: int, ref_path: str, capacity_factor: float) -> None:
    from moecc.examples import mixtral_style

    model, (ids,) = mixtral_style.build(seed=0)
    for exchange in ("counted", "padded"):  # padding rows take no place: the same pairs are dropped
        _capacity_step(rank, world, ref_path, capacity_factor, copy.deepcopy(model), ids, exchange)
        torch._dynamo.reset()


def _capacity_step(rank: int, world: int, ref_path: str, capacity_factor: float, model, ids, exchange: str) -> None:
    cm = moecc.compile(model, ep=world, capacity_factor=capacity_factor, exchange=exchange)
    ref = torch.load(ref_path)
    batches = _batches(ids, world, 0)
    loss = testing.lm_loss(cm(batches[rank]), batches[rank])
    torch.testing.assert_close(loss, ref["losses"][rank], rtol=1e-5, atol=1e-5)
    loss.backward()
    for name, p in cm.named_parameters():
        want = testing.local_slice(ref["grads"][name], p, cm.session.mesh.ep_index)
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_capacity_factor_drops_like_one_process_on_the_global_batch(tmp_path) -> None:
    from moecc.examples import mixtral_style

    world, cf = 2, 0.5
    model, (ids,) = mixtral_style.build(seed=0)
    dropless = copy.deepcopy(model)
    cm = moecc.compile(model, capacity_factor=cf)
    batches = _batches(ids, world, 0)
    logits = cm(torch.cat(batches))  # one process, the concatenated batch: the policy's reference order
    losses = [testing.lm_loss(part, b) for part, b in zip(logits.chunk(world), batches, strict=True)]
    (sum(losses) / world).backward()
    full = dropless(torch.cat(batches))
    assert not torch.allclose(full, logits), "capacity 0.5 must drop some tokens"
    torch.save(
        {
            "losses": [x.detach() for x in losses],
            "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
        },
        tmp_path / "ref.pt",
    )
    testing.spawn(capacity_matches_single_process, world, str(tmp_path / "ref.pt"), cf, backend="gloo")


# ---------------------------------------------------------------------------------------------------------
# checkpoints: the whole model's state in and out of an expert-sharded model


def checkpoints_round_trip(rank: int, world: int, names: list[str]) -> None:
    builds = _builds()
    for name in names:
        model, (ids,) = builds[name](seed=0)
        ref = copy.deepcopy(model)
        cm = moecc.compile(model, ep=world)
        opt = torch.optim.AdamW(cm.parameters(), lr=1e-2)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
        testing.step_against_eager(cm, ref, (opt, ref_opt), _batches(ids, world, 0), rank, rank, f"{name} step")
        # out: every rank's experts gathered, 3-D expert weights whole: eager's state after the same step
        full = cm.full_state_dict()
        want = ref.state_dict()
        assert list(full) == list(want), f"{name}: keys or their order differ from the eager model's"
        for k, v in want.items():
            # after one AdamW step: its normalisation turns float32 rounding in tiny gradients into ~1e-6
            torch.testing.assert_close(full[k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=f"{name} {k}": f"{k}: {m}")
        # in: another model's whole state (a pretrained checkpoint) loads into the sharded one
        other, _ = builds[name](seed=1)
        cm.load_state_dict(other.state_dict())
        batch = _batches(ids, world, 1)[rank]

        def logits(m: nn.Module, batch: torch.Tensor = batch) -> torch.Tensor:
            with torch.no_grad():
                out = m(batch)
            return getattr(out, "logits", out)

        torch.testing.assert_close(logits(cm), logits(other), rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        # and a shard saved by a rank loads back into that rank
        shard = {k: v.clone() for k, v in cm.state_dict().items()}  # state_dict() aliases the parameters
        cm.load_state_dict({k: torch.zeros_like(v) for k, v in shard.items()})
        cm.load_state_dict(shard)
        torch.testing.assert_close(logits(cm), logits(other), rtol=1e-4, atol=1e-5)


def test_full_checkpoints_in_and_out_of_an_expert_sharded_model() -> None:
    """full_state_dict() gathers the experts of every rank into the eager model's state_dict (ModuleList
    experts and transformers' 3-D expert weights alike), and load_state_dict takes such a whole-model state
    (skipping other ranks' experts, cutting 3-D weights to this rank's), so pretrained checkpoints load."""
    testing.spawn(checkpoints_round_trip, 2, ["mixtral", "hf_mixtral"], timeout_s=300, backend="gloo")


def clipping_matches_eager(rank: int, world: int, names: list[str]) -> None:
    builds = _builds()
    for name in names:
        for norm_type in (2.0, float("inf")):
            model, (ids,) = builds[name](seed=0)
            ref = copy.deepcopy(model)
            cm = moecc.compile(model, ep=world)
            batches = _batches(ids, world, 0)
            testing.lm_loss(cm(batches[rank]), batches[rank]).backward()
            torch.stack([testing.lm_loss(ref(b), b) for b in batches]).mean().backward()
            want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e-3, norm_type)
            got = cm.clip_grad_norm_(1e-3, norm_type)
            what = f"{name} norm {norm_type}"
            torch.testing.assert_close(got, want, rtol=1e-5, atol=0.0, msg=lambda m, w=what: f"{w}: {m}")
            assert want > 1e-3, f"{what}: the test must clip"
            assert testing.assert_grads_match(cm, ref, cm.session.mesh.ep_index, f"{what} clipped") > 0


def test_clip_grad_norm_is_the_whole_models_on_every_rank() -> None:
    """clip_grad_norm_ with expert parallelism: the eager model's total norm (replicated gradients once,
    expert gradients summed over the ranks holding them) and the same clipped gradients, for the 2-norm and
    the max-norm, ModuleList and transformers experts."""
    testing.spawn(clipping_matches_eager, 2, ["mixtral", "hf_mixtral"], timeout_s=300, backend="gloo")
