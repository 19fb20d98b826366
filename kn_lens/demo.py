"""The main job (``kn-lens demo``): one walk through kn-lens on a real model.

1. load (and on first use prepare) the model; 2. show built-in facts with the model's top
predictions and which of them it knows; 3. locate the knowledge neurons of one known fact with two
locators and check that they matter (suppress them vs as many random neurons); 4. erase the fact
through its knowledge neurons (QL eq. 2) and judge it the QL way; 5. move the fact (the Eiffel
Tower to Rome) with ROME, judge it on the harness's three protocols (CounterFact, token accuracy,
generation), show the edited model's predictions and a continuation, then undo it and show that
the weights are bit-identical and no hook is left.
"""
from __future__ import annotations

import time
from typing import Callable

import torch


def run_demo(model_name: str | None = None, n_facts: int = 8, seed: int = 0,
             out: Callable[[str], None] = print, model=None, stats_tokens: int = 100_000,
             new_object: str = "Rome", load_kwargs: dict | None = None) -> dict:
    from kn_lens import hooks
    from kn_lens.datasets import build_edit_requests, builtin_dataset, known_facts, sample_facts
    from kn_lens.edit import erase
    from kn_lens.evaluate import evaluate_edit, reference_slices
    from kn_lens.facts import make_query, predict, queries_for_fact, query_from_prompt
    from kn_lens.locate import agreement, locate
    from kn_lens.models import load_model, model_info
    from kn_lens.neurons import random_like, threshold_relative, top_fraction

    t0 = time.perf_counter()
    model = load_model(model_name, **(load_kwargs or {})) if model is None else model
    info = model_info(model)
    out(f"== model: {info.name} ({info.n_layers} layers x {info.d_mlp} FFN neurons, "
        f"{'gated ' if info.gated_mlp else ''}MLP, BOS={info.prepend_bos}, fold_ln={info.fold_ln}; "
        f"{info.backend} on {info.device}, {info.dtype}) "
        f"loaded in {time.perf_counter() - t0:.0f} s")
    ds = builtin_dataset()
    out(f"== built-in data: {len(ds.relations)} relations, {len(ds.facts)} facts")

    # -- 2. facts, predictions, known?
    # a display sample: facts of every relation in turn (known or not; the next lines say which)
    sample = list(sample_facts(model, ds, n_facts, seed=seed, strategy="balanced",
                               known_only=False, min_per_relation=1).facts)
    kf = known_facts(model, sample, ds)
    known = {f.key() for f in kf.known_facts()}
    out(f"\n== {n_facts} facts (first template), top-3 next tokens, known = answer top-1 on >= 60% "
        "of the relation's templates")
    preds = predict(model, [make_query(model, f, ds.relations[f.relation].templates[0])
                            for f in sample], k=3)
    for f, p in zip(sample, preds):
        top = ", ".join(f"{t!r} {pr:.2f}" for t, pr in zip(p.top_tokens, p.top_probs))
        mark = "known" if f.key() in known else "     "
        out(f"  [{mark}] {p.query.prompt} ->{p.query.answer!r:16s} | {top}")

    # -- 3. knowledge neurons of one fact
    fact = next((f for f in ds.facts if "Eiffel Tower" in f.subject), None) or kf.known_facts()[0]
    rel = ds.relations[fact.relation]
    queries = queries_for_fact(model, fact, rel)
    q = queries[0]
    out(f"\n== knowledge neurons of <{fact.subject}, {rel.name}, {fact.object}>: {q.prompt!r}")
    results = {}
    for method in ("contribution", "ig"):
        t1 = time.perf_counter()
        (s,) = locate(model, [q], method=method, progress=False)
        results[method] = [s]
        top = top_fraction(s, 0.001)
        p0 = float(predict(model, [q])[0].answer_prob)
        p_top = float(torch.exp(_lp(model, q, hooks.scale_neurons(top, 0.0))))
        rnd = random_like(top, info.n_layers, info.d_mlp,
                          generator=torch.Generator(device="cpu").manual_seed(seed), exclude=top)
        p_rnd = float(torch.exp(_lp(model, q, hooks.scale_neurons(rnd, 0.0))))
        best = ", ".join(str(n) for n in s.top_k(5))
        out(f"  {method:12s} {time.perf_counter() - t1:5.1f} s  top-5: {best}")
        out(f"  {'':12s} zero its top 0.1% ({len(top)} neurons): P({q.answer.strip()}) "
            f"{p0:.3f} -> {p_top:.3f}; as many random neurons: -> {p_rnd:.3f}")
    ag = agreement(results, k=50)
    out(f"  agreement contribution vs IG: top-50 Jaccard {ag.jaccard[0, 1]:.2f}, "
        f"Spearman {ag.spearman[0, 1]:.2f}")

    # -- 4. edit the fact: KN erasure (QL eq. 2) on the query's own IG neurons N_i
    req = build_edit_requests(ds, [fact], seed=seed)[0]
    (s_ig,) = results["ig"]
    n_i = threshold_relative(s_ig, 0.2)  # Dai et al.: > 0.2 x max
    out(f"\n== edit: erase <{fact.subject}, {rel.name}, {fact.object}> (KN erasure, QL eq. 2: the "
        f"W_out rows of the query's IG neurons N_i, > 0.2 x max, set to zero)")
    edit = erase(model, n_i, description=f"erase {fact.subject} -> {fact.object}")
    edited = [q]
    general = queries[1:]
    local = [query_from_prompt(model, lp.prompt, lp.answer) for lp in req.neighbourhood[:8]]
    weights_before = {k: v.clone() for k, v in model.state_dict().items() if "W_out" in k}
    metrics = evaluate_edit(model, edit, edited=edited, generalisation=general, locality=local,
                            mode="erasure", reference=reference_slices(
                                model, n_slices=4, slice_len=min(128, model.cfg.n_ctx), seed=seed))
    out(f"  {len(n_i)} neurons, {edit.n_params} weights changed (reliability / generalisation = "
        "1 - accuracy on the edited / paraphrased prompts; locality = other facts unchanged)")
    for k, v in metrics.summary().items():
        out(f"  {k:15s} {v if not isinstance(v, float) else round(v, 3)}")
    with model.hooks(fwd_hooks=edit.hooks(model)):
        for p in predict(model, edited + general[:2], k=1):
            out(f"  edited model: {p.query.prompt!r} -> {p.top_tokens[0]!r} "
                f"(P({p.query.answer.strip()}) = {p.answer_prob:.3f})")

    # -- 5. move the fact with ROME, judge it on the three protocols, undo it
    rome_res, req, ref = _rome_section(model, ds, fact, new_object, seed, stats_tokens, out)
    # -- 6. the same request with FiNE (a few neurons' W_out rows), next to ROME
    fine_res = _fine_section(model, req, ref, rome_res, seed, out)
    same = all(torch.equal(v, model.state_dict()[k]) for k, v in weights_before.items())
    out(f"  after the demo: weights unchanged = {same}, hooks attached = "
        f"{hooks.active_hook_count(model)}")
    out(f"\n== done in {time.perf_counter() - t0:.0f} s")
    return {"metrics": metrics.summary(), "n_known": len(known), "weights_restored": same,
            "rome": rome_res, "fine": fine_res}


def _rome_section(model, ds, fact, new_object: str, seed: int, stats_tokens: int, out) -> dict:
    from kn_lens.datasets import edit_request
    from kn_lens.edit import edit
    from kn_lens.edit.baselines.rome import ROMEConfig
    from kn_lens.edit.baselines.stats import second_moment
    from kn_lens.edit.layers import rome_layer
    from kn_lens.evaluate import prepare_reference, reference_slices
    from kn_lens.evaluate.harness import HarnessConfig, evaluate
    from kn_lens.facts import predict, prompt_query

    req = edit_request(ds, fact, new_object, seed=seed)
    layer = rome_layer(model)
    out(f"\n== edit: ROME moves <{fact.subject}, {ds.relations[fact.relation].name}, "
        f"{fact.object}> to {new_object} (rank-one update of layer {layer}'s W_out)")
    t1 = time.perf_counter()
    second_moment(model, layer, n_tokens=stats_tokens)  # once per model and layer, then cached
    t_stats = time.perf_counter() - t1
    t1 = time.perf_counter()
    e = edit(model, [req], method="rome", config=ROMEConfig(stats_tokens=stats_tokens), seed=seed)
    t_edit = time.perf_counter() - t1
    out(f"  {e!r}")
    out(f"  computed in {t_edit:.1f} s (key statistics C = E[k k^T]: {t_stats:.1f} s, cached)")
    prompts = (req.prompts + req.paraphrase_prompts)[:3]
    qs = [prompt_query(model, p, new_object, req.fact) for p in prompts]
    w = model.blocks[layer].mlp.W_out
    w_before = w.detach().clone()
    with e.applied(model):  # materialised: W_out += u v^T inside the block
        after = predict(model, qs, k=3)
        changed = not torch.equal(w.detach(), w_before)
    undone = torch.equal(w.detach(), w_before)  # restored bit for bit on exit
    with model.hooks(fwd_hooks=e.hooks(model)):  # the same edit through hooks, weights untouched
        hooked = predict(model, qs, k=3)
    agree = all(a.top_tokens == h.top_tokens for a, h in zip(after, hooked))
    for q, b, a in zip(qs, predict(model, qs, k=3), after):
        out(f"  {q.prompt!r}: {b.top_tokens[0]!r} {b.top_probs[0]:.2f} -> {a.top_tokens[0]!r} "
            f"{a.top_probs[0]:.2f}")
    ref = prepare_reference(model, reference_slices(model, n_slices=4,
                                                    slice_len=min(128, model.cfg.n_ctx), seed=seed))
    rep = evaluate(model, e, [req], config=HarnessConfig(n_bootstrap=0, max_new_tokens=24),
                   reference=ref)
    out("  judged on three protocols (each value tagged with its protocol; before -> after):")
    picks = _PICKS
    for proto, ms in picks.items():
        cells = ", ".join(f"{m} {rep.before[proto][m].fmt()} -> {rep.after[proto][m].fmt()}"
                          for m in ms)
        out(f"    {proto:12s} {cells}")
    g = rep.rows[0].generations[0]
    out(f"  generated before: {g['prompt']!r} ->{g['before']!r}")
    out(f"  generated after:  {g['prompt']!r} ->{g['after']!r}")
    out(f"  undo: W_out changed while applied = {changed}, restored bit for bit = {undone}; "
        f"hooks and materialised weights give the same top tokens = {agree}")
    return {"edit": repr(e), "seconds": t_edit, "after": {p: {m: rep.after[p][m].mean for m in ms}
                                                          for p, ms in picks.items()},
            "before": {p: {m: rep.before[p][m].mean for m in ms} for p, ms in picks.items()},
            "n_params": e.n_params, "undone": undone and changed, "hooks_agree": agree}, req, ref


_PICKS = {"counterfact": ("ES", "PS", "NS", "Score"),
          "tokens": ("rewrite_acc", "paraphrase_acc", "locality", "portability"),
          "generation": ("rewrite_success", "paraphrase_success", "fluency", "dppl")}


def _fine_section(model, req, ref, rome_res: dict, seed: int, out) -> dict:
    from kn_lens.edit import edit
    from kn_lens.evaluate.harness import HarnessConfig, evaluate

    out(f"\n== edit: FiNE moves the same fact (FiNE eq. 3 neurons, their W_out rows trained on "
        "eq. 7), next to ROME")
    t1 = time.perf_counter()
    from kn_lens.edit.fine import FiNEConfig

    # FiNE's l_f = 3 frozen last layers (tiny test models have 3 layers: keep one editable)
    cfg = FiNEConfig(freeze_last=min(3, model.cfg.n_layers - 1))
    e = edit(model, [req], method="fine", config=cfg, seed=seed)
    t_edit = time.perf_counter() - t1
    d = e.config["details"]
    layers = sorted({n[0] for n in d["neurons"]})
    out(f"  {len(d['neurons'])} neurons in layers {layers}, {e.n_params} weights changed "
        f"(ROME: {rome_res['n_params']}); {d['steps']} steps ({d['stopped']}), {t_edit:.1f} s")
    rep = evaluate(model, e, [req], config=HarnessConfig(n_bootstrap=0, max_new_tokens=24),
                   reference=ref)
    out("  after the edit, ROME | FiNE (same request, same protocols):")
    after = {}
    for proto, ms in _PICKS.items():
        after[proto] = {m: rep.after[proto][m].mean for m in ms}
        cells = ", ".join(f"{m} {rome_res['after'][proto][m]:.2f} | {after[proto][m]:.2f}"
                          for m in ms)
        out(f"    {proto:12s} {cells}")
    g = rep.rows[0].generations[0]
    out(f"  FiNE generated: {g['prompt']!r} ->{g['after']!r}")
    return {"edit": repr(e), "seconds": t_edit, "n_params": e.n_params, "after": after}


def _lp(model, q, fwd_hooks):
    from kn_lens.facts import answer_logprobs

    return answer_logprobs(model, [q], fwd_hooks=fwd_hooks)[0]
