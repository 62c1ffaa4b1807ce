"""Where this process stands in a job that a cluster scheduler started, from its environment.

Two schedulers start the processes of a distributed job themselves:

- SLURM: ``srun`` starts the tasks of a job step on its nodes and tells each its node
  (``SLURM_NODEID`` of ``SLURM_STEP_NUM_NODES``/``SLURM_NNODES``), the step's nodes
  (``SLURM_STEP_NODELIST``/``SLURM_JOB_NODELIST``, a compressed host list such as
  ``gpu[01-04]``) and, with several tasks per node, its task (``SLURM_PROCID`` of
  ``SLURM_STEP_NUM_TASKS``/``SLURM_NTASKS``, ``SLURM_LOCALID`` on the node). Outside a step
  (the batch script itself, an ``salloc`` shell) nothing is read: the job's nodes are not
  running this command.
- Kubeflow: the Training Operator's ``PyTorchJob`` gives every pod ``MASTER_ADDR``,
  ``MASTER_PORT``, ``WORLD_SIZE`` and ``RANK`` (the pod's index, master 0), and since v1.7
  also torchrun's ``PET_NNODES``, ``PET_NODE_RANK``, ``PET_NPROC_PER_NODE``,
  ``PET_MASTER_ADDR`` and ``PET_MASTER_PORT``; Trainer v2's ``TrainJob`` (torch runtime) gives
  the ``PET_*`` variables only.

:func:`scheduler_placement` reads either into a :class:`Placement`; the stages
(``cts_stages.launch``) combine it with the launch params, which win where they are set.
Environment variables are read from a mapping passed in, so the functions are pure.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field

# torchrun's environment of one of its workers: such a process is placed already.
TORCHRUN_WORKER = ("RANK", "WORLD_SIZE", "LOCAL_RANK")

_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
_TASKS = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


@dataclass(frozen=True)
class Tasks:
    """The scheduler started every worker process: this one is ``rank`` of ``world_size``,
    ``local_rank`` of the ``local_world_size`` on its node (SLURM with several tasks per node)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


@dataclass(frozen=True)
class Placement:
    """A job's nodes as a scheduler describes them to this process.

    ``master_port`` None: the scheduler names none. ``nproc_per_node``: the processes per
    node it asks for (``PET_NPROC_PER_NODE``: a count or torchrun's ``auto``/``gpu``/``cpu``),
    None: it does not say. ``tasks``: set when the scheduler started every worker itself.
    ``origin``: for each field, the variable it came from as ``NAME=value``, for messages.
    """

    scheduler: str
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int | None = None
    nproc_per_node: int | str | None = None
    tasks: Tasks | None = None
    origin: dict[str, str] = field(default_factory=dict, compare=False)


def _split_top_level(text: str) -> list[str]:
    """``a[1-2,4],b`` -> ``['a[1-2,4]', 'b']``: commas outside brackets separate."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ValueError("nested or unbalanced brackets")
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError("unbalanced brackets")
    parts.append(text[start:])
    return parts


def _expand_range(spec: str) -> list[str]:
    """``01-03,7`` -> ``['01', '02', '03', '7']``; a range keeps its low bound's zero padding."""
    values = []
    for item in spec.split(","):
        low, sep, high = item.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"[{spec}] is not a list of numbers and ranges")
        if not sep:
            values.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"range {item} runs backwards")
        values += [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]
    return values


def expand_hostlist(hostlist: str) -> list[str]:
    """Host names of a SLURM host list, in SLURM's order.

    ``node[01-03,07]`` -> node01, node02, node03, node07; ``a1,b[1-2]`` -> a1, b1, b2;
    ``r[1-2]n[1-2]`` -> r1n1, r1n2, r2n1, r2n2 (the first bracket varies slowest). A range
    keeps the zero padding of its low bound. ValueError for a malformed list.
    """
    hosts = []
    for item in _split_top_level(hostlist.strip()):
        if not item:
            raise ValueError("empty host name")
        literals = _BRACKETS.split(item)[::2]
        if any(char in literal for literal in literals for char in "[]"):
            raise ValueError(f"unbalanced brackets in {item!r}")
        ranges = [_expand_range(spec) for spec in _BRACKETS.findall(item)]
        for combination in itertools.product(*ranges):
            pieces = itertools.zip_longest(literals, combination, fillvalue="")
            hosts.append("".join(a + b for a, b in pieces))
    return hosts


def slurm_hostnames(hostlist: str) -> list[str]:
    """The hosts of a SLURM host list: ``scontrol show hostnames`` where SLURM's tools are
    installed (it knows every form SLURM writes), else :func:`expand_hostlist`."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return expand_hostlist(hostlist)
    result = subprocess.run(
        [scontrol, "show", "hostnames", hostlist], capture_output=True, text=True, timeout=60
    )
    if result.returncode:
        reason = (result.stderr.strip().splitlines() or ["failed"])[0]
        raise ValueError(f"scontrol show hostnames: {reason}")
    return result.stdout.split()


def _tasks_on_node(tasks_per_node: str, node: int) -> int:
    """Tasks on node ``node`` from SLURM's ``2(x3),1`` (2 on each of 3 nodes, then 1)."""
    counts = []
    for item in tasks_per_node.split(","):
        match = _TASKS.match(item.strip())
        if not match:
            raise ValueError(f"cannot read {item!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    if node >= len(counts):
        raise ValueError(f"no count for node {node}")
    return counts[node]


def _first(env: Mapping[str, str], *names: str) -> tuple[str, str]:
    """The first of ``names`` that is set, and its value."""
    for name in names:
        if name in env:
            return name, env[name]
    raise ValueError(f"{' or '.join(names)} is not set")


def _integer(env: Mapping[str, str], *names: str) -> tuple[int, str]:
    """An integer variable (the first of ``names`` set) and its ``NAME=value`` for messages."""
    name, value = _first(env, *names)
    if not value.strip().isdigit():
        raise ValueError(f"{name}={value!r}: expected a non-negative integer")
    return int(value), f"{name}={value}"


def slurm_placement(env: Mapping[str, str]) -> Placement | None:
    """This task's place in the SLURM job step it runs in; None outside a step.

    Node 0 of the step hosts the rendezvous: ``master_addr`` is the step's first host. With
    one task per node the task launches its node's processes; with more, ``tasks`` says
    which worker it is. A malformed variable or host list is a ValueError naming it.
    """
    if "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
        return None
    nnodes, nnodes_from = _integer(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES")
    node_rank, node_rank_from = _integer(env, "SLURM_NODEID")
    list_name, hostlist = _first(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    list_from = f"{list_name}={hostlist}"
    try:
        hosts = slurm_hostnames(hostlist)
    except ValueError as error:
        raise ValueError(f"{list_from}: not a host list ({error})") from None
    if len(hosts) != nnodes:
        raise ValueError(f"{list_from} names {len(hosts)} host(s), but {nnodes_from}")
    if node_rank >= nnodes:
        raise ValueError(f"{node_rank_from} is not below {nnodes_from}")
    world_size, world_from = _integer(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    origin = {
        "nnodes": nnodes_from,
        "node_rank": node_rank_from,
        "master_addr": list_from,
    }
    tasks = None
    if world_size > nnodes:
        name, value = _first(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
        try:
            local_world_size = _tasks_on_node(value, node_rank)
        except ValueError as error:
            raise ValueError(f"{name}={value}: {error}") from None
        rank, rank_from = _integer(env, "SLURM_PROCID")
        local_rank, _ = _integer(env, "SLURM_LOCALID")
        if rank >= world_size:
            raise ValueError(f"{rank_from} is not below {world_from}")
        if local_rank >= local_world_size:
            raise ValueError(f"SLURM_LOCALID={local_rank} is not below {name}={value}")
        tasks = Tasks(rank, world_size, local_rank, local_world_size)
        origin["tasks"] = f"{name}={value}"
    return Placement("SLURM", nnodes, node_rank, hosts[0], tasks=tasks, origin=origin)


def _port(env: Mapping[str, str], name: str) -> tuple[int, str]:
    port, where = _integer(env, name)
    if not 1 <= port <= 65535:
        raise ValueError(f"{where}: not a port (1..65535)")
    return port, where


def kubeflow_placement(env: Mapping[str, str]) -> Placement | None:
    """This pod's place in a Kubeflow training job; None when the variables are absent.

    torchrun's ``PET_*`` variables (PyTorchJob since v1.7, TrainJob) come first; an older
    PyTorchJob's ``WORLD_SIZE`` pods of rank ``RANK`` are its nodes (one process each unless
    ``nproc_per_node`` says more, as ``torchrun --nnodes=$WORLD_SIZE --node-rank=$RANK``
    would run). An elastic range (``PET_NNODES=1:4``) is refused: the rendezvous is static.
    """
    if "PET_NNODES" in env and "PET_NODE_RANK" in env:
        if ":" in env["PET_NNODES"]:
            raise ValueError(
                f"PET_NNODES={env['PET_NNODES']}: an elastic node range is not supported "
                "(the stages train with a fixed set of processes); drop the job's elasticPolicy"
            )
        names = ("PET_NNODES", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
    elif all(name in env for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")):
        names = ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")
    else:
        return None
    nnodes, nnodes_from = _integer(env, names[0])
    node_rank, node_rank_from = _integer(env, names[1])
    if not nnodes or node_rank >= nnodes:
        raise ValueError(f"{node_rank_from} is not below {nnodes_from}")
    addr_name, master_addr = _first(env, names[2], "MASTER_ADDR")
    port_name, _ = _first(env, names[3], "MASTER_PORT")
    master_port, port_from = _port(env, port_name)
    origin = {
        "nnodes": nnodes_from,
        "node_rank": node_rank_from,
        "master_addr": f"{addr_name}={master_addr}",
        "master_port": port_from,
    }
    nproc = env.get("PET_NPROC_PER_NODE")
    if nproc is not None:
        origin["nproc_per_node"] = f"PET_NPROC_PER_NODE={nproc}"
        nproc = int(nproc) if nproc.isdigit() else nproc
    return Placement("Kubeflow", nnodes, node_rank, master_addr, master_port, nproc, origin=origin)


def scheduler_placement(env: Mapping[str, str]) -> Placement | None:
    """SLURM's or Kubeflow's placement of this process; None under neither, and None for a
    worker that torchrun (ours or an outer one) started: its environment places it already."""
    if all(name in env for name in TORCHRUN_WORKER):
        return None
    return slurm_placement(env) or kubeflow_placement(env)
