"""Inputs that differ from the compiled signature recompile (a new graph, same answers) or, past the
recompile limit, raise a clear error instead of silently running eager."""

from __future__ import annotations

import pytest
import torch

import moecc
from moecc.examples import switch_style


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
