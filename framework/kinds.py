"""Every SAE kind, registered explicitly: the one module that imports all of them, so that
code which needs the complete registry (config validation, building SAEs, loading exports)
imports this, and `framework.sae` (the base classes) imports none of the variants.

    topk, abstopk                               framework/sae.py
    batchtopk, mutual_choice, feature_choice    framework/variants/choice.py
    topafa, gsae, mpsae, matryoshka, vtopk      framework/variants/<name>.py
    jumprelu                                    framework/variants/jumprelu.py
    clt, jumprelu_clt (cross-layer transcoders) framework/variants/clt.py

and the latent-shard layouts beyond TopK's (framework/clt_sharding.py registers clt's).
"""

from __future__ import annotations

from framework.errors import ConfigError
from framework.sae import SAE_KINDS, TopKSAE, with_skip
from framework.schema import build_dataclass
from framework import clt_sharding  # noqa: F401  (registration)
from framework.variants import choice, clt, gsae, jumprelu, matryoshka, mpsae, topafa, vtopk  # noqa: F401  (registration)

__all__ = ["SAE_KINDS", "build_sae", "lm_gradient_sites", "parse_options"]


def build_sae(kind: str, d_in: int, n_latents: int, k: int, d_out: int | None = None, seed: int = 0,
              options: dict | None = None, skip_connection: bool = False) -> TopKSAE:
    cls = with_skip(SAE_KINDS[kind]) if skip_connection else SAE_KINDS[kind]
    return cls(d_in, n_latents, k, d_out=d_out, seed=seed, options=parse_options(kind, options or {}))


def parse_options(kind: str, options: dict, key: str = "options"):
    """The kind's typed Options from a config mapping; unknown keys fail with a suggestion."""
    try:
        return build_dataclass(SAE_KINDS[kind].Options, options, key)
    except ConfigError as err:  # a kind's own checks say "options.x: ..."; name the SAE too
        msg = str(err)
        if key != "options" and msg.startswith("options."):
            raise ConfigError(key + msg[len("options"):]) from None
        raise


def lm_gradient_sites(sae_cfgs) -> list[str]:
    """The sites whose LM-loss gradient the SAEs need: the output site of every kind that
    `needs_lm_grad` (the reconstructed activation, i.e. an SAE's own site)."""
    return sorted({s.output_site or s.site for s in sae_cfgs if SAE_KINDS[s.kind].needs_lm_grad})
