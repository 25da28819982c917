"""Data-parallel training under PyTorch's own launcher, ``torchrun``:

    torchrun --nproc_per_node 4 train_decoder.py configs/decoder_gpt_amazon.gin ...

Without the launcher's environment (``RANK``, ``WORLD_SIZE``, ...) nothing here does anything:
every helper is the identity / a no-op and a single process runs as it always did, paying
nothing. Under it, each process ("rank") joins one process group (NCCL for CUDA tensors, each
rank on ``cuda:LOCAL_RANK``, with gloo beside it for CPU-side bookkeeping; gloo alone on CPUs)
and the train scripts use these pieces:

- :func:`shard`: a rank's contiguous part of every global batch (same global batch and learning
  rate as one process), and :func:`check_batches`, which refuses batch sizes that would leave
  a rank without examples;
- :func:`all_reduce_gradients`: gradients summed over ranks in one flattened collective, then
  divided by the *global* number of whatever the loss summed over (labels, examples), so one
  step equals one single-process step on the same global batch (see ``train_loop``);
- :func:`my_batches` + :func:`all_gather_object`: evaluation batches split over ranks and their
  per-batch results gathered and re-added in batch order (exactly one process's figures);
- :func:`is_main`, :func:`rank0_first`, :func:`on_main`, :func:`barrier`: rank 0 alone writes
  files, prepares caches, builds a vocabulary (then broadcast); the others wait for it;
- :func:`broadcast_module`, :func:`assert_same`: identical weights at the start, and a check that
  ranks never drifted apart (e.g. through buffers updated in ``forward``).

Collective helpers must be called by every rank, in the same order. Checkpoints and caches are
read by every rank from ``out_dir``: several machines need a shared filesystem.
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import os
import random
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist

T = TypeVar("T")

# What torchrun sets for every process it starts; MASTER_* tell the ranks where to meet.
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Long: the other ranks wait at a barrier while rank 0 alone downloads and preprocesses a
# dataset, embeds item texts or learns an ActionPiece vocabulary (minutes to an hour on the
# largest datasets); torch's default (10-30 minutes) would kill such a run.
TIMEOUT = datetime.timedelta(hours=3)


def launched() -> bool:
    """True when started by torchrun (its environment variables are set)."""
    return "WORLD_SIZE" in os.environ or "RANK" in os.environ


def active() -> bool:
    """True once this process has joined a process group (under torchrun, after :func:`init`)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, which alone writes checkpoints, results, logs, plots and progress output."""
    return rank() == 0


def init(device: str = "auto") -> torch.device:
    """Join the process group torchrun's environment describes (once) and return this rank's
    device: ``cuda:LOCAL_RANK`` when ``device`` is ``"auto"`` (and CUDA is there) or ``"cuda"``,
    else the CPU. Without torchrun: :func:`torch.device` of ``device`` ("auto": CUDA if any)."""
    if not launched():
        if device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(device)
    missing = [v for v in ENV_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(f"distributed run: environment variable(s) {', '.join(missing)} not set; start "
                           "the script with torchrun (e.g. torchrun --nproc_per_node 2 train_decoder.py ...), "
                           "which sets them, or unset RANK / WORLD_SIZE to run one process")
    local = int(os.environ["LOCAL_RANK"])
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if device not in ("auto", "cuda", f"cuda:{local}"):
            raise ValueError(f"device = {device!r} under torchrun: every process uses cuda:LOCAL_RANK; "
                             "set device = 'cuda' or 'auto' (restrict GPUs with CUDA_VISIBLE_DEVICES)")
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) visible: "
                               "use at most that many processes per node (--nproc_per_node)")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    elif device == "auto" or device == "cpu":
        dev = torch.device("cpu")
    else:
        raise ValueError(f"device = {device!r} is not supported under torchrun (use 'auto', 'cuda' or 'cpu')")
    if not active():
        # NCCL for the CUDA tensors (gradients, model broadcast); gloo for CPU tensors and the
        # pickled objects of evaluation and checkpoint bookkeeping.
        backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
        store = _attempt_store()
        if store is None:
            dist.init_process_group(backend, timeout=TIMEOUT)
        else:
            dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]), timeout=TIMEOUT)
        atexit.register(shutdown)
    return dev


def _attempt_store() -> "dist.Store | None":
    """Under ``torchrun --max-restarts``, the key-value store of this attempt: torchrun's agent
    keeps one TCP store for all attempts (TORCHELASTIC_USE_AGENT_STORE) and torch's env://
    rendezvous adds no per-attempt prefix, so the workers of a restart would read the addresses
    that the killed attempt's workers published and fail to connect ("Gloo connectFullMesh
    failed ... Connection refused"). Keys under ``attempt_<TORCHELASTIC_RESTART_COUNT>/`` are
    this attempt's alone. None (torch's own env:// rendezvous) outside torchelastic's store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                           int(os.environ["WORLD_SIZE"]), is_master=False, timeout=TIMEOUT)
    return dist.PrefixStore(f"sidrec/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)


def shutdown() -> None:
    """Leave the process group (registered at exit by :func:`init`; tests call it directly)."""
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


@contextmanager
def rank0_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. downloads and caches a dataset), the others after it,
    then from its cache: one preparation, no two ranks writing the same cache folder."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 only, its result broadcast to every rank (tensors arrive on the
    CPU). An exception on rank 0 is raised on every rank, so none is left waiting."""
    if not active():
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
    result, error = broadcast_object((result, _picklable(error)))
    if error is not None:
        raise error
    return result


def _picklable(error: BaseException | None) -> BaseException | None:
    if error is None or not active():
        return error
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - an exception type that does not pickle: keep its text
        return RuntimeError(f"on rank 0: {type(error).__name__}: {error}")


# ----------------------------------------------------------------------------- batches


def check_batches(num_examples: int, batch_size: int) -> None:
    """Every global batch must give every rank at least one example: a rank without one would
    have nothing to run its forward pass on, which models that communicate inside ``forward``
    (the RQ-VAE's codebook statistics) still need. Raises a clear error otherwise."""
    n = world_size()
    if n == 1:
        return
    if batch_size < n:
        raise ValueError(f"batch_size {batch_size} is smaller than the {n} processes: each process takes a "
                         f"share of every batch, so use a batch_size of at least {n}")
    last = num_examples % batch_size
    if 0 < last < n:
        raise ValueError(f"the last batch of each epoch holds {last} of the {num_examples} examples, fewer than "
                         f"the {n} processes that share it; pick another batch_size (e.g. {batch_size + 1}) "
                         "or another number of processes")


def shard_bounds(n: int) -> tuple[int, int]:
    """This rank's rows [start, stop) of a batch of n rows: contiguous, in rank order, sizes
    differing by at most one (``np.array_split``)."""
    per, extra = divmod(n, world_size())
    r = rank()
    start = r * per + min(r, extra)
    return start, start + per + (r < extra)


def shard(indices: Sequence[T] | np.ndarray) -> Any:
    """This rank's contiguous part of a global batch (the whole batch in one process)."""
    if not active():
        return indices
    start, stop = shard_bounds(len(indices))
    return indices[start:stop]


def my_batches(num_batches: int) -> list[int]:
    """The batch numbers this rank evaluates: every world_size-th, from its rank on."""
    return list(range(rank(), num_batches, world_size()))


def gather_keyed(parts: Iterable[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every rank's ``(key, value)`` pairs (keys distinct over ranks, e.g. batch numbers), merged
    and sorted by key: what one process would have produced in that order."""
    parts = list(parts)
    if not active():
        return sorted(parts, key=lambda p: p[0])
    return sorted((p for rank_parts in all_gather_object(parts) for p in rank_parts), key=lambda p: p[0])


def seed_per_rank(seed: int) -> None:
    """Distinct random streams per rank (dropout masks, sampling, SPR segmentations of different
    examples should not repeat each other): ranks > 0 reseed python, numpy and torch from
    (seed, rank); rank 0 keeps the stream it has, which one process would have had."""
    r = rank()
    if r == 0:
        return
    s = int(np.random.SeedSequence([seed, r]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


# ----------------------------------------------------------------------------- objects


def _cpu(obj: Any) -> Any:
    """Tensors (in dicts, lists, tuples) moved to the CPU: a pickled CUDA tensor would be
    unpickled on the sender's GPU index on every rank."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if type(obj) is dict:
        return {k: _cpu(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s picklable ``obj`` on every rank (the identity in one process)."""
    if not active():
        return obj
    box = [_cpu(obj) if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in one process)."""
    if not active():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, _cpu(obj))
    return out


# ----------------------------------------------------------------------------- tensors


def _grouped(tensors: list[torch.Tensor]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def broadcast_tensors_(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (one flattened broadcast per
    device and dtype)."""
    if not active():
        return
    tensors = list(tensors)
    for idx in _grouped(tensors).values():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
        dist.broadcast(flat, src=src)
        offset = 0
        for i in idx:
            t = tensors[i]
            t.data.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Every parameter and buffer of ``module`` set to rank ``src``'s values: all ranks start
    from the same weights whatever their initialisation (e.g. k-means on a GPU) did."""
    broadcast_tensors_([*module.parameters(), *module.buffers()], src)


def all_reduce_sum_(tensors: Iterable[torch.Tensor]) -> None:
    """Sum ``tensors`` over ranks, in place (one flattened all-reduce per device and dtype)."""
    if not active():
        return
    tensors = list(tensors)
    for idx in _grouped(tensors).values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        dist.all_reduce(flat)
        offset = 0
        for i in idx:
            t = tensors[i]
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()


def all_gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """Rows of ``x`` from every rank concatenated in rank order (ranks may hold different
    numbers of rows), and the slice of them that is this rank's ``x``. Not differentiable."""
    if not active():
        return x, slice(0, x.shape[0])
    n = world_size()
    sizes = torch.tensor([x.shape[0]], device=x.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(n)]
    dist.all_gather(all_sizes, sizes)
    counts = [int(s) for s in all_sizes]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    out = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(out, padded)
    start = sum(counts[: rank()])
    return torch.cat([o[:c] for o, c in zip(out, counts)]), slice(start, start + x.shape[0])


def all_reduce_gradients(params: Iterable[torch.nn.Parameter], scalars: Sequence[float | torch.Tensor] = (),
                         divisor_index: int | None = None) -> torch.Tensor:
    """Sum every parameter's gradient over the ranks and return the sums of ``scalars`` (float64,
    on the gradients' device; summed in a second collective that runs at the same time).

    With ``divisor_index``, the summed gradients are then divided by the summed
    ``scalars[divisor_index]``: each rank back-propagates its *summed* loss, and dividing by the
    global count (labels, examples) gives the gradient of the global mean, which per-rank means
    averaged would not when ranks hold different counts. A parameter without a gradient on
    some ranks counts as zero there; one without a gradient on every rank keeps ``grad None``
    (the optimiser then skips it, as in one process)."""
    params = [p for p in params if p.requires_grad]
    grads = [p.grad for p in params]
    device = next((g.device for g in grads if g is not None), params[0].device if params else torch.device("cpu"))
    values = [torch.as_tensor(s, dtype=torch.float64, device=device).reshape(()) for s in scalars]
    has_grad = torch.tensor([g is not None for g in grads], dtype=torch.float64, device=device)
    summed = torch.cat([torch.stack(values) if values else has_grad.new_zeros(0), has_grad])
    if not active():
        return summed[: len(values)]
    for p in params:
        if p.grad is None:  # zeros here, so that the flat buffers have the same layout on every rank
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    work = [dist.all_reduce(summed, async_op=True)]
    flats = {}
    for key, idx in _grouped(grads).items():
        flats[key] = (idx, torch.cat([grads[i].reshape(-1) for i in idx]))
        work.append(dist.all_reduce(flats[key][1], async_op=True))
    for w in work:
        w.wait()
    for idx, flat in flats.values():
        if divisor_index is not None:
            flat.div_(summed[divisor_index].to(flat.dtype))
        offset = 0
        for i in idx:
            grads[i].copy_(flat[offset: offset + grads[i].numel()].view_as(grads[i]))
            offset += grads[i].numel()
    for p, flag in zip(params, summed[len(values):].tolist()):
        if flag == 0:
            p.grad = None
    return summed[: len(values)]


def max_over_ranks(value: float) -> float:
    """The largest of every rank's ``value``, on every rank (e.g. the training clock's seconds)."""
    if not active():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a CPU tensor: gloo, no GPU synchronisation
    return float(t.item())


def assert_same(obj: torch.Tensor | torch.nn.Module, what: str) -> None:
    """Raise on every rank unless ``obj`` (a tensor, or a module's parameters and buffers) is
    bit-identical on all ranks. Ranks that drifted apart would train different models and
    disagree on item codes."""
    if not active():
        return
    tensors = list(obj.state_dict().values()) if isinstance(obj, torch.nn.Module) else [obj]
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digests = all_gather_object(h.hexdigest())
    if len(set(digests)) > 1:
        raise RuntimeError(f"{what} differ across the {world_size()} processes (digests by rank: "
                           f"{[d[:12] for d in digests]}): the ranks drifted apart")
