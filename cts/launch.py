"""Starting worker processes with PyTorch's elastic launcher (what `torchrun` runs).

``launch(settings, fn, *args)`` runs ``fn(*args)`` in ``settings.nproc_per_node`` processes
on this node, which join the processes of the other ``nnodes - 1`` nodes through a static
rendezvous at ``master_addr:master_port`` (torchrun's ``--nnodes/--node-rank/--master-addr``).
Each worker finds RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in its
environment, as under torchrun, so the same code runs under an outer ``torchrun`` (or
``srun`` + torchrun), where :func:`launched_externally` tells not to launch again. Where a
scheduler started the processes (:mod:`cts.cluster`), the caller fills in the settings.

Bad settings fail here, before any worker starts, with one line; a worker that dies ends
the launch with :class:`WorkerFailed`, whose message names its rank and the cause, after the
elastic agent has stopped the other workers.

The rendezvous store (node 0) listens on ``master_addr`` alone: on one machine loopback, so
that nothing else reaches it (it has no authentication); there gloo's connections between the
workers are on loopback too.

SIGTERM, SIGUSR1 or Ctrl-C, whether sent to the launcher alone or to every process of the job
at once (as SLURM and Kubernetes do), end the launch as they end one process: every worker
unwinds (its handler raises :class:`~cts.processes.Terminated` or KeyboardInterrupt once and
ignores repeats; a training finishes its step and writes its resume checkpoint first), so
rank 0 ends its MLflow runs KILLED; the workers exit with 128 + the signal (143 for SIGTERM
and SIGUSR1), and the launcher raises the same interrupt.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import ipaddress
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from cts.processes import STOP_SIGNALS, interrupt_for, stop_exit_code, stop_once, stopped_by

# The rendezvous port of torchrun when several nodes must agree on one.
DEFAULT_MASTER_PORT = 29500
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_QUIET_LOGGERS = (
    "torch.distributed.elastic",
    "torch.distributed.launcher",
    "torch.multiprocessing",
)


class WorkerFailed(RuntimeError):
    """A worker process ended with an error, a signal or a non-zero exit code."""


@dataclass(frozen=True)
class LaunchSettings:
    """Processes on this node and how the nodes meet.

    ``master_port`` None: any free port on a single node, 29500 across nodes.
    ``timeout``: seconds a node waits for the master and for the other nodes.
    ``threads``: CPU threads per worker; None: :func:`threads_per_process`'s ``auto``.
    """

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    timeout: float = 300.0
    threads: int | None = None

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def launched_externally() -> bool:
    """True inside a worker of torchrun (ours or an outer one): it must not launch again."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def uses_cuda(device: str) -> bool:
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def resolve_nproc_per_node(value: int | str, device: str) -> int:
    """``auto``: one process per visible GPU (1 on CPU); a count above the GPUs is an error."""
    gpus = torch.cuda.device_count() if uses_cuda(device) else 0
    if value == "auto":
        return max(gpus, 1)
    if gpus and value > gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise ValueError(
            f"nproc_per_node={value}: only {gpus} GPU(s) visible{where}; use auto or at most {gpus}"
        )
    return value


def threads_per_process(num_threads: int | str, processes: int) -> int:
    """CPU threads (intra-op, OpenMP) of each of this node's ``processes``: ``num_threads``
    itself, or for ``auto`` OMP_NUM_THREADS when it is set, else an equal share of the cores
    this process may run on (its affinity: a container's or ``taskset``'s, not the machine's)."""
    if num_threads != "auto":
        return int(num_threads)
    if (value := os.environ.get("OMP_NUM_THREADS", "")).isdigit() and int(value) > 0:
        return int(value)
    return max(len(os.sched_getaffinity(0)) // processes, 1)


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def resolve_host(host: str, where: str | None = None, hint: str = "") -> None:
    """Unless ``host`` resolves, a one-line ValueError naming ``where`` it came from (default:
    the master_addr param), followed by ``hint``."""
    try:
        socket.getaddrinfo(host, None)
    except socket.gaierror as error:
        where = where or f"master_addr={host!r}"
        raise ValueError(f"{where}: unknown host {host!r} ({error.strerror}){hint}") from None


def _check_master_here(host: str, port: int) -> None:
    """Node 0 serves the rendezvous: ``host`` must be this machine's and ``port`` free."""
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ValueError(
                    f"master_port={port} is already in use on {host}: choose another port"
                ) from None
            raise ValueError(
                f"master_addr={host!r} is not an address of this machine, but node_rank 0 "
                "hosts the rendezvous: set master_addr to this node's address"
            ) from None


def _wait_for_master(host: str, port: int, timeout: float) -> None:
    """Nodes 1.. wait for node 0 to listen, which may start after them."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=5):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise ValueError(
                    f"master {host}:{port} unreachable after {timeout:g} s "
                    "(rendezvous_timeout): start node_rank 0, or check master_addr, "
                    "master_port and the firewall"
                ) from None
            time.sleep(1.0)


def prepare(settings: LaunchSettings) -> LaunchSettings:
    """Checks the settings and the master before any worker starts; fills in the port."""
    if not 0 <= settings.node_rank < settings.nnodes:
        raise ValueError(
            f"node_rank={settings.node_rank}: allowed 0..{settings.nnodes - 1} for "
            f"nnodes={settings.nnodes}"
        )
    resolve_host(settings.master_addr)
    port = settings.master_port
    if port is None:
        port = _free_port(settings.master_addr) if settings.nnodes == 1 else DEFAULT_MASTER_PORT
    if settings.node_rank == 0:
        _check_master_here(settings.master_addr, port)
    else:
        _wait_for_master(settings.master_addr, port, settings.timeout)
    return dataclasses.replace(settings, master_port=port)


def _listen_address(host: str, port: int) -> tuple[int, tuple]:
    """The address family and socket address of ``host:port`` (IPv4 first)."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, _, _, _, address = min(found, key=lambda info: info[0] != socket.AF_INET)
    return family, address


def _named_loopback(host: str, address: str) -> bool:
    """Whether ``host`` is a name (not an address) that resolves to a loopback address."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return ipaddress.ip_address(address).is_loopback
    return False


def _bound(family: int, address: tuple) -> socket.socket:
    """A TCP socket listening on ``address``; ``("::", port)``: every interface, IPv4 too."""
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and address[0] == "::":
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind(address)
        listener.listen(socket.SOMAXCONN)
    except OSError:
        listener.close()
        raise
    return listener


def _store_listener(host: str, port: int, nnodes: int) -> socket.socket:
    """The store's socket: on ``host``'s address. On every interface instead, as torch's,
    with a note, where the other nodes of a job could not reach it there (a name that means
    loopback here: a hosts file may give the machine's own name Debian's 127.0.1.1) or where
    ``host`` cannot be served here (a name not in DNS yet, a service's virtual address)."""
    try:
        family, address = _listen_address(host, port)
        if not (nnodes > 1 and _named_loopback(host, address[0])):
            return _bound(family, address)
        why = f"is {address[0]} on this node (its hosts file?)"
    except socket.gaierror:
        why = "does not resolve here"
    except OSError as error:
        if error.errno != errno.EADDRNOTAVAIL:
            raise
        why = "is not an address of this node"
    print(
        f"note: master_addr={host!r} {why}: the rendezvous listens on every interface, so "
        "that the other nodes reach it; set master_addr to this node's address to keep it "
        "to one",
        file=sys.stderr,
    )
    try:
        return _bound(socket.AF_INET6, ("::", port))
    except OSError:  # no IPv6 on this machine
        return _bound(socket.AF_INET, ("0.0.0.0", port))


def serve_store(host: str, port: int, nnodes: int, timeout: float) -> dist.TCPStore:
    """The TCPStore server of a rendezvous at ``host:port``, listening on that address only
    (but see :func:`_store_listener`).

    torch's binds every interface whatever address it is given; made first, and
    multi-tenant, this one is the server that torch's store of the same port then uses (the
    elastic agent's, or ``env://``'s of rank 0). Keep it while the job runs.
    """
    listener = _store_listener(host, port, nnodes)
    # The store owns the socket from here on and closes it when it is gone.
    return dist.TCPStore(
        host,
        port,
        None,
        True,
        timedelta(seconds=timeout),
        wait_for_workers=False,
        multi_tenant=True,
        master_listen_fd=listener.detach(),
    )


def loopback_interface() -> str:
    """The name of this machine's loopback network interface (Linux: ``lo``)."""
    for flags in sorted(Path("/sys/class/net").glob("*/flags")):
        with contextlib.suppress(OSError, ValueError):
            if int(flags.read_text(), 16) & 0x8:  # IFF_LOOPBACK
                return flags.parent.name
    return "lo"


@contextlib.contextmanager
def _rendezvous_network(settings: LaunchSettings) -> Iterator[None]:
    """On node 0 the rendezvous store, on ``master_addr`` only (:func:`serve_store`); on one
    machine gloo's listeners on loopback too (GLOO_SOCKET_IFNAME, which the workers
    inherit; unless set), instead of on the address of the machine's name."""
    if settings.nnodes == 1:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_interface())
    if settings.node_rank != 0:
        yield
        return
    store = serve_store(
        settings.master_addr, settings.master_port, settings.nnodes, settings.timeout
    )
    try:
        yield
    finally:
        del store


def _describe(rank: int, failure) -> str:
    """One line from the elastic agent's record of a failed worker."""
    where = f"worker rank {rank} (pid {failure.pid})"
    if failure.exitcode < 0:
        return f"{where} was killed by {failure.signal_name()}"
    message = failure.message
    if isinstance(message, dict):  # an exception recorded by the worker
        message = message.get("message", "")
    if not message or message.startswith("To enable traceback"):
        return f"{where} exited with code {failure.exitcode}"
    for prefix in ("ValueError: ", "RuntimeError: ", "FileNotFoundError: ", "OSError: "):
        message = message.removeprefix(prefix)
    return f"{where} failed: {message.strip().splitlines()[0]}"


def launch(settings: LaunchSettings, fn: Callable[..., None], *args) -> None:
    """Runs ``fn(*args)`` in every worker process of this node; returns when all are done.

    ``fn`` must be importable by name (the workers are spawned). Each worker computes with
    ``settings.threads`` threads (None: OMP_NUM_THREADS, else an equal share of the cores).
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    settings = prepare(settings)
    if not os.environ.get("CTS_DEBUG"):
        _quiet_agent()
    threads = settings.threads or threads_per_process("auto", settings.nproc_per_node)
    # The workers inherit it: their OpenMP and MKL start with that many threads.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    with (
        _rendezvous_network(settings),
        tempfile.TemporaryDirectory(prefix="cts-launch-") as log_dir,
    ):
        config = LaunchConfig(
            min_nodes=settings.nnodes,
            max_nodes=settings.nnodes,
            nproc_per_node=settings.nproc_per_node,
            run_id="cts",
            rdzv_backend="static",
            rdzv_endpoint=f"{settings.master_addr}:{settings.master_port}",
            rdzv_configs={"rank": settings.node_rank, "timeout": int(settings.timeout)},
            max_restarts=0,
            monitor_interval=0.2,
            start_method="spawn",
            logs_specs=DefaultLogsSpecs(log_dir=log_dir),
            # The agent's handlers raise SignalException, which it answers by passing the
            # signal to the workers; SIGHUP and SIGQUIT keep their default, as in one process.
            signals_to_handle=",".join(each.name for each in STOP_SIGNALS),
        )
        # The agent installs its handlers over ours and leaves them: ours come back after it.
        handlers = {each: signal.getsignal(each) for each in STOP_SIGNALS}
        try:
            elastic_launch(config, _worker)(fn, *args)
        except SignalException as error:
            # The agent has stopped the workers (they unwound, or were killed after its
            # shutdown timeout): the launcher stops the way one process does.
            raise interrupt_for(error.sigval) from None
        except ChildFailedError as error:
            rank, failure = _root_cause(error.failures)
            if (stop := stopped_by(failure.exitcode)) is not None:
                # The workers alone were signalled: the job was stopped, nothing failed.
                raise interrupt_for(stop) from None
            raise WorkerFailed(_describe(rank, failure)) from None
        finally:
            for each, handler in handlers.items():
                if handler is not None:  # None: installed outside Python, cannot be restored
                    signal.signal(each, handler)


def _quiet_agent() -> None:
    """The agent logs every failure as a traceback and every signal as a warning; the one
    line of WorkerFailed or of the interrupt says it. Its modules set their loggers' levels
    themselves (torch.distributed.elastic.utils.logging), so each is set, not the parents."""
    loggers = logging.Logger.manager.loggerDict
    for name in [*_QUIET_LOGGERS, *loggers]:
        if name.startswith(_QUIET_LOGGERS):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _worker(fn: Callable[..., None], *args) -> None:
    if sys.platform == "linux":
        # A launcher killed outright (SIGKILL) cannot stop its workers: they die with it.
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    # A spawned process starts with Python's defaults: SIGTERM would kill the worker before
    # rank 0 could end its MLflow runs.
    for each in STOP_SIGNALS:
        signal.signal(each, stop_once)
    try:
        fn(*args)
    except KeyboardInterrupt as error:
        # Stopped, not failed: no traceback and no error record, and an exit status that
        # says which signal stopped it.
        raise SystemExit(stop_exit_code(error)) from None


def _root_cause(failures: dict) -> tuple:
    """The failure that ended the run: a worker killed by a signal (the others then see a
    closed connection, and the agent ends them with SIGTERM), else the earliest failure that
    is not a stop, else the earliest stop (every worker was told to stop)."""
    killed = [
        (rank, f)
        for rank, f in failures.items()
        if f.exitcode < 0 and stopped_by(f.exitcode) is None
    ]
    if killed:
        return killed[0]
    failed = {rank: f for rank, f in failures.items() if stopped_by(f.exitcode) is None}
    return min((failed or failures).items(), key=lambda item: item[1].timestamp)
