"""Inputs that differ from the compiled signature recompile (a new graph, same answers) or, past the
recompile limit, raise a clear error instead of silently running eager."""

from __future__ import annotations

import copy

import pytest
import torch

import moecc
from moecc import testing
from moecc.examples import mixtral_style, switch_style


def test_new_sequence_length_recompiles_and_matches() -> None:
    model, (ids,) = switch_style.build(tokens=16)
    cm = moecc.compile(model)
    torch.testing.assert_close(cm(ids), model(ids))
    longer = torch.randint(0, 64, (2, 12))
    torch.testing.assert_close(cm(longer), model(longer))
    assert len(cm.session.graphs) == 2


def test_recompile_limit_is_an_error_not_a_silent_fallback() -> None:
    torch._dynamo.reset()  # compiled code is cached per code object, across models
    model, (ids,) = switch_style.build(tokens=16)
    cm = moecc.compile(model)
    with torch._dynamo.config.patch(recompile_limit=2):
        cm(torch.randint(0, 64, (1, 4)))
        cm(torch.randint(0, 64, (1, 5)))
        with pytest.raises(moecc.MoeccError, match="recompile limit"):
            cm(torch.randint(0, 64, (1, 6)))


def test_dynamic_token_count_one_graph_with_module_list_experts() -> None:
    """dynamic=True: a Mixtral-style model (experts in a ModuleList, lifted from the model's loop) compiles once
    for a symbolic token count and gives eager's outputs and gradients at three lengths."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, (ids,) = mixtral_style.build(tokens=64)
    ref = mixtral_style.build(tokens=64)[0]
    ref.load_state_dict(model.state_dict())
    cm = moecc.compile(model, dynamic=True)
    for T in (16, 24, 40):
        x = torch.randint(0, int(ids.max()) + 1, (2, T))
        loss = testing.lm_loss(cm(x), x)
        ref_loss = testing.lm_loss(ref(x), x)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        for opt_model in (cm, ref):
            opt_model.zero_grad()
        loss.backward()
        ref_loss.backward()
        assert testing.assert_grads_match(cm, ref, 0, f"T={T}") > 0
    counters = cm.session.counters()
    assert counters["lift_moe.lifted"] == len(cm.regions) > 0, counters  # lifted once: no recompile per length
    assert len(cm.session.graphs) == 1


def test_dynamic_token_count_with_capacity_is_refused_clearly() -> None:
    torch._dynamo.reset()
    model, (ids,) = mixtral_style.build(tokens=16)
    cm = moecc.compile(model, dynamic=True, capacity_factor=1.25)
    with pytest.raises(moecc.MoeccError, match="capacity_factor=1.25 with a symbolic token count"):
        cm(ids)


def _dynamic_expert_parallel(rank: int, world: int) -> None:
    # both exchanges: a padded one sizes its all-to-alls from each call's token count, equal on every rank
    for exchange in ("counted", "padded"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model, (ids,) = mixtral_style.build(tokens=64)
        ref = copy.deepcopy(model)
        cm = moecc.compile(model, ep=world, dynamic=True, exchange=exchange)
        opt = torch.optim.AdamW(cm.parameters(), lr=1e-2)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
        for T in (16, 24, 40):
            gen = torch.Generator().manual_seed(T)
            batches = [torch.randint(0, int(ids.max()) + 1, (2, T), generator=gen) for _ in range(world)]
            testing.step_against_eager(cm, ref, (opt, ref_opt), batches, rank, rank, f"{exchange}, T={T}")
        assert len(cm.session.graphs) == 1, "a new token count must not recompile the expert-parallel program"
        assert {x for c in cm.session.contexts for x in c.plan["exchange"].values()} == {exchange}


def test_dynamic_token_count_with_expert_parallelism_one_graph() -> None:
    """dynamic=True across 2 ranks (experts sharded, all-to-all dispatch, counted and padded): training steps at
    three sequence lengths match the eager global-batch reference, all from one compiled program."""
    testing.spawn(_dynamic_expert_parallel, 2, timeout_s=200, backend="gloo")
