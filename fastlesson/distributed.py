"""Data-parallel training on several processes (GPUs, or CPU cores) through fastai's Accelerate integration.

Launch one process per GPU (or per CPU worker) and wrap the training in ``distrib_ctx``::

    torchrun --nproc_per_node=2 train.py                      # CPU (gloo) or GPUs (nccl)
    accelerate launch --multi_gpu --num_processes 2 train.py  # the same through Accelerate's launcher

    from fastlesson.distributed import distrib_ctx, is_main_process
    with distrib_ctx(learn):
        fit_sgdr(learn, n_cycles=3, cycle_len=1, lr_max=1e-3)
    if is_main_process():
        learn.export(...)

Every process trains on its own shard of each epoch, gradients are averaged (PyTorch DDP, created by
Accelerate), so the weights are identical on every process after each step. The global batch is
``bs * world_size()``. Without a launcher (one process) ``distrib_ctx`` does nothing.

What fastai 2.8.12's ``learn.distrib_ctx()`` lacks, fixed here through the same code on CPU and GPU:

- ``DistributedDL._broadcast`` moves the epoch's item order to ``.cuda()`` ("nccl only works with
  cuda tensors"): on CPU it fails with "Found no NVIDIA driver". Here the broadcast runs on the device
  of the process group's backend: gloo on CPU tensors, nccl on the process's GPU.
- ``sync_bn=True`` is the default, and torch's ``SyncBatchNorm`` refuses CPU tensors (ValueError).
  Here ``sync_bn=True`` (the default too) synchronizes BatchNorm through the process group's backend,
  gloo on CPU and nccl on GPU: a BatchNorm layer in training mode normalizes with the mean and variance
  of the global batch (all-reduced in the forward pass, its gradient terms all-reduced in the backward
  pass: torch's SyncBatchNorm formula), so N processes train as one process on the global batch would.
  The layers are not swapped (fastai's swap leaves SyncBatchNorm layers in the model, which fastai's
  ``BnFreeze`` then no longer recognises): their forward is replaced for the fit and put back after.
- On CPU, ``Accelerator()`` without ``cpu=True`` sees no distributed setup under torchrun and does not
  wrap the model: each process would train alone. Here ``cpu=True`` is passed when there is no GPU.
- ``accelerate launch --cpu --num_processes 2`` starts one process (Accelerate issue 2741: ``--cpu``
  picks its single-process launcher). Use ``torchrun --nproc_per_node=N`` or
  ``accelerate launch --multi_gpu --num_processes N`` (which runs torchrun; on a machine without a GPU
  the processes then train on CPU with gloo).
- The wrapped model's ``state_dict`` has the keys of the plain model (no ``module.`` prefix), so
  callbacks that copy and restore weights during a fit (EarlyStopping, BestCheckpoint, the recipe's
  best-weights copy) work unchanged; BatchNorm buffers are made equal on every process (rank 0's)
  before validation and at the end of each fit.
- ``learn.loss`` (what callbacks and the Recorder read) is the mean over processes, so every decision a
  callback takes from it (the LR range test's divergence stop, early stopping) is the same everywhere;
  otherwise one process stops while the others wait for it in the next gradient all-reduce.

Timeouts: the process group is created with ``timeout`` (``FASTLESSON_DIST_TIMEOUT_S``, default
1800 s); a collective that waits longer (another process died) raises instead of hanging, and
``distrib_ctx`` re-raises it as a RuntimeError naming the process.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from fastai.callback.progress import ProgressCallback
from fastai.distributed import DistributedDL as _FastaiDistributedDL
from fastai.distributed import DistributedTrainer as _FastaiDistributedTrainer
from fastai.torch_core import apply, noop
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["DEFAULT_TIMEOUT_S", "LR_RULE", "DistributedDL", "DistributedTrainer", "all_gather_object", "barrier",
           "broadcast_object", "comm_device", "describe", "detach_distributed", "distrib_ctx", "gather_shards",
           "in_distrib_ctx", "init_distributed", "is_distributed", "is_main_process", "local_rank",
           "main_process_first", "mean_across_ranks", "quiet_unless_main", "rank", "seed_per_process", "shard_dl",
           "synced_batch_norm", "teardown_distributed", "to_distributed", "trainer_cbs", "world_size"]

DEFAULT_TIMEOUT_S = 1800  # s a collective may wait for the other processes (rank 0 writing the report...)
TIMEOUT_ENV = "FASTLESSON_DIST_TIMEOUT_S"
# The recipe's rule for the learning rate under data-parallel training (recorded in metrics.json)
LR_RULE = ("not scaled: the LR range tests run data-parallel on the global batch (bs x world_size) and "
           "average the loss over the processes, so the LRs they pick are already those of the global batch")
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# ---------------------------------------------------------------------------------------------------------
# who am I: rank, world size, process group


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name, "")
    return int(v) if v.strip() else default


def world_size() -> int:
    """Number of processes training together (1 without a launcher)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return max(1, _env_int("WORLD_SIZE", 1))


def rank() -> int:
    """This process's global rank (0 without a launcher)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def local_rank() -> int:
    """This process's rank on its machine: the GPU index it uses."""
    return _env_int("LOCAL_RANK", 0)


def is_main_process() -> bool:
    """True on rank 0, the one process that writes files and prints the report."""
    return rank() == 0


def is_distributed() -> bool:
    """True when a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _timeout_s(timeout_s: float | None) -> float:
    t = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)) if timeout_s is None else float(timeout_s)
    if not t > 0:
        raise ValueError(f"timeout_s={t!r} (or {TIMEOUT_ENV}) must be a positive number of seconds")
    return t


def init_distributed(timeout_s: float | None = None, backend: str | None = None) -> int:
    """Join the process group a launcher (torchrun, accelerate launch) set up; returns the world size.

    Does nothing with one process or when a group exists. ``backend``: None picks nccl when CUDA is
    available (and first binds this process to GPU ``LOCAL_RANK``), gloo otherwise. ``timeout_s``
    bounds how long any collective waits for the others (default ``FASTLESSON_DIST_TIMEOUT_S`` or
    1800 s). Call it before building DataLoaders, so they use this process's GPU.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    n = _env_int("WORLD_SIZE", 1)
    if n <= 1:
        return 1
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ValueError(f"WORLD_SIZE={n} but {', '.join(missing)} not set: start the script with "
                         f"`torchrun --nproc_per_node={n} ...` or `accelerate launch --multi_gpu "
                         f"--num_processes {n} ...`")
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if backend == "nccl":
        if not cuda:
            raise ValueError("backend='nccl' needs CUDA GPUs; on CPU use backend='gloo' (or None)")
        torch.cuda.set_device(local_rank())
    elif _one_machine() and "GLOO_SOCKET_IFNAME" not in os.environ and _has_interface("lo"):
        # every process on this machine: gloo talks over loopback, not over whatever interface the
        # hostname resolves to (in containers that can be one whose connections stall)
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(backend=backend, init_method="env://",
                            timeout=timedelta(seconds=_timeout_s(timeout_s)))
    atexit.register(teardown_distributed)  # we made the group: leave it cleanly at exit
    return dist.get_world_size()


def _one_machine() -> bool:
    """All processes on this machine (torchrun sets LOCAL_WORLD_SIZE; a plain env launch may not)."""
    return _env_int("LOCAL_WORLD_SIZE", 0) == world_size() or os.environ.get("MASTER_ADDR") in (
        "localhost", "127.0.0.1", "::1")


def _has_interface(name: str) -> bool:
    try:
        return name in {n for _, n in socket.if_nameindex()}
    except OSError:  # no interface list on this platform
        return False


def teardown_distributed() -> None:
    """Leave the process group (at the end of a script)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def describe(bs: int, sync_bn: bool = True) -> dict:
    """World size, backend, per-process and global batch, the LR rule, how BatchNorm trains: for metrics.json."""
    n = world_size()
    bn = ("one process" if n == 1 else "synchronized: the global batch's statistics" if sync_bn
          else "per process: each process's own batch's statistics")
    return {"world_size": n, "backend": dist.get_backend() if is_distributed() else None,
            "bs_per_process": bs, "global_bs": bs * n, "lr_rule": LR_RULE, "batchnorm": bn}


@contextmanager
def quiet_unless_main():
    """Inside the block only rank 0 prints to stdout (the others' stderr stays: warnings, errors)."""
    if is_main_process():
        yield
        return
    with open(os.devnull, "w") as devnull:
        old, sys.stdout = sys.stdout, devnull
        try:
            yield
        finally:
            sys.stdout = old


def seed_per_process(seed: int) -> None:
    """Seed the global RNGs (Python, NumPy, torch) with ``seed + rank``: each process its own augmentation
    and dropout draws (the same seed everywhere would repeat rank 0's draws on every shard); rank 0 keeps
    `seed`'s stream. The weights stay identical (DDP starts every fit from rank 0's), and the epoch's item
    order is rank 0's (``DistributedDL``). Call it after building the model. No-op with one process."""
    if is_distributed():
        from fastai.torch_core import set_seed

        set_seed(seed + rank())


def comm_device() -> torch.device:
    """Where tensors must be for a collective: this process's GPU with nccl, the CPU with gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every process gets here (no-op with one process)."""
    if is_distributed():
        dist.barrier()


@contextmanager
def main_process_first():
    """Rank 0 runs the block first (e.g. a download or a cache build), then the others."""
    if not is_main_process():
        barrier()
    try:
        yield
    finally:
        if is_main_process():
            barrier()


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` (any picklable value) on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=comm_device())
    return box[0]


def all_gather_object(obj) -> list:
    """Every process's `obj`, in rank order, on every process."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` (same shape everywhere) over the processes, bitwise the same on every process.

    all_gather then a sum in rank order (not all_reduce, whose order of additions is the backend's).
    """
    if not is_distributed():
        return t
    x = t.detach().to(comm_device(), torch.float32)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.stack(parts).mean(0).to(t.device, t.dtype)


def gather_shards(t: torch.Tensor, n: int, bs: int) -> torch.Tensor:
    """Every process's rows of `t` (what it computed over its ``shard_dl`` shard, batches of `bs`), put
    back in dataset order; the first `n` rows (the padding repeats are cut off).

    ``DistributedDL`` deals the epoch out in global batches of ``bs * world_size``: rank r gets rows
    ``[r*bs, (r+1)*bs)`` of each, and every process the same number of full batches.
    """
    if not is_distributed():
        return t[:n]
    sizes = all_gather_object(tuple(t.shape))
    if len(set(sizes)) != 1 or len(t) % bs:
        raise ValueError(f"gather_shards: the processes hold shards of shapes {sizes}, not the same number of "
                         f"full batches of bs={bs}; compute them over shard_dl(dl) with drop_last=False")
    x = t.to(comm_device()).contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    x = torch.stack(parts).to(t.device)  # [world, k * bs, ...]: each process's batches in order
    world, rows = x.shape[:2]
    x = x.reshape(world, rows // bs, bs, *x.shape[2:]).transpose(0, 1)  # [k, world, bs, ...]
    return x.reshape(world * rows, *x.shape[3:])[:n]


# ---------------------------------------------------------------------------------------------------------
# the data: fastai's DistributedDL, broadcasting on the right device


class DistributedDL(_FastaiDistributedDL):
    """fastai's ``DistributedDL``, with the epoch's item order (rank 0 draws it) broadcast on the backend's
    device instead of always ``.cuda()``, and dealt out in global batches of ``bs * world_size``: rank r
    trains on rows ``[r*bs, (r+1)*bs)`` of each. Every process gets the same number of full batches
    (``drop_last``: the rest of the epoch is left out, as in torch's DistributedSampler; else the last
    global batch is filled with repeats of the first items), and what ``to_detach`` gathers (fastai's
    get_preds, the metrics) comes back in dataset order, the repeats removed. fastai gives each process
    a contiguous slice instead, so its gathered predictions come back interleaved batch by batch.
    """

    def _broadcast(self, t, rank):
        t = torch.tensor(list(t), dtype=torch.long, device=comm_device())
        dist.broadcast(t, rank)
        return t.cpu().tolist()

    def _global_bs(self) -> int:
        return (self.bs or 1) * self.world_size

    def __len__(self):
        n, g = self.dl.n, self._global_bs()
        return n // g if self.drop_last else -(-n // g)

    def get_idxs(self):
        idxs = self._broadcast(list(self.dl.get_idxs()), 0)  # rank 0's order, everywhere
        self.n, g, bs = len(idxs), self._global_bs(), self.bs or 1
        if self.drop_last:
            idxs = idxs[:self.n // g * g]
        elif self.n:
            pad = -self.n % g
            idxs += (idxs * (pad // self.n + 1))[:pad]
        self.n_padded = len(idxs)
        lo = self.rank * bs
        return [i for start in range(0, len(idxs), g) for i in idxs[start + lo:start + lo + bs]]

    def before_iter(self):
        super().before_iter()
        self._batch = -1

    def after_batch(self, b):
        self._batch += 1
        return super().after_batch(b)

    def to_detach(self, b, cpu=True, gather=True):
        b = self._to_detach(b, cpu, gather)
        if not gather or not hasattr(self, "n_padded") or getattr(self, "_batch", -1) < 0:
            return b
        keep = max(0, self.n - self._batch * self._global_bs())  # the gathered batch's rows that are real

        def _real(x):
            return x[:keep] if isinstance(x, torch.Tensor) and x.ndim > 0 and keep < len(x) else x

        return apply(_real, b)


def shard_dl(dl):
    """`dl` split across the processes (``DistributedDL``); `dl` itself with one process."""
    if not is_distributed() or isinstance(dl, _FastaiDistributedDL):
        return dl
    return DistributedDL(dl)


# ---------------------------------------------------------------------------------------------------------
# the model: DDP with the plain model's state_dict keys, BatchNorm synchronized for the fit


class _PlainKeysDDP(DistributedDataParallel):
    """DDP whose state_dict / load_state_dict are the wrapped model's (no ``module.`` prefix)."""

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes, differentiable: the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad)


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    dev = comm_device()
    return _AllReduceSum.apply(t.to(dev)).to(t.device) if t.device != dev else _AllReduceSum.apply(t)


def synced_batch_norm(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`bn`'s forward pass with the statistics of the global batch (every process's `x` together).

    The mean (with the row count), then the variance around it, are all-reduced sums (two small collectives
    per layer), so the result is the same on every process; autograd all-reduces their gradients back,
    which gives torch's SyncBatchNorm backward. Running statistics are updated as ``nn.BatchNorm`` does (unbiased
    variance of the global batch). In eval mode (running statistics) or with one process: `bn` as it is.
    """
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    if not (use_batch_stats and is_distributed()):
        return type(bn).forward(bn, x)
    bn._check_input_dim(x)
    if x.shape[1] != bn.num_features:
        raise ValueError(f"{type(bn).__name__}({bn.num_features}) got input with {x.shape[1]} channels")
    dims = [0, *range(2, x.ndim)]
    shape = [1, -1] + [1] * (x.ndim - 2)
    xf = x.float()
    local = x.numel() // x.shape[1]
    sums = _all_reduce_sum(torch.cat([xf.sum(dims), xf.new_tensor([float(local)])]))  # batches may differ in size
    n = float(sums[-1])
    if n <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {int(n)} over "
                         f"{world_size()} processes (input size {list(x.shape)})")
    mean = sums[:-1] / n
    xc = xf - mean.reshape(shape)
    var = _all_reduce_sum((xc * xc).sum(dims)) / n  # biased, as BatchNorm normalizes
    if bn.training and bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), m)
            bn.running_var.lerp_((var.detach() * (n / (n - 1))).to(bn.running_var.dtype), m)
    y = xc * torch.rsqrt(var + bn.eps).reshape(shape)
    if bn.affine:
        y = y * bn.weight.float().reshape(shape) + bn.bias.float().reshape(shape)
    return y.to(x.dtype)


def _synced_forward(self, x):
    return synced_batch_norm(self, x)


def _to_sync_bn(model: nn.Module) -> list:
    """Make every BatchNorm layer of `model` normalize over the global batch (``synced_batch_norm``) until
    ``_restore_bn``: the layers stay where and what they are (same module, parameters and buffers, so
    isinstance checks such as fastai's BnFreeze still see them); only their forward is replaced."""
    layers = [m for m in model.modules() if isinstance(m, _BN_TYPES) and "forward" not in m.__dict__]
    for m in layers:
        m.forward = _synced_forward.__get__(m)
    return layers


def _restore_bn(layers: list) -> None:
    for m in layers:
        m.__dict__.pop("forward", None)


@torch.no_grad()
def _sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every process."""
    if not is_distributed():
        return
    dev = comm_device()
    for b in model.buffers():
        x = b.to(dev)
        dist.broadcast(x, 0)
        if x is not b:
            b.copy_(x)


class DistributedTrainer(_FastaiDistributedTrainer):
    """fastai's ``DistributedTrainer`` (DDP through Accelerate, ``DistributedDL`` loaders), working on CPU.

    ``sync_bn`` (default True, as fastai's): BatchNorm layers in training mode use the statistics of the
    global batch (``synced_batch_norm``), on CPU (gloo) and GPU (nccl) alike; False: each process its own
    batch's. Other keyword arguments go to ``accelerate.Accelerator`` (``cpu=True`` is the default
    without a GPU, and ``mixed_precision='no'``: fastai's own MixedPrecision callback does AMP).
    """

    order = 11  # fastai's: after MixedPrecision, before the schedulers read len(dls.train)

    def __init__(self, sync_bn: bool = True, **kwargs):
        cuda = torch.cuda.is_available()
        kwargs.setdefault("cpu", not cuda)
        kwargs.setdefault("mixed_precision", "no")
        super().__init__(sync_bn=sync_bn, **kwargs)
        self._swaps, self._logger = [], None

    def before_fit(self):
        model = self.learn.model
        self._swaps = _to_sync_bn(model) if self.sync_bn else []
        # DDP refuses a model with nothing to train (e.g. get_preds on a frozen model): shard the data only
        if any(p.requires_grad for p in model.parameters()):
            ddp = self.accelerator.prepare(model)
            if isinstance(ddp, DistributedDataParallel) and not isinstance(ddp, _PlainKeysDDP):
                ddp.__class__ = _PlainKeysDDP  # same object, plain state_dict keys
            self.learn.model = ddp
        self.old_dls = list(self.dls)
        self.learn.dls.loaders = [self._wrap_dl(dl) for dl in self.dls]
        if rank():
            self._logger, self.learn.logger = self.learn.logger, noop

    def _wrap_dl(self, dl):
        if isinstance(dl, _FastaiDistributedDL):
            return dl
        device = getattr(self.learn.model, "device", None) or next(self.learn.model.parameters()).device
        return DistributedDL(dl, device=device)

    def after_loss(self):
        # the mean over processes: a callback stopping on it (divergence, NaN) stops everywhere at once
        loss = getattr(self.learn, "loss", None)
        if isinstance(loss, torch.Tensor) and loss.ndim == 0:
            self.learn.loss = mean_across_ranks(loss)

    def before_validate(self):
        super().before_validate()
        _sync_buffers(self.learn.model)  # the same BatchNorm statistics on every process's shard

    def after_fit(self):
        model = self.learn.model
        if isinstance(model, DistributedDataParallel):
            model = model.module
        _sync_buffers(model)
        self.learn.model = model
        _restore_bn(self._swaps)
        self._swaps = []
        self.learn.dls.loaders = self.old_dls
        if self._logger is not None:
            self.learn.logger, self._logger = self._logger, None
        self.accelerator.free_memory()  # drop Accelerate's reference to this fit's DDP wrapper


def in_distrib_ctx(learn) -> bool:
    """True when `learn` trains data-parallel (inside ``distrib_ctx`` with more than one process)."""
    return is_distributed() and any(isinstance(cb, _FastaiDistributedTrainer) for cb in learn.cbs)


def trainer_cbs(learn) -> list:
    """Callbacks that make a learner built from `learn` (e.g. a head learner) train as `learn` does."""
    cbs = [cb for cb in learn.cbs if isinstance(cb, _FastaiDistributedTrainer)] if is_distributed() else []
    return [DistributedTrainer(sync_bn=cbs[0].sync_bn)] if cbs else []


def _collective_error(e: BaseException) -> bool:
    dist_error = getattr(dist, "DistError", None)
    return (dist_error is not None and isinstance(e, dist_error)) or "gloo" in str(e).lower()


@contextmanager
def distrib_ctx(learn, sync_bn: bool = True, timeout_s: float | None = None, **accelerator_kwargs):
    """Inside the block `learn` trains data-parallel over the launched processes; a no-op with one.

    Joins the process group first (``init_distributed``). Only rank 0 keeps its progress bar and
    logger. A failed collective (another process died, or a timeout) is re-raised as a RuntimeError
    that names this process. ``sync_bn`` and ``accelerator_kwargs``: see ``DistributedTrainer``.
    """
    if init_distributed(timeout_s) <= 1:
        yield learn
        return
    to_distributed(learn, sync_bn=sync_bn, **accelerator_kwargs)
    try:
        yield learn
    except RuntimeError as e:
        if not _collective_error(e):
            raise
        raise RuntimeError(f"distributed training failed on rank {rank()} of {world_size()}: a collective "
                           f"operation did not complete (another process probably died or timed out; "
                           f"see the launcher's log for the first failure). {type(e).__name__}: {e}") from e
    finally:
        detach_distributed(learn)


def to_distributed(learn, sync_bn: bool = True, **accelerator_kwargs):
    """Make `learn` train data-parallel from now on (``distrib_ctx`` without the block); a no-op with
    one process or when it already is. Ranks other than 0 lose their progress bar."""
    if init_distributed() <= 1 or any(isinstance(c, _FastaiDistributedTrainer) for c in learn.cbs):
        return learn
    bars = [c for c in learn.cbs if isinstance(c, ProgressCallback)] if rank() else []
    learn.remove_cbs(bars)
    learn.add_cb(DistributedTrainer(sync_bn=sync_bn, **accelerator_kwargs))
    learn._fastlesson_bars = bars
    return learn


def detach_distributed(learn):
    """Undo ``to_distributed``: `learn` trains in this process alone again (progress bar back)."""
    trainers = [c for c in learn.cbs if isinstance(c, _FastaiDistributedTrainer)]
    if isinstance(learn.model, DistributedDataParallel):  # a fit that raised never reached after_fit
        learn.model = learn.model.module
        for cb in trainers:
            if getattr(cb, "old_dls", None):
                learn.dls.loaders = cb.old_dls
            _restore_bn(getattr(cb, "_swaps", []))
    learn.remove_cbs(trainers)
    learn.add_cbs(learn.__dict__.pop("_fastlesson_bars", []))
    return learn
