"""Tiny random HookedTransformers for unit tests (milliseconds, no weights, no network).

- :func:`tiny_gpt2`: GPT-2 style (LayerNorm, GELU, learned positions, MHA).
- :func:`tiny_llama`: LLaMA style (RMSNorm, gated SiLU MLP, rotary, grouped-query attention).
- :func:`tiny_gemma`, :func:`tiny_gemma3`, :func:`tiny_neox`: Gemma (norms after attention and
  MLP), Gemma-3 (plus q/k norms, sliding windows, soft-caps) and GPT-NeoX (parallel blocks, partial
  rotary) variants for the code paths that depend on block structure.

All use a byte-level BPE tokenizer trained on the fly (deterministic) so that leading spaces,
multi-token answers and round trips behave like a real model's tokenizer.
"""
from __future__ import annotations

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


def _build(cfg_kwargs: dict, seed: int, name: str, prepend_bos: bool, n_ctx: int = 64):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from kn_lens.models import _attach_info

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
    model.eval()
    return _attach_info(model, name, "random", dict(fold_ln=False, center_writing_weights=False,
                                                     center_unembed=False), prepend_bos)


def tiny_gpt2(seed: int = 0, n_layers: int = 3, d_model: int = 32, d_mlp: int = 64,
              prepend_bos: bool = True, n_ctx: int = 64):
    return _build(dict(n_layers=n_layers, d_model=d_model, d_head=8, n_heads=4, d_mlp=d_mlp,
                       act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard"),
                  seed, "tiny-gpt2", prepend_bos, n_ctx)


def tiny_llama(seed: int = 0, n_layers: int = 3, d_model: int = 32, d_mlp: int = 48,
               prepend_bos: bool = False, n_ctx: int = 64):
    return _build(dict(n_layers=n_layers, d_model=d_model, d_head=8, n_heads=4, n_key_value_heads=2,
                       d_mlp=d_mlp, act_fn="silu", gated_mlp=True, normalization_type="RMS",
                       positional_embedding_type="rotary", rotary_dim=8, final_rms=True),
                  seed, "tiny-llama", prepend_bos, n_ctx)


def tiny_gemma(seed: int = 0, n_layers: int = 3, d_model: int = 32, d_mlp: int = 48,
               prepend_bos: bool = True, n_ctx: int = 64):
    """Gemma-style blocks: RMS norms before *and after* attention and MLP, gated GELU MLP."""
    return _build(dict(n_layers=n_layers, d_model=d_model, d_head=8, n_heads=4, n_key_value_heads=2,
                       d_mlp=d_mlp, act_fn="gelu_pytorch_tanh", gated_mlp=True,
                       normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=8,
                       final_rms=True, use_normalization_before_and_after=True),
                  seed, "tiny-gemma", prepend_bos, n_ctx)


def tiny_gemma3(seed: int = 0, n_layers: int = 3, d_model: int = 32, d_mlp: int = 48,
                prepend_bos: bool = True, n_ctx: int = 64, window: int = 4):
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
                  seed, "tiny-gemma3", prepend_bos, n_ctx)


def tiny_neox(seed: int = 0, n_layers: int = 3, d_model: int = 32, d_mlp: int = 64,
              prepend_bos: bool = True, n_ctx: int = 64):
    """GPT-NeoX / Pythia-style: parallel attention and MLP (both read the block input), LayerNorm,
    GELU, rotary on part of each head (4 of 8 dimensions)."""
    return _build(dict(n_layers=n_layers, d_model=d_model, d_head=8, n_heads=4, d_mlp=d_mlp,
                       act_fn="gelu", normalization_type="LN", positional_embedding_type="rotary",
                       rotary_dim=4, parallel_attn_mlp=True),
                  seed, "tiny-neox", prepend_bos, n_ctx)
