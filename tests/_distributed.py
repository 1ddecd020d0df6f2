"""What tests/test_integration.py's distributed tests run: the training recipe (one process or one rank of
several), the spawned workers' entry point, and the loopback-only rendezvous.

Spawned processes import this module, not the test module, so each starts with torch and fastlora only
(no pytest, no transformers): a couple of seconds per process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import time
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import fastlora
from fastlora.model import lora_layers

WORLD_SIZE = 2
STEPS = 4
LR = 0.05
IN_FEATURES, HIDDEN, OUT_FEATURES = 16, 32, 8
BATCH, TOKENS = 8, 5  # the fixed global batch; each rank trains on BATCH // WORLD_SIZE rows of it
# Bounds every wait in a worker: connecting to the store, the process group's rendezvous and each
# collective (gloo honours the process group's timeout). The parent's join deadline is longer.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


# --- the training recipe -----------------------------------------------------------------------------------


def make_model(dropout: float) -> nn.Module:
    """A small MLP with a fastlora adapter on each of its three linears; B is non-zero so that A gets a
    gradient from the first step on. Same weights in every process."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(IN_FEATURES, HIDDEN), nn.GELU(),
        nn.Linear(HIDDEN, HIDDEN), nn.GELU(),
        nn.Linear(HIDDEN, OUT_FEATURES),
    )  # fmt: skip
    fastlora.inject(model, "all-linear", r=4, lora_alpha=8, lora_dropout=dropout)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].normal_(std=0.1, generator=generator)
    return model.train()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(BATCH, TOKENS, IN_FEATURES, generator=generator)
    target = torch.randn(BATCH, TOKENS, OUT_FEATURES, generator=generator)
    return x, target


def part(t: torch.Tensor, index: int, parts: int) -> torch.Tensor:
    return t.chunk(parts)[index]


def step_seed(step: int, rank: int) -> int:
    """The dropout seed state of ``rank`` at ``step``: each rank draws its own masks, as in real training."""
    return 1000 * step + rank


def _full(p: torch.Tensor) -> torch.Tensor:
    # FSDP2 parameters are DTensors sharded on dim 0; full_tensor() all-gathers them (a collective: every
    # rank calls it, in the same order).
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: _full(p) for n, p in model.named_parameters() if ".lora_" in n}


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: _full(p) for n, p in model.named_parameters() if ".lora_" not in n}


def train_one_process(dropout: float, micro_batches: int = 1, only: int | None = None) -> dict[str, torch.Tensor]:
    """STEPS SGD steps in this process on the whole batch, as ``micro_batches`` micro-batches whose
    gradients add up (micro-batch i drawing its dropout seed as rank i would); or, with ``only``, on
    micro-batch ``only`` alone (what one rank would learn without synchronisation). Returns the adapters."""
    model = make_model(dropout)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    x, target = batch()
    for step in range(STEPS):
        optimizer.zero_grad()
        for i in range(micro_batches) if only is None else [only]:
            torch.manual_seed(step_seed(step, i))
            loss = F.mse_loss(model(part(x, i, micro_batches)), part(target, i, micro_batches))
            (loss / (micro_batches if only is None else 1)).backward()
        optimizer.step()
    return adapter_state(model)


def _wrap(model: nn.Module, wrapper: str) -> nn.Module:
    if wrapper == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if wrapper == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        for layer in lora_layers(model).values():
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ValueError(f"wrapper: expected 'ddp' or 'fsdp', got {wrapper!r}")


def train_rank(rank: int, wrapper: str, dropout: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """STEPS SGD steps of this rank, under DDP or FSDP2, on its part of the batch. Returns the full
    (gathered) adapters and base weights."""
    model = make_model(dropout)
    wrapped = _wrap(model, wrapper)
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=LR)
    x, target = batch()
    x, target = part(x, rank, WORLD_SIZE), part(target, rank, WORLD_SIZE)
    for step in range(STEPS):
        optimizer.zero_grad()
        torch.manual_seed(step_seed(step, rank))
        F.mse_loss(wrapped(x), target).backward()  # the mean over this rank's rows; DDP/FSDP average ranks
        optimizer.step()
    return adapter_state(model), base_state(model)


# --- the spawned workers ------------------------------------------------------------------------------------


def loopback_interface() -> str | None:
    names = {name for _, name in socket.if_nameindex()}
    return next((n for n in ("lo", "lo0") if n in names), None)


def worker(rank: int, wrapper: str, port: int, out_dir: str, cases: list[tuple[str, float]]) -> None:
    """One rank: joins the group through the parent's store on 127.0.0.1:``port``, trains each (backend,
    dropout) case, and writes ``{wrapper}-{backend}-p{dropout}-rank{rank}.pt`` (tensors only) into ``out_dir``."""
    torch.set_num_threads(1)  # two processes on a 2-core machine
    # FSDP2 warns when a wrapped module returns a view (an in-place op on it would skip the pre-backward
    # all-gather); fastlora's output must not be one, as F.linear's is not.
    warnings.filterwarnings("error", message=r".*returned a view tensor")
    # The group meets through the store below; the usual variables say the same to anything that reads them.
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    interface = loopback_interface()
    if interface is not None:  # gloo's own connections on the loopback too (else: the host name's address)
        os.environ["GLOO_SOCKET_IFNAME"] = interface
    store = dist.TCPStore("127.0.0.1", port, world_size=WORLD_SIZE, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD_SIZE, timeout=COLLECTIVE_TIMEOUT)
    try:
        for backend, dropout in cases:
            with fastlora.use_backend(backend):
                adapters, base = train_rank(rank, wrapper, dropout)
            path = os.path.join(out_dir, f"{wrapper}-{backend}-p{dropout}-rank{rank}.pt")
            torch.save({"adapters": adapters, "base": base}, path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def loopback_store() -> Iterator[int]:
    """A TCPStore served by this process on 127.0.0.1 only, on a free port (the socket is bound to port 0
    and handed to the store still open, so no other process can take the port in between). Yields the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2 * WORLD_SIZE)
    port = sock.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, world_size=WORLD_SIZE, is_master=True, wait_for_workers=False,
                          timeout=COLLECTIVE_TIMEOUT, master_listen_fd=sock.detach())  # fmt: skip
    try:
        yield port
    finally:
        del store


def run_workers(args: tuple, timeout: float) -> None:
    """Spawn WORLD_SIZE ``worker`` processes with ``args`` and wait at most ``timeout`` seconds for all of
    them. A worker's exception is re-raised here with its traceback; past the deadline every worker still
    running is killed and TimeoutError raised."""
    context = mp.start_processes(worker, args=args, nprocs=WORLD_SIZE, join=False, daemon=True, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic()), grace_period=5):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the {WORLD_SIZE} workers did not finish within {timeout:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(5)
