"""Running one recipe on many ranks (`torchrun --nproc_per_node=N -m signalrl train ...`).

`Dist` is the process's place in the job (rank, world size, strategy). Every rank loads the
same model, takes its share of each step's global batch, and the ranks agree on everything
that spans the batch, so a run gives the same result on 1 and on N ranks:

- a step's loss is a mean over the *global* units (tokens, sequences or pairs): each
  micro-batch's mean is weighted by `units / global_total` and the gradients are *summed*
  over ranks (`sync_gradients` for `ddp`; FSDP2's reduce-scatter with a divide factor of 1);
- online rollouts are gathered so every rank holds the global batch: advantages, batch
  whitening, dynamic sampling and metrics see all of it (`gather_objects`); the expensive
  forwards (reference, old policy, critic) run on the rank's own rows only and are summed
  into the global tensors (`all_reduce_sum`);
- sampling noise is counter-based (`signalrl.rollout.noise`): a prompt draws the same tokens
  whatever rank samples it.

Strategies (`train.parallel`): `ddp` keeps a full replica on every rank and all-reduces the
summed gradients once per optimiser step, in flat buckets (the wrapper `DistributedDataParallel`
is not used: it syncs inside every backward, which hangs when ranks run different numbers of
micro-batches, as online RL does when it skips zero-advantage rows, and it does not allow the
two forward calls of prefix-shared log-probs before one backward). `fsdp2` shards the policy
with `torch.distributed.fsdp.fully_shard` per decoder layer and on the root; generation and
other no-grad passes of the policy run on all-gathered weights (`gathered`), and the ranks run
the same number of training micro-batches (a short rank adds zero-weight ones). The frozen
models (reference, teacher, reward model) and the PPO critic are replicated.

Rank 0 alone writes the run directory; the other ranks print nothing but errors. A failure
on one rank ends its process; torchrun then stops the others (its summary names the rank).
Set-up decisions that can fail (the run directory plan) are taken on rank 0 and broadcast, so
every rank fails with rank 0's message (`on_main`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

STRATEGIES = ("none", "ddp", "fsdp2")


@dataclass(frozen=True)
class Dist:
    """This process's rank, the world size and the parallel strategy."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one rank (collectives run)."""
        return self.world > 1

    @property
    def fsdp(self) -> bool:
        return self.strategy == "fsdp2"

    def share(self, n: int) -> slice:
        """This rank's contiguous share of `n` items (sizes differ by at most one)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))


_CURRENT = Dist()


def current() -> Dist:
    """The process's `Dist` (one rank, strategy none, unless `init` ran under torchrun)."""
    return _CURRENT


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them (0, 1, 0 without torchrun)."""
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def resolve_strategy(parallel: str, world: int) -> str:
    """`train.parallel` for this world size: `auto` is none for one rank and ddp otherwise;
    fsdp2 on one rank is an error (nothing to shard across), none on many ranks too (every
    rank would train alone and write the same run directory)."""
    if parallel not in (*STRATEGIES, "auto"):
        raise ValueError(f"train.parallel {parallel!r}: use auto, none, ddp or fsdp2")
    if parallel == "auto":
        return "none" if world == 1 else "ddp"
    if parallel == "fsdp2" and world == 1:
        raise ValueError(
            "train.parallel: fsdp2 needs more than one rank (launch with torchrun "
            "--nproc_per_node=N); use none or ddp for one process"
        )
    if parallel == "none" and world > 1:
        raise ValueError(
            f"train.parallel: none but torchrun started {world} ranks; use ddp or fsdp2 (or auto)"
        )
    return "none" if world == 1 else parallel


def init(parallel: str = "auto", device: str = "cpu") -> Dist:
    """Join the torchrun job (gloo on CPU, NCCL on CUDA) and set `current()`; on one rank,
    validate `parallel` and return the single-process `Dist`."""
    global _CURRENT
    rank, world, local = world_from_env()
    strategy = resolve_strategy(parallel, world)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    _CURRENT = Dist(rank, world, local, strategy)
    if not _CURRENT.is_main:
        quiet_rank()
    return _CURRENT


def shutdown() -> None:
    """Leave the job (a no-op on one rank)."""
    global _CURRENT
    if dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT = Dist()


def quiet_rank() -> None:
    """A rank other than 0 shows nothing but errors."""
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


# -- collectives (no-ops on one rank) -----------------------------------------------------------
def barrier() -> None:
    if current().active:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over ranks, in place (returned)."""
    if current().active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(value: float) -> float:
    if not current().active:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def gather_objects(obj: T) -> list[T]:
    """`obj` of every rank, in rank order (tensors must be on the CPU)."""
    if not current().active:
        return [obj]
    out: list[Any] = [None] * current().world
    dist.all_gather_object(out, obj)
    return out


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 and hand its result, or its exception, to every rank: a set-up
    failure on rank 0 (a run directory that exists, a bad resume) fails every rank with the
    same message instead of leaving them waiting."""
    if not current().active:
        return fn()
    box: list[Any] = [None]
    if current().is_main:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            box[0] = ("error", _picklable(e))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def _picklable(e: Exception) -> Exception:
    try:
        pickle.dumps(e)
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(e).__name__}: {e}")


def move(obj: Any, device: torch.device | str) -> Any:
    """`obj` with every tensor (in lists, tuples, dicts and dataclasses) on `device`."""
    import dataclasses

    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device)
    if isinstance(obj, list):
        return [move(x, device) for x in obj]
    if isinstance(obj, tuple):
        return tuple(move(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj, **{f.name: move(getattr(obj, f.name), device) for f in dataclasses.fields(obj)}
        )
    return obj


def to_cpu(obj: Any) -> Any:
    """`obj` with every tensor moved to the CPU (for `gather_objects`)."""
    return move(obj, "cpu")


# -- gradients -----------------------------------------------------------------------------
def sync_gradients(params: Sequence[torch.nn.Parameter], bucket_mb: float = 64.0) -> None:
    """Sum the gradients of `params` over ranks (ddp), in flat buckets of about `bucket_mb`;
    a parameter without a gradient on a rank counts as zeros there (every rank takes part in
    every bucket, whatever it ran)."""
    if not current().active:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    limit = int(bucket_mb * 2**20)
    bucket: list[torch.Tensor] = []
    size = 0
    for p in list(params) + [None]:  # type: ignore[list-item]
        if p is not None and (not bucket or size + p.grad.nbytes <= limit):
            bucket.append(p.grad)
            size += p.grad.nbytes
            continue
        if bucket:
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
                g.copy_(synced)
        if p is not None:
            bucket, size = [p.grad], p.grad.nbytes
        else:
            bucket = []


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (replicas start equal)."""
    if not current().active:
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


# -- FSDP2 ---------------------------------------------------------------------------------
def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: modules whose class is in HF's `_no_split_modules`
    (Qwen2DecoderLayer, LlamaDecoderLayer, GPT2Block, ...)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names |= set(getattr(inner, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"train.parallel fsdp2: {type(model).__name__} declares no decoder layer class "
            "(_no_split_modules); use ddp"
        )
    return layers


def shard(model: torch.nn.Module, precision: str, device: torch.device) -> torch.nn.Module:
    """`fully_shard` every decoder layer and the root (in place; returns `model`). On CUDA
    with `train.precision: bf16`, parameters are all-gathered in bf16 and gradients reduced
    in fp32 (`MixedPrecisionPolicy`). FSDP2 averages gradients over ranks: the trainer
    scales its backward by the world size so the result is the sum (a divide factor of 1
    needs PREMUL_SUM, which gloo lacks)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw: dict[str, Any] = {}
    if device.type == "cuda" and precision == "bf16":
        kw["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    broadcast_parameters(model)
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """All of an FSDP2 model's parameters unsharded for the block (generation, no-grad
    scoring: ranks may then run different numbers of forward passes); a no-op otherwise."""
    from torch.distributed.fsdp import FSDPModule

    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not mods:
        yield
        return
    for m in mods:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model state on the CPU (collective under FSDP2: call on every rank; the
    full tensors are on rank 0, other ranks get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_sharded(model):
        return model.state_dict()
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=opts)
    # tied parameters (embeddings and LM head) come back as two copies: share them again,
    # as in the model, so save_pretrained writes the tied weight once
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first and name in state and first[id(p)] in state:
            state[name] = state[first[id(p)]]
        first.setdefault(id(p), name)
    return state


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser state keyed by parameter name, unsharded, on the CPU (the same layout for
    none, ddp and fsdp2 and any world size, so a checkpoint resumes under another one)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=is_sharded(model))
    return get_optimizer_state_dict(model, optimizer, options=opts)


def load_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load `optimizer_state` output into `optimizer` (sharded again under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=opts)
