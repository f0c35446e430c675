"""Every registered SAE kind x role (SAE; transcoder and skip transcoder where the kind allows
it) trains a few steps, exports, loads with `sae_lens.SAE.load_from_disk` and computes what we
compute on held-out inputs: encode, decode and forward within 1e-5 (relative) where SAELens has
the architecture, and within the stated bound for the approximations (framework/calibrate.py)
where it has none. The kinds come from the registry, so a new kind cannot escape."""

import json

import pytest
import torch

import framework.kinds  # noqa: F401  (registers the kinds)
from framework import calibrate, export, hooks
from framework.kinds import SAE_KINDS
from framework.schema import SAEConfig, TrainConfig
from framework.sae_trainer import SAETrainer

sae_lens = pytest.importorskip("sae_lens")

D, D_OUT, N, K, ROWS = 16, 12, 64, 4, 512
EXACT = 1e-5
MARGIN = 1e-4  # rows whose selection is this close (relative) to a tie are left out of the comparison
ROLES = ("sae", "transcoder", "skip_transcoder")
# (kind, options) beyond each kind's defaults whose export differs
EXTRA_OPTIONS = {"matryoshka": [{"selection": "batchtopk"}], "mpsae": [{"stop_residual": 0.3}]}
# approximations: the stated bounds on the FVU of SAELens' output against ours on held-out rows
# (measured values in README.md; a bound about 2x the measured error leaves room for the data)
APPROX_BOUND = {"topk": 0.7, "abstopk": 0.7, "top_afa": 0.9, "matching_pursuit": 0.01}

# every kind that exports SAELens folders (a CLT exports circuit-tracer's format: tests/test_clt.py)
SAELENS_KINDS = sorted(kind for kind in SAE_KINDS if SAE_KINDS[kind].export_format == "saelens")
CASES = [(kind, role, opts) for kind in SAELENS_KINDS for opts in [{}] + EXTRA_OPTIONS.get(kind, [])
         for role in ROLES if role == "sae" or SAE_KINDS[kind].supports_transcoder]


def test_every_kind_is_covered_by_an_interop_test():
    # cross-layer kinds have no SAELens format: circuit-tracer loads them (tests/test_clt.py, every CLT kind)
    cross_layer = {kind for kind in SAE_KINDS if SAE_KINDS[kind].cross_layer}
    assert cross_layer == {"clt", "jumprelu_clt"}
    assert set(SAE_KINDS) - set(SAELENS_KINDS) == cross_layer, "a kind without a SAELens or circuit-tracer interop test"


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(seed: int, role: str):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, D, generator=g) * 3 + 1
    if role == "sae":
        return x, x
    mix = torch.randn(D, D_OUT, generator=g) / D ** 0.5
    return x, torch.relu(x @ mix) + 0.1 * torch.randn(ROWS, D_OUT, generator=g)


def _trained(kind: str, role: str, options: dict) -> SAETrainer:
    torch.manual_seed(0)
    transcoder = role != "sae"
    cfg = SAEConfig(name="s", kind=kind, site="a", output_site="b" if transcoder else "", n_latents=N, k=K,
                    options=options, dead_after_tokens=64, lr=1e-3, skip_connection=role == "skip_transcoder")
    tr = SAETrainer(cfg, TrainConfig(warmup_steps=0), "a", "b" if transcoder else "a",
                    {"a": D, "b": D_OUT if transcoder else D}, 100, torch.device("cpu"), 0)
    x, y = _data(1, role)
    tr.init_from_sample(x, y, True, "geometric_median")
    for _ in range(6):
        tr.step(x, y, torch.randn(ROWS, y.shape[1]) if tr.sae.needs_lm_grad else None)
    return tr


def _dense(values, indices, n):
    return torch.zeros(values.shape[0], n, dtype=values.dtype).scatter_add_(1, indices, values)


def _row_rel(a, b):
    """Per-row ||a - b|| / ||b|| (rows of b near zero: relative to the mean row norm)."""
    floor = b.norm(dim=1).mean().clamp_min(1e-12) * 1e-3
    return ((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(floor)).double()


def _stable_rows(sae_lens_sae, x, arch: str, k: int) -> torch.Tensor:
    """Rows whose selection leaves a margin in SAELens' own pre-activations (away from ties)."""
    if arch == "matching_pursuit":  # greedy argmax per step: no one-shot margin; ties have measure 0
        return torch.ones(x.shape[0], dtype=torch.bool)
    with torch.no_grad():
        pre = sae_lens_sae.process_sae_in(x) @ sae_lens_sae.W_enc + sae_lens_sae.b_enc
    scale = pre.abs().amax(1, keepdim=True).clamp_min(1e-12)
    if "jumprelu" in arch:
        return ((pre - sae_lens_sae.threshold).abs() / scale).amin(1) > MARGIN
    score = pre.abs() if arch == "abstopk" else pre
    top = score.topk(k + 1, dim=1).values
    return (top[:, k - 1] - top[:, k]) / scale[:, 0] > MARGIN


@pytest.mark.parametrize("kind,role,options", CASES, ids=[f"{k}-{r}{'-' + str(o) if o else ''}" for k, r, o in CASES])
def test_saelens_computes_our_function(tmp_path, kind, role, options):
    from sae_lens import SAE  # noqa: PLC0415
    from sae_lens.registry import SAE_CLASS_REGISTRY  # noqa: PLC0415

    tr = _trained(kind, role, options)
    folder = export.export_sae(tr.sae, tmp_path / "e", kind, {"hook_name": "blocks.0.hook_resid_post"})
    cfg = json.loads((folder / "cfg.json").read_text())
    x, _ = _data(2, role)  # held out
    with tr.evaluating() as sae:
        out = sae(sae.normalize_input(x))
        s_out = sae.output_scale.item()
        codes, x_hat = _dense(out.values / s_out, out.indices, N), out.x_hat / s_out
    arch = export.saelens_architecture(tr.sae)
    assert cfg["architecture"] == export.export_architecture_name(tr.sae)
    if arch is None:  # no SAELens architecture: it must refuse the folder, and the metadata say why
        assert cfg["architecture"] not in SAE_CLASS_REGISTRY and cfg["metadata"]["saelens_exact"] is False
        assert "no SAELens" in cfg["metadata"]["saelens_note"]
        with pytest.raises(Exception):
            SAE.load_from_disk(folder)
        measured = calibrate.calibrate_folder(folder, _data(3, role)[0], tmp_path / "approx")
        approx_folder = tmp_path / "approx"
        bound_key = tr.sae.export_architecture
    else:
        approx_folder, measured = folder, None
        bound_key = None if cfg["metadata"]["saelens_exact"] else arch
    theirs = SAE.load_from_disk(approx_folder)
    assert type(theirs).__name__ != "" and theirs.cfg.architecture() == json.loads(
        (approx_folder / "cfg.json").read_text())["architecture"]
    with torch.no_grad():
        acts = theirs.encode(x)
        recon, fwd = theirs.decode(acts), theirs(x)
    if bound_key is not None:  # an approximation: the FVU of SAELens' output against ours
        ref = x_hat.double()
        fvu = float((fwd.double() - ref).pow(2).sum() / (ref - ref.mean(0)).pow(2).sum())
        print(f"\n{kind}/{role}{options or ''}: {json.loads((approx_folder / 'cfg.json').read_text())['architecture']} "
              f"approximation FVU vs ours {fvu:.3g} (calibrate measured {measured and measured['relative_error']})")
        assert fvu <= APPROX_BOUND[bound_key]
        if measured is not None:
            assert measured["relative_error"] <= APPROX_BOUND[bound_key]
        return
    assert theirs.cfg.architecture() == arch
    stable = _stable_rows(theirs, x, arch, tr.sae.k)
    assert stable.float().mean() >= 0.5, f"only {int(stable.sum())} rows away from ties"
    # SAELens' decode leaves the skip out (its forward adds it); ours runs inside the forward
    skip = x @ theirs.W_skip.T if tr.sae.has_skip else 0.0
    errors = {"encode": _row_rel(acts, codes), "decode": _row_rel(recon + skip, x_hat), "forward": _row_rel(fwd, x_hat)}
    worst = {name: float(e[stable].detach().max()) for name, e in errors.items()}
    print(f"\n{kind}/{role}{options or ''}: {arch} exact, max relative error {worst}")
    assert max(worst.values()) <= EXACT, worst


def test_default_stop_rule_of_saelens_matching_pursuit_differs(tmp_path):
    """What the export's stop settings avoid: SAELens' defaults (stop on an unchanged support or a
    residual norm below 1e-2, at most d_in steps) compute another function than k pursuit steps."""
    from sae_lens import SAE  # noqa: PLC0415

    tr = _trained("mpsae", "sae", {})
    folder = export.export_sae(tr.sae, tmp_path / "e", "mpsae", {})
    cfg = json.loads((folder / "cfg.json").read_text())
    assert (cfg["residual_threshold"], cfg["stop_on_duplicate_support"], cfg["max_iterations"]) == (0.0, False, K)
    x, _ = _data(2, "sae")
    exact = SAE.load_from_disk(folder)
    for key in ("residual_threshold", "stop_on_duplicate_support", "max_iterations"):
        del cfg[key]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    default = SAE.load_from_disk(folder)
    with torch.no_grad():
        l0_exact, l0_default = ((m.encode(x) != 0).sum(1).double().mean().item() for m in (exact, default))
    print(f"\nmatching_pursuit L0: export settings {l0_exact:.2f}, SAELens defaults {l0_default:.2f}")
    assert l0_exact <= K and l0_default > l0_exact


def test_hook_z_exports_reshape_and_saelens_reads_heads(tmp_path):
    """An attn_z SAE records SAELens' hook_z reshaping, and SAELens then reads [.., heads, d_head]."""
    from sae_lens import SAE  # noqa: PLC0415

    tr = _trained("topk", "sae", {})
    meta = {"hook_name": hooks.hook_name("blocks.1.attn_z")}
    assert meta["hook_name"] == "blocks.1.attn.hook_z"
    folder = export.export_sae(tr.sae, tmp_path / "z", "topk", meta)
    assert json.loads((folder / "cfg.json").read_text())["reshape_activations"] == "hook_z"
    theirs = SAE.load_from_disk(folder)
    x, _ = _data(2, "sae")
    with torch.no_grad():
        heads = theirs(x.view(ROWS, 4, D // 4))
        theirs.turn_off_forward_pass_hook_z_reshaping()
        flat = theirs(x)
    assert heads.shape == (ROWS, 4, D // 4)
    torch.testing.assert_close(heads.reshape(ROWS, D), flat, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalization", ["LN", "RMS"])
def test_every_site_records_a_hook_transformer_lens_has(normalization):
    """The hook names our exports record exist in TransformerLens' HookedTransformer (what
    SAELens' HookedSAETransformer splices into), for a LayerNorm and an RMSNorm model."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: PLC0415

    cfg = HookedTransformerConfig(n_layers=2, d_model=16, d_head=4, n_ctx=8, d_vocab=11, act_fn="gelu",
                                  normalization_type=normalization, use_hook_mlp_in=True)
    names = set(HookedTransformer(cfg).hook_dict)
    for kind in hooks.SITE_KINDS:
        assert hooks.hook_name(f"blocks.1.{kind}") in names, kind
