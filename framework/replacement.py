"""Replacement sets (`eval.replacement_sets: {name: [sae names]}`): several single-layer MLP
transcoders evaluated as one replacement model, as a cross-layer transcoder is: every member's
MLP output replaced at once in one forward, each member reading its input from that replaced
forward (errors compound through the layers), for ΔCE, KL and CE recovered against the zero
ablation of the same MLPs (framework/evaluate.py `splice_metrics`, on the same tokens and
positions as every SAE's own splice metrics).

A member reads the MLP input side of its layer L and writes `blocks.L.mlp_out`; at most one
member per layer; and all members of a set read the same input kind, as one replacement model
reads one hook (circuit-tracer's TranscoderSet has one `feature_input_hook`): a set mixing
resid_mid and mlp_in readers would compare as neither. A CLT is refused: it is a replacement
model already (its own metrics).
"""

from __future__ import annotations

from framework import hooks, llm
from framework.kinds import SAE_KINDS
from framework.schema import RunConfig, SAEConfig, check, did_you_mean

# what a member may read at its layer: the residual stream before the MLP's norm (a CLT's
# input: the fair comparison), or the normalised MLP input
MLP_INPUT_KINDS = ("resid_mid", "mlp_in")
OUTPUT_KIND = "mlp_out"
KEY = "eval.replacement_sets"


def member_layer(s: SAEConfig, where: str) -> tuple[int, str]:
    """(layer, input kind) of a transcoder that may join a set; a ConfigError saying why not."""
    check(not SAE_KINDS[s.kind].cross_layer, f"{where} is a cross-layer transcoder, itself a replacement model "
          "(its delta_ce/kl are in eval.json); a set holds single-layer transcoders")
    check(bool(s.output_site) and s.output_site != s.site, f"{where} is an SAE (no output_site), not a transcoder; "
          f"a set holds transcoders blocks.L.{'|'.join(MLP_INPUT_KINDS)} -> blocks.L.{OUTPUT_KIND}")
    inp, out = hooks.parse_site(s.site, where), hooks.parse_site(s.output_site, where)
    check(inp.kind in MLP_INPUT_KINDS and out.kind == OUTPUT_KIND and inp.layer == out.layer,
          f"{where} maps {s.site} -> {s.output_site}; a set member replaces one layer's MLP: "
          f"blocks.L.{'|'.join(MLP_INPUT_KINDS)} -> blocks.L.{OUTPUT_KIND}")
    return out.layer, inp.kind


def validate_sets(cfg: RunConfig) -> None:
    """Every set names existing single-layer MLP transcoders, one per layer, one input kind, in
    a run that can splice them into a causal LM (after the SAE names are filled in)."""
    sets = cfg.eval.replacement_sets
    if not sets:
        return
    check(cfg.data.source == "text", f"{KEY}: splicing needs the LLM in the run (data.source=text), got "
          f"'{cfg.data.source}'")
    check(llm.model_type_hint(cfg.model.name) not in llm.ENCODER_TYPES,
          f"{KEY}: ΔCE/KL need a causal LM's next-token loss; '{cfg.model.name}' is an encoder")
    check(cfg.eval.splice and cfg.eval.splice_tokens > 0, f"{KEY}: sets are measured by splicing; set eval.splice: "
          f"true and eval.splice_tokens > 0 (got {cfg.eval.splice}, {cfg.eval.splice_tokens})")
    check(cfg.dist.sae_placement == "replicated", f"{KEY}: a set's transcoders are spliced together in one "
          "forward, so one rank must hold all of them; use dist.sae_placement: replicated")
    index = {s.name: i for i, s in enumerate(cfg.saes)}
    for name, members in sets.items():
        key = f"{KEY}.{name}"
        check(name not in index, f"{key}: '{name}' is also an SAE's name (results are reported by name); rename the set")
        check(bool(members), f"{key}: list the transcoders of the set (saes.N.name)")
        layers: dict[int, str] = {}
        inputs: dict[str, str] = {}
        for member in members:
            check(member in index, f"{key}: no SAE named '{member}'{did_you_mean(member, index)}")
            layer, kind = member_layer(cfg.saes[index[member]], f"{key}: '{member}' (saes.{index[member]})")
            check(layer not in layers, f"{key}: '{member}' and '{layers.get(layer)}' both replace layer {layer}'s MLP "
                  "output; a replacement model has one transcoder per layer")
            layers[layer] = member
            inputs.setdefault(kind, member)
        check(len(inputs) == 1, f"{key}: mixes inputs ({', '.join(f'{m} reads {k}' for k, m in inputs.items())}); "
              "one replacement model reads one input kind at every layer")


def set_replacement(members: list[str], trainers: dict, saes: dict) -> hooks.Replacement:
    """The set as one splice: its members' replacements in layer order. `saes`: name -> the
    SAE in inference mode."""
    ordered = sorted(members, key=lambda n: hooks.parse_site(trainers[n].output_site).layer)
    return hooks.Replacement.together([hooks.Replacement.of(trainers[n].input_site, trainers[n].output_site,
                                                            saes[n].splice_predictor) for n in ordered])
