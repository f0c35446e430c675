"""circuit-tracer in the tests: its imports made to work with this environment's libraries, and
tiny-gpt2 as its TransformerLens replacement model (for attribution graphs on our exports)."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants

# circuit-tracer 0.5.0 imports a constant that huggingface_hub >= 1.0 dropped (hf_transfer); its
# value only matters for hub downloads, which these tests never make
if not hasattr(huggingface_hub.constants, "HF_HUB_ENABLE_HF_TRANSFER"):
    huggingface_hub.constants.HF_HUB_ENABLE_HF_TRANSFER = False


def tl_replacement_model(hf_model, tokenizer, transcoders, folder: Path):
    """tiny-gpt2 in TransformerLens with the same weights, made circuit-tracer's replacement
    model over `transcoders` (a transcoder set or a CLT; what ReplacementModel.from_config does,
    plus the weights). TransformerLens reloads the tokenizer from its name_or_path, so it is
    saved to a local folder first."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    tokenizer.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (  # noqa: PLC0415
        TransformerLensReplacementModel,
    )
    from transformer_lens import HookedTransformerConfig  # noqa: PLC0415
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights  # noqa: PLC0415

    c = hf_model.config
    cfg = HookedTransformerConfig(d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head, d_mlp=c.n_inner,
                                  n_layers=c.n_layer, n_ctx=c.n_positions, eps=c.layer_norm_epsilon,
                                  d_vocab=c.vocab_size, act_fn=c.activation_function, normalization_type="LN",
                                  original_architecture="GPT2LMHeadModel", model_name="tiny-gpt2", device="cpu")
    model = TransformerLensReplacementModel(cfg, tokenizer=tokenizer)
    model.load_and_process_state_dict(convert_gpt2_weights(hf_model, cfg), fold_ln=False,
                                      center_writing_weights=False, center_unembed=False)
    model._configure_replacement_model(transcoders)
    return model
