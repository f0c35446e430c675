"""d(LM loss)/d(activation) at hook sites of a frozen causal LM, for the kinds that select with
it (gsae): the activation sources yield it under `grad_key(site)`, row-aligned with the
activations."""

from __future__ import annotations

from contextlib import ExitStack

import torch
import torch.nn.functional as F

from framework import hooks

GRAD_SUFFIX = "@grad"


def grad_key(site: str) -> str:
    """Batch key under which a source yields d(LM loss)/d(activation) for `site`."""
    return site + GRAD_SUFFIX


def lm_activation_grads(model, input_ids: torch.Tensor, site: str, attention_mask: torch.Tensor | None = None,
                        loss_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(activations [b, s, d], d(LM loss)/d(activations) [b, s, d], loss) at one hook site;
    `lm_site_grads` for several sites in one pass."""
    acts, grads, loss = lm_site_grads(model, input_ids, [site], attention_mask, loss_mask)
    return acts[site], grads[site], loss


def lm_site_grads(model, input_ids: torch.Tensor, sites: list[str], attention_mask: torch.Tensor | None = None,
                  loss_mask: torch.Tensor | None = None) -> tuple[dict, dict, torch.Tensor]:
    """site -> activations, site -> d(LM loss)/d(activation) (each [b, s, d]), and the loss.

    LM loss = next-token cross-entropy summed over predicted positions (those where
    loss_mask[:, 1:] is True, default all), so the gradient at a token is not diluted by the
    batch size. One forward through the whole model and one backward from the logits down to
    the first hooked site only: the first site reached is made a leaf that requires grad (the
    weights do not), so no weight gradient is formed and layers below it are not
    back-propagated; a later site already downstream of a leaf stays in the graph (its gradient
    is the total derivative through it), one that is not becomes a leaf of its own.
    Cost per token ~ forward of all layers + LM head, plus an activation-only backward of the
    layers above the hook + LM head (~1x their forward FLOPs): about 2-3x the early-stopped
    capture that plain training uses, and the activations of the layers above the hook are kept
    for the backward (memory ~ batch x seq x d x layers above x a few)."""
    acts: dict[str, torch.Tensor] = {}

    def track(name):
        def replace(act: torch.Tensor) -> torch.Tensor:
            acts[name] = act if act.requires_grad else act.detach().requires_grad_(True)
            return acts[name]
        return replace

    sites = list(dict.fromkeys(sites))
    with torch.enable_grad(), ExitStack() as stack:
        for site in sites:
            stack.enter_context(hooks.splice(model, hooks.parse_site(site), track(site)))
        kwargs = {"input_ids": input_ids, "use_cache": False}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        logits = model(**kwargs).logits
        missing = [s for s in sites if s not in acts]
        if missing:
            raise RuntimeError(f"hook sites {missing} were not reached by the forward")
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="none")
        if loss_mask is not None:
            ce = ce * loss_mask[:, 1:].flatten().to(ce.dtype)
        loss = ce.sum()
        grads = torch.autograd.grad(loss, [acts[s] for s in sites])
    return ({s: acts[s].detach() for s in sites}, {s: g.detach() for s, g in zip(sites, grads)}, loss.detach())
