"""Worker for tests/test_llm_sharding.py: one rank of a gloo job on CPU.

    torchrun --standalone --nproc_per_node=2 tests/workers/zero3_worker.py OUT_DIR FOLDER TEXT_DIR

Loads tiny-gpt2 (built from its config with seed 7, then partitioned) and the saved model in
FOLDER (loaded straight into partitions) sharded with ZeRO-3 over the ranks, and saves to
OUT_DIR/rank{RANK}.pt what it computed: its own token ids, every site of the first layers
from full and early-stopped captures, the parameter elements it holds, and for the FOLDER model
also LM-loss gradients, the state ZeRO-3 is left in after early stops (with and without the
cleanup), and the row counts an LLMSource yields when the ranks' text streams differ. The test
process compares with the unsharded models.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework import hooks, llm  # noqa: E402
from worker_results import save_result  # noqa: E402
from framework.activations import LLMSource  # noqa: E402
from framework.config import DataConfig, ModelConfig  # noqa: E402
from framework.lm_grads import lm_site_grads  # noqa: E402

LAYERS = (0, 1, 2)
GRAD_SITES = ["blocks.0.resid_post", "blocks.2.attn_out"]


def sites() -> list[str]:
    return [f"blocks.{layer}.{kind}" for layer in LAYERS for kind in sorted(hooks.SITE_KINDS)]


def token_ids(rank: int) -> torch.Tensor:
    """Different tokens (and shapes) on each rank: the gathers must not depend on the input."""
    return torch.randint(0, 256, (2 + rank, 11), generator=torch.Generator().manual_seed(100 + rank))


def zero3_state(model) -> dict:
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    whole = [n for n, p in model.named_parameters() if p.ds_status != ZeroParamStatus.NOT_AVAILABLE]
    return {"stack": len(parameter_offload.FWD_MODULE_STACK), "whole_params": whole}


def early_captures(model, specs, ids, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        with torch.no_grad(), hooks.capture(model, specs, stop_early=True) as got:
            hooks.run_until_captured(lambda: model(input_ids=ids, use_cache=False))
        out.append({**dict(got), "_state": zero3_state(model)})
    return out


def activations(model, ids, specs) -> dict:
    with torch.no_grad(), hooks.capture(model, specs, stop_early=False) as full:
        logits = model(input_ids=ids, use_cache=False).logits
    return {"numel": llm.local_parameter_numel(model), "full": dict(full), "logits": logits,
            "state_before": zero3_state(model),
            # early stops at an input-read site (the last module is entered, not run) and at outputs
            "early": {name: early_captures(model, [hooks.parse_site(name)], ids, 3)
                      for name in ("blocks.1.attn_z", "blocks.2.mlp_in", "blocks.0.resid_post")},
            "early_all": early_captures(model, specs, ids, 2)}


def main() -> None:
    out, folder, text_dir = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # a hang fails within a minute
    rank, world = dist.get_rank(), dist.get_world_size()
    ids = token_ids(rank)
    specs = [hooks.parse_site(s) for s in sites()]
    built, _ = llm.load_frozen(ModelConfig(name="tiny-gpt2", device="cpu", shard="zero3"), seed=7)
    model, tokenizer = llm.load_frozen(ModelConfig(name=folder, device="cpu", shard="zero3"))
    result = {"ids": ids, "built": activations(built, ids, specs), "loaded": activations(model, ids, specs)}

    acts, grads, loss = lm_site_grads(model, ids, GRAD_SITES)
    result["grads"], result["grad_acts"], result["loss"] = grads, acts, loss
    result["state_after_grads"] = zero3_state(model)

    # negative control: without the cleanup an early stop leaves ZeRO-3 state behind
    guard = hooks._EARLY_STOP_GUARDS.pop(model)
    undo = guard(model)  # taken before: it restores the state from here
    early_captures(model, [hooks.parse_site("blocks.1.attn_z")], ids, 2)
    result["state_without_cleanup"] = zero3_state(model)
    undo()
    result["state_restored"] = zero3_state(model)
    hooks.on_early_stop(model, guard)

    # an LLM source over different documents per rank (and outlier filtering that drops
    # different numbers of rows): lockstep forwards and equal row counts
    forwards = []
    model.register_forward_pre_hook(lambda *a: forwards.append(1))
    data = DataConfig(paths=[text_dir], context_size=24, llm_batch_size=3, norm_outlier_factor=1.02)
    src = LLMSource(data, model, tokenizer, ["blocks.1.resid_post"], torch.device("cpu"), seed=0, rank=rank,
                    world=world, grad_sites=["blocks.1.resid_post"])
    result["lockstep"] = src.lockstep
    result["eval_rows"] = [b["blocks.1.resid_post"].shape[0] for b in src.batches("eval")]
    train = src.batches("train")
    batches = [next(train) for _ in range(3)]
    result["train_rows"] = [b["blocks.1.resid_post"].shape[0] for b in batches]
    result["train_has_grads"] = all("blocks.1.resid_post@grad" in b for b in batches)
    result["forwards"] = len(forwards)
    result["dropped"] = src.skipped["train"]["lockstep"] + src.skipped["eval"]["lockstep"]
    save_result(result, out / f"rank{rank}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
