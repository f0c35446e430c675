"""The distributed engine: process group, device, and how each SAE is wrapped for training.

Strategies (`dist.strategy`):
  ddp          torch DDP through Accelerate (`accelerator.prepare_model`); a single process
               trains unwrapped.
  zero1/2/3    a DeepSpeed engine per SAE (ZeRO stage 1, 2 or 3 over that SAE's parameters,
               gradients and Adam states). One engine per SAE, rather than one Accelerate
               `prepare`, keeps per-SAE learning rates, clipping and schedules exact and lets
               SAEs of different sizes live side by side; Accelerate still sets up the process
               group and device. A single process runs DeepSpeed on a one-rank group, so a
               zero2 run on 1 and on 2 ranks is the same computation.

Every rank of a data-parallel run holds every SAE; normalising statistics (batch variance,
firing counts) are reduced across ranks inside the step, so N ranks with a global batch B
compute what one process computes with batch B.

Latent sharding (`dist.latent_shards` = T > 1, ddp only): the world is a (data parallel D) x
(latent shards T) mesh; the T consecutive ranks of a group each hold n/T latents of every SAE
(framework/tensor_parallel.py) and read the same batches, D groups split the data. Per SAE
and optimizer step, with B_r = B / D tokens per rank, k_loc = min(k, n/T) and fp32 (4 B):
  candidate gather  T*B_r*k_loc*4 B received per rank   (the global top-k selection)
  x_hat all-reduce  B_r*d_out*4 B over the T shards      (partial decodes; the big one)
  b_dec grad        d_in*4 B over the T shards (+ the same again when AuxK runs)
  gradients         (n/T*(d_in+d_out+1) + d_out)*4 B over the D replicas (one packed all_reduce)
  statistics        (d_out+2)*8 B over D (FVU normaliser), (n+1)*8 B over all ranks (firing
                    counts), 4 B over T (gradient norm for clipping)
Choose it when one SAE's weights, gradients and Adam state (16*n*(d_in+d_out) bytes) do not
fit one device, or to split the B*n encoder work: the shards exchange activations (B_r*d_out +
T*B_r*k_loc) instead of gradients, while plain data parallel all-reduces n*(d_in+d_out) floats
per step - so it also moves less whenever B_r < n. ZeRO partitions the state too, but every
rank still runs the whole B_r*n encoder and gathers/reduces parameters of size n*d.

Gradient accumulation (`train.grad_accumulation_steps` = A): `train.batch_size` stays the
tokens per optimizer step; each rank runs A micro-batches of B / (D*A) tokens and the
gradients are synchronised once, on the last (DDP `no_sync` on the others; latent shards
average over the replicas at the step; ZeRO uses DeepSpeed's `gradient_accumulation_steps`
boundary: stage 1 reduces only there, stages 2/3 still reduce-scatter at every micro-step, as
they keep gradients partitioned). The loss of the step is the exact mean of the A
micro-batch losses; each micro-batch's FVU normaliser (its centred sum of squares over the
ranks, d+2 doubles, and AuxK's) is still all-reduced at that micro-step, because the
normalised loss must be known before the micro-step's backward.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist

from framework import watchdog
from framework.schema import ConfigError, DistConfig

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "zero1", "zero2", "zero3")


def _skip_deepspeed_shmbuild_dataclass() -> None:
    """DeepSpeed JIT-compiles a shared-memory all-reduce op with g++ (~50 s) at its first
    init on CPU; it serves inference kernels we do not use, so mark it incompatible."""
    import deepspeed.ops  # noqa: PLC0415

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def mesh_shape(world: int, latent_shards: int) -> tuple[int, int]:
    """(data-parallel size, latent shards) of a world of `world` ranks."""
    if world % latent_shards:
        raise ConfigError(f"dist.latent_shards={latent_shards} does not divide the world size {world} "
                          "(world = data-parallel size x latent shards); launch a multiple of it")
    return world // latent_shards, latent_shards


class Engine:
    """One per process. `world`/`rank`: all processes. `dp_world`/`dp_rank`: the data-parallel
    size and this rank's index in it (= world/rank without latent sharding; the ranks of one
    latent-shard group share a dp_rank and read the same data). `tp_rank`: the latent shard."""

    def __init__(self, cfg: DistConfig, device_name: str = "auto"):
        self.cfg = cfg
        watchdog.bound_waits(cfg.timeout_s)  # before any process group: every wait ends after dist.timeout_s
        self.zero_stage = int(cfg.strategy[-1]) if cfg.strategy.startswith("zero") else 0
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        use_cuda = torch.cuda.is_available() and device_name != "cpu"
        self.backend = "nccl" if use_cuda else "gloo"
        self.accelerator = None
        if self.zero_stage:
            _skip_deepspeed_shmbuild_dataclass()
        if env_world > 1 and not dist.is_initialized():
            from accelerate import Accelerator  # noqa: PLC0415
            from accelerate.utils import InitProcessGroupKwargs  # noqa: PLC0415

            init = InitProcessGroupKwargs(backend=self.backend, timeout=timedelta(seconds=cfg.timeout_s))  # else 30 min
            self.accelerator = Accelerator(cpu=not use_cuda, kwargs_handlers=[init])
        elif self.zero_stage and not dist.is_initialized():
            # DeepSpeed needs a process group even alone: a one-rank group on an in-memory store.
            dist.init_process_group(self.backend, store=dist.HashStore(), rank=0, world_size=1)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_name not in ("auto", "cpu", "cuda"):
            self.device = torch.device(device_name)
        else:
            self.device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        self.dp_world, self.latent_shards = mesh_shape(self.world, cfg.latent_shards)
        self.dp_rank, self.tp_rank = divmod(self.rank, self.latent_shards)
        self.dp_group = self.tp_group = None  # the default group / no latent shards
        if self.latent_shards > 1:
            from framework.tensor_parallel import init_mesh  # noqa: PLC0415

            self.dp_group, self.tp_group, _ = init_mesh(self.dp_world, self.latent_shards, self.device.type)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over all ranks (no-op alone)."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def data_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over this rank's data-parallel group: every token counted once (the
        ranks of a latent-shard group hold the same batch)."""
        if self.dp_world > 1:
            dist.all_reduce(t, group=self.dp_group)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast_object(self, obj):
        """Rank 0's (picklable, trusted: in-process) object on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, 0)
        return box[0]

    def wrap(self, module: torch.nn.Module, optimizer, scheduler, grad_clip: float, accumulation: int = 1) -> "Runner":
        if self.zero_stage:
            return ZeroRunner(module, optimizer, scheduler, grad_clip, self.zero_stage, accumulation)
        if self.latent_shards > 1:
            return LatentShardedRunner(module, optimizer, scheduler, grad_clip, accumulation, self.dp_group)
        if self.world > 1:
            return DDPRunner(module, optimizer, scheduler, grad_clip, accumulation, self.accelerator)
        return Runner(module, optimizer, scheduler, grad_clip, accumulation)

    def close(self) -> None:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


class Runner:
    """A wrapped training module. Per optimizer step: `accumulation` times (forward, backward)
    inside `micro_step(last)`, then `step()` (clip + optimizer + schedule)."""

    def __init__(self, module, optimizer, scheduler, grad_clip: float, accumulation: int = 1):
        self.module, self.wrapped = module, module
        self.optimizer, self.scheduler, self.grad_clip = optimizer, scheduler, grad_clip
        self.accumulation = accumulation

    def __call__(self, *args):
        return self.wrapped(*args)

    def micro_step(self, last: bool):
        """Context of one micro-step's forward and backward; gradients are synchronised across
        ranks only when `last` (the accumulation boundary)."""
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulates d(loss / accumulation): the step's loss is the mean of its micro-steps'."""
        (loss / self.accumulation if self.accumulation > 1 else loss).backward()

    def clip_grads(self) -> torch.Tensor:
        """The gradient norm of the whole model, after clipping it to grad_clip (if set)."""
        params = [p for p in self.module.parameters() if p.grad is not None]
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

    @contextmanager
    def weights_for_eval(self):
        """Schedule-free optimizers evaluate at their averaged point."""
        switch = hasattr(self.optimizer, "eval") and hasattr(self.optimizer, "train")
        if switch:
            self.optimizer.eval()
        try:
            yield
        finally:
            if switch:
                self.optimizer.train()

    def gathered(self, modify: bool = False):
        """Context in which every parameter is whole on every rank (ZeRO-3 partitions them);
        with modify=True, changes made inside (identically on every rank) are kept."""
        return nullcontext()

    def optimizer_state(self) -> dict:
        out = {"optimizer": self.optimizer.state_dict()}
        if self.scheduler is not None:
            out["scheduler"] = self.scheduler.state_dict()
        return out

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])


class DDPRunner(Runner):
    def __init__(self, module, optimizer, scheduler, grad_clip, accumulation, accelerator):
        """`accelerator` is None when the caller made the process group before the engine
        (Accelerate then stays out of it): plain torch DDP, the same wrapper Accelerate uses."""
        super().__init__(module, optimizer, scheduler, grad_clip, accumulation)
        if accelerator is not None:
            self.wrapped = accelerator.prepare_model(module)
        else:
            self.wrapped = torch.nn.parallel.DistributedDataParallel(module)

    def micro_step(self, last: bool):
        """DDP all-reduces gradients in backward unless inside no_sync: only the last micro-step
        syncs (the reducer then averages the locally accumulated sums)."""
        return nullcontext() if last else self.wrapped.no_sync()


class LatentShardedRunner(Runner):
    """A latent-sharded SAE (framework/tensor_parallel.py; `module.sae` is this rank's shard):
    no DDP wrapper, the shard's own collectives run inside forward and backward. At the step,
    one packed all_reduce averages the gradients over the data-parallel replicas, and clipping
    uses the norm of the whole (unsharded) model."""

    def __init__(self, module, optimizer, scheduler, grad_clip, accumulation, dp_group):
        super().__init__(module, optimizer, scheduler, grad_clip, accumulation)
        self.dp_group = dp_group

    def clip_grads(self) -> torch.Tensor:
        shard = self.module.sae
        shard.sync_data_parallel_grads(self.dp_group)
        return shard.clip_grad_norm_(self.grad_clip) if self.grad_clip > 0 else shard.grad_norm()


class ZeroRunner(Runner):
    def __init__(self, module, optimizer, scheduler, grad_clip, stage: int, accumulation: int = 1):
        import deepspeed  # noqa: PLC0415

        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError("ZeRO strategies need a torch optimizer (train.optimizer: adam)")
        config = {
            "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: we feed whole micro-batches
            "gradient_accumulation_steps": accumulation,  # DeepSpeed scales the loss and finds the boundary
            "gradient_clipping": grad_clip,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
        }
        engine, opt, _, sched = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                     config=config, dist_init_required=False)
        if stage == 3:
            # The objective's forward and backward use the SAE's parameters directly (fused ops
            # save them for backward): keep them gathered for the objective's whole pass.
            for p in module.parameters():
                deepspeed.zero.register_external_parameter(module, p)
        super().__init__(module, opt, sched, grad_clip, accumulation)
        self.wrapped = self.engine = engine
        self.stage = stage

    def backward(self, loss: torch.Tensor) -> None:
        """DeepSpeed divides by its gradient_accumulation_steps and counts micro-steps in
        engine.step(), which must follow every backward (it updates only at the boundary)."""
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def step(self) -> torch.Tensor:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(float(norm) if norm is not None else 0.0)

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    @contextmanager
    def gathered(self, modify: bool = False):
        """With modify=True the changes also reach DeepSpeed's fp32 master partitions: every
        ZeRO stage keeps a separate master copy and overwrites the module from it at the next
        step, which would silently undo e.g. the decoder renorm."""
        import deepspeed  # noqa: PLC0415
        from deepspeed.utils import safe_set_full_fp32_param  # noqa: PLC0415

        params = list(self.module.parameters())
        whole = (deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)
                 if self.stage == 3 else nullcontext())
        with whole:
            yield
            if modify:  # still gathered: each rank copies its own partition out of the full values
                for p in params:
                    if p.requires_grad:  # frozen parameters have no master copy
                        safe_set_full_fp32_param(p, p.data)

    def optimizer_state(self) -> dict:
        raise RuntimeError("ZeRO optimizer state is partitioned over the ranks: use optimizer_partition")

    # -- optimizer state, piece by piece: the state manager saves each rank's pieces and puts
    # -- them back under any world size or stage -------------------------------------------------
    def _pieces(self):
        """(name, full shape, flat fp32 partition, offset in it, offset in the flattened full
        parameter, numel) of each parameter piece this rank's optimizer holds (at most one per
        parameter). This reads DeepSpeed's partition layout, the same attributes its own
        safe_get_*/safe_set_* helpers use: stage 1/2 map each parameter onto the rank's flat fp32
        partition of its group (`_hp_mapping`); stage 3 puts each parameter's partition at
        `grad_position` in its sub-group's flat fp32 tensor. Stage 3 partitions are padded:
        the padding is no part of any parameter and is skipped."""
        opt = self.optimizer
        names = {id(p): n for n, p in self.module.named_parameters()}
        if self.stage < 3:
            flats = opt.single_partition_of_fp32_groups
            for group in opt.bit16_groups:
                for p in group:
                    m = getattr(p, "_hp_mapping", None)
                    if m is not None:
                        yield (names[id(p)], tuple(p.shape), flats[m.param_group_index], m.hp_fragment_address.start,
                               m.lp_fragment_address.start, m.lp_fragment_address.numel)
        else:
            flats = opt.fp32_partitioned_groups_flat
            for group in opt.fp16_groups:
                for p in group:
                    index, offset, size = opt.grad_position[opt.get_param_id(p)]
                    start = dist.get_rank(group=p.ds_process_group) * size
                    numel = min(size, p.ds_numel - start)
                    if numel > 0:
                        yield names[id(p)], tuple(p.ds_shape), flats[index], offset, start, numel

    def optimizer_partition(self) -> tuple[dict[str, torch.Tensor], dict]:
        """This rank's pieces of every parameter's flattened fp32 master weights and optimizer
        state: tensors `<param>.master` and `<param>.<state key>` (e.g. exp_avg), and metadata
        {"params": {param: {"shape", "start", "numel", "step", "keys"}}, ...} saying where each
        piece lies in the full tensor. "step" is None before the first optimizer step."""
        state_of = self.optimizer.optimizer.state
        tensors, params = {}, {}
        for name, shape, flat, offset, start, numel in self._pieces():
            state = state_of.get(flat, {})
            keys = sorted(k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape)
            for key, full in [("master", flat), *((k, state[k]) for k in keys)]:
                tensors[f"{name}.{key}"] = full.detach().narrow(0, offset, numel).to("cpu").clone()
            step = float(state["step"]) if "step" in state else None
            params[name] = {"shape": list(shape), "start": start, "numel": numel, "step": step, "keys": keys}
        meta = {"stage": self.stage, "rank": dist.get_rank(), "world": dist.get_world_size(), "params": params,
                "global_steps": self.engine.global_steps, "skipped_steps": self.engine.skipped_steps}
        return tensors, meta

    @torch.no_grad()
    def load_optimizer_partition(self, source) -> None:
        """Set this rank's pieces from `source`, a checkpoint's optimizer state in any layout
        (optimizer_state.SavedOptimizer: shape(), step(), keys() and read(param, key, start,
        numel) of the flattened full tensors, and counters). An engine that has not stepped yet
        gets its optimizer state created here, as torch's Adam would at its first step."""
        state_of, steps = self.optimizer.optimizer.state, {}
        for name, shape, flat, offset, start, numel in self._pieces():
            if list(shape) != source.shape(name):
                raise ValueError(f"{name}: saved shape {source.shape(name)}, this model's is {list(shape)}")
            flat.narrow(0, offset, numel).copy_(source.read(name, "master", start, numel))
            step = source.step(name)
            if steps.setdefault(id(flat), step) != step:  # one flat partition has one step count
                raise ValueError(f"{name}: saved at optimizer step {step}, other parameters of its group at "
                                 f"{steps[id(flat)]}")
            if step is None:  # saved before the first step: there is no optimizer state yet
                continue
            state = state_of[flat]
            if "step" in state:
                state["step"].fill_(step)
            else:
                group = self.optimizer.optimizer.param_groups[0]
                on_device = group.get("capturable") or group.get("fused")
                state["step"] = torch.tensor(step, dtype=torch.float32, device=flat.device if on_device else "cpu")
            for key in source.keys(name):
                state.setdefault(key, torch.zeros_like(flat)).narrow(0, offset, numel).copy_(
                    source.read(name, key, start, numel))
        if self.stage < 3 and any(s is not None for s in steps.values()):
            # link the parameters to the new state now (DeepSpeed does it after its first step),
            # so that its safe_get_full_optimizer_state works straight after a resume
            self.optimizer._lazy_init_hp_params_optimizer_state()
        # DeepSpeed's counters, as its own load_checkpoint sets them; the micro-step count is what
        # finds the accumulation boundary: a checkpoint is always at one, under any accumulation
        engine = self.engine
        engine.global_steps = int(source.counters["global_steps"])
        engine.skipped_steps = int(source.counters["skipped_steps"])
        engine.global_samples = engine.global_steps * engine.train_batch_size()
        engine.micro_steps = engine.global_steps * engine.gradient_accumulation_steps()
