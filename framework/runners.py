"""How one SAE is laid out over the ranks and stepped: a Runner per layout, each answering its
own questions (which module this rank trains, the reductions its statistics need, whole
weights for evaluation and export, and its state in the whole-SAE layout), so the trainer and
the checkpointer never ask which layout they have.

    Runner               one process, or one rank that owns the SAE whole (layer placement)
    DDPRunner            data parallel: torch DDP (through Accelerate), gradients all-reduced
    LatentShardedRunner  this rank's n/T latents (framework/tensor_parallel.py); the T shards
                         of a group read the same batches; replicas average gradients
    ZeroRunner           DeepSpeed ZeRO 1/2/3 over the SAE (framework/deepspeed_adapter.py)

State (`state_dict` / `load_state_dict`, framework/stateful.py): the shared part holds the
whole SAE's weights (`sae.<name>`; `eval.<name>`: an averaging optimizer's evaluation
weights), the optimizer settings and, for torch optimizers, the optimizer state as one piece
of whole tensors; a ZeRO rank's local part holds its optimizer partition
(framework/optimizer_state.py). Any layout loads any other's.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from framework import optimizer_state, tensor_parallel
from framework.stateful import Saved, State, StateDict
from framework.registry import Registry

RUNNERS: Registry[type] = Registry("layout")


def _cpu(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}


def _bytes(tensors) -> int:
    """Bytes this rank holds of `tensors` (a ZeRO-3 parameter: its partition, `ds_tensor`)."""
    return sum(getattr(t, "ds_tensor", t).numel() * t.element_size() for t in tensors)


def _state_tensors(optimizer) -> list[torch.Tensor]:
    return [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]


@RUNNERS.register("single")
class Runner:
    """A wrapped training objective over a whole SAE. Per optimizer step: `accumulation` times
    (forward, backward) inside `micro_step(last)`, then `step()` (clip + optimizer + schedule).

    `sae` is the (full) module to train; `objective(sae, runner)` builds what is wrapped (it
    reads the runner's reductions); `optimizer(params)` -> (optimizer, scheduler);
    `blueprint()` -> a fresh whole SAE of the same kind (for copies of gathered weights);
    `eval_weights`: the optimizer evaluates at averaged weights (optimizer.eval()/.train())."""

    data_world = 1  # ranks that split the SAE's batch
    writes = True  # this rank writes the SAE's shared state and export
    sharded = False  # the module is a shard of the SAE's latents (evaluated as such, with its group)

    def __init__(self, sae, objective, optimizer, train_cfg, blueprint, eval_weights: bool = False, engine=None):
        self.engine = engine
        self.sae = self.place(sae)
        self.objective = objective(self.sae, self)
        params = [p for p in self.sae.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = optimizer(params)
        self.grad_clip, self.accumulation = train_cfg.grad_clip, train_cfg.grad_accumulation_steps
        self.blueprint, self.eval_weights = blueprint, eval_weights
        self.wrapped = self.wrap(self.objective)

    # -- layout ---------------------------------------------------------------------------
    def place(self, sae):
        """The module this rank trains, from the whole SAE."""
        return sae

    def wrap(self, objective):
        return objective

    def reduce_batch(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over the ranks that split the batch (each token counted once)."""
        return t

    def reduce_counts(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum of per-latent counts (and token counts) over every rank that holds any."""
        return t

    counts_tokens = True  # this rank's tokens count in the firing statistics (one shard per group does)

    # -- stepping -----------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.wrapped(*args, **kwargs)

    def micro_step(self, last: bool):
        """Context of one micro-step's forward and backward; gradients are synchronised across
        ranks only when `last` (the accumulation boundary)."""
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulates d(loss / accumulation): the step's loss is the mean of its micro-steps'."""
        (loss / self.accumulation if self.accumulation > 1 else loss).backward()

    def clip_grads(self) -> torch.Tensor:
        """The gradient norm of the whole model, after clipping it to grad_clip (if set)."""
        params = [p for p in self.sae.parameters() if p.grad is not None]
        if self.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))

    def step(self) -> torch.Tensor:
        norm = self.clip_grads()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_bytes(self) -> dict[str, int]:
        """This rank's training state of the SAE in bytes: parameters (a shard's or ZeRO-3
        partition's), their gradients (one per trained parameter, as a step holds them, counted
        whole also under ZeRO-2/3, which reduce them into partitions), the optimizer's state (ZeRO:
        the fp32 master partitions too)."""
        params = list(self.sae.parameters())
        return {"param_bytes": _bytes(params), "grad_bytes": _bytes(p for p in params if p.requires_grad),
                "optimizer_bytes": _bytes(self._optimizer_tensors())}

    def _optimizer_tensors(self) -> list[torch.Tensor]:
        return _state_tensors(self.optimizer)

    def gathered(self, modify: bool = False):
        """Context in which every parameter is whole on every rank (ZeRO-3 partitions them);
        with modify=True, changes made inside (identically on every rank) are kept."""
        return nullcontext()

    # -- evaluation and export ----------------------------------------------------------------
    @contextmanager
    def evaluating(self, whole: bool = False):
        """The module in inference mode at the optimizer's evaluation weights; the training
        weights are restored exactly afterwards (an averaging optimizer's switch back is not
        bitwise reversible). The whole SAE (ZeRO-3: a gathered copy), except that latent shards
        are yielded as they are unless `whole` (export: gathered, None on the ranks that do not
        write). Collective under ZeRO-3 and latent shards."""
        kept = [p.detach().clone() for p in self.sae.parameters()] if self.eval_weights else []
        if self.eval_weights:
            self.optimizer.eval()
        try:
            sae = self.whole_sae() if whole or not self.sharded else self.sae
            if sae is not None:
                sae.eval()
            try:
                yield sae
            finally:
                if sae is not None:
                    sae.train()
        finally:
            if self.eval_weights:
                self.optimizer.train()
                with torch.no_grad():
                    for p, k in zip(self.sae.parameters(), kept):
                        p.copy_(k)

    def whole_sae(self):
        """The whole SAE with its current weights (this module, or a gathered copy)."""
        return self.sae

    def whole_weights(self) -> dict[str, torch.Tensor] | None:
        """The whole SAE's state_dict, on the ranks that write (None elsewhere); collective."""
        with self.gathered():
            return _cpu(self.sae.state_dict())

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> StateDict:
        weights = self.whole_weights()
        shared = None
        if self.writes and weights is not None:
            shared = State({f"sae.{k}": v for k, v in weights.items()}, {})
            if self.eval_weights:
                with self.evaluating():
                    shared.tensors |= {f"eval.{k}": v for k, v in self.whole_weights().items()}
        local = self._optimizer_state(shared)
        return StateDict(shared, local)

    def _optimizer_state(self, shared: State | None) -> State | None:
        """A torch optimizer's state, whole, goes with the shared part (returns no local part)."""
        whole = self.whole_optimizer_state()
        if shared is not None:
            names = optimizer_state.param_names(self.objective, self.optimizer)
            tensors, meta = optimizer_state.torch_pieces(whole, names, self._global_steps())
            shared.tensors |= {f"optim.{k}": v for k, v in tensors.items()}
            shared.meta |= {"optimizer": optimizer_state.settings(self.optimizer, self.scheduler), "pieces": meta}
        return None

    def whole_optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def _global_steps(self) -> int:
        return int(self.scheduler.last_epoch) if self.scheduler is not None else 0

    def load_state_dict(self, saved: Saved) -> None:
        if saved.shared is None:
            raise ValueError("the checkpoint holds no weights of this SAE")
        weights = {k[len("sae."):]: saved.shared.tensors[k] for k in saved.shared.tensors.keys() if k.startswith("sae.")}
        self.load_weights(weights)
        source = saved_optimizer(saved)
        self.load_optimizer(source)
        optimizer_state.apply_settings(self.optimizer, self.scheduler, source.settings)

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.sae.load_state_dict(weights)

    def load_optimizer(self, source: optimizer_state.SavedOptimizer) -> None:
        self.optimizer.load_state_dict(source.torch_state(self.objective, self.optimizer))


def saved_optimizer(saved: Saved) -> optimizer_state.SavedOptimizer:
    """The saved optimizer state of an SAE, whichever layout wrote it: a torch optimizer's
    piece in the shared part, or ZeRO's partitions in every saved rank's local part."""
    shared = saved.shared
    pieces = []
    for part in [shared, *saved.local]:
        if part is not None and "pieces" in part.meta:
            pieces.append((part.meta["pieces"], lambda key, lo, hi, part=part: part.slice(f"optim.{key}", lo, hi)))
    weights = {k: shared.tensors[k] for k in shared.tensors.keys() if k.startswith("sae.")} if shared else {}
    return optimizer_state.SavedOptimizer(shared.meta["optimizer"] if shared else {}, pieces, weights)


class DataParallelRunner(Runner):
    """What every multi-rank layout shares: the data-parallel ranks split each batch, rank 0
    writes the SAE's shared state, statistics are summed over the ranks."""

    def __init__(self, *args, engine, **kwargs):
        self.data_world, self.writes = engine.dp_world, engine.is_main
        super().__init__(*args, engine=engine, **kwargs)

    def reduce_batch(self, t):
        return self.engine.data_reduce_(t)

    def reduce_counts(self, t):
        return self.engine.all_reduce_(t)


@RUNNERS.register("ddp")
class DDPRunner(DataParallelRunner):
    """Data parallel: every rank holds the whole SAE; DDP averages the gradients in backward."""

    def wrap(self, objective):
        """Accelerate's DDP; plain torch DDP when the caller made the process group before the
        engine (Accelerate then stays out of it), the same wrapper."""
        if self.engine.accelerator is not None:
            return self.engine.accelerator.prepare_model(objective)
        return torch.nn.parallel.DistributedDataParallel(objective)

    def micro_step(self, last: bool):
        """DDP all-reduces gradients in backward unless inside no_sync: only the last micro-step
        syncs (the reducer then averages the locally accumulated sums)."""
        return nullcontext() if last else self.wrapped.no_sync()


@RUNNERS.register("latent_shards")
class LatentShardedRunner(DataParallelRunner):
    """This rank's latents of the SAE (`sae` is a LatentShardedTopK shard cut from the same
    whole initialisation as an unsharded run). No DDP wrapper: the shard's own collectives run
    inside forward and backward; at the step one packed all_reduce averages the gradients over
    the data-parallel replicas, and clipping uses the norm of the whole model. Checkpoints and
    exports hold the whole SAE, gathered on the first shard of each group."""

    sharded = True

    def place(self, sae):
        return tensor_parallel.from_full(sae, group=self.engine.tp_group)

    @property
    def counts_tokens(self) -> bool:
        return self.engine.tp_rank == 0

    def clip_grads(self) -> torch.Tensor:
        self.sae.sync_data_parallel_grads(self.engine.dp_group)
        return self.sae.clip_grad_norm_(self.grad_clip) if self.grad_clip > 0 else self.sae.grad_norm()

    def whole_sae(self):
        return tensor_parallel.gather_full(self.sae, dst=0)

    def whole_weights(self):
        state = tensor_parallel.gather_state(self.sae, dst=0)
        return None if state is None else _cpu(state)

    def whole_optimizer_state(self) -> dict:
        state = tensor_parallel.gather_optimizer_state(self.sae, {"optimizer": self.optimizer.state_dict()}, dst=0)
        return state["optimizer"] if state is not None else {}

    def load_weights(self, weights):
        self.sae.load_state_dict(tensor_parallel.shard_state(self.sae, weights))

    def load_optimizer(self, source):
        whole = {"optimizer": source.torch_state(self.objective, self.optimizer)}
        self.optimizer.load_state_dict(tensor_parallel.shard_optimizer_state(self.sae, whole)["optimizer"])


@RUNNERS.register("zero")
class ZeroRunner(DataParallelRunner):
    """DeepSpeed ZeRO over the SAE (one engine per SAE keeps per-SAE learning rates, clipping
    and schedules exact). Every rank saves its own optimizer partition."""

    def __init__(self, *args, engine, **kwargs):
        self.stage = engine.zero_stage
        super().__init__(*args, engine=engine, **kwargs)

    def wrap(self, objective):
        from framework.deepspeed_adapter import ZeroEngine  # noqa: PLC0415

        self.zero = ZeroEngine(objective, self.optimizer, self.scheduler, self.grad_clip, self.stage,
                               self.accumulation)
        self.optimizer, self.scheduler = self.zero.optimizer, self.zero.scheduler
        return self.zero

    def backward(self, loss):
        self.zero.backward(loss)

    def step(self):
        return self.zero.step()

    @property
    def lr(self) -> float:
        return self.zero.lr

    def _optimizer_tensors(self) -> list[torch.Tensor]:
        return self.zero.optimizer_tensors()

    def gathered(self, modify: bool = False):
        return self.zero.gathered(modify)

    def whole_sae(self):
        if self.stage < 3:
            return self.sae
        copy = self.blueprint()
        copy.load_state_dict({k: v for k, v in self.whole_weights().items()})
        return copy.to(self.sae.b_dec.device)

    def _optimizer_state(self, shared):
        tensors, meta = self.zero.optimizer_partition()
        if shared is not None:
            shared.meta["optimizer"] = optimizer_state.settings(self.optimizer, self.scheduler)
        return State({f"optim.{k}": v for k, v in tensors.items()}, {"pieces": meta})

    def load_weights(self, weights):
        # The module weights and the fp32 master weights may differ (changes made under
        # GatheredParameters, like the decoder renorm, reach only the module): both are put back.
        with self.gathered(modify=True), torch.no_grad():
            for key, value in self.sae.state_dict(keep_vars=True).items():
                value.copy_(weights[key])

    def load_optimizer(self, source):
        self.zero.load_optimizer_partition(source)
