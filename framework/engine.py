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
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

from framework.config import DistConfig

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "zero1", "zero2", "zero3")


def _skip_deepspeed_shm_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory all-reduce op with g++ (~50 s) at its first
    init on CPU; it serves inference kernels we do not use, so mark it incompatible."""
    import deepspeed.ops  # noqa: PLC0415

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class Engine:
    """One per process. `world`/`rank` describe the data-parallel group of the SAEs."""

    def __init__(self, cfg: DistConfig, device_name: str = "auto"):
        self.cfg = cfg
        self.zero_stage = int(cfg.strategy[-1]) if cfg.strategy.startswith("zero") else 0
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        use_cuda = torch.cuda.is_available() and device_name != "cpu"
        self.backend = "nccl" if use_cuda else "gloo"
        self.accelerator = None
        if self.zero_stage:
            _skip_deepspeed_shm_build()
        if env_world > 1 and not dist.is_initialized():
            from accelerate import Accelerator  # noqa: PLC0415
            from accelerate.utils import InitProcessGroupKwargs  # noqa: PLC0415

            self.accelerator = Accelerator(cpu=not use_cuda, kwargs_handlers=[InitProcessGroupKwargs(backend=self.backend)])
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

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over the data-parallel group (no-op alone)."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def wrap(self, module: torch.nn.Module, optimizer, scheduler, grad_clip: float) -> "Runner":
        if self.zero_stage:
            return ZeroRunner(module, optimizer, scheduler, grad_clip, self.zero_stage)
        if self.world > 1:
            return DDPRunner(module, optimizer, scheduler, grad_clip, self.accelerator)
        return Runner(module, optimizer, scheduler, grad_clip)

    def close(self) -> None:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


class Runner:
    """A wrapped training module: forward, backward, step (clip + optimizer + schedule)."""

    def __init__(self, module, optimizer, scheduler, grad_clip: float):
        self.module, self.wrapped = module, module
        self.optimizer, self.scheduler, self.grad_clip = optimizer, scheduler, grad_clip

    def __call__(self, *args):
        return self.wrapped(*args)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> torch.Tensor:
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
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
    def __init__(self, module, optimizer, scheduler, grad_clip, accelerator):
        super().__init__(module, optimizer, scheduler, grad_clip)
        self.wrapped = accelerator.prepare_model(module)


class ZeroRunner(Runner):
    def __init__(self, module, optimizer, scheduler, grad_clip, stage: int):
        import deepspeed  # noqa: PLC0415

        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError("ZeRO strategies need a torch optimizer (train.optimizer: adam)")
        config = {
            "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: we feed whole batches
            "gradient_accumulation_steps": 1,
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
        super().__init__(module, opt, sched, grad_clip)
        self.wrapped = self.engine = engine
        self.stage = stage

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> torch.Tensor:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(float(norm) if norm is not None else 0.0)

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def gathered(self, modify: bool = False):
        if self.stage < 3:
            return nullcontext()
        import deepspeed  # noqa: PLC0415

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=0 if modify else None)

    def optimizer_state(self) -> dict:
        raise NotImplementedError("ZeRO optimizer state is sharded: save it with the state manager")
