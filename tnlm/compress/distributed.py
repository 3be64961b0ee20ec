"""The collectives layer-by-layer compression needs under ``torch.distributed``.

Every function here is a no-op (or the identity) when no process group is initialized or
the world has one rank, so the single-process path runs the same code. Ranks take the
calibration *batches* (``batch_size`` consecutive sequences, as one process would cut
them) in a round-robin: rank ``r`` of ``w`` gets batches ``r, r + w, r + 2w, ...``
(:func:`shard_batches`). Sums over batches (Gram statistics, errors) then add up to the
single-process sums; only the order of the float additions differs.

Statistics are reduced in float64 (:func:`all_reduce_stats`), one flat buffer per call.
Training that averages gradients over the ranks wraps its module in torch's
``DistributedDataParallel`` (:func:`data_parallel`). A collective that fails (another rank
stopped, or the process group's timeout passed) raises :class:`RankFailure` naming the
step that was waiting (:func:`rank_failures` does the same for collectives torch runs
inside a block of code, e.g. DDP's gradient all-reduce in ``backward``).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch

__all__ = ["RankFailure", "world", "is_distributed", "shard_batches", "all_reduce_sum",
           "all_reduce_floats", "all_reduce_stats", "average_gradients", "broadcast_module",
           "broadcast_json", "barrier", "check_same", "digest", "rank_failures",
           "data_parallel", "launched_world", "process_group_from_env", "owners_by_cost"]


class RankFailure(RuntimeError):
    """A collective failed: another rank stopped or the process group's timeout passed."""


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialized."""
    return world()[1] > 1


def launched_world() -> tuple[int, int]:
    """``(rank, world_size)`` a launcher such as ``torchrun`` gave this process in the
    environment (``RANK``, ``WORLD_SIZE``); ``(0, 1)`` when it was started alone.

    Raises:
        ValueError: ``RANK``/``WORLD_SIZE`` that are not integers with
            ``0 <= RANK < WORLD_SIZE``.
    """
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        raise ValueError(f"the environment's WORLD_SIZE {os.environ.get('WORLD_SIZE')!r} and "
                         f"RANK {os.environ.get('RANK')!r} must be integers") from None
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"the environment's RANK {rank} and WORLD_SIZE {size} need "
                         "0 <= RANK < WORLD_SIZE")
    return rank, size


@contextlib.contextmanager
def process_group_from_env(timeout: timedelta | None = None, backend: str | None = None
                           ) -> Iterator[tuple[int, int]]:
    """The default process group of a job the environment describes (``torchrun`` sets
    ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), for the
    duration of the block; yields ``(rank, world_size)``.

    With ``WORLD_SIZE`` > 1 and no process group yet, one is initialized with ``backend``
    (default: ``nccl`` where CUDA is available, each process on the GPU ``LOCAL_RANK``;
    ``gloo`` on the CPU; pass ``"gloo"`` for models kept on the CPU, as ``tnlm
    compress`` keeps them) with
    ``timeout`` (default: torch's) and destroyed at the end of the block, also when it
    raises. Started alone, or inside a process group someone else made, nothing is
    initialized or destroyed. A failed rendezvous raises :class:`RankFailure`."""
    rank, size = launched_world()
    dist = torch.distributed
    if size == 1 or (dist.is_available() and dist.is_initialized()):
        yield world() if dist.is_available() and dist.is_initialized() else (rank, size)
        return
    if not dist.is_available():
        raise RuntimeError("this torch has no torch.distributed: run one process")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kw = {"timeout": timeout} if timeout is not None else {}
    _collective("the process group's rendezvous", dist.init_process_group, backend, **kw)
    try:
        # no barrier at the end: rank 0 may work alone after the last collective (e.g.
        # measuring and saving) for longer than the group's timeout
        yield world()
    finally:
        dist.destroy_process_group()


def shard_batches(n: int, batch_size: int, rank: int, world_size: int) -> list[slice]:
    """The sequence slices of the batches rank ``rank`` of ``world_size`` takes from ``n``
    sequences cut into batches of ``batch_size`` (round-robin: batches
    ``rank, rank + world_size, ...``).

    Raises:
        ValueError: ``rank`` not in ``[0, world_size)`` (another rank's batches would be
            taken twice), or ``n`` < 0, ``batch_size`` or ``world_size`` < 1.
    """
    for name, v, least in (("n", n, 0), ("batch_size", batch_size, 1),
                           ("world_size", world_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ValueError(f"{name} must be an int >= {least}, got {v!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    starts = range(0, n, batch_size)
    return [slice(s, min(s + batch_size, n)) for s in list(starts)[rank::world_size]]


def owners_by_cost(costs: Sequence[float], world_size: int) -> list[int]:
    """The rank that does each task: the tasks in order of decreasing cost (ties: the
    earlier task first), each to the rank with the least cost so far (ties: the lower
    rank) — the greedy longest-processing-time rule, within 4/3 of the best makespan.
    The same on every rank (no communication).

    Raises:
        ValueError: ``world_size`` < 1 or a negative or non-finite cost.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    costs = [float(c) for c in costs]
    if any(not (c >= 0 and c != float("inf")) for c in costs):
        raise ValueError(f"costs must be finite numbers >= 0, got {costs}")
    load = [0.0] * world_size
    owners = [0] * len(costs)
    for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owners[k] = r
        load[r] += costs[k]
    return owners


def _collective(what: str, fn: Any, *args: Any, **kw: Any) -> Any:
    try:
        return fn(*args, **kw)
    except RuntimeError as err:  # DistBackendError, gloo/nccl errors, timeouts
        rank, size = world()
        raise RankFailure(f"rank {rank} of {size}: the collective of {what} failed; another "
                          f"rank has stopped or the process group's timeout passed "
                          f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                          ) from err


#: words in the messages of the errors torch raises when a peer or the network fails
_PEER_FAILURE = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket",
                 "broken pipe", "process group")


@contextlib.contextmanager
def rank_failures(what: str) -> Iterator[None]:
    """Inside the block, an error of a collective torch runs (a ``torch.distributed``
    ``DistError``, or a ``RuntimeError`` whose message names the backend, a connection, a
    peer or a timeout) becomes :class:`RankFailure` naming ``what``; other errors pass
    unchanged. Nothing changes without a process group."""
    try:
        yield
    except RankFailure:
        raise
    except RuntimeError as err:
        dist = torch.distributed
        text = str(err).lower()
        peer = (isinstance(err, getattr(dist, "DistError", ())) or
                any(w in text for w in _PEER_FAILURE))
        if not (is_distributed() and peer):
            raise
        rank, size = world()
        raise RankFailure(f"rank {rank} of {size}: the collective of {what} failed; another "
                          f"rank has stopped or the process group's timeout passed "
                          f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                          ) from err


def data_parallel(module: torch.nn.Module, *, find_unused_parameters: bool = False
                  ) -> torch.nn.Module:
    """``module`` wrapped in ``torch.nn.parallel.DistributedDataParallel`` over the default
    process group (``module`` itself without one): ``backward`` through the wrapper's
    outputs leaves every rank with the gradients averaged over the ranks (parameters with
    ``requires_grad`` only: set the flags first). Rank 0's parameters and buffers are
    copied to every rank once, here; buffers are not sent again each forward. CPU (gloo):
    no device ids; CUDA: the module's device. ``find_unused_parameters``: a trainable
    parameter a forward does not use gets a zero gradient instead of an error, for a
    traversal of the autograd graph every step (off by default: every trainable parameter
    must take part in every forward). Call the wrapper (not ``module``) for every forward
    whose loss is back-propagated, with a ``backward`` before the next one."""
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    dev = next((p.device for p in module.parameters()), torch.device("cpu"))
    # buffers are copied once, at the start, and not before every forward
    buffers = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
               inspect.signature(DistributedDataParallel).parameters
               else {"broadcast_buffers": False})
    with rank_failures("the model's parameters (DistributedDataParallel's first copy)"):
        return DistributedDataParallel(
            module, device_ids=[dev.index] if dev.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters, **buffers)


def _device() -> torch.device:
    """Where the backend wants its buffers (CUDA for nccl, else the CPU)."""
    dist = torch.distributed
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor, what: str = "a sum") -> torch.Tensor:
    """``t`` summed over the ranks, in place, and returned (unchanged in one process)."""
    if not is_distributed():
        return t
    dev = _device()
    buf = t if t.device == dev else t.to(dev)
    _collective(what, torch.distributed.all_reduce, buf)
    if buf is not t:
        t.copy_(buf.to(t.device))
    return t


def all_reduce_floats(values: Sequence[float], what: str = "errors") -> list[float]:
    """Python floats summed over the ranks (float64)."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return [float(v) for v in all_reduce_sum(t, what)]


def all_reduce_stats(stats: Mapping[str, Any], what: str = "input statistics") -> Mapping[str, Any]:
    """Sum :class:`tnlm.compress.calibration.InputStats` (``gram``, ``cross``,
    ``ref_gram``: (in, in) float64; ``n_tokens``) over the ranks, in place, as one flat
    float64 buffer in the order of the sorted names; returns ``stats``."""
    if not is_distributed():
        return stats
    names = sorted(stats)
    parts: list[torch.Tensor] = []
    for n in names:
        s = stats[n]
        parts += [t.reshape(-1).to(torch.float64) for t in (s.gram, s.cross, s.ref_gram)
                  if t is not None]
    counts = torch.tensor([float(stats[n].n_tokens) for n in names], dtype=torch.float64)
    flat = all_reduce_sum(torch.cat(parts + [counts]), what)
    k = 0
    for n in names:
        s = stats[n]
        for attr in ("gram", "cross", "ref_gram"):
            t = getattr(s, attr)
            if t is not None:
                t.copy_(flat[k:k + t.numel()].reshape(t.shape))
                k += t.numel()
    for j, n in enumerate(names):
        stats[n].n_tokens = int(round(float(flat[k + j])))
    return stats


def average_gradients(params: Sequence[torch.nn.Parameter], loss: torch.Tensor
                      ) -> torch.Tensor:
    """Average ``params``' gradients (missing ones count as zero) and ``loss`` over the
    ranks, in one buffer; returns the averaged loss (a float64 scalar). Every rank ends
    with the same gradients, so the same optimizer step keeps the ranks identical."""
    if not is_distributed():
        return loss.detach().to(torch.float64)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).to(torch.float64) for g in grads]
                     + [loss.detach().reshape(1).to(torch.float64)])
    all_reduce_sum(flat, "gradients in block fitting")
    flat /= world()[1]
    k = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[k:k + n].reshape(p.shape).to(p.dtype)
        k += n
    return flat[k]


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0, what: str = "a block") -> None:
    """Copy ``module``'s parameters and buffers from rank ``src`` to every rank."""
    if not is_distributed():
        return
    dev = _device()
    for t in list(module.parameters()) + list(module.buffers()):
        buf = t.data if t.device == dev else t.data.to(dev)
        _collective(what, torch.distributed.broadcast, buf, src)
        if buf is not t.data:
            t.data.copy_(buf.to(t.device))


def broadcast_json(value: Any, src: int = 0, what: str = "a value") -> Any:
    """Rank ``src``'s ``value`` (anything JSON holds) on every rank, as JSON text (no
    pickle); ``value`` JSON round-tripped in one process, so every rank gets the same
    types (e.g. tuples become lists)."""
    if not is_distributed():
        return json.loads(json.dumps(value))
    dev = _device()
    mine = json.dumps(value, sort_keys=True).encode() if world()[0] == src else b""
    n = torch.tensor([len(mine)], dtype=torch.int64, device=dev)
    _collective(what, torch.distributed.broadcast, n, src)
    if mine:
        buf = torch.frombuffer(bytearray(mine), dtype=torch.uint8).to(dev)
    else:
        buf = torch.zeros(int(n), dtype=torch.uint8, device=dev)
    _collective(what, torch.distributed.broadcast, buf, src)
    return json.loads(bytes(buf.cpu().numpy()).decode())


def barrier(what: str = "a barrier") -> None:
    """Wait for every rank (a no-op in one process)."""
    if is_distributed():
        # an all-reduce rather than dist.barrier(): it honours the group's timeout on gloo
        all_reduce_sum(torch.zeros(1), what)


def digest(items: Iterable[Any]) -> str:
    """sha256 of tensors (their dtype, shape and bytes) and strings."""
    h = hashlib.sha256()
    for x in items:
        if torch.is_tensor(x):
            t = x.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():  # the tensor's own bytes, not a copy
                h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        else:
            h.update(str(x).encode())
    return h.hexdigest()


def check_same(value: str, what: str) -> None:
    """Raise ``ValueError`` on every rank unless ``value`` (e.g. a :func:`digest`) is the
    same on all ranks."""
    if not is_distributed():
        return
    code = torch.tensor([int(value[:13], 16)], dtype=torch.float64)
    lo, hi = code.clone(), code.clone()
    dev = _device()
    lo, hi = lo.to(dev), hi.to(dev)
    _collective(what, torch.distributed.all_reduce, lo, op=torch.distributed.ReduceOp.MIN)
    _collective(what, torch.distributed.all_reduce, hi, op=torch.distributed.ReduceOp.MAX)
    if float(lo) != float(hi):
        raise ValueError(f"the ranks were given different {what}; every rank must pass the "
                         f"same (rank {world()[0]} has digest {value[:12]})")
