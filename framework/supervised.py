"""Evaluating an SAE against supervised feature dictionaries on a templated task ("Towards
Principled Evaluations of Sparse Autoencoders for Interpretability and Control").

On a task whose prompts carry known attributes (e.g. IOI: `io`, `s`, `order`), the site's
activation at the answer position is modelled as mean + sum over attributes of u[a][value],
with u[a][v] = E[x | a = v] - E[x] (the supervised dictionary, centred). Dictionaries, per-value
mean SAE codes and latent choices are fitted on a seeded random half of the prompts and
everything is scored on the other half (prompts whose attribute values the first half lacks are
left out). Three axes:

- approximation: the mean logit difference (answer - distractor) with the site replaced by the
  SAE reconstruction, by the supervised reconstruction and by the mean activation, as a
  fraction recovered between mean ablation (0) and clean (1); the FVU of both
  reconstructions; and how well the SAE reconstruction carries each supervised feature
  (cosine of u[a][v] with the same centred mean computed on SAE reconstructions).
- control: change the answer attribute (`control_attribute`, whose value determines the answer)
  from its value v to another value v' by supervised arithmetic (x - u[v] + u[v']) or by
  editing SAE latents (add the difference of the per-value mean codes on the `s` latents
  where it is largest, codes kept >= 0, decoded on top of the SAE's error term); success = the
  new answer's logit beats the old one; collateral = KL between the clean and edited next-token
  distributions over every other token (renormalised without the two). A random direction of
  the supervised edit's norm is the floor.
- interpretability: per attribute value, the best single latent's F1 as a detector ("fires" =
  active) and, for reference, the best-threshold F1 of the projection on u[a][v].
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from framework import hooks, templates
from framework.errors import ConfigError
from framework.schema import ModelConfig, check
from framework.study_config import write_outputs

log = logging.getLogger(__name__)


@dataclass
class SupervisedConfig:
    run_dir: str = "runs/supervised"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(device="cpu"))
    sae: str = ""  # an SAELens export folder written by `sparsemill train` (its metadata names the site)
    site: str = ""  # "" = the export's hook_name
    task: str = ""  # task file (JSON) whose positive examples carry `attributes`
    attributes: list[str] = field(default_factory=list)  # [] = every attribute with >= 2 values
    control_attribute: str = ""  # the attribute edited for control; its value must determine the answer
    edit_latents: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])  # SAE edits: latents changed
    examples: int = 0  # positive examples used; 0 = all
    batch_size: int = 64  # prompts per LLM forward
    seed: int = 0

    def validate(self) -> None:
        check(bool(self.sae), "sae: give an SAELens export folder (RUN_DIR/export/<name>)")
        check(bool(self.task), "task: give a task file (JSON) whose examples carry attributes")
        check(bool(self.control_attribute), "control_attribute: name the attribute to edit (its value is the answer)")
        check(all(s >= 1 for s in self.edit_latents), "edit_latents: positive latent counts")
        check(self.examples >= 0 and self.batch_size >= 1, "examples / batch_size: must be >= 0 / >= 1")


# --------------------------------------------------------------------------- supervised dictionaries


@dataclass
class SupervisedDictionary:
    """mean + u[attribute][value], fitted on a set of activations with their labels."""

    mean: torch.Tensor
    features: dict[str, dict[str, torch.Tensor]]

    @classmethod
    def fit(cls, x: torch.Tensor, labels: dict[str, list[str]]) -> "SupervisedDictionary":
        mean = x.mean(0)
        feats = {}
        for attr, values in labels.items():
            feats[attr] = {v: x[[i for i, w in enumerate(values) if w == v]].mean(0) - mean for v in sorted(set(values))}
        return cls(mean, feats)

    def reconstruct(self, labels: dict[str, list[str]], n: int) -> torch.Tensor:
        out = self.mean.expand(n, -1).clone()
        for attr, values in labels.items():
            out += torch.stack([self.features[attr].get(v, torch.zeros_like(self.mean)) for v in values])
        return out


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-30))


def f1_best_threshold(score: torch.Tensor, label: torch.Tensor) -> float:
    """Best F1 over thresholds `score >= t`."""
    order = score.argsort(descending=True)
    lab = label[order].double()
    tp = lab.cumsum(0)
    k = torch.arange(1, len(lab) + 1, dtype=torch.float64)
    f1 = 2 * tp / (k + lab.sum())
    # only cut between distinct scores
    s = score[order]
    valid = torch.ones_like(f1, dtype=torch.bool)
    valid[:-1] = s[:-1] != s[1:]
    return float(f1[valid].max()) if lab.sum() > 0 else float("nan")


def latent_f1(active: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """F1 of every latent as a detector of `label`: active [n, L] bool, label [n] bool -> [L]."""
    a, y = active.double(), label.double()
    tp = (a * y[:, None]).sum(0)
    return 2 * tp / (a.sum(0) + y.sum()).clamp_min(1e-12)


# --------------------------------------------------------------------------- model plumbing


def _site_acts(model: nn.Module, spec: hooks.SiteSpec, batch: templates.PromptBatch, batch_size: int) -> torch.Tensor:
    """The site's activation at each prompt's final position: [n, d]."""
    out = []
    device = next(model.parameters()).device
    for s in range(0, batch.ids.shape[0], batch_size):
        sl = slice(s, s + batch_size)
        with torch.no_grad(), hooks.capture(model, [spec]) as store:
            hooks.run_until_captured(lambda: model(input_ids=batch.ids[sl].to(device),
                                                   attention_mask=batch.mask[sl].to(device), use_cache=False))
        a = store[spec.name]
        out.append(a[torch.arange(a.shape[0]), batch.last[sl].to(a.device)].float().cpu())
    return torch.cat(out)


def _final_logits(model: nn.Module, spec: hooks.SiteSpec, batch: templates.PromptBatch, batch_size: int,
                  new_acts: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token logits at each prompt's final position: [n, vocab]; with `new_acts` [n, d]
    the site's activation at that position is replaced by it."""
    out = []
    device = next(model.parameters()).device
    for s in range(0, batch.ids.shape[0], batch_size):
        sl = slice(s, s + batch_size)
        last = batch.last[sl].to(device)

        def replace(act, sl=sl, last=last):
            act = act.clone()
            act[torch.arange(act.shape[0], device=act.device), last] = new_acts[sl].to(act.device, act.dtype)
            return act

        with torch.no_grad():
            if new_acts is None:
                logits = templates.final_logits(model, batch.ids[sl], batch.mask[sl], batch.last[sl])
            else:
                with hooks.splice(model, spec, replace):
                    logits = templates.final_logits(model, batch.ids[sl], batch.mask[sl], batch.last[sl])
        out.append(logits.float().cpu())
    return torch.cat(out)


def _collateral_kl(clean: torch.Tensor, edited: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """KL(clean || edited) over the tokens other than old and new answers, renormalised: [n]."""
    mask = torch.zeros_like(clean, dtype=torch.bool)
    mask.scatter_(1, old[:, None], True)
    mask.scatter_(1, new[:, None], True)
    p = F.log_softmax(clean.masked_fill(mask, float("-inf")), -1)
    q = F.log_softmax(edited.masked_fill(mask, float("-inf")), -1)
    return (p.exp() * (p - q)).masked_fill(mask, 0).sum(-1)


def dense_codes(sae, x: torch.Tensor) -> torch.Tensor:
    """The SAE's codes as a dense [n, n_latents] matrix (raw units: scales 1 after export)."""
    with torch.no_grad():
        out = sae(sae.normalize_input(x))
        return torch.zeros(x.shape[0], sae.n_latents).scatter_(1, out.indices, out.values.float())


def decode_dense(sae, codes: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (codes @ sae.decoder_weight + sae.b_dec) / sae.output_scale


# --------------------------------------------------------------------------- the evaluation


def _labels(examples: list[templates.Example], attributes: list[str]) -> dict[str, list[str]]:
    return {a: [e.attributes[a] for e in examples] for a in attributes}


def _check_task(task: templates.Task, cfg: SupervisedConfig) -> list[str]:
    examples = task.positive
    missing = [i for i, e in enumerate(examples) if cfg.control_attribute not in e.attributes]
    if missing:
        raise ConfigError(f"control_attribute: '{cfg.control_attribute}' is not an attribute of positive[{missing[0]}] "
                          f"in task '{task.name}' (it has {sorted(examples[missing[0]].attributes)})")
    answers: dict[str, str] = {}
    for i, e in enumerate(examples):
        v = e.attributes[cfg.control_attribute]
        if answers.setdefault(v, e.answer) != e.answer:
            raise ConfigError(f"control_attribute: {cfg.control_attribute}={v!r} has answer {answers[v]!r} in one "
                              f"example and {e.answer!r} in positive[{i}]; the control attribute must determine the "
                              "answer")
    names = cfg.attributes or sorted({a for e in examples for a in e.attributes})
    for a in names:
        bad = [i for i, e in enumerate(examples) if a not in e.attributes]
        if bad:
            raise ConfigError(f"attributes: '{a}' missing from positive[{bad[0]}] of task '{task.name}'")
    return [a for a in names if len({e.attributes[a] for e in examples}) >= 2]


def run_supervised(cfg: SupervisedConfig) -> dict:
    from framework.export import load_exported  # noqa: PLC0415
    from framework.llm import load_frozen  # noqa: PLC0415

    t_start = time.perf_counter()
    task = templates.load_task(cfg.task)
    attributes = _check_task(task, cfg)
    if cfg.control_attribute not in attributes:
        raise ConfigError(f"control_attribute: '{cfg.control_attribute}' takes a single value in task '{task.name}'")
    try:
        sae = load_exported(cfg.sae).eval()
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"sae: {err}") from None
    sae_cfg = json.loads((Path(cfg.sae) / "cfg.json").read_text())
    site = cfg.site or sae_cfg.get("metadata", {}).get("hook_name", "")
    if not site:
        raise ConfigError(f"site: the export '{cfg.sae}' records no hook_name; set site")
    spec = hooks.parse_site(site, "site")
    model, tokenizer = load_frozen(cfg.model, seed=cfg.seed)
    hooks.resolve(model, spec)

    examples = task.positive[: cfg.examples or None]
    batch = templates.encode(examples, tokenizer, "positive")
    x = _site_acts(model, spec, batch, cfg.batch_size)
    if x.shape[1] != sae.d_in:
        raise ConfigError(f"sae: d_in={sae.d_in} but site '{site}' is {x.shape[1]} wide")
    labels = _labels(examples, attributes)
    order = random.Random(cfg.seed).sample(range(len(examples)), len(examples))  # not by parity: templates alternate
    fit_idx = sorted(order[: len(examples) // 2])
    eval_idx = [i for i in sorted(order[len(examples) // 2:])
                if all(labels[a][i] in set(labels[a][j] for j in fit_idx) for a in attributes)]
    if len(eval_idx) < 2:
        raise ConfigError(f"task '{task.name}': too few examples ({len(examples)}) to fit on one half and evaluate on "
                          "the other with every attribute value seen")

    def sub(idx, d):
        return {a: [v[i] for i in idx] for a, v in d.items()}

    sup = SupervisedDictionary.fit(x[fit_idx], sub(fit_idx, labels))
    codes = dense_codes(sae, x)
    ev = templates.PromptBatch(batch.ids[eval_idx], batch.mask[eval_idx], batch.last[eval_idx],
                               batch.answer[eval_idx], batch.distractor[eval_idx])
    xe, le, ze = x[eval_idx], sub(eval_idx, labels), codes[eval_idx]

    result = {"task": task.name, "model": cfg.model.name, "sae": str(cfg.sae), "site": site,
              "attributes": attributes, "control_attribute": cfg.control_attribute,
              "fit_examples": len(fit_idx), "eval_examples": len(eval_idx)}
    result["approximation"] = _approximation(model, spec, ev, cfg, sae, sup, xe, le, x[fit_idx])
    answer_id = {e.attributes[cfg.control_attribute]: int(batch.answer[i]) for i, e in enumerate(examples)}
    result["control"] = _control(model, spec, ev, cfg, sae, sup, xe, le, codes[fit_idx], sub(fit_idx, labels),
                                 answer_id)
    result["interpretability"] = _interpretability(sup, xe, le, ze)
    result["seconds"] = round(time.perf_counter() - t_start, 2)
    write_outputs(cfg, result, "supervised_eval.json")
    return result


def _approximation(model, spec, ev, cfg, sae, sup, xe, le, x_fit) -> dict:
    x_sae = sae.reconstruct(xe)
    x_sup = sup.reconstruct(le, xe.shape[0])
    x_mean = sup.mean.expand_as(xe)
    lds = {}
    for name, acts in (("clean", None), ("sae", x_sae), ("supervised", x_sup), ("mean_ablation", x_mean)):
        lds[name] = float(templates.logit_diff(_final_logits(model, spec, ev, cfg.batch_size, acts), ev.answer,
                                      ev.distractor).mean())
    span = lds["clean"] - lds["mean_ablation"]
    recovered = {k: (lds[k] - lds["mean_ablation"]) / span if abs(span) > 1e-9 else float("nan")
                 for k in ("sae", "supervised")}
    # the supervised features as the SAE's reconstructions carry them (same half, same labels)
    rec = SupervisedDictionary.fit(x_sae, le)
    own = SupervisedDictionary.fit(xe, le)
    cos = {a: float(torch.stack([F.cosine_similarity(own.features[a][v], rec.features[a][v], dim=0)
                                 for v in own.features[a]]).mean()) for a in le}
    return {"logit_diff": lds, "logit_diff_recovered": recovered,
            "fvu": {"sae": fvu(xe, x_sae), "supervised": fvu(xe, x_sup)},
            "feature_cosine_sae_vs_supervised": cos}


def _control(model, spec, ev, cfg, sae, sup, xe, le, z_fit, l_fit, answer_id: dict[str, int]) -> dict:
    attr = cfg.control_attribute
    values = sorted(sup.features[attr])
    rng = random.Random(cfg.seed)
    old_v = le[attr]
    in_prompt = [{le[a][i] for a in le} for i in range(len(old_v))]
    new_v = [rng.choice([v for v in values if v not in in_prompt[i]] or [v for v in values if v != old_v[i]])
             for i in range(len(old_v))]
    old_id = torch.tensor([answer_id[v] for v in old_v])
    new_id = torch.tensor([answer_id[v] for v in new_v])
    clean = _final_logits(model, spec, ev, cfg.batch_size)

    def score(acts) -> dict:
        logits = _final_logits(model, spec, ev, cfg.batch_size, acts)
        return {"success": float((templates.logit_diff(logits, new_id, old_id) > 0).double().mean()),
                "new_answer_top1": float((logits.argmax(1) == new_id).double().mean()),
                "collateral_kl": float(_collateral_kl(clean, logits, old_id, new_id).mean())}

    u = sup.features[attr]
    sup_delta = torch.stack([u[n] - u[o] for o, n in zip(old_v, new_v)])
    g = torch.Generator().manual_seed(cfg.seed)
    rand = torch.randn(sup_delta.shape, generator=g)
    rand *= sup_delta.norm(dim=1, keepdim=True) / rand.norm(dim=1, keepdim=True)
    out = {"clean": {"success": float((templates.logit_diff(clean, new_id, old_id) > 0).double().mean())},
           "supervised": score(xe + sup_delta), "random_direction": score(xe + rand)}
    mean_code = {v: z_fit[[i for i, w in enumerate(l_fit[attr]) if w == v]].mean(0) for v in values}
    z = dense_codes(sae, xe)
    base = decode_dense(sae, z)
    for s in cfg.edit_latents:
        delta = torch.stack([mean_code[n] - mean_code[o] for o, n in zip(old_v, new_v)])
        keep = delta.abs().topk(min(s, delta.shape[1]), dim=1).indices
        sparse = torch.zeros_like(delta).scatter_(1, keep, delta.gather(1, keep))
        edited = decode_dense(sae, (z + sparse).clamp_min(0))
        out[f"sae_{s}_latents"] = score(xe + edited - base)
    return out


def _interpretability(sup, xe, le, ze) -> dict:
    out = {}
    active = ze > 0
    for a, values in le.items():
        per_value = {}
        for v in sorted(set(values)):
            y = torch.tensor([w == v for w in values])
            if y.all():
                continue
            f1 = latent_f1(active, y)
            best = int(f1.argmax())
            proj = xe @ sup.features[a][v]
            per_value[v] = {"best_latent": best, "best_latent_f1": float(f1[best]),
                            "supervised_f1": f1_best_threshold(proj, y)}
        out[a] = {"mean_best_latent_f1": sum(p["best_latent_f1"] for p in per_value.values()) / max(len(per_value), 1),
                  "mean_supervised_f1": sum(p["supervised_f1"] for p in per_value.values()) / max(len(per_value), 1),
                  "values": per_value}
    return out


def format_result(r: dict) -> str:
    ap, ctl, it = r["approximation"], r["control"], r["interpretability"]
    lines = [f"supervised evaluation: task {r['task']}, site {r['site']}, {r['fit_examples']} fit / "
             f"{r['eval_examples']} eval prompts ({r['seconds']:.1f} s)",
             "approximation   logit diff clean {clean:.3f}  SAE {sae:.3f}  supervised {supervised:.3f}  "
             "mean-ablated {mean_ablation:.3f}".format(**ap["logit_diff"]),
             f"                recovered: SAE {ap['logit_diff_recovered']['sae']:.3f}  supervised "
             f"{ap['logit_diff_recovered']['supervised']:.3f};  FVU: SAE {ap['fvu']['sae']:.3f}  supervised "
             f"{ap['fvu']['supervised']:.3f}",
             "                feature cosine (SAE recon vs supervised): " + ", ".join(
                 f"{a} {c:.3f}" for a, c in ap["feature_cosine_sae_vs_supervised"].items()),
             f"control ({r['control_attribute']})   {'edit':18s} {'success':>8s} {'top1':>6s} {'collateral KL':>14s}"]
    for name, row in ctl.items():
        if name == "clean":
            continue
        lines.append(f"                {name:18s} {row['success']:8.3f} {row['new_answer_top1']:6.3f} "
                     f"{row['collateral_kl']:14.4f}")
    lines.append("interpretability  " + "  ".join(f"{a}: best-latent F1 {v['mean_best_latent_f1']:.3f} "
                                                  f"(supervised {v['mean_supervised_f1']:.3f})" for a, v in it.items()))
    return "\n".join(lines)
