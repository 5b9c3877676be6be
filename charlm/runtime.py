"""Where and how computation runs: device choice, precision, seeding, and torchrun/DDP process groups."""

from __future__ import annotations

import ctypes
import os
import random
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from charlm.errors import CharlmError


def pick_device(name: str = "auto") -> torch.device:
    """auto: cuda > mps > cpu. An explicit device that is not present is an error, not a silent fallback."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CharlmError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CharlmError("--device cuda but no CUDA device is visible; use --device cpu or auto")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CharlmError("--device mps but MPS is not available here; use --device cpu or auto")
    return device


# One sampled character costs ~25-35 small kernel launches and a host sync on a GPU whatever the model's size
# (about 0.2-0.3 ms), and one read of every weight on the CPU (bench/sampling.py: 0.28 ms for a 2 x 512 GRU,
# 10 MB, on 2 cores). Up to this many fp32 weight bytes the CPU is about as fast for one sample and skips
# the CUDA start-up; beyond it the CPU's memory bandwidth loses. An estimate from the CPU measurements and
# launch costs, not a GPU measurement: --device cuda always wins over it.
SINGLE_SAMPLE_CPU_BYTES = 16 * 2**20


def sampling_device(requested: str, batch: int, parameters: int) -> tuple:
    """(device, note or None) for generating `batch` samples from a model of `parameters` fp32 weights.

    --device auto with one sample of a small model on CUDA picks the CPU instead, and says so in the note:
    batch-1 generation is launch-bound on a GPU. Batched sampling, large models and an explicit device keep
    the device pick_device gives."""
    device = pick_device(requested)
    if requested != "auto" or device.type != "cuda" or batch > 1 or parameters * 4 > SINGLE_SAMPLE_CPU_BYTES:
        return device, None
    return torch.device("cpu"), (f"one sample of a {parameters * 4 / 2**20:.0f} MB model runs on the CPU (a GPU "
                                 "step is launch-bound at batch 1); --device cuda to use the GPU")


def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): there bf16 matmuls run 3-4x
    faster than fp32. Read from /proc/cpuinfo; elsewhere we do not guess."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# glibc hands freed blocks above a size threshold back to the kernel (munmap, or trimming the heap's top), and
# a CPU training step frees and asks again for megabytes of activations every step, so each step's pages came
# back zeroed, one fault per 4 KB page: 18,700 faults a step for a 2 x 384 GRU on 38 x 64 chunks (73 MB).
# Keeping freed memory in the process (mmap only above glibc's 32 MB ceiling, trim only past 1 GiB free) took
# that to about none, cost 5% more peak memory (460 MB against 437), and made the step 8-11% faster on two
# threads (BENCHMARKS.md 10, "A GRU backward written for the recurrence, and memory kept").
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for the next step instead of returning it to the kernel: for a
    process that trains. True where it took effect (Linux with glibc); elsewhere nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no C library symbols to reach, or a libc without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 autocast where the hardware does bf16 natively (Ampere+ GPUs, bf16 CPUs), else fp32."""
    if precision not in ("auto", "fp32", "bf16"):
        raise CharlmError(f"unknown --precision {precision!r}; use auto, fp32 or bf16")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        # Not torch.cuda.is_bf16_supported(): it also says yes where bf16 is emulated (compute capability 7.x:
        # T4, GTX 16xx, RTX 20xx), which is slower than fp32. Tensor cores do bf16 from 8.0 (Ampere) on.
        return "bf16" if tuple(torch.cuda.get_device_capability(device)) >= (8, 0) else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job; world 1, rank 0 when run plainly."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> tuple:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    Returns (Dist, device). NCCL on CUDA, gloo on CPU. Without torchrun: Dist() and the chosen device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), pick_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        # torchrun sets LOCAL_WORLD_SIZE; without it, this process knows only that it is number local_rank.
        _check_gpu_count(int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1)), torch.cuda.device_count())
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(os.environ, os.cpu_count() or 1, world))
    return Dist(rank, world, local_rank), device


def cpu_threads(env, cores: int, world: int) -> int:
    """Threads for one process of a torchrun job on the CPU. torchrun starts K processes on a machine: they
    share its cores instead of each taking them all. OMP_NUM_THREADS, where the user set it, wins (two
    "machines" rehearsed on one box, a job beside others); torchrun itself sets it to 1 for K > 1 when it was
    unset, which would leave cores idle, so a 1 beside K > 1 processes is read as torchrun's and not kept."""
    local = int(env.get("LOCAL_WORLD_SIZE", world))
    given = env.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0 and not (given == "1" and local > 1):
        return int(given)
    return max(1, cores // local)


def _check_gpu_count(local_processes: int, gpus: int) -> None:
    """One GPU per process: more processes than GPUs would send the extra ones to a device ordinal that does
    not exist. Checked before joining the process group, from counts every process on this machine sees alike
    (torchrun's LOCAL_WORLD_SIZE and the visible devices), so all of them stop with this same line before any
    joins, and none is left waiting in the rendezvous for one that failed."""
    if local_processes > gpus:
        raise CharlmError(f"{local_processes} processes on this machine but only {gpus} CUDA device"
                          f"{'s' if gpus != 1 else ''}; one process per GPU: use --nproc_per_node={gpus}, "
                          "or --device cpu to train on the CPU")


def teardown_distributed() -> None:
    """Leave the process group (on every path out of a run; a no-op once left or never joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def finish_distributed(device: torch.device) -> None:
    """The end of a run that every process reached alike: settle the group's worker threads, then leave it.

    Why (bench/soak.py; BENCHMARKS.md, "The torchrun exit"): a gloo collective runs on one of the group's
    worker threads, and that thread lets go of the finished work a moment after the caller has its result. When
    it holds the last reference to a tensor Python made, letting go needs the GIL. If Python is already
    shutting down by then, the thread is ended inside a C++ destructor and the process aborts ("terminate
    called without an active exception", SIGABRT) after a run that succeeded. destroy_process_group() does not
    join those threads here: DistributedDataParallel keeps references to the group beyond its own lifetime.
    So the last collective is this one: an all-reduce of a probe that Python keeps until the call returns
    (waiting in it lets a thread still finishing an earlier work take the GIL), and then a wait until the
    probe itself is gone, that is, its worker has let go too. A collective, so only where every process
    calls it: the error paths leave through teardown_distributed() alone."""
    if dist.is_available() and dist.is_initialized():
        probe = torch.zeros(1, device=device)
        gone = weakref.ref(probe)
        dist.all_reduce(probe)
        del probe
        deadline = time.monotonic() + 10.0  # a bound, not a timing: normally it is gone at once
        while gone() is not None and time.monotonic() < deadline:
            time.sleep(0.001)  # releases the GIL, which the worker may need to let go of the probe
    teardown_distributed()


def agreed(dinfo: Dist, fn, here: bool = True):
    """Run fn (where `here`), then agree across a torchrun job on whether it failed: every process learns of
    a CharlmError raised on any of them and raises the same one-line message (the lowest failing rank's), instead
    of the others waiting in their next collective until it times out. Without torchrun the error is simply
    raised. Returns fn's result (None where it did not run)."""
    result, message = None, None
    if here:
        try:
            result = fn()
        except CharlmError as exc:
            if not dinfo.enabled:
                raise
            message = str(exc)
    if dinfo.enabled:
        messages = [None] * dinfo.world
        dist.all_gather_object(messages, message)
        first = next((m for m in messages if m), None)
        if first:
            raise CharlmError(first)
    return result


def from_main(dinfo: Dist, fn):
    """fn's result computed by rank 0 alone and sent to every process (a checkpoint, a run directory): the
    other machines of a job need not have the file on their own disks. A CharlmError on rank 0 is raised on
    every process, as agreed() does."""
    result = agreed(dinfo, fn, here=dinfo.is_main)
    if not dinfo.enabled:
        return result
    box = [result]
    dist.broadcast_object_list(box, src=0)
    return box[0]
