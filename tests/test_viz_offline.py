"""circuitsvis views that render without internet: the saved page carries its JavaScript, and
headless Chromium (networking off) draws every view's root element and a non-blank screenshot."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest

from kn_lens import viz
from kn_lens.errors import ConfigError
from kn_lens.viz.browser import find_chromium, rendered_dom, screenshot

TOKENS = ["The", " Eiffel", " Tower", " is", " in"]


def _views():
    rng = np.random.default_rng(0)
    att = np.tril(rng.random((3, 5, 5))).astype(np.float32)
    att /= att.sum(-1, keepdims=True)
    return {"attention": viz.attention_view(TOKENS, att),
            "one neuron": viz.token_view(TOKENS, rng.random(5)),
            "three neurons": viz.token_view(TOKENS, rng.random((5, 3)),
                                            labels=["L3.N1", "L7.N2", "L9.N9"])}


def test_save_html_is_standalone_and_shares_the_bundle(tmp_path):
    views = _views()
    one = viz.save_html(views["attention"], tmp_path / "one.html")
    many = viz.save_html(views, tmp_path / "many.html", title="Eiffel")
    text = many.read_text()
    assert text.startswith("<!doctype html>") and "<title>Eiffel</title>" in text
    assert not re.search(r"<script[^>]*\\ssrc=", text)  # nothing fetched
    assert text.count("var CircuitsVis=") == 1 and text.count("CircuitsVis.render(") == 3
    assert many.stat().st_size < one.stat().st_size * 1.1  # the ~1.3 MB bundle once
    for title in views:
        assert f"<h3>{title}</h3>" in text
    # a circuitsvis RenderedHTML is taken by its inlined source, never its CDN str()
    from circuitsvis.tokens import colored_tokens

    raw = colored_tokens(tokens=TOKENS, values=[0.1, 0.2, 0.3, 0.4, 0.5])
    assert viz.OfflineView.of(raw).html == raw.local_src
    with pytest.raises(ConfigError, match="network"):
        viz.OfflineView.of(str(raw))  # the CDN version
    for bad, match in ((42, "not a view"), ([], "at least one")):
        with pytest.raises(ConfigError, match=match):
            viz.save_html(bad, tmp_path / "bad.html")
    with pytest.raises(ConfigError, match=".html"):
        viz.save_html(views["attention"], tmp_path / "bad.png")
    assert not list(tmp_path.glob("bad*")) and not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError):
        viz.token_view(TOKENS, np.ones(4))
    with pytest.raises(ValueError):
        viz.token_view(TOKENS, np.ones((5, 2)), labels=["a"])


_REQUIRE = os.environ.get("KN_LENS_REQUIRE_CHROMIUM") == "1"  # scripts/test.sh on Debian / CI


@pytest.mark.skipif(find_chromium() is None and not _REQUIRE,
                    reason="no Chromium (scripts/setup.sh --test installs it on Debian)")
def test_views_render_offline_in_headless_chromium(tmp_path):
    assert find_chromium() is not None, "Chromium is required here (KN_LENS_REQUIRE_CHROMIUM=1)"
    from PIL import Image

    page = viz.save_html(_views(), tmp_path / "views.html")
    dom = rendered_dom(page)
    roots = re.findall(r'<div id="(circuits-vis-[\w-]+)"[^>]*>(.{0,200})', dom)
    assert len(roots) == 3
    for _, inner in roots:  # each root element holds what React rendered into it
        assert inner.startswith("<div"), inner
    assert "<canvas" in dom and "colored-tokens" in dom
    png = screenshot(page, tmp_path / "views.png", width=900, height=800)
    img = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32)
    assert img.shape[:2] == (800, 900)
    non_white = (img.min(-1) < 200).mean()
    assert non_white > 0.02 and img.std() > 10, (non_white, img.std())
    # blank control: an empty page screenshots as (almost) pure white
    empty = tmp_path / "empty.html"
    empty.write_text("<!doctype html><html><body></body></html>")
    blank = np.asarray(Image.open(screenshot(empty, tmp_path / "empty.png")).convert("RGB"))
    assert (blank.min(-1) < 200).mean() < 0.001


def test_fact_views_on_a_model(tiny_model):
    """The views of one fact: the synapse layer, its full attention, the KNs along the prompt;
    no hook is left on the model."""
    from kn_lens import hooks, query_from_prompt
    from kn_lens.neurons import Neuron

    q = query_from_prompt(tiny_model, "The capital of France is", "Paris")
    views = viz.fact_views(tiny_model, q, [Neuron(1, 3), Neuron(0, 2)], label="France",
                           full_attention=True)
    titles = list(views)
    assert len(views) == 3 and all(t.startswith("France: ") for t in titles)
    assert "knowledge synapses of layer" in titles[0] and "full attention" in titles[1]
    assert "2 knowledge neurons" in titles[2]
    assert all(isinstance(v, viz.OfflineView) for v in views.values())
    assert "L0.N2" in views[titles[2]].html  # sorted by layer, labelled
    assert len(viz.fact_views(tiny_model, q)) == 1  # no KNs: the synapse view alone
    assert hooks.active_hook_count(tiny_model) == 0
