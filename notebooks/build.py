"""Write the notebooks from their cell sources and execute them (outputs are committed so the
notebooks read well unexecuted). ``python notebooks/build.py [NAME ...]`` (default: all).

Each notebook's code asserts what it shows (tests/test_notebooks.py re-executes the committed
files). Views (circuitsvis) are saved to ``notebooks/out/`` (not committed) and shown as a
headless-Chromium screenshot, so the committed outputs stay small; ``display(view)`` renders the
interactive view in a live notebook, offline.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

SETUP = '''import torch
torch.set_num_threads(2)
from kn_lens import load_model, builtin_dataset, queries_for_fact, predict
model = load_model()                      # smollm2-135m, prepared on first use
ds = builtin_dataset()
fact = next(f for f in ds.facts if f.subject == "the Eiffel Tower")
rel = ds.relations[fact.relation]
print(model.kn_info.name, "|", fact, "|", rel.name)'''

NOTEBOOKS = {
    "01_tour": [
        ("md", """# 01 · A tour of kn-lens

Load the default model (SmolLM2-135M, offline), take one fact, find its knowledge neurons (KNs) with
three locators, check that they matter (suppress / enhance them against as many random neurons),
and compare the locators. Every intervention is a scoped hook: nothing stays on the model."""),
        ("code", SETUP),
        ("md", "## The fact on every template of its relation"),
        ("code", '''queries = queries_for_fact(model, fact, rel)     # one query per template
for p in predict(model, queries, k=3):
    print(f"{p.query.prompt!r:58} top-1 {p.top_tokens[0]!r:10} P({p.query.answer}) = {p.answer_prob:.2f}")'''),
        ("md", """## Three locators on the first template

`contribution` (FiNE eq. 3: activation x (W_U W_out)[answer]), `ig` (integrated gradients, Dai et
al. / KNE), `atp` (attribution patching, a first-order estimate of TNF-DA's indirect effect). Each
returns a `NeuronScores` over every (layer, neuron)."""),
        ("code", '''import time
from kn_lens import locate, agreement
q = queries[0]
results = {}
for method in ("contribution", "ig", "atp"):
    t = time.perf_counter()
    results[method] = locate(model, [q], method=method, progress=False)
    s = results[method][0]
    print(f"{method:12s} {time.perf_counter() - t:4.1f} s  top-5: {[str(n) for n in s.top_k(5)]}")
    assert s.method == method and s.scores.shape == (model.cfg.n_layers, model.cfg.d_mlp)'''),
        ("code", '''ag = agreement(results, k=50)
print("top-50 Jaccard / Spearman between locators")
for i, a in enumerate(ag.methods):
    for j, b in enumerate(ag.methods):
        if i < j:
            print(f"  {a:12s} vs {b:12s} Jaccard {ag.jaccard[i, j]:.2f}  Spearman {ag.spearman[i, j]:.2f}")'''),
        ("md", """## Do the KNs matter? Suppress and enhance them

Scale the top 0.1 % of neurons (by IG) to 0 or 2x, against as many random neurons (seeded)."""),
        ("code", '''from kn_lens import hooks
from kn_lens.facts import answer_probs
from kn_lens.neurons import random_like, top_fraction
kns = top_fraction(results["ig"][0], 0.001)
rnd = random_like(kns, model.cfg.n_layers, model.cfg.d_mlp,
                  generator=torch.Generator().manual_seed(0), exclude=kns)
base = float(answer_probs(model, [q])[0])
p = {}
for name, ns in (("KNs", kns), ("random", rnd)):
    for factor in (0.0, 2.0):
        with model.hooks(fwd_hooks=hooks.scale_neurons(ns, factor)):   # removed on exit
            p[name, factor] = float(answer_probs(model, [q])[0])
print(f"P({q.answer}) unedited {base:.3f}   ({len(kns)} KNs, as many random neurons)")
for (name, factor), v in p.items():
    print(f"  {name:7s} x{factor:.0f}: {v:.3f}")
assert p["KNs", 0.0] < p["random", 0.0] and p["KNs", 2.0] > p["random", 2.0]
assert hooks.active_hook_count(model) == 0'''),
        ("md", """The KNs move the answer's probability in both directions far more than random neurons do.
Next: `02_circuits` (attention, knowledge synapses, what a KN writes) and `03_edit_a_fact`."""),
    ],
    "02_circuits": [
        ("md", """# 02 · Circuits: attention, knowledge synapses, what a knowledge neuron writes

circuitsvis views that work offline (`kn_lens.viz`), the Query Localization paper's knowledge
synapses (QL eq. 5-6) and the attention sink, a neuron score heatmap, and the tokens a KN promotes
through the unembedding."""),
        ("code", SETUP),
        ("code", '''from kn_lens import query_from_prompt
from kn_lens.analysis.synapses import attention_patterns, knowledge_synapses
q = query_from_prompt(model, "The Eiffel Tower is located in the city of", "Paris")
syn = knowledge_synapses(model, q)          # QL eq. 6, alpha = 0.3
pats = attention_patterns(model, q)         # [layer, head, query, key]
n_syn = int(syn.mask.sum()); on_sink = int(syn.mask[..., 0].sum())
print(f"{n_syn} synapses (layer, head, key) over {model.cfg.n_layers} layers; {on_sink} "
      f"({on_sink / n_syn:.0%}) on key 0, the attention sink ({syn.tokens[0]!r})")
per_layer = syn.mask.flatten(1).sum(1)
print("synapses per layer:", per_layer.tolist())
assert on_sink / n_syn > 0.5     # the sink dominates (README: ~95 % over the dataset)'''),
        ("md", """## Offline views

`viz.synapse_view` / `attention_view` / `token_view` return `OfflineView`s: in a live notebook the
cell's value renders the interactive circuitsvis view (its JavaScript inlined, no CDN). Here the
views are saved as one page and shown as a headless-Chromium screenshot, to keep the committed
notebook small."""),
        ("code", '''from pathlib import Path
from kn_lens import viz, contribution_scores
from kn_lens.neurons import top_k
layer = int(per_layer.argmax())
scores = contribution_scores(model, q)
kns = sorted(top_k(scores, 5), key=lambda n: (n.layer, n.index))
store = {}
from kn_lens import hooks
fwd = []
for l in {n.layer for n in kns}:
    fwd += hooks.cache_hook(hooks.mlp_post(l), store)
with torch.no_grad(), model.hooks(fwd_hooks=fwd):
    model(torch.tensor([q.prompt_ids]), return_type=None)
acts = torch.stack([store[hooks.mlp_post(n.layer)][0, :, n.index] for n in kns], dim=1)
views = {f"layer {layer}: synapse columns only": viz.synapse_view(syn.tokens, pats, syn.mask, layer=layer),
         f"layer {layer}: full attention": viz.attention_view(syn.tokens, pats[layer]),
         "top-5 KNs (contribution) along the prompt":
             viz.token_view(syn.tokens, acts, labels=[str(n) for n in kns])}
page = viz.save_html(views, Path("out") / "02_circuits.html", title=q.prompt)
print(page, f"{page.stat().st_size / 1e6:.1f} MB (the bundle once)")'''),
        ("code", '''from IPython.display import Image
from kn_lens.viz.browser import find_chromium, screenshot
if find_chromium():
    png = screenshot(page, Path("out") / "02_circuits.png", width=900, height=1150)
    display(Image(filename=str(png), width=700))
else:
    print("no Chromium here: open", page, "in a browser")'''),
        ("md", "## Where the fact's neurons are: the contribution map"),
        ("code", '''from IPython.display import Image
heat = viz.plot_score_heatmap(scores.scores, Path("out") / "02_heatmap.png",
                              title=f"contribution scores: {q.prompt} -> {q.answer}",
                              highlight=[[n.layer, n.index] for n in kns])
display(Image(filename=str(heat), width=700))
print("layers of the top-50:", sorted({n.layer for n in scores.top_k(50)}))'''),
        ("md", """## What a KN writes

A neuron's output vector (its row of `W_out`) read through the unembedding, signed by its
activation at the last token: the tokens it pushes up there, and where Paris ranks among them.
A neuron can contribute to Paris (eq. 3 weighs the entry by a large activation) without Paris
being among its top tokens."""),
        ("code", '''W_U = model.W_U.detach()
answer_id = q.answer_ids[0]
for n in kns:
    logits = model.blocks[n.layer].mlp.W_out[n.index].detach() @ W_U
    sign = 1.0 if float(acts[-1, kns.index(n)]) > 0 else -1.0   # the activation at the last token
    top = torch.topk(sign * logits, 6).indices.tolist()
    rank = int((sign * logits > sign * logits[answer_id]).sum())
    print(f"{str(n):10s} act {float(acts[-1, kns.index(n)]):7.2f}  promotes "
          f"{[model.tokenizer.decode([t]) for t in top]}  (Paris ranks {rank})")'''),
        ("md", """## The attention sink

QL's synapses count attention mass; almost all of it sits on the first token, which carries no
meaning here. `SynapseConfig(ignore_first=True)` drops key 0 from S (not in the paper)."""),
        ("code", '''from kn_lens.analysis.synapses import SynapseConfig
syn2 = knowledge_synapses(model, q, config=SynapseConfig(ignore_first=True))
print(f"with key 0 ignored: {int(syn2.mask.sum())} synapses left of {n_syn}")
assert int(syn2.mask[..., 0].sum()) == 0'''),
    ],
    "03_edit_a_fact": [
        ("md", """# 03 · Edit a fact: FiNE vs ROME vs KNE, judged on three protocols, then undone

One CounterFact-style request (the Eiffel Tower -> Rome), three editors, one harness: the
CounterFact probability comparisons (ES / PS / NS), EasyEdit's token accuracy (rewrite,
paraphrase, locality, portability) and generation (the new object in greedy text, fluency, dPPL).
Each editor returns an `Edit` and never changes the model."""),
        ("code", SETUP),
        ("code", '''from kn_lens.datasets import edit_request
from kn_lens.evaluate import prepare_reference, reference_slices
from kn_lens.evaluate.harness import HarnessConfig, evaluate, measure
from kn_lens.evaluate.probes import probe_sets
req = edit_request(ds, fact, "Rome", seed=0)
cfg = HarnessConfig(n_bootstrap=0, max_new_tokens=24)
pss = probe_sets(model, [req], n_prefix_probes=cfg.n_prefix_probes, seed=cfg.seed)
before = measure(model, pss, config=cfg)               # the unedited model, once
ref = prepare_reference(model, reference_slices(model, n_slices=4, slice_len=128, seed=0))
print(req.prompts[0], "->", req.new_object, f"| {len(pss[0].probes)} probes:",
      sorted({p.kind for p in pss[0].probes}))'''),
        ("code", '''import time
from kn_lens.edit import edit
weights = {k: v.clone() for k, v in model.state_dict().items()}
edits, reports = {}, {}
for method in ("fine", "rome", "kne"):
    t = time.perf_counter()
    edits[method] = edit(model, [req], method=method, seed=0)
    secs = time.perf_counter() - t
    reports[method] = evaluate(model, edits[method], pss, config=cfg, reference=ref, before=before)
    print(f"{method:5s} {secs:5.1f} s  {edits[method].n_params:>8,} weights  {edits[method]!r}")'''),
        ("code", '''rows = {"counterfact": ("ES", "PS", "NS", "Score"),
        "tokens": ("rewrite_acc", "paraphrase_acc", "locality", "portability"),
        "generation": ("rewrite_success", "paraphrase_success", "fluency", "dppl")}
first = reports["fine"]
print(f"{'protocol':12s} {'metric':20s} {'unedited':>9s}" + "".join(f"{m:>9s}" for m in reports))
for proto, ms in rows.items():
    for m in ms:
        cells = "".join(f"{reports[k].after[proto][m].mean:9.3f}" for k in reports)
        print(f"{proto:12s} {m:20s} {first.before[proto][m].mean:9.3f}{cells}")
for k, r in reports.items():
    assert r.after["counterfact"]["ES"].mean == 1.0, k   # every editor moved the rewrite prompt'''),
        ("code", '''for k, r in reports.items():
    g = r.rows[0].generations[0]
    print(f"{k:5s} {g['prompt']!r} ->{g['after']!r}")
print(f"unedited {g['prompt']!r} ->{g['before']!r}")'''),
        ("md", """## Apply, then undo

An `Edit` is applied through hooks (weights untouched) or materialised inside a `with` block and
restored bit for bit on exit. Sequential edits compose (`kn_lens.edit.compose`)."""),
        ("code", '''from kn_lens import hooks
from kn_lens.facts import query_from_prompt
probe = query_from_prompt(model, req.prompts[0], "Rome")
e = edits["fine"]
with model.hooks(fwd_hooks=e.hooks(model)):
    hooked = predict(model, [probe])[0].top_tokens[0]
with e.applied(model):
    applied = predict(model, [probe])[0].top_tokens[0]
same = all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
print(f"through hooks: {hooked!r}; materialised: {applied!r}; after both: weights bit-identical = "
      f"{same}, hooks attached = {hooks.active_hook_count(model)}")
assert hooked == applied == " Rome" and same and hooks.active_hook_count(model) == 0'''),
    ],
    "04_new_relation": [
        ("md", """# 04 · A relation of your own: `kn_lens.study`

Write a relation (templates with `{}` for the subject, facts as `[subject, object]`) and test
hypotheses on it: which facts the model knows, where their knowledge neurons are, whether the KNs
are consistent across templates (QL), whether they are causal (vs random neurons), and which
built-in relations share them (TNF-DA). `kn-lens study FILE --out DIR` runs the same from the
shell; a killed run resumes from `DIR/.cache`."""),
        ("code", '''import json, torch
from pathlib import Path
torch.set_num_threads(2)
from kn_lens import load_model
from kn_lens.datasets import load_relations_file
relations = {"relations": [{
    "id": "river_country", "name": "river flows through", "group": "location",
    "templates": ["The {} is a river in", "The river {} flows through the country of",
                  "The {} river is located in"],
    "facts": [["Danube", "Austria"], ["Loire", "France"], ["Seine", "France"], ["Tiber", "Italy"],
              ["Rhine", "Germany"], ["Volga", "Russia"], ["Ganges", "India"], ["Nile", "Egypt"],
              ["Thames", "England"], ["Yangtze", "China"]]}]}
path = Path("out") / "rivers.json"
path.parent.mkdir(exist_ok=True)
path.write_text(json.dumps(relations))
ds = load_relations_file(path)   # every problem of the file is listed at once, before model work
print(ds.relations["river_country"], len(ds), "facts")'''),
        ("md", "A malformed file is refused with every problem and its location:"),
        ("code", '''from kn_lens.errors import DataFileError
bad = Path("out") / "bad.json"
bad.write_text(json.dumps({"relations": [{"id": "r", "name": "r", "templates": ["no subject"],
                                          "facts": [["Danube", ""]], "colour": 1}]}))
try:
    load_relations_file(bad)
except DataFileError as e:
    print(e)
    assert len(e.problems) == 3'''),
        ("code", '''from kn_lens.study import StudyConfig, study
model = load_model()
res = study(model, ds, out=Path("out") / "study_rivers",
            config=StudyConfig(locators=("contribution",), builtin_facts=2, n_views=1),
            progress=False)
print(f"{res.computed} items computed, {res.cached} from the cache, {res.seconds:.0f} s")
r = res.results["relations"]["river_country"]
print(f"known: {r['n_known']} of {r['n_facts']} facts")
assert r["n_known"] >= 2'''),
        ("code", '''c = res.results["causal"]["contribution"]["by_relation"]["river_country"]
print(f"causal check: {c['pass']} of {c['n']} facts pass; mean relative change of P(answer): "
      f"KNs x0 {c['kn_suppress']}, random x0 {c['random_suppress']}, "
      f"KNs x2 {c['kn_enhance']}, random x2 {c['random_enhance']}")
for d in res.results["sharing"]["river_country"]["nearest"]:
    print(f"shares neurons with {d['builtin']} ({d['group']}): Jaccard {d['jaccard']}, "
          f"{d['shared']} neurons")'''),
        ("code", '''from IPython.display import Markdown
report = (res.out / "report.md").read_text()
Markdown(report.split("## 4.")[0])'''),
    ],
}


def build(name: str, execute: bool = True) -> Path:
    import nbformat
    from nbclient import NotebookClient

    cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
             for kind, src in NOTEBOOKS[name]]
    nb = nbformat.v4.new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"}})
    path = HERE / f"{name}.ipynb"
    if execute:
        (HERE / "out").mkdir(exist_ok=True)
        t = time.perf_counter()
        NotebookClient(nb, timeout=900, kernel_name="python3",
                       resources={"metadata": {"path": str(HERE)}}).execute()
        print(f"{name}: executed in {time.perf_counter() - t:.0f} s")
    for c in nb.cells:  # stable files: no execution timestamps, no progress bars / warnings
        c.get("metadata", {}).pop("execution", None)
        if c.cell_type == "code":
            c.outputs = [o for o in c.outputs
                         if not (o.output_type == "stream" and o.get("name") == "stderr")]
    tmp = path.with_suffix(".tmp")
    nbformat.write(nb, str(tmp))
    tmp.replace(path)
    return path


if __name__ == "__main__":
    for n in sys.argv[1:] or list(NOTEBOOKS):
        print(build(n))
