"""Tiny random models for unit tests (milliseconds, no weights, no network).

- :func:`tiny_gpt2`: GPT-2 style (LayerNorm, GELU, learned positions, MHA).
- :func:`tiny_llama`: LLaMA style (RMSNorm, gated SiLU MLP, rotary, grouped-query attention).
- :func:`tiny_gemma`, :func:`tiny_gemma3`, :func:`tiny_neox`: Gemma (norms after attention and
  MLP), Gemma-3 (plus q/k norms, sliding windows, soft-caps) and GPT-NeoX (parallel blocks, partial
  rotary) variants for the code paths that depend on block structure.
- :func:`tiny_hf` / :func:`tiny_hf_folder`: tiny random Hugging Face models (and folders to load
  with ``load_model(folder, backend=...)``), e.g. to compare a TransformerBridge with a
  HookedTransformer of the same weights.

The HookedTransformer builders take ``device`` and ``dtype`` (built in float32, then moved / cast).

All use a byte-level BPE tokenizer trained on the fly (deterministic) so that leading spaces,
multi-token answers and round trips behave like a real model's tokenizer.
"""
from __future__ import annotations

import dataclasses
import functools
import tempfile

import torch

_CORPUS = [
    "The capital of France is Paris", "The capital of Germany is Berlin",
    "The capital of Italy is Rome", "The capital of Spain is Madrid",
    "The capital of Japan is Tokyo", "The Eiffel Tower is located in the city of Paris",
    "The official language of Brazil is Portuguese", "Windows was developed by Microsoft",
    "The iPhone is produced by Apple", "Albert Einstein was born in Germany",
    "The currency of Japan is the yen", "Kenya is located in Africa",
    "The native language of Pablo Picasso is Spanish", "Python was created by Guido van Rossum",
]


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A deterministic byte-level BPE tokenizer (vocab 512) as a HF PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    # TransformerLens re-loads tokenizers by name_or_path: give it a folder to load from.
    folder = tempfile.mkdtemp(prefix="kn-lens-tiny-tok-")
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def _build(cfg_kwargs: dict, seed: int, name: str, prepend_bos: bool, n_ctx: int = 64,
           device=None, dtype=None):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from kn_lens.models import _attach_info, resolve_dtype

    tok = tiny_tokenizer()
    cfg = HookedTransformerConfig(
        d_vocab=len(tok), n_ctx=n_ctx, seed=seed, device="cpu", dtype=torch.float32,
        default_prepend_bos=prepend_bos, model_name=name, tokenizer_prepends_bos=False,
        **cfg_kwargs,
    )
    torch.manual_seed(seed)
    model = HookedTransformer(cfg, tok, move_to_device=False)
    # Non-trivial weight scale so attributions are not all ~0.
    with torch.no_grad():
        for p_name, p in model.named_parameters():
            if p.ndim >= 2:
                p.mul_(2.0)
    # built in float32 and then moved / cast: the same seed gives the same weights (rounded to the
    # dtype) on every device and in every dtype
    if dtype is not None and resolve_dtype(dtype) != torch.float32:
        model.to(resolve_dtype(dtype), print_details=False)
    if device is not None:
        model.to(device, print_details=False)
    model.eval()
    return _attach_info(model, name, "random", dict(fold_ln=False, center_writing_weights=False,
                                                     center_unembed=False), prepend_bos)


def tiny_gpt2(seed: int = 0, n_layers: int = 3, d_model: int = 32, d_mlp: int = 64,
              prepend_bos: bool = True, n_ctx: int = 64, *, device=None, dtype=None):
    return _build(dict(n_layers=n_layers, d_model=d_model, d_head=8, n_heads=4, d_mlp=d_mlp,
                       act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard"),
                  seed, "tiny-gpt2", prepend_bos, n_ctx, device, dtype)


def tiny_llama(seed: int = 0, n_layers: int = 3, d_model: int = 32, d_mlp: int = 48,
               prepend_bos: bool = False, n_ctx: int = 64, *, device=None, dtype=None):
    return _build(dict(n_layers=n_layers, d_model=d_model, d_head=8, n_heads=4, n_key_value_heads=2,
                       d_mlp=d_mlp, act_fn="silu", gated_mlp=True, normalization_type="RMS",
                       positional_embedding_type="rotary", rotary_dim=8, final_rms=True),
                  seed, "tiny-llama", prepend_bos, n_ctx, device, dtype)


def tiny_gemma(seed: int = 0, n_layers: int = 3, d_model: int = 32, d_mlp: int = 48,
               prepend_bos: bool = True, n_ctx: int = 64, *, device=None, dtype=None):
    """Gemma-style blocks: RMS norms before *and after* attention and MLP, gated GELU MLP."""
    return _build(dict(n_layers=n_layers, d_model=d_model, d_head=8, n_heads=4, n_key_value_heads=2,
                       d_mlp=d_mlp, act_fn="gelu_pytorch_tanh", gated_mlp=True,
                       normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=8,
                       final_rms=True, use_normalization_before_and_after=True),
                  seed, "tiny-gemma", prepend_bos, n_ctx, device, dtype)


def tiny_gemma3(seed: int = 0, n_layers: int = 3, d_model: int = 32, d_mlp: int = 48,
                prepend_bos: bool = True, n_ctx: int = 64, window: int = 4, *, device=None,
                dtype=None):
    """Gemma-3-style: :func:`tiny_gemma`'s blocks plus q/k RMS norms, sliding-window ("local")
    attention in all but the last layer (``window`` tokens, short enough that test prompts
    exceed it) with its own rotary base, and soft-capped attention scores and logits."""
    return _build(dict(n_layers=n_layers, d_model=d_model, d_head=8, n_heads=4, n_key_value_heads=2,
                       d_mlp=d_mlp, act_fn="gelu_pytorch_tanh", gated_mlp=True,
                       normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=8,
                       final_rms=True, use_normalization_before_and_after=True, use_qk_norm=True,
                       use_local_attn=True, window_size=window,
                       attn_types=["local"] * (n_layers - 1) + ["global"], rotary_base=10_000,
                       rotary_base_local=100, attn_scores_soft_cap=5.0, output_logits_soft_cap=3.0),
                  seed, "tiny-gemma3", prepend_bos, n_ctx, device, dtype)


def tiny_neox(seed: int = 0, n_layers: int = 3, d_model: int = 32, d_mlp: int = 64,
              prepend_bos: bool = True, n_ctx: int = 64, *, device=None, dtype=None):
    """GPT-NeoX / Pythia-style: parallel attention and MLP (both read the block input), LayerNorm,
    GELU, rotary on part of each head (4 of 8 dimensions)."""
    return _build(dict(n_layers=n_layers, d_model=d_model, d_head=8, n_heads=4, d_mlp=d_mlp,
                       act_fn="gelu", normalization_type="LN", positional_embedding_type="rotary",
                       rotary_dim=4, parallel_attn_mlp=True),
                  seed, "tiny-neox", prepend_bos, n_ctx, device, dtype)


TINY_MODELS = {"tiny-gpt2": tiny_gpt2, "tiny-llama": tiny_llama, "tiny-gemma": tiny_gemma,
               "tiny-gemma3": tiny_gemma3, "tiny-neox": tiny_neox}


def tiny_model(name: str, *, seed: int = 0, **kw):
    """The tiny random model called ``name`` (:data:`TINY_MODELS`: ``tiny-gpt2``,
    ``tiny-llama``, ``tiny-gemma``, ``tiny-gemma3``, ``tiny-neox``); ``kw`` are its builder's
    (``n_ctx``, ``n_layers``, ...)."""
    from kn_lens.errors import UnknownModelError

    if name not in TINY_MODELS:
        raise UnknownModelError(f"unknown tiny model {name!r}: choose from {sorted(TINY_MODELS)}")
    return TINY_MODELS[name](seed=seed, **kw)


# --------------------------------------------------------------------------- sweep test items


@dataclasses.dataclass(frozen=True)
class ProbeJob:
    """Input of the ``test.probe`` sweep kind (tests of the sweep machinery): returns ``value``
    squared after ``sleep`` seconds; with ``crash_marker``, the worker process dies (``os._exit``)
    the first time (when the marker file does not exist yet, creating it), as a killed worker
    would; with ``fail``, the item raises. Needs no model (``needs_model=False``)."""

    value: int
    sleep: float = dataclasses.field(default=0.0, compare=False)  # not part of the key
    crash_marker: str | None = None
    fail: bool = False


def run_probe(model, item) -> dict:
    import os
    import time
    from pathlib import Path

    job = item.payload
    if job.crash_marker is not None and not Path(job.crash_marker).exists():
        Path(job.crash_marker).write_text(str(os.getpid()))
        os._exit(3)
    if job.fail:
        from kn_lens.errors import InvalidFactError

        raise InvalidFactError(f"probe {job.value} fails on purpose")
    time.sleep(job.sleep)
    return {"value": job.value, "square": job.value ** 2, "pid": os.getpid()}


def register_test_kinds() -> None:
    """Register the ``test.probe`` item kind (idempotent)."""
    from kn_lens.sweep.items import ItemKind, available_kinds, register_kind

    if "test.probe" not in available_kinds():
        register_kind(ItemKind(name="test.probe", run="kn_lens.testing:run_probe",
                               methods=lambda: ["probe"], payload=ProbeJob, needs_model=False))



HF_FAMILIES = ("gpt2", "gpt-neox", "llama", "gemma-3")


def tiny_hf(family: str, vocab: int | None = None, *, n_layers: int = 2,
            initializer_range: float | None = None):
    """A tiny random Hugging Face model of ``family`` (one of :data:`HF_FAMILIES`) as the current
    ``transformers`` builds it: GPT-2 (LayerNorm, learned positions), GPT-NeoX (parallel
    attention + MLP), LLaMA (RMSNorm, gated MLP, rotary, grouped-query attention), Gemma-3 (local +
    global layers, q/k norms, norms after attention and MLP). ``initializer_range`` widens the
    random weights (HF's default 0.02 gives near-uniform predictions)."""
    import transformers as T

    vocab = len(tiny_tokenizer()) if vocab is None else vocab
    init = {} if initializer_range is None else {"initializer_range": initializer_range}
    small = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=n_layers,
                 num_attention_heads=4, max_position_embeddings=64, **init)
    if family == "gpt2":  # GPT2Config has no n_ctx any more
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32,
                                              n_layer=n_layers, n_head=4, **init))
    if family == "gpt-neox":
        return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(intermediate_size=64, **small))
    if family == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(intermediate_size=48, num_key_value_heads=2,
                                                tie_word_embeddings=True, **small))
    if family == "gemma-3":  # local + global layers, q/k norms, query_pre_attn_scalar != head_dim
        types = ["sliding_attention", "full_attention"] * n_layers
        return T.Gemma3ForCausalLM(T.Gemma3TextConfig(
            intermediate_size=48, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=16,
            sliding_window=4, layer_types=types[:n_layers], **small))
    raise ValueError(f"unknown family {family!r}; choose one of {HF_FAMILIES}")


def tiny_hf_folder(folder, family: str, *, seed: int = 0, **kw):
    """:func:`tiny_hf` (seeded) saved with the tiny tokenizer into ``folder``, ready for
    ``load_model(folder)`` with either backend. Returns the folder."""
    from pathlib import Path

    torch.manual_seed(seed)
    folder = Path(folder)
    tiny_hf(family, **kw).eval().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
