"""Hook sites: where in a frozen transformer activations are read (and, for evaluation,
written back), resolved per architecture, with an early stop after the last needed site.

Site names: `blocks.<L>.<kind>` with kind in SITE_KINDS (TransformerLens names such as
`blocks.6.hook_resid_post` are accepted too), or `module:<path>` / `module_input:<path>` for
the output / first input of any named module.

A *stacked* site `blocks.<A>-<B>.<kind>` is the concatenation (along the feature axis, layer A
first) of that kind's sites in layers A..B: what a cross-layer transcoder reads and writes as
one activation row, so that buffers, checkpoints and runners see one tensor (`stack_members`).
"""

from __future__ import annotations

import re
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from framework.errors import ConfigError
from framework.registry import Registry

# kind -> (which submodule of the block, read its "input" or "output", TransformerLens name)
SITE_KINDS = {
    "resid_pre": ("block", "input", "blocks.{L}.hook_resid_pre"),
    "resid_post": ("block", "output", "blocks.{L}.hook_resid_post"),
    "attn_out": ("attn", "output", "blocks.{L}.hook_attn_out"),
    "mlp_in": ("mlp_in", "input", "blocks.{L}.ln2.hook_normalized"),
    # the residual stream between attention and MLP: the pre-MLP norm's input
    "resid_mid": ("resid_mid", "input", "blocks.{L}.hook_resid_mid"),
    "mlp_out": ("mlp_out", "output", "blocks.{L}.hook_mlp_out"),
    # per-head attention outputs, concatenated, before the output projection
    "attn_z": ("attn_z", "input", "blocks.{L}.attn.hook_z"),
}
_TL_ALIASES = {"hook_resid_pre": "resid_pre", "hook_resid_post": "resid_post", "hook_attn_out": "attn_out",
               "hook_mlp_out": "mlp_out", "hook_resid_mid": "resid_mid", "ln2.hook_normalized": "mlp_in", "hook_mlp_in": "mlp_in",
                "attn.hook_z": "attn_z", "hook_z": "attn_z"}
_BLOCK_SITE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_STACKED_SITE = re.compile(r"^blocks\.(\d+)-(\d+)\.(.+)$")


def stacked_site(kind: str, layers: list[int]) -> str:
    """The stacked site name of `kind` over contiguous `layers`."""
    return f"blocks.{layers[0]}-{layers[-1]}.{kind}"


def stack_members(name: str) -> list[str] | None:
    """The per-layer sites of a stacked site (None for any other name)."""
    m = _STACKED_SITE.match(name)
    if not m:
        return None
    first, last = int(m.group(1)), int(m.group(2))
    if last < first:
        raise ConfigError(f"site '{name}': layer range {first}-{last} is empty (write the lower layer first)")
    return [f"blocks.{L}.{m.group(3)}" for L in range(first, last + 1)]


def stack_captured(store: dict[str, torch.Tensor], sites: list[str]) -> dict[str, torch.Tensor]:
    """The requested `sites` from captured per-layer activations: stacked sites concatenated
    along the last axis (only what was asked for is kept: no member is held twice)."""
    return {s: torch.cat([store[m] for m in members], -1) if (members := stack_members(s)) else store[s] for s in sites}


def parse_sites(name: str, key: str = "site") -> list[SiteSpec]:
    """A site's specs: one, or a stacked site's members in order."""
    return [parse_site(n, key) for n in (stack_members(name) or [name])]


@dataclass(frozen=True)
class SiteSpec:
    """A parsed site name; resolved to a module once a model is known."""

    name: str
    kind: str  # a SITE_KINDS key, or "module"
    layer: int = -1
    module_path: str = ""
    read: str = "output"  # "input" | "output"

    @property
    def tl_name(self) -> str:
        if self.kind == "module":
            return self.module_path
        return SITE_KINDS[self.kind][2].format(L=self.layer)


def hook_name(site: str) -> str:
    """The TransformerLens-style name a SAELens export records for a site; a name that is no
    hook site (a tensor of an activation file, e.g. `resid`) is recorded as it is."""
    try:
        return parse_site(site).tl_name
    except ConfigError:
        return site


def parse_site(name: str, key: str = "site") -> SiteSpec:
    for prefix, read in (("module:", "output"), ("module_input:", "input")):
        if name.startswith(prefix):
            path = name[len(prefix):]
            if not path:
                raise ConfigError(f"{key}: '{name}' names no module path")
            return SiteSpec(name, "module", module_path=path, read=read)
    m = _BLOCK_SITE.match(name)
    if m:
        kind = _TL_ALIASES.get(m.group(2), m.group(2))
        if kind in SITE_KINDS:
            return SiteSpec(name, kind, layer=int(m.group(1)), read=SITE_KINDS[kind][1])
    from framework.schema import did_you_mean  # noqa: PLC0415

    tail = m.group(2) if m else name
    raise ConfigError(
        f"{key}: unknown hook site '{name}'{did_you_mean(tail, SITE_KINDS)}; use blocks.<layer>.<kind> with kind in "
        f"{sorted(SITE_KINDS)}, or module:<path> / module_input:<path>"
    )


# --------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class Layout:
    """Where an architecture keeps its blocks and, inside a block, each site's module."""

    blocks: str  # path of the ModuleList of blocks, relative to the full model
    attn: str  # paths relative to a block
    mlp_in: str
    mlp_out: str
    attn_z: str  # the attention's output projection (its input is the concatenated heads)
    resid_mid: str = ""  # the pre-MLP norm, whose input is resid_mid ("": not defined for this architecture)


ARCHITECTURES: Registry[Callable[[nn.Module], Layout]] = Registry("architecture")


def _prefixed(model: nn.Module, path: str) -> str:
    prefix = getattr(model, "base_model_prefix", "")
    has_prefix = prefix and hasattr(model, prefix) and model.get_submodule(prefix) is not model
    return f"{prefix}.{path}" if has_prefix else path


@ARCHITECTURES.register("gpt2")
def _gpt2(model):
    return Layout(_prefixed(model, "h"), "attn", "mlp", "mlp", "attn.c_proj", "ln_2")


@ARCHITECTURES.register("gpt_neox")
def _neox(model):
    # use_parallel_residual (the default): the MLP reads the block input, so resid_mid = resid_pre there
    return Layout(_prefixed(model, "layers"), "attention", "mlp", "mlp", "attention.dense", "post_attention_layernorm")


for _name in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "olmo", "phi3", "smollm3"):
    ARCHITECTURES.register(_name)(
        lambda model: Layout(_prefixed(model, "layers"), "self_attn", "mlp", "mlp", "self_attn.o_proj",
                             "post_attention_layernorm"))
for _name in ("gemma2", "gemma3_text", "olmo2"):  # post-attention norms on the branch: resid_mid left undefined
    ARCHITECTURES.register(_name)(
        lambda model: Layout(_prefixed(model, "layers"), "self_attn", "mlp", "mlp", "self_attn.o_proj"))

for _name in ("bert", "roberta", "xlm-roberta", "electra"):
    # Post-LN encoders: attn_out / mlp_out are the projections before the residual add + LayerNorm;
    # the normed stream after attention is both the residual and the MLP's input: resid_mid = mlp_in.
    ARCHITECTURES.register(_name)(
        lambda model: Layout(_prefixed(model, "encoder.layer"), "attention.output.dense", "intermediate", "output.dense",
                             "attention.output.dense", "intermediate")
    )


def _first_path(model: nn.Module, *paths: str) -> str:
    """The first of `paths` the model has (vision towers sit at the top or under `vision_model`)."""
    for path in paths:
        try:
            model.get_submodule(path)
            return path
        except AttributeError:
            continue
    raise ConfigError(f"hook sites: model {type(model).__name__} has none of {list(paths)}")


# Vision encoders (framework/vision.py): the token axis is CLS (where the family has one) + patches.
# Pre-LN blocks; DINOv2's attn_out / mlp_out are read before its layer scale. For CLIP / SigLIP
# models with both towers, blocks.<L> are the vision tower's. resid_mid: the pre-MLP norm's input.
ARCHITECTURES.register("vit")(
    lambda model: Layout(_first_path(model, _prefixed(model, "layers"), _prefixed(model, "encoder.layer")),
                         "attention", "mlp", "mlp", "attention.o_proj", "layernorm_after"))
ARCHITECTURES.register("dinov2")(
    lambda model: Layout(_first_path(model, _prefixed(model, "layers"), _prefixed(model, "encoder.layer")),
                         "attention", "mlp", "mlp", "attention.o_proj", "norm2"))
for _name in ("clip", "clip_vision_model", "siglip", "siglip_vision_model"):
    ARCHITECTURES.register(_name)(
        lambda model: Layout(_first_path(model, "vision_model.encoder.layers", "encoder.layers"), "self_attn", "mlp",
                             "mlp", "self_attn.out_proj", "layer_norm2"))


def layout_of(model: nn.Module) -> Layout:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"hook sites: architecture '{model_type}' has no layout; supported: {sorted(ARCHITECTURES)}. "
            "Use module:<path> sites for other models."
        )
    return ARCHITECTURES[model_type](model)


def num_layers(model: nn.Module) -> int:
    return len(model.get_submodule(layout_of(model).blocks))


def resolve(model: nn.Module, spec: SiteSpec) -> tuple[nn.Module, str]:
    """The module a site reads and whether it reads that module's input or output."""
    if spec.kind == "module":
        try:
            return model.get_submodule(spec.module_path), spec.read
        except AttributeError:
            raise ConfigError(f"hook site '{spec.name}': model has no module '{spec.module_path}'") from None
    layout = layout_of(model)
    blocks = model.get_submodule(layout.blocks)
    if not 0 <= spec.layer < len(blocks):
        raise ConfigError(f"hook site '{spec.name}': layer {spec.layer} out of range, model has {len(blocks)} layers")
    block = blocks[spec.layer]
    where = SITE_KINDS[spec.kind][0]
    if not getattr(layout, where, "block"):
        raise ConfigError(f"hook site '{spec.name}': '{spec.kind}' is not defined for architecture "
                          f"'{model.config.model_type}'")
    module = block if where == "block" else block.get_submodule(getattr(layout, where))
    return module, spec.read


def _first_tensor_arg(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _output_tensor(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class StopForward(Exception):
    """Raised from a hook once every requested site is captured: the rest of the model
    (deeper layers, final norm, LM head) is never computed."""


# model -> guard(model), called as a capture starts; returns the cleanup to run if the forward
# stopped early. For wrappers whose per-forward state assumes forwards run to the end
# (DeepSpeed ZeRO-3's parameter fetching, see framework/llm.py).
_EARLY_STOP_GUARDS = weakref.WeakKeyDictionary()


def on_early_stop(model: nn.Module, guard: Callable[[nn.Module], Callable[[], None]]) -> None:
    """Register `guard` for `model` (it must not hold a reference to the model)."""
    _EARLY_STOP_GUARDS[model] = guard


@contextmanager
def capture(model: nn.Module, specs: list[SiteSpec], stop_early: bool = True):
    """Within the block, forwards of `model` record each site into the yielded dict
    (name -> [batch, seq, d]); with stop_early the forward ends at the last needed site.
    Wrap the forward call in `run_until_captured`."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    wanted = {s.name for s in specs}
    stopped = []
    guard = _EARLY_STOP_GUARDS.get(model) if stop_early else None
    cleanup = guard(model) if guard is not None else None

    def record(name, tensor):
        store[name] = tensor.detach()
        if stop_early and wanted <= store.keys():
            stopped.append(True)
            raise StopForward

    for spec in specs:
        module, read = resolve(model, spec)
        if read == "input":
            handles.append(module.register_forward_pre_hook(
                lambda m, a, kw, n=spec.name: record(n, _first_tensor_arg(a, kw)), with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(lambda m, a, o, n=spec.name: record(n, _output_tensor(o))))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
        if stopped and cleanup is not None:
            cleanup()


def run_until_captured(forward: Callable[[], object]) -> None:
    try:
        forward()
    except StopForward:
        pass


@contextmanager
def splice(model: nn.Module, spec: SiteSpec, replace: Callable[[torch.Tensor], torch.Tensor]):
    """Within the block, the site's activation is replaced by replace(activation)."""
    module, read = resolve(model, spec)
    if read == "input":
        def pre_hook(m, args, kwargs):
            if args:
                return (replace(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": replace(kwargs["hidden_states"])}

        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        def hook(m, args, out):
            if isinstance(out, (tuple, list)):
                return type(out)((replace(out[0]), *out[1:]))
            return replace(out)

        handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@dataclass(frozen=True)
class Replacement:
    """What one spliced forward replaces: member j's output site by predict(j, member j's input
    site as read in this same forward), members in forward order. `predictor()` makes a fresh
    predict per forward (a cross-layer transcoder's keeps the codes of its earlier layers)."""

    members: tuple[tuple[str, str], ...]  # (input site, output site) per replaced site: single sites
    predictor: Callable[[], Callable[[int, torch.Tensor], torch.Tensor]]

    @classmethod
    def of(cls, input_site: str, output_site: str, predictor) -> "Replacement":
        """One SAE or transcoder: a stacked site (CLT) replaces every member, its predictor
        taking the member index; a single site's predictor takes the input only."""
        ins, outs = stack_members(input_site) or [input_site], stack_members(output_site) or [output_site]
        if len(ins) != len(outs):
            raise ValueError(f"splice: {input_site} and {output_site} stack different numbers of layers")
        if stack_members(output_site) is None:
            return cls(((input_site, output_site),), lambda: _by_input(predictor()))
        return cls(tuple(zip(ins, outs)), predictor)

    @classmethod
    def together(cls, parts: list["Replacement"]) -> "Replacement":
        """Several replacements in one forward (a replacement set): `parts` in forward order."""
        offsets = [0]
        for part in parts:
            offsets.append(offsets[-1] + len(part.members))

        def predictor():
            fresh = [part.predictor() for part in parts]
            owner = [(i, j - offsets[i]) for i in range(len(parts)) for j in range(offsets[i], offsets[i + 1])]
            return lambda j, x: fresh[owner[j][0]](owner[j][1], x)

        return cls(tuple(m for part in parts for m in part.members), predictor)

    def zero_ablation(self) -> "Replacement":
        """The same output sites, zeroed."""
        return Replacement(tuple((out, out) for _, out in self.members), lambda: lambda j, x: torch.zeros(()))


def _by_input(predict):
    return lambda j, x: predict(x)


@contextmanager
def splice_prediction(model: nn.Module, replacement: Replacement, positions: torch.Tensor):
    """Within the block, every member's output activation is replaced at `positions` by its
    prediction from its input activation at those positions, read in this spliced forward; other
    positions keep their clean value. Members are predicted in forward order, so a later layer's
    input carries the earlier replacements (the replacement model: errors compound as they would)."""
    in_specs = [parse_site(i) for i, _ in replacement.members]
    out_specs = [parse_site(o) for _, o in replacement.members]
    predict = replacement.predictor()
    with capture(model, in_specs, stop_early=False) as inputs, ExitStack() as stack:
        def replacer(j: int):
            def replace(act: torch.Tensor) -> torch.Tensor:
                out = act.clone()
                out[positions] = predict(j, inputs[in_specs[j].name][positions]).to(act.dtype)
                return out
            return replace

        for j, spec in enumerate(out_specs):
            stack.enter_context(splice(model, spec, replacer(j)))
        yield
