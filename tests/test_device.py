"""Any device and dtype, tested on a machine without a GPU.

- ``load_model(device=, dtype=)``: names, typed errors, what ``kn_info`` records.
- Device correctness without a GPU: the bug class is a tensor made on the default device (the
  CPU) in a compute path, which meets the model's tensors on a GPU ("expected all tensors on the
  same device") or silently computes on the CPU. The pipeline sweep runs every compute path on a
  CPU model under ``torch.set_default_device("meta")``: a factory given its device (the model's,
  or ``"cpu"`` on purpose for results and random draws) is unaffected; one relying on the
  default makes a meta tensor, and mixing it with the model's CPU tensors or reading it raises.
  That is stricter than a GPU run (a CPU tensor meant to stay on the CPU must say so) and finds
  the GPU bug on every path it runs, without a GPU. Running the model itself on ``meta`` would
  find nothing: every op on meta tensors succeeds. A generator on the wrong device is not seen
  by the sweep (a CPU generator drawing on a CPU model is fine): an AST check requires every
  random draw to name ``device="cpu"`` (then move; the same seed gives the same draws on every
  device). Not checked without a GPU: GPU kernels' own numerics and memory.
- bfloat16 / float16 models (CPU kernels exist for both): results within a tolerance of the
  float32 model's, results in float32, and the reductions kn-lens keeps in float32 (the answer
  log-softmax, KL) exact to float32 on half-precision logits.
"""
import ast
import dataclasses
from pathlib import Path

import pytest
import torch

import kn_lens
from kn_lens import hooks as H
from kn_lens.errors import ConfigError
from kn_lens.facts import Fact, make_query, query_from_prompt
from kn_lens.models import load_model, model_info, resolve_device, resolve_dtype
from kn_lens.neurons import Neuron, NeuronSet
from kn_lens.testing import tiny_gemma, tiny_hf_folder, tiny_llama


# --------------------------------------------------------------------------- names and errors


def test_dtype_names():
    for name, dt in [("float32", torch.float32), ("fp32", torch.float32), (None, torch.float32),
                     ("bfloat16", torch.bfloat16), ("BF16", torch.bfloat16),
                     ("torch.float16", torch.float16), ("half", torch.float16),
                     (torch.bfloat16, torch.bfloat16)]:
        assert resolve_dtype(name) == dt
    for bad in ("float8", "int8", torch.int64, 32):
        with pytest.raises(ConfigError, match="dtype"):
            resolve_dtype(bad)


def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad, match in [("gpu0", "not a device name"), ("meta", "holds no weights"),
                       ("cuda:99", "cuda")]:
        with pytest.raises(ConfigError, match=match):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_load_model_places_and_records(tmp_path):
    folder = tiny_hf_folder(tmp_path / "tiny", "llama")
    for backend in ("hooked", "bridge"):
        m = load_model(folder, device="cpu", dtype="bfloat16", backend=backend)
        info = m.kn_info
        assert (info.device, info.dtype, info.backend) == ("cpu", "bfloat16", backend)
        assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in m.parameters())
        assert model_info(m) == info
    assert load_model(folder).kn_info.backend == "hooked"  # TransformerLens 3.x: the default
    for kw, match in [({"backend": "tl4"}, "backend"), ({"dtype": "float64x"}, "dtype"),
                      ({"device": "meta"}, "meta")]:
        with pytest.raises(ConfigError, match=match):
            load_model(folder, **kw)


def test_model_info_follows_the_weights():
    m = tiny_llama()
    assert model_info(m).dtype == "float32"
    m.to(torch.float16, print_details=False)
    assert model_info(m).dtype == "float16" and model_info(m).device == "cpu"


# --------------------------------------------------------------------------- no implicit device


def _pipeline(model):
    """One call of every compute path: locators, hook factories, the scorer, generation,
    analyses, every editor, edits applied both ways, the harness and perplexity."""
    from kn_lens.analysis import TraceConfig, causal_trace, neuron_top_tokens
    from kn_lens.analysis.mapping import scaled_probs
    from kn_lens.analysis.synapses import (activation_maps, knowledge_synapses,
                                           synapse_manipulation)
    from kn_lens.edit import edit
    from kn_lens.edit.fine import FiNEConfig
    from kn_lens.edit.kne import KNEConfig
    from kn_lens.edit.tnf_da import TNFDAConfig
    from kn_lens.evaluate import generation as G
    from kn_lens.evaluate.harness import HarnessConfig, evaluate
    from kn_lens.evaluate.perplexity import perplexity, prepare_reference, reference_slices
    from kn_lens.evaluate.scoring import score
    from kn_lens.locate import IGConfig, contribution_scores, integrated_gradients
    from kn_lens.locate import integrated_gradients_plain
    from kn_lens.locate.mediation import (AtPConfig, MediationConfig, attribution_patching,
                                          causal_mediation, causal_mediation_plain)
    from test_edit_engine import CONFIGS, _request

    q = query_from_prompt(model, "The capital of France is", "Guido van Rossum")
    q2 = make_query(model, Fact("France", "capital", "Paris"), "The capital of {} is")
    kns = NeuronSet([Neuron(0, 1), Neuron(1, 3)])
    req = _request()
    configs = {**CONFIGS, "fine": FiNEConfig(steps=2, freeze_last=1),
               "kne": KNEConfig(steps=2, ig_steps=3, module="W_Q"),
               "tnf_da": TNFDAConfig(steps=2, n_noise=1, n_augment=1,
                                     augment_subjects=("Germany", "Italy"))}
    ref = reference_slices(model, n_slices=2, slice_len=16)
    return {
        "ig": lambda: integrated_gradients(model, q, config=IGConfig(steps=4)),
        "ig_plain": lambda: integrated_gradients_plain(model, q, config=IGConfig(steps=4)),
        "ig_eos": lambda: integrated_gradients(model, q, config=IGConfig(steps=4,
                                                                          baseline="eos")),
        "contribution": lambda: contribution_scores(model, q),
        "mediation": lambda: causal_mediation(model, q2, config=MediationConfig(
            n_noise=1, gamma=5.0)),
        "mediation_plain": lambda: causal_mediation_plain(model, q2, config=MediationConfig(
            n_noise=1, gamma=1.0)),
        "atp": lambda: attribution_patching(model, q2, config=AtPConfig(n_noise=2)),
        "hooks": lambda: score(model, [q2], fwd_hooks=H.set_neurons(kns, [1.0, 2.0], 3)
                               + H.scale_neurons(kns, 0.5)),
        "score": lambda: score(model, [q, q2], top_k=3),
        "greedy": lambda: G.greedy(model, list(q.prompt_ids), 3),
        "greedy_batch": lambda: G.greedy_batch(model, [list(q.prompt_ids),
                                                       list(q2.prompt_ids)[1:]], 3),
        "causal_trace": lambda: causal_trace(model, q2, config=TraceConfig(n_noise=2)),
        "synapses": lambda: knowledge_synapses(model, q2),
        "synapse_manipulation": lambda: synapse_manipulation(model, [q2, q], [kns, kns]),
        "activation_maps": lambda: activation_maps(model, q2),
        "scaled_probs": lambda: scaled_probs(model, q2, [(kns, 0.0)]),
        "neuron_top_tokens": lambda: neuron_top_tokens(model, [Neuron(0, 1)]),
        "perplexity": lambda: perplexity(model, ref),
        "prepared_perplexity": lambda: prepare_reference(model, ref).perplexity(
            model, start_at_layer=1),
        **{f"edit_{m}": (lambda m=m: _apply_both_ways(model, edit(
            model, [req], method=m, config=configs[m], seed=1), q2))
           for m in ("ft_l", "rome", "memit", "kn_erase", "kn_update", "fine", "kne", "tnf_da")},
        "evaluate": lambda: evaluate(model, edit(model, [req], method="kn_erase",
                                                 config=CONFIGS["kn_erase"]), [req],
                                     config=HarnessConfig(max_new_tokens=3, n_bootstrap=5),
                                     reference=prepare_reference(model, ref)),
    }


def _apply_both_ways(model, e, q):
    from kn_lens.evaluate.scoring import score

    with model.hooks(fwd_hooks=e.hooks(model)):
        score(model, [q])
    with e.applied(model):
        score(model, [q])


@pytest.fixture(scope="module", params=["llama", "gemma"])
def pipeline(request):
    model = tiny_llama() if request.param == "llama" else tiny_gemma()
    return _pipeline(model)


_NAMES = ["ig", "ig_plain", "ig_eos", "contribution", "mediation", "mediation_plain", "atp",
          "hooks", "score", "greedy", "greedy_batch", "causal_trace", "synapses",
          "synapse_manipulation", "activation_maps", "scaled_probs", "neuron_top_tokens",
          "perplexity", "prepared_perplexity", "edit_ft_l", "edit_rome", "edit_memit",
          "edit_kn_erase", "edit_kn_update", "edit_fine", "edit_kne", "edit_tnf_da", "evaluate"]


def test_the_pipeline_lists_every_job(pipeline):
    assert sorted(pipeline) == sorted(_NAMES)


@pytest.mark.parametrize("job", _NAMES)
def test_no_compute_path_relies_on_the_default_device(pipeline, job):
    """See the module doc: under a meta default device, a tensor made without naming its device
    fails here exactly where it would meet the model's tensors on a GPU."""
    torch.set_default_device("meta")
    try:
        pipeline[job]()
    finally:
        torch.set_default_device(None)


def test_random_draws_are_made_on_the_cpu():
    """Every torch random draw with a generator names ``device="cpu"`` and every generator is a
    CPU one: a generator must live on the device it samples on, and drawing on the CPU and then
    moving gives the same neurons, noise and windows for a seed on every device."""
    bad = []
    for path in sorted(Path(kn_lens.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                continue
            kw = {k.arg: k.value for k in node.keywords}
            draws = "generator" in kw or node.func.attr == "Generator"
            device = kw.get("device")
            if draws and not (isinstance(device, ast.Constant) and device.value == "cpu"):
                bad.append(f"{path.name}:{node.lineno} torch.{node.func.attr}")
    assert not bad, f"random draws without device='cpu': {bad}"


# --------------------------------------------------------------------------- reduced precision


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.08), (torch.float16, 0.01)])
def test_reduced_precision_matches_float32(dtype, tol):
    """The same weights (built in float32, then cast) in bfloat16 / float16: every score within
    ``tol`` x its largest value of the float32 model's (bfloat16 keeps 8 significant bits,
    float16 11: 2^-8 ~ 0.4 % per rounding, and three blocks of rounding errors add up; measured
    4.3 % / 0.2 % for IG, 0.8 % / 0.4 % for contribution), results in float32."""
    from kn_lens.evaluate.scoring import score
    from kn_lens.locate import IGConfig, contribution_scores, integrated_gradients

    ref, low = tiny_llama(), tiny_llama(dtype=dtype)
    assert next(low.parameters()).dtype == dtype and model_info(low).dtype == str(dtype)[6:]
    q = query_from_prompt(ref, "The capital of France is", "Paris")
    for fn in (lambda m: integrated_gradients(m, q, config=IGConfig(steps=20)),
               lambda m: contribution_scores(m, q)):
        a, b = fn(ref), fn(low)
        assert b.scores.dtype == torch.float32 and b.per_token.dtype == torch.float32
        err, scale = float((a.scores - b.scores).abs().max()), float(a.scores.abs().max())
        assert err <= tol * scale, (b.method, err, scale)
    (sa,), (sb,) = score(ref, [q]), score(low, [q])
    assert abs(sa.logprob - sb.logprob) <= tol * abs(sa.logprob)


def test_answer_log_probs_and_kl_are_float32_on_half_precision_logits():
    """The reductions over the vocabulary run in float32 whatever the model's dtype: on bfloat16
    logits the answer log-probability and the KL term equal a float64 computation on the same
    logits to float32 rounding (in bfloat16 they would be off by ~1e-2)."""
    from kn_lens.edit.optimise import KL, Example
    from kn_lens.evaluate.scoring import score, token_logprobs

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 500, generator=g) * 4).to(torch.bfloat16)
    ids = [5, 77, 400]
    lp = token_logprobs(logits, ids)
    exact = torch.log_softmax(logits.double(), -1)[torch.arange(3), ids]
    assert lp.dtype == torch.float32 and float((lp.double() - exact).abs().max()) < 1e-5
    ref = (torch.randn(3, 500, generator=g) * 4).to(torch.bfloat16)
    for direction in ("ref||edit", "edit||ref"):
        term = KL([Example((1, 2, 3), (0, 1, 2))], direction=direction)
        term.prepare([ref])
        got = term.loss([logits])
        p, r = torch.log_softmax(logits.double(), -1), torch.log_softmax(ref.double(), -1)
        want = ((r.exp() * (r - p)) if direction == "ref||edit" else (p.exp() * (p - r)))
        assert got.dtype == torch.float32
        assert abs(float(got) - float(want.sum(-1).mean())) < 1e-5
    model = tiny_llama(dtype=torch.bfloat16)
    q = query_from_prompt(model, "The capital of France is", "Paris")
    (s,) = score(model, [q])
    with torch.no_grad():
        full = torch.log_softmax(model(q.tokens())[0].double(), -1)
    want = sum(float(full[p, a]) for p, a in zip(q.answer_positions, q.answer_ids))
    assert abs(s.logprob - want) < 1e-4  # only the model's own (bfloat16) rounding


def test_edits_on_a_half_precision_model():
    """Deltas are trained and kept in float32; on a bfloat16 model an edit acts alike through
    hooks and written into the weights (rounded once into bfloat16), and undoing it restores
    the weights bit for bit. Gemma-style post-norms compute in float32 inside a bfloat16 model:
    the hook terms follow the activation's dtype."""
    from kn_lens.edit import Edit, low_rank, w_in_columns, w_out_rows

    for model in (tiny_llama(dtype=torch.bfloat16), tiny_gemma(dtype=torch.bfloat16)):
        cfg = model.cfg
        g = torch.Generator().manual_seed(3)
        e = Edit((w_out_rows(1, [2, 5], torch.randn(2, cfg.d_model, generator=g)),
                  w_in_columns(0, [1], torch.randn(cfg.d_model, 1, generator=g)),
                  low_rank(2, "W_out", torch.randn(cfg.d_mlp, 1, generator=g),
                           torch.randn(cfg.d_model, 1, generator=g))), "", "", model_info(model))
        assert all(d.values.dtype == torch.float32 for d in e.deltas[:2])
        toks = torch.tensor([[1, 2, 3, 4, 5, 6]])
        snap = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            base = torch.log_softmax(model(toks).float(), -1)
            with model.hooks(fwd_hooks=e.hooks(model)):
                hooked = torch.log_softmax(model(toks).float(), -1)
            with e.applied(model):
                written = torch.log_softmax(model(toks).float(), -1)
        assert float((hooked - base).abs().max()) > 0.5
        assert float((hooked - written).abs().max()) < 0.1 * float((hooked - base).abs().max())
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in snap.items())


def test_statistics_cache_key_ignores_device_and_backend():
    """Second moments depend on the weights, not on where or through which class they were
    computed: the cache key leaves out device and backend (and so keeps the keys of caches
    written before they were recorded)."""
    from kn_lens.edit.baselines.stats import _fingerprint

    m = tiny_llama()
    key = _fingerprint(m)
    m.kn_info = dataclasses.replace(m.kn_info, backend="bridge", device="cuda:0")
    assert _fingerprint(m) == key
    m.kn_info = dataclasses.replace(m.kn_info, fold_ln=not m.kn_info.fold_ln)
    assert _fingerprint(m) != key


def test_cli_and_scripts_take_device_and_dtype(tmp_path, capsys):
    """``--device`` / ``--dtype`` / ``--backend`` reach the loader from the CLI; the experiment
    scripts' parser takes ``--device`` / ``--dtype`` and ``load_experiment_model`` applies them."""
    import sys

    from kn_lens.cli import build_parser, main

    args = build_parser().parse_args(["locate", "The capital of France is", "Paris",
                                      "--device", "cpu", "--dtype", "bf16", "--backend", "bridge"])
    assert (args.device, args.dtype, args.backend) == ("cpu", "bf16", "bridge")
    folder = tiny_hf_folder(tmp_path / "tiny", "llama")
    assert main(["models", "info", str(folder), "--dtype", "float16", "--backend", "bridge"]) == 0
    out = capsys.readouterr().out
    assert "backend: bridge" in out and "dtype: float16" in out and "device: cpu" in out
    assert main(["predict", "The capital of France is", "--model", str(folder),
                 "--device", "meta"]) == 2  # a typed error, reported
    from kn_lens import experiment

    a = experiment.parser("x").parse_args(["--model", "tiny-llama", "--device", "cpu",
                                           "--dtype", "bfloat16"])
    m = experiment.model_from_args(a)
    assert next(m.parameters()).dtype == torch.bfloat16
