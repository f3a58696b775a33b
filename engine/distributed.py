"""Process-group setup from the environment, collective helpers, and preemption signals.

Launchers supported (rank, world size and local rank are read from the environment):

* ``torchrun`` (single or multi node): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``.
* ``srun`` one task per GPU: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; ``MASTER_ADDR`` and
  ``MASTER_PORT`` must be exported by the batch script (``scripts/slurm/train.sbatch`` does).
* Plain ``python train.py``: one process, no process group.

The backend follows the device: NCCL on CUDA, gloo on the CPU, so every helper here also runs in the
CPU tests. Nothing in this module hard-codes ``cuda``.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import signal
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from engine.errors import UserError

# Exit status of a run stopped by SIGTERM/SIGINT/SIGUSR1 after writing its checkpoint: EX_TEMPFAIL from
# sysexits.h ("temporary failure; the user is invited to retry"). The SLURM script requeues on it.
EXIT_PREEMPTED = 75


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return None


def world_info_from_env() -> tuple[int, int, int]:
    """Returns (rank, world_size, local_rank) from torchrun or SLURM variables, else (0, 1, 0)."""
    rank = _env_int("RANK")
    if rank is not None:
        return rank, _env_int("WORLD_SIZE") or 1, _env_int("LOCAL_RANK") or 0
    # SLURM's srun-native mode, one task per GPU. Ignored for a single-task allocation in which the
    # user runs `python train.py` by hand (SLURM_NTASKS == 1).
    ntasks = _env_int("SLURM_NTASKS")
    if ntasks is not None and ntasks > 1 and "MASTER_ADDR" in os.environ:
        return _env_int("SLURM_PROCID") or 0, ntasks, _env_int("SLURM_LOCALID") or 0
    return 0, 1, 0


def device_type(device: str | None = None) -> str:
    """The device type a process will use: ``device`` ("cpu"/"cuda"), else "cuda" when a GPU is visible.

    Raises:
        UserError: "cuda" was asked for but no CUDA device is visible.
    """
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            "--device cuda was given but no CUDA device is visible to this process (check CUDA_VISIBLE_DEVICES and "
            "the driver); drop --device to use what is there, or pass --device cpu."
        )
    return "cuda" if device.startswith("cuda") else "cpu"


def init_distributed(backend: str = "auto", timeout_minutes: float = 30.0, device: str | None = None) -> DistInfo:
    """Initialises the default process group when launched with several processes.

    Args:
        backend: "auto" (NCCL on CUDA, gloo otherwise), "nccl" or "gloo".
        timeout_minutes: collective timeout.
        device: force "cpu" or "cuda"; default CUDA when available.
    """
    rank, world_size, local_rank = world_info_from_env()
    use_cuda = device_type(device) == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if use_cuda else "gloo"
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world_size))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums a tensor over ranks in place (no-op in a single process) and returns it."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_from_main(obj):
    """Rank 0's ``obj`` (a small picklable value, e.g. an error message or None) on every rank (collective)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def distribute_norm_stats(model: torch.nn.Module, mode: str = "reduce") -> None:
    """Makes running statistics identical on every rank (before evaluation and checkpointing).

    With ``broadcast_buffers=False`` each rank's BatchNorm statistics drift apart (they see different
    data). "reduce" averages every floating ``running_*`` buffer (plain BN, AN's standardizer and its
    attention BN, SN) over ranks; "broadcast" copies rank 0's; "none" leaves them alone.
    """
    if mode == "none" or not is_initialized():
        return
    world = dist.get_world_size()
    for name, buf in model.named_buffers():
        if not name.rsplit(".", 1)[-1].startswith("running_") or not buf.is_floating_point():
            continue
        if mode == "reduce":
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(world)
        elif mode == "broadcast":
            dist.broadcast(buf, src=0)
        else:
            raise ValueError(f"unknown dist_bn mode '{mode}' (valid: reduce, broadcast, none)")


def state_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, dtypes and bytes): equal digests mean equal weights."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def ranks_consistent(module: torch.nn.Module) -> bool:
    """True when every rank holds bitwise-identical weights and buffers (collective; True when not distributed)."""
    if not is_initialized():
        return True
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, state_digest(module))
    return len(set(digests)) == 1


class PreemptionHandler:
    """Catches SIGTERM, SIGINT and SIGUSR1 and lets all ranks agree to stop, or to checkpoint, at the same step.

    The handler only sets a local flag. Every ``check_every`` optimizer steps (:meth:`is_check_step`) the
    loop calls :meth:`agree`: one small all-reduce (MAX) of [this rank was signalled, this rank asks for a
    timed checkpoint]. So if any rank was signalled, every rank stops at the same step boundary, writes
    its part of the checkpoint and exits with :data:`EXIT_PREEMPTED`; and when rank 0's clock says a
    timed checkpoint is due, every rank saves at the same step (the save gathers every rank's RNG state).

    Launchers signal whole process groups (``timeout``, torchrun's shutdown, SLURM), so the data loader's
    worker processes get the signal too; they ignore it (``data/torch_loader.py``) and end with the
    trainer. Launchers may deliver a signal twice (to torchrun and from it): every one means "checkpoint
    and stop"; to stop at once without a checkpoint, send SIGQUIT (Ctrl-\\) or SIGKILL.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self, device: torch.device, check_every: int = 10):
        self.device = device
        self.check_every = check_every
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionHandler:
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            try:  # a plain write: the logging module is not reentrant
                os.write(
                    2,
                    f"{signal.Signals(signum).name} received: stopping with a checkpoint at the next check.\n".encode(),
                )
            except OSError:
                pass
        self.received = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"

    def is_check_step(self, update: int) -> bool:
        """True every ``check_every`` optimizer steps: the steps at which :meth:`agree` is called."""
        return update % self.check_every == 0

    def agree(self, save_due: bool = False) -> tuple[bool, bool]:
        """``(stop, save)``, identical on every rank: any rank signalled, any rank asked to save (collective)."""
        flags = torch.tensor([float(self.received is not None), float(save_due)], device=self.device)
        stop, save = all_reduce_max(flags).tolist()
        return stop > 0, save > 0

    def should_stop(self, update: int, force_sync: bool = False) -> bool:
        """True on every rank once any rank has been signalled (checked every ``check_every`` steps)."""
        if not force_sync and not self.is_check_step(update):
            return False
        return self.agree()[0]
