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
from datetime import timedelta

import torch
import torch.distributed as dist

from framework import host_memory, watchdog
from framework.schema import ConfigError, DistConfig

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "zero1", "zero2", "zero3")


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
            from framework.deepspeed_adapter import skip_shm_build  # noqa: PLC0415

            skip_shm_build()
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
        elif self.device.type == "cpu":
            host_memory.keep_freed_memory()  # the step's large temporaries reuse their pages
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

    def runner_class(self):
        """The Runner of this layout (framework/runners.py): one decision, made here."""
        from framework import runners  # noqa: PLC0415

        layout = ("zero" if self.zero_stage else "latent_shards" if self.latent_shards > 1
                  else "ddp" if self.world > 1 else "single")
        return runners.RUNNERS[layout]

    def close(self) -> None:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
