"""The public API: `moecc.compile` as a function and as a class decorator, `torch.compile(backend="moecc")`,
shared parameters/state, train/eval, and the options that switch passes off."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import example_module, load_example, next_token_loss
from torch import nn

import moecc
from moecc.backends import torch_backend

mixtral_style = example_module("mixtral_style")
switch_style = example_module("switch_style")

SMALL = dict(num_layers=1, num_experts=4)  # a one-layer Mixtral-style model: compiles in about a second


def small_mixtral(seed: int = 0, cls: type[nn.Module] | None = None) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = (cls or mixtral_style.MixtralStyleLM)(mixtral_style.Config(**SMALL))
    return model, torch.randint(0, 64, (2, 8))


class DropoutMixtral(mixtral_style.MixtralStyleLM):
    """Mixtral-style with dropout on the embeddings: train() and eval() give different programs."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.drop = nn.Dropout(0.5)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.embed(input_ids))
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


@pytest.fixture(autouse=True)
def _fresh_dynamo_per_test():
    # every test compiles new instances of the same classes; Dynamo counts them against one recompile limit
    torch._dynamo.reset()
    yield


def _lifted_paths(regions) -> list[str]:
    return sorted(r.path for r in regions if r.status == "lifted")


# ---------------------------------------------------------------------------------------------------------
# parameters and state


def test_compiled_module_shares_parameters_buffers_and_state():
    model, _ = load_example("deepseek_style")  # has a buffer (the selection bias)
    cm = moecc.compile(model)
    assert isinstance(cm, moecc.CompiledModule)
    got, want = list(cm.named_parameters()), list(model.named_parameters())
    assert [n for n, _ in got] == [n for n, _ in want]
    assert all(a is b for (_, a), (_, b) in zip(got, want, strict=True))
    assert all(a is b for a, b in zip(cm.parameters(), model.parameters(), strict=True))
    sd, ref = cm.state_dict(), model.state_dict()
    assert list(sd) == list(ref)
    assert all(sd[k].data_ptr() == ref[k].data_ptr() for k in ref)
    assert any("e_score_correction_bias" in k for k in sd)
    assert {n: b.data_ptr() for n, b in cm.module.named_buffers()} == {
        n: b.data_ptr() for n, b in model.named_buffers()
    }


def test_load_state_dict_reaches_the_compiled_program():
    model, ids = small_mixtral(seed=0)
    other, _ = small_mixtral(seed=1)
    cm = moecc.compile(model)
    torch.testing.assert_close(cm(ids), model(ids))
    cm.load_state_dict(other.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters(), strict=True))
    torch.testing.assert_close(cm(ids), other(ids), atol=1e-5, rtol=1e-5)
    assert len(cm.session.graphs) == 1  # new values, not a new program


def test_optimizer_on_compiled_parameters_updates_the_model():
    model, ids = small_mixtral()
    before = copy.deepcopy(model.state_dict())
    cm = moecc.compile(model)
    opt = torch.optim.SGD(cm.parameters(), lr=0.1)
    next_token_loss(cm(ids), ids).backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(".experts." in k for k in changed) and any("router" in k for k in changed)


# ---------------------------------------------------------------------------------------------------------
# decorator


def test_class_decorator_compiles_lazily_and_matches_undecorated():
    @moecc.compile()
    class CompiledMixtral(mixtral_style.MixtralStyleLM):
        pass

    model, ids = small_mixtral(cls=CompiledMixtral)
    plain, _ = small_mixtral(seed=1)
    plain.load_state_dict(model.state_dict())
    assert "_moecc_compiled" not in model.__dict__  # nothing compiled before the first call
    assert isinstance(CompiledMixtral.__moecc_options__, moecc.CompileOptions)
    out = model(ids)
    compiled = model.__dict__["_moecc_compiled"]
    assert isinstance(compiled, moecc.CompiledModule)
    assert _lifted_paths(compiled.regions) == ["layers.0.moe.experts"]
    torch.testing.assert_close(out, plain(ids), atol=1e-5, rtol=1e-5)
    # the same program on later calls, gradients on the instance's own parameters
    next_token_loss(model(ids), ids).backward()
    next_token_loss(plain(ids), ids).backward()
    assert len(compiled.session.graphs) == 1
    for (n, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    # the compiled program is not a submodule: no extra parameters or state
    assert list(model.state_dict()) == list(plain.state_dict())
    assert len(list(model.parameters())) == len(list(plain.parameters()))
    # a second instance compiles on its own
    second, _ = small_mixtral(seed=2, cls=CompiledMixtral)
    torch.testing.assert_close(second(ids), plain.__class__.forward(second, ids), atol=1e-5, rtol=1e-5)
    assert second.__dict__["_moecc_compiled"] is not compiled


def test_compile_applied_to_a_class_returns_the_class():
    class Fresh(switch_style.SwitchStyleLM):
        pass

    decorated = moecc.compile(Fresh, allow_fallback=True)
    assert decorated is Fresh
    assert Fresh.__moecc_options__.allow_fallback
    torch.manual_seed(0)
    model = Fresh(switch_style.Config(num_layers=1))
    ids = torch.randint(0, 64, (2, 8))
    out = model(ids)
    expect = switch_style.SwitchStyleLM.forward(model, ids)  # the class's own eager code
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)
    regions = model.__dict__["_moecc_compiled"].regions
    assert [(r.path, r.expert_fn, r.status) for r in regions] == [("layers.0.moe.experts", "mlp_gelu", "lifted")]


# ---------------------------------------------------------------------------------------------------------
# train / eval


def _is_stochastic(fn, ids) -> bool:
    return not torch.equal(fn(ids), fn(ids))


def test_train_eval_toggle_on_compiled_module():
    model, ids = small_mixtral(cls=DropoutMixtral)
    cm = moecc.compile(model)
    assert _is_stochastic(cm, ids)  # training: dropout is on
    cm.eval()
    model.eval()
    assert not cm.training and not cm.module.drop.training
    torch.testing.assert_close(cm(ids), model(ids), atol=1e-5, rtol=1e-5)
    cm.train()
    assert _is_stochastic(cm, ids)
    cm.eval()
    torch.testing.assert_close(cm(ids), model(ids), atol=1e-5, rtol=1e-5)
    assert _lifted_paths(cm.regions) == ["layers.0.moe.experts"]


def test_train_eval_toggle_on_decorated_instance():
    @moecc.compile()
    class CompiledDropout(DropoutMixtral):
        pass

    model, ids = small_mixtral(cls=CompiledDropout)
    plain, _ = small_mixtral(seed=1, cls=DropoutMixtral)
    plain.load_state_dict(model.state_dict())
    plain.eval()
    model.eval()  # before the first call: compiled in eval mode
    torch.testing.assert_close(model(ids), plain(ids), atol=1e-5, rtol=1e-5)
    model.train()
    assert _is_stochastic(model, ids)
    model.eval()
    torch.testing.assert_close(model(ids), plain(ids), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# torch.compile(backend="moecc")


def test_torch_compile_backend_matches_eager_and_runs_moecc_ops():
    model, (ids,) = load_example("mixtral_style")
    ref = copy.deepcopy(model)
    before = torch_backend.COUNTERS.copy()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(model, backend="moecc")
        out = compiled(ids)
        ran = torch_backend.COUNTERS - before
        # the two expert GEMMs of each of the two layers ran through the moecc ops
        assert ran["grouped_mm.native"] + ran["grouped_mm.loop"] >= 4
        expect = ref(ids)
        torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)
        loss = next_token_loss(out, ids)
        before = torch_backend.COUNTERS.copy()
        loss.backward()
        ran = torch_backend.COUNTERS - before
        assert ran["grouped_mm_wgrad.native"] + ran["grouped_mm_wgrad.loop"] == 4
    next_token_loss(expect, ids).backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def test_moecc_backend_is_registered():
    assert "moecc" in torch._dynamo.list_backends(exclude_tags=())


# ---------------------------------------------------------------------------------------------------------
# switching passes off


def test_disable_lift_moe_lifts_nothing_and_still_matches_eager():
    model, ids = small_mixtral()
    cm = moecc.compile(model, disable_passes=["lift_moe"])
    assert cm.options.disable_passes == ("lift_moe",)
    before = torch_backend.COUNTERS.copy()
    out = cm(ids)
    assert torch_backend.COUNTERS == before  # no moecc op ran
    assert cm.regions == []
    assert not any(k.startswith("lift_moe.") for k in cm.session.counters())
    torch.testing.assert_close(out, model(ids), atol=1e-5, rtol=1e-5)


def test_disable_the_other_passes_still_lifts_and_matches(tmp_path):
    model, ids = small_mixtral()
    off = ["plan", "shard", "fuse", "schedule", "lower"]
    cm = moecc.compile(model, disable_passes=off, dump_dir=tmp_path)
    out = cm(ids)
    torch.testing.assert_close(out, model(ids), atol=1e-5, rtol=1e-5)
    assert _lifted_paths(cm.regions) == ["layers.0.moe.experts"]
    index = (cm.dump_root / "graph_0" / "index.md").read_text()
    for name in off:
        assert any(line.startswith(f"| {name} ") and "disabled" in line for line in index.splitlines()), name


@pytest.mark.parametrize("bad", ["lift_mo", "fusion"])
def test_unknown_pass_name_is_an_error_naming_it(bad):
    model, _ = small_mixtral()
    with pytest.raises(moecc.MoeccError, match=bad) as info:
        moecc.compile(model, disable_passes=["fuse", bad])
    assert "lift_moe" in str(info.value)  # the message lists the real pass names


@pytest.mark.parametrize(
    "kwargs, match",
    [({"backend": "triton-xyz"}, "backend"), ({"ep": 0}, "ep"), ({"ep": "2"}, "ep")],
)
def test_bad_options_are_errors(kwargs, match):
    model, _ = small_mixtral()
    with pytest.raises(moecc.MoeccError, match=match):
        moecc.compile(model, **kwargs)


def test_non_module_is_an_error():
    with pytest.raises(moecc.MoeccError, match="nn.Module"):
        moecc.compile(lambda x: x)


def test_env_disable_passes(monkeypatch):
    monkeypatch.setenv("MOECC_DISABLE_PASSES", " lift_moe , ")
    model, ids = small_mixtral()
    cm = moecc.compile(model, disable_passes=["fuse"])
    assert set(cm.options.disable_passes) == {"lift_moe", "fuse"}
    out = cm(ids)
    assert cm.regions == []
    torch.testing.assert_close(out, model(ids), atol=1e-5, rtol=1e-5)


def test_env_disable_passes_unknown_name(monkeypatch):
    monkeypatch.setenv("MOECC_DISABLE_PASSES", "lift_moe,nonexistent_pass")
    model, _ = small_mixtral()
    with pytest.raises(moecc.MoeccError, match="nonexistent_pass"):
        moecc.compile(model)


def test_env_dump_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MOECC_DUMP_DIR", str(tmp_path))
    model, ids = small_mixtral()
    cm = moecc.compile(model)
    cm(ids)
    assert cm.dump_root is not None and cm.dump_root.parent == tmp_path
    assert (cm.dump_root / "summary.md").is_file()
    assert "layers.0.moe.experts" in (cm.dump_root / "summary.md").read_text()
