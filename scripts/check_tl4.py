"""Does kn-lens on TransformerLens 4 (TransformerBridge) give the numbers of kn-lens on
TransformerLens 3.x (HookedTransformer)? Two runs of this script, one per TransformerLens:

    # 1. with TransformerLens 3.x (the project's venv): HookedTransformer results
    python scripts/check_tl4.py save --out /tmp/kn-lens-tl4
    # 2. TransformerLens 4 next to it (its own dependencies are the project's already)
    python -m pip install --no-deps --target /tmp/tl4 transformer-lens==4.3.0
    PYTHONPATH=/tmp/tl4 python scripts/check_tl4.py check --out /tmp/kn-lens-tl4

``check`` loads the same tiny random Hugging Face folders (LLaMA, GPT-2 and Gemma-3 style) with
``backend="bridge"`` and prints, per family and computation, the largest difference from the saved
result: every locator, the scorer, batched generation, causal tracing, a hook factory, an edit
through hooks and materialised, every editor (the deltas it returns), knowledge synapses,
activation maps, scaled probabilities, prepared perplexity and the three-protocol harness. Exit
status 1 when a difference exceeds 1e-3 x the largest value.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch

FAMILIES = ("llama", "gpt2", "gemma-3")
STATS_TOKENS = 3000  # ROME's second moments on tiny models (the default is 100,000)


def _request():
    from kn_lens.facts import EditRequest, Fact, LabelledPrompt

    f = Fact("France", "capital", "Paris")
    return EditRequest(
        f, "Rome", ("The capital of France is",), paraphrase_prompts=("France has the capital",),
        neighbourhood=(LabelledPrompt("The capital of Italy is", "Rome",
                                      Fact("Italy", "capital", "Rome")),),
        prefixes=("Yesterday, the dog stood. ", "The old house was quiet. "))


def computations(model) -> dict:
    from kn_lens import hooks as H
    from kn_lens.analysis import TraceConfig, causal_trace
    from kn_lens.edit import Edit, edit, head_slices, low_rank, w_in_columns, w_out_rows
    from kn_lens.analysis.mapping import scaled_probs
    from kn_lens.analysis.synapses import activation_maps, knowledge_synapses
    from kn_lens.edit.baselines.ft_l import FTLConfig
    from kn_lens.edit.baselines.memit import MEMITConfig
    from kn_lens.edit.baselines.rome import ROMEConfig
    from kn_lens.edit.fine import FiNEConfig
    from kn_lens.edit.kn import KNEditorConfig
    from kn_lens.edit.kne import KNEConfig
    from kn_lens.edit.tnf_da import TNFDAConfig
    from kn_lens.evaluate import generation as G
    from kn_lens.evaluate.harness import HarnessConfig, evaluate
    from kn_lens.evaluate.perplexity import prepare_reference, reference_slices
    from kn_lens.evaluate.scoring import score
    from kn_lens.facts import Fact, make_query, query_from_prompt
    from kn_lens.locate import IGConfig, contribution_scores, integrated_gradients
    from kn_lens.locate.mediation import (AtPConfig, MediationConfig, attribution_patching,
                                          causal_mediation)
    from kn_lens.models import model_info
    from kn_lens.neurons import Neuron, NeuronSet

    m, cfg = model, model.cfg
    q = query_from_prompt(m, "The capital of France is", "Guido van Rossum")
    q2 = make_query(m, Fact("France", "capital", "Paris"), "The capital of {} is")
    toks = torch.randint(0, cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    e = Edit((w_out_rows(1, [2, 7], torch.randn(2, cfg.d_model, generator=g)),
              w_in_columns(0, [1, 4], torch.randn(cfg.d_model, 2, generator=g)),
              head_slices(2, "W_Q", [1], torch.randn(1, cfg.d_model, cfg.d_head, generator=g)),
              head_slices(1, "W_K", [0], torch.randn(1, cfg.d_model, cfg.d_head, generator=g)),
              head_slices(0, "W_O", [2], torch.randn(1, cfg.d_head, cfg.d_model, generator=g)),
              low_rank(2, "W_out", torch.randn(cfg.d_mlp, 1, generator=g),
                       torch.randn(cfg.d_model, 1, generator=g))), "check", "", model_info(m))

    def logprobs(fwd):
        with torch.no_grad(), m.hooks(fwd_hooks=fwd):
            return torch.log_softmax(m(toks), -1)

    def materialised():
        with torch.no_grad(), e.applied(m):
            return torch.log_softmax(m(toks), -1)

    def deltas(method, config):
        ed = edit(m, [_request()], method=method, config=config, seed=1)
        return torch.cat([(d.dense() if hasattr(d, "u") else d.values).flatten()
                          for d in ed.deltas])

    prompts = [list(q.prompt_ids), list(q.prompt_ids)[2:]]
    kns = NeuronSet([Neuron(0, 1), Neuron(1, 3)])
    ref = reference_slices(m, n_slices=2, slice_len=16)
    request = _request()

    def judged():
        report = evaluate(m, edit(m, [request], method="kn_erase",
                                  config=KNEditorConfig(locator="contribution")), [request],
                          config=HarnessConfig(max_new_tokens=3, n_bootstrap=0),
                          reference=prepare_reference(m, ref))
        return torch.tensor([report.after[p][k].mean for p in sorted(report.after)
                             for k in sorted(report.after[p])])

    return {
        "ig": lambda: integrated_gradients(m, q, config=IGConfig(steps=6)).scores,
        "ig_eos": lambda: integrated_gradients(m, q, config=IGConfig(steps=6,
                                                                      baseline="eos")).scores,
        "contribution": lambda: contribution_scores(m, q).scores,
        "mediation": lambda: causal_mediation(m, q2, config=MediationConfig(
            n_noise=2, gamma=10.0)).scores,
        "atp": lambda: attribution_patching(m, q2, config=AtPConfig(n_noise=2)).scores,
        "score": lambda: torch.tensor([x for s in score(m, [q, q2]) for x in s.token_logprobs]),
        "greedy_batch": lambda: torch.tensor(sum(G.greedy_batch(m, prompts, 5), [])),
        "causal_trace": lambda: causal_trace(m, q2, config=TraceConfig(n_noise=2)).p_restored,
        "set_neurons": lambda: logprobs(H.set_neurons([Neuron(0, 3), Neuron(2, 5)],
                                                      torch.tensor([1.5, -2.0]), positions=[2])),
        "edit_hooks": lambda: logprobs(e.hooks(m)),
        "edit_materialised": materialised,
        "kn_erase": lambda: deltas("kn_erase", KNEditorConfig(locator="contribution")),
        "fine": lambda: deltas("fine", FiNEConfig(steps=3, freeze_last=1)),
        "rome": lambda: deltas("rome", ROMEConfig(v_steps=3, stats_tokens=STATS_TOKENS)),
        "memit": lambda: deltas("memit", MEMITConfig(v_steps=3, stats_tokens=STATS_TOKENS)),
        "ft_l": lambda: deltas("ft_l", FTLConfig(steps=3)),
        "kn_update": lambda: deltas("kn_update", KNEditorConfig(locator="contribution")),
        "kne_w_q": lambda: deltas("kne", KNEConfig(steps=2, ig_steps=3, module="W_Q")),
        "tnf_da": lambda: deltas("tnf_da", TNFDAConfig(steps=2, n_noise=1, n_augment=1,
                                                       augment_subjects=("Germany", "Italy"))),
        "synapses": lambda: knowledge_synapses(m, q2).column_sums,
        "activation_maps": lambda: activation_maps(m, q2).maps["suppressed"],
        "scaled_probs": lambda: torch.as_tensor(scaled_probs(m, q2, [(kns, 0.0)])),
        "prepared_perplexity": lambda: torch.tensor(
            prepare_reference(m, ref).perplexity(m, start_at_layer=1)),
        "evaluate": judged,
    }


def main() -> int:
    import transformer_lens

    from kn_lens.models import load_model
    from kn_lens.testing import tiny_hf_folder

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("save", "check"))
    ap.add_argument("--out", type=Path, required=True, help="folder for the models and results")
    args = ap.parse_args()
    print(f"TransformerLens from {Path(transformer_lens.__file__).parent}")
    ref_file = args.out / "hooked_results.pt"
    ref = {} if args.mode == "save" else torch.load(ref_file)
    failed = 0
    for fam in FAMILIES:
        folder = args.out / fam
        if args.mode == "save":
            tiny_hf_folder(folder, fam, n_layers=3, initializer_range=0.2)
        model = load_model(folder, backend="hooked" if args.mode == "save" else "bridge")
        print(f"{fam}: {type(model).__name__}")
        for name, fn in computations(model).items():
            key = f"{fam}/{name}"
            try:
                value = fn().detach().double().cpu()
            except Exception:
                failed += 1
                print(f"  {name}: ERROR\n{traceback.format_exc()}")
                continue
            if args.mode == "save":
                ref[key] = value
                continue
            same_nan = torch.equal(value.isnan(), ref[key].isnan())  # e.g. a metric n/a in both
            value, want = value.nan_to_num(), ref[key].nan_to_num()
            err = float((value - want).abs().max())
            scale = float(want.abs().max())
            ok = same_nan and err <= 1e-3 * max(scale, 1e-12)
            failed += not ok
            print(f"  {name:18s} max abs diff {err:.2e} (largest value {scale:.2e}) "
                  f"{'ok' if ok else 'DIFFERS'}")
    if args.mode == "save":
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(ref, ref_file)
        print(f"saved {len(ref)} results to {ref_file}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
