"""Every use of DeepSpeed in one place, its private attributes included, behind a version check.

sparsemill uses DeepSpeed for two things: ZeRO 1/2/3 over one SAE's parameters, gradients and
Adam states (`ZeroEngine`), and ZeRO-3 partitioning of the frozen LLM (`partition_frozen`,
`stop_guard`). Both need DeepSpeed internals that have no public API:
  * the per-rank optimizer partitions, read and written directly (checkpoints without pickles,
    re-sharded under any world size or stage): stage 1/2 `bit16_groups`,
    `single_partition_of_fp32_groups` and each parameter's `_hp_mapping`; stage 3
    `fp16_groups`, `fp32_partitioned_groups_flat`, `grad_position`; the counters
    `global_steps`, `skipped_steps`, `global_samples`, `micro_steps`; and
    `_lazy_init_hp_params_optimizer_state` after a load;
  * an early-stopped forward of a ZeRO-3 model: `parameter_offload.FWD_MODULE_STACK` and the
    parameter coordinator's `_clean_inflight_param_registry`.
These were read off DeepSpeed 0.19.8, the version the tests run; TESTED bounds what may run
(pyproject.toml says the same), and anything else fails at import with a clear message.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

TESTED = ((0, 19), (0, 20))  # [lowest, highest) (major, minor) whose internals this module was checked against


def _deepspeed():
    """The deepspeed module, once its version is known to be one this adapter was checked on."""
    import deepspeed  # noqa: PLC0415

    parts = tuple(int(p) for p in deepspeed.__version__.split(".")[:2] if p.isdigit())
    if not TESTED[0] <= parts < TESTED[1]:
        raise RuntimeError(f"deepspeed {deepspeed.__version__} is installed; sparsemill's ZeRO support reads "
                           f"DeepSpeed internals checked on {TESTED[0][0]}.{TESTED[0][1]}.x only "
                           f"(framework/deepspeed_adapter.py): install deepspeed>={TESTED[0][0]}.{TESTED[0][1]},"
                           f"<{TESTED[1][0]}.{TESTED[1][1]}")
    return deepspeed


def skip_shm_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory all-reduce op with g++ (~50 s) at its first init
    on CPU; it serves inference kernels we do not use, so mark it incompatible."""
    import deepspeed.ops  # noqa: PLC0415

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# --------------------------------------------------------------------------- ZeRO over an SAE


class ZeroEngine:
    """A DeepSpeed engine over one module (an SAE's objective) with ZeRO `stage`, plus the
    operations the runner needs: the step protocol, whole parameters, and the optimizer
    partition of this rank as pieces of each parameter's flattened full tensors."""

    def __init__(self, module, optimizer, scheduler, grad_clip: float, stage: int, accumulation: int):
        skip_shm_build()
        deepspeed = _deepspeed()
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError("ZeRO strategies need a torch optimizer (train.optimizer: adam)")
        config = {
            "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: whole micro-batches are fed
            "gradient_accumulation_steps": accumulation,  # DeepSpeed scales the loss and finds the boundary
            "gradient_clipping": grad_clip,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
        }
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config, dist_init_required=False)
        if stage == 3:
            # The objective's forward and backward use the SAE's parameters directly (fused ops
            # save them for backward): keep them gathered for the objective's whole pass.
            for p in module.parameters():
                deepspeed.zero.register_external_parameter(module, p)
        self.module, self.stage = module, stage

    def __call__(self, *args):
        return self.engine(*args)

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
        """Every parameter whole on every rank (ZeRO-3 partitions them). With modify=True the
        changes made inside (identically on every rank) also reach DeepSpeed's fp32 master
        partitions: every stage keeps a master copy and overwrites the module from it at the
        next step, which would silently undo e.g. the decoder renorm."""
        deepspeed = _deepspeed()
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

    def _pieces(self):
        """(name, full shape, flat fp32 partition, offset in it, offset in the flattened full
        parameter, numel) of each parameter piece this rank's optimizer holds (at most one per
        parameter). Stage 1/2 map each parameter onto the rank's flat fp32 partition of its
        group (`_hp_mapping`); stage 3 puts each parameter's partition at `grad_position` in its
        sub-group's flat fp32 tensor. Stage 3 partitions are padded: padding is skipped."""
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

    def optimizer_tensors(self) -> list[torch.Tensor]:
        """This rank's flat fp32 master partitions (one per group) and their optimizer state:
        what its optimizer holds (Runner.state_bytes)."""
        flats = self.optimizer.single_partition_of_fp32_groups if self.stage < 3 else \
            self.optimizer.fp32_partitioned_groups_flat
        state_of = self.optimizer.optimizer.state
        return list(flats) + [t for f in flats for t in state_of.get(f, {}).values() if torch.is_tensor(t)]

    def optimizer_partition(self) -> tuple[dict[str, torch.Tensor], dict]:
        """This rank's pieces of every parameter's flattened fp32 master weights and optimizer
        state: tensors `<param>.master` and `<param>.<state key>` (e.g. exp_avg), and metadata
        {"params": {param: {"shape", "start", "numel", "step", "keys"}}, ...} saying where each
        piece lies in the full tensor (framework/optimizer_state.py). "step" is None before the
        first optimizer step."""
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
        """Set this rank's pieces from `source` (optimizer_state.SavedOptimizer: a checkpoint's
        optimizer state in any layout). An engine that has not stepped yet gets its optimizer
        state created here, as torch's Adam would at its first step."""
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


# --------------------------------------------------------------------------- ZeRO-3 frozen LLM


def frozen_zero3_config(dtype: torch.dtype) -> dict:
    """A config for a frozen, partitioned model: no optimizer; every parameter is partitioned
    (persistence threshold 0: the memory saving is exactly 1/world, at the price of also
    gathering the small LayerNorm tensors with their module)."""
    config = {
        "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: nothing is trained
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 2**31 - 1,
    }
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    elif dtype == torch.float16:
        config["fp16"] = {"enabled": True}
    return config


def partition_frozen(build, dtype: torch.dtype, load_partitioned: bool):
    """(model, tokenizer, engine) of `build()` partitioned with ZeRO-3 over every rank. With
    load_partitioned, transformers loads pretrained weights straight into partitions (its
    zero.Init path: no rank ever holds the whole model); otherwise the model is built whole
    (tiny random models, so they equal the unsharded ones), then partitioned."""
    skip_shm_build()
    deepspeed = _deepspeed()
    config = frozen_zero3_config(dtype)
    if load_partitioned:
        from transformers.integrations import HfDeepSpeedConfig  # noqa: PLC0415
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config  # noqa: PLC0415

        hf_config = HfDeepSpeedConfig(config)  # while alive, from_pretrained partitions as it loads
        try:
            model, tokenizer = build()
        finally:
            del hf_config
            unset_hf_deepspeed_config()
    else:
        model, tokenizer = build()
    model.eval().requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=config, dist_init_required=False)
    return model, tokenizer, engine


def partition_numel(model) -> tuple[int, int]:
    """(elements of the parameters this rank holds, elements of the whole model) of a
    partitioned model."""
    params = list(model.parameters())
    return sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params)


def stop_guard(engine):
    """What undoes an early-stopped forward of a ZeRO-3 model (call it as the capture begins).
    ZeRO-3 expects each module's post-forward hook: a forward cut short leaves the modules it
    was inside on DeepSpeed's module stack (it grows every forward) and the prefetched or
    just-gathered parameters of the skipped modules whole (the memory ZeRO-3 should save). All
    ranks stop at the same module, so the collectives still match."""
    from deepspeed.runtime.zero import parameter_offload  # noqa: PLC0415
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus  # noqa: PLC0415

    depth = len(parameter_offload.FWD_MODULE_STACK)

    def cleanup() -> None:
        del parameter_offload.FWD_MODULE_STACK[depth:]
        engine.optimizer.get_param_coordinator()._clean_inflight_param_registry()  # waits, then releases
        for p in engine.module.parameters():
            if p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_persist:
                p.ds_active_sub_modules.clear()
                p.partition()

    return cleanup
