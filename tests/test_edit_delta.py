"""Edit as data: hook-applied == materialised, exact undo, restore on error, save/load, compose."""
import pytest
import torch

from kn_lens import hooks as H
from kn_lens.edit import Edit, WeightDelta, compose, head_slices, w_in_columns, w_out_rows
from kn_lens.errors import ConfigError, DataFileError, NumericalError
from kn_lens.models import model_info
from kn_lens.neurons import Neuron


def _tokens(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (3, 10), generator=g)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_weights_equal(model, snap):
    now = model.state_dict()
    assert snap.keys() == now.keys()
    for k, v in snap.items():
        assert torch.equal(v, now[k]), f"{k} changed"


def _mixed_edit(model, seed=1):
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    deltas = [
        w_out_rows(1, [3, 7], torch.randn(2, cfg.d_model, generator=g)),
        w_out_rows(2, [0], torch.randn(1, cfg.d_model, generator=g)),
        w_in_columns(0, [1, 5, 9], torch.randn(cfg.d_model, 3, generator=g)),
        head_slices(2, "W_O", [1], torch.randn(1, cfg.d_head, cfg.d_model, generator=g)),
        head_slices(1, "W_Q", [0, 2], torch.randn(2, cfg.d_model, cfg.d_head, generator=g)),
        head_slices(0, "W_V", [1], torch.randn(1, cfg.d_model, cfg.d_head, generator=g)),
    ]
    if cfg.gated_mlp:
        deltas.append(w_in_columns(2, [4], torch.randn(cfg.d_model, 1, generator=g), gate=True))
    return Edit(tuple(deltas), "random test edit", "test", model_info(model))


@pytest.mark.parametrize("kind", ["w_out", "w_in", "mixed"])
def test_hooks_equal_materialised(tiny_model, kind):
    cfg = tiny_model.cfg
    g = torch.Generator().manual_seed(2)
    if kind == "w_out":
        edit = Edit((w_out_rows(1, [0, 4, 11], torch.randn(3, cfg.d_model, generator=g)),))
    elif kind == "w_in":
        edit = Edit((w_in_columns(1, [2, 6], torch.randn(cfg.d_model, 2, generator=g)),))
    else:
        edit = _mixed_edit(tiny_model)
    toks = _tokens(tiny_model)
    with torch.no_grad():
        base = tiny_model(toks)
        with tiny_model.hooks(fwd_hooks=edit.hooks(tiny_model)):
            hooked = tiny_model(toks)
        with edit.applied(tiny_model):
            mat = tiny_model(toks)
    assert (hooked - base).abs().max() > 1e-2  # the edit does something
    torch.testing.assert_close(hooked, mat, atol=2e-5, rtol=1e-5)
    assert H.active_hook_count(tiny_model) == 0


def test_hooks_equal_materialised_output_norm_model():
    """Models that normalise block outputs (Gemma-style ln*_post): the delta is added before the norm."""
    from kn_lens.testing import _build

    model = _build(dict(n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=48, act_fn="gelu",
                        gated_mlp=True, normalization_type="RMS", positional_embedding_type="rotary",
                        rotary_dim=8, use_normalization_before_and_after=True), 0, "tiny-post", True)
    g = torch.Generator().manual_seed(0)
    edit = Edit((w_out_rows(1, [3, 7], torch.randn(2, 32, generator=g)),
                 head_slices(0, "W_O", [1], torch.randn(1, 8, 32, generator=g))))
    toks = _tokens(model)
    with torch.no_grad():
        with model.hooks(fwd_hooks=edit.hooks(model)):
            hooked = model(toks)
        with edit.applied(model):
            mat = model(toks)
    torch.testing.assert_close(hooked, mat, atol=2e-5, rtol=1e-5)


def test_undo_is_exact(tiny_model):
    snap = _snapshot(tiny_model)
    edit = _mixed_edit(tiny_model)
    with edit.applied(tiny_model):
        changed = any(not torch.equal(v, tiny_model.state_dict()[k]) for k, v in snap.items())
    assert changed
    _assert_weights_equal(tiny_model, snap)


def test_restore_on_exception(tiny_model):
    snap = _snapshot(tiny_model)
    edit = _mixed_edit(tiny_model)
    with pytest.raises(RuntimeError, match="boom"):
        with edit.applied(tiny_model):
            raise RuntimeError("boom")
    _assert_weights_equal(tiny_model, snap)
    with pytest.raises(RuntimeError, match="boom"):
        with tiny_model.hooks(fwd_hooks=edit.hooks(tiny_model)):
            raise RuntimeError("boom")
    assert H.active_hook_count(tiny_model) == 0


def test_bad_delta_raises_before_touching_weights(gpt2_tiny):
    snap = _snapshot(gpt2_tiny)
    good = w_out_rows(0, [1], torch.ones(1, gpt2_tiny.cfg.d_model))
    bad = w_out_rows(1, [gpt2_tiny.cfg.d_mlp], torch.ones(1, gpt2_tiny.cfg.d_model))  # out of range
    with pytest.raises(ConfigError, match="out of range"):
        with Edit((good, bad)).applied(gpt2_tiny):
            pass
    _assert_weights_equal(gpt2_tiny, snap)
    with pytest.raises(ConfigError):
        Edit((w_out_rows(0, [1], torch.ones(1, 5)),)).check(gpt2_tiny)
    with pytest.raises(ConfigError, match="repeated"):
        w_out_rows(0, [1, 1], torch.ones(2, gpt2_tiny.cfg.d_model))
    with pytest.raises(NumericalError):
        w_out_rows(0, [1], torch.full((1, gpt2_tiny.cfg.d_model), float("nan")))
    with pytest.raises(ConfigError, match="applied"):  # rows of W_in are not a hookable unit
        Edit((WeightDelta("blocks.0.mlp.W_in", 0, [0], torch.ones(1, gpt2_tiny.cfg.d_mlp)),)).hooks(gpt2_tiny)


def test_model_mismatch_refused(gpt2_tiny, llama_tiny):
    edit = Edit((w_out_rows(0, [1], torch.ones(1, gpt2_tiny.cfg.d_model)),), model=model_info(gpt2_tiny))
    with pytest.raises(ConfigError, match="another model"):
        edit.check(llama_tiny)


def test_save_load_roundtrip(tiny_model, tmp_path):
    edit = _mixed_edit(tiny_model)
    edit.save(tmp_path / "e")
    back = Edit.load(tmp_path / "e")
    assert back.description == edit.description and back.method == edit.method
    assert back.model == edit.model and back.n_params == edit.n_params
    for a, b in zip(edit.deltas, back.deltas):
        assert a.param == b.param and a.dim == b.dim
        assert torch.equal(a.index, b.index) and torch.equal(a.values, b.values)
    toks = _tokens(tiny_model)
    with torch.no_grad(), edit.applied(tiny_model):
        a = tiny_model(toks)
    with torch.no_grad(), back.applied(tiny_model):
        b = tiny_model(toks)
    assert torch.equal(a, b)
    with pytest.raises(DataFileError):
        Edit.load(tmp_path / "nothing-here")


def test_compose_and_scale(gpt2_tiny):
    d = gpt2_tiny.cfg.d_model
    a = Edit((w_out_rows(1, [2, 5], torch.ones(2, d)),), "a")
    b = Edit((w_out_rows(1, [5, 9], 2 * torch.ones(2, d)), w_in_columns(0, [3], torch.ones(d, 1))), "b")
    c = a + b
    assert compose([a, b]).n_params == c.n_params == 2 * d + 2 * d
    rows = [x for x in c.deltas if x.param == "blocks.1.mlp.W_out"][0]
    assert rows.index.tolist() == [2, 5, 9]
    assert rows.values[:, 0].tolist() == [1.0, 3.0, 2.0]  # deltas on the same row add
    assert c.touched_neurons() == a.touched_neurons() | b.touched_neurons()
    assert Neuron(0, 3) in c.touched_neurons()
    # two deltas on one parameter inside one Edit are merged the same way
    merged = Edit((w_out_rows(1, [2], torch.ones(1, d)), w_out_rows(1, [2, 3], torch.ones(2, d))))
    assert len(merged) == 1 and merged.deltas[0].values[:, 0].tolist() == [2.0, 1.0]
    # composition == applying both
    toks = _tokens(gpt2_tiny)
    with torch.no_grad():
        with c.applied(gpt2_tiny):
            both = gpt2_tiny(toks)
        with a.applied(gpt2_tiny), b.applied(gpt2_tiny):
            nested = gpt2_tiny(toks)
        with gpt2_tiny.hooks(fwd_hooks=a.hooks(gpt2_tiny) + b.hooks(gpt2_tiny)):
            hooked = gpt2_tiny(toks)
    torch.testing.assert_close(both, nested, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both, hooked, atol=2e-5, rtol=1e-5)
    # scaling
    half = c.scale(0.5)
    assert torch.equal(half.deltas[0].values, c.deltas[0].values * 0.5)
    with torch.no_grad():
        base = gpt2_tiny(toks)
        with c.scale(0.0).applied(gpt2_tiny):
            zero = gpt2_tiny(toks)
    torch.testing.assert_close(zero, base)
    # (c + (-c)) is a no-op edit
    with torch.no_grad(), (c + c.scale(-1.0)).applied(gpt2_tiny):
        torch.testing.assert_close(gpt2_tiny(toks), base)
