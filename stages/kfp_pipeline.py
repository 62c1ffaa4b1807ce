"""The pipeline of dvc.yaml as a Kubeflow Pipelines (KFP v2) pipeline, built from dvc.yaml.

Nothing is written twice, so the two cannot disagree: each dvc.yaml stage becomes one
component that runs the stage's own `cts` command (`stages/kfp_task.py`); each out,
metrics and plots file of a stage becomes an output artifact, passed to every stage whose
deps name it (or a file inside it), which also gives the tasks their order; every param of
the params file becomes a pipeline parameter, and each task receives the params its stage
lists in dvc.yaml plus those no stage lists (how a stage runs, not what it computes:
`nproc_per_node`, `mlflow_tracking_uri`, ...). Kubeflow's cache then reruns what `dvc repro`
would rerun. Parameters are YAML text, as `cts <stage> --set key=value` and
`dvc exp run -S key=value` take them (``103``, ``null``, ``[1.0, 1.25]``), since several
params take values of more than one type (``nproc_per_node``: 1 or auto). A stage that reads
`device` runs a model and requests the accelerator.

kfp is imported only when a pipeline is built, after dvc.yaml and the params are checked.
"""

from __future__ import annotations

import inspect
import keyword
import linecache
import re
import shlex
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from graphlib import CycleError, TopologicalSorter
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import yaml

from cts_stages.dvc_file import DvcYamlError, read_dvc_yaml
from cts_stages.kfp_task import interpolate, resolve_path, template_variables
from cts_stages.params import load_params

PIPELINE_NAME = "cts"
IMAGE = "cts:latest"  # an image with the project and its `cluster` extra installed
# Every task's input bound to the pipeline job's name: the MLflow parent of its stage run.
PIPELINE_RUN_INPUT = "cts_pipeline_run"
DEVICE_PARAM = "device"  # a stage that reads it runs a model: it gets the accelerator
# The task writes the params file and passes it: a command must not choose its own.
_PARAMS_FLAGS = ("--params", "-p", "--set", "-S")


@dataclass(frozen=True)
class Stage:
    """One dvc.yaml stage; paths as dvc.yaml writes them (``${data_root}`` unresolved)."""

    name: str
    argv: tuple[str, ...]
    params: tuple[str, ...]
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    metrics: tuple[str, ...]
    plots: tuple[str, ...]

    @property
    def writes(self) -> tuple[str, ...]:
        return (*self.outs, *self.metrics, *self.plots)


@dataclass(frozen=True)
class Artifact:
    """An out, metrics or plots path of a stage as a Kubeflow artifact."""

    name: str  # the component's input/output name and the pipeline's output name
    path: str  # as dvc.yaml writes it
    stage: str  # the stage that writes it
    metrics: bool  # a dvc.yaml metrics file: a Kubeflow Metrics artifact


@dataclass(frozen=True)
class Plan:
    """What the Kubeflow pipeline is made of, checked before kfp is imported."""

    stages: list[Stage]  # each after the stages whose outputs it reads
    artifacts: dict[str, Artifact]  # by dvc.yaml path
    inputs: dict[str, list[str]]  # stage -> dvc.yaml paths of the artifacts it reads
    params: dict[str, str]  # pipeline parameter -> default YAML text, params-file order
    task_params: dict[str, list[str]]  # stage -> the parameters its task receives
    values: dict[str, Any]  # the params the defaults hold


def yaml_text(value: Any) -> str:
    """One line of YAML that reads back as ``value`` (``0.001``, ``null``, ``[0, 26]``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    return text.removesuffix("\n...").strip()


def _identifier(where: str, name: str) -> str:
    if not name.isidentifier() or keyword.iskeyword(name):
        raise DvcYamlError(f"{where}: {name!r} cannot name a Kubeflow input or output")
    return name


def _command(where: str, cmd: Any) -> tuple[str, ...]:
    """The stage's command split into words: a single `cts <stage>` with only the stage's
    own flags (the task runs the words without a shell; the params are its own), checked
    here, since on the cluster it would fail only once its task runs."""
    from cts.cli.pipeline import stage_flags

    if isinstance(cmd, list) and len(cmd) == 1:
        cmd = cmd[0]
    argv = shlex.split(cmd) if isinstance(cmd, str) else []
    if len(argv) < 2 or argv[0] != "cts" or argv[1].startswith("-"):
        raise DvcYamlError(
            f"{where}: cmd {cmd!r} is not a `cts` command; a Kubeflow component runs `cts <stage>`"
        )
    stages = stage_flags()
    if argv[1] not in stages:
        raise DvcYamlError(
            f"{where}: cmd {cmd!r} is not a `cts` pipeline stage ({', '.join(stages)}); "
            "a Kubeflow component runs `cts <stage>`"
        )
    flags = [word for word in argv if word.split("=")[0] in _PARAMS_FLAGS]
    if flags:
        raise DvcYamlError(
            f"{where}: cmd {cmd!r} passes {flags[0]}; the Kubeflow task passes the params itself"
        )
    own = stages[argv[1]]
    extra = [word for word in argv[2:] if word not in own]
    if extra:
        raise DvcYamlError(
            f"{where}: cmd {cmd!r}: `cts {argv[1]}` takes no {extra[0]!r}; a Kubeflow component "
            f"runs `cts <stage>` with only the stage's own flags ({', '.join(own) or 'none'})"
        )
    return tuple(argv)


def read_stages(dvc_yaml: Path, params: Mapping[str, Any]) -> list[Stage]:
    """The stages of ``dvc_yaml`` in file order; a stage that cannot become a component
    (not a `cts` command, an unknown param, a construct not translated) is a one-line
    DvcYamlError naming the file and stage."""
    if not dvc_yaml.is_file():
        raise FileNotFoundError(f"{dvc_yaml} not found: run from the repository or pass --dvc-yaml")
    stages = []
    for read in read_dvc_yaml(dvc_yaml):
        where = f"{dvc_yaml}: stage {read.name!r}"
        stage = Stage(
            name=read.name,
            argv=_command(where, read.cmd),
            params=read.params,
            deps=read.deps,
            outs=read.outs,
            metrics=read.metrics,
            plots=read.plots,
        )
        paths = [*stage.deps, *stage.writes]
        for key in [*stage.params, *(v for p in paths for v in template_variables(p))]:
            if key not in params:
                raise DvcYamlError(f"{where} reads param {key!r}, which the params file lacks")
        stages.append(stage)
    return stages


def _contains(out: PurePosixPath, dep: PurePosixPath) -> bool:
    return dep == out or out in dep.parents


def _artifact_names(
    dvc_yaml: Path, stages: Sequence[Stage], params: Mapping[str, Any]
) -> dict[str, Artifact]:
    """One artifact per written path, named after it (``checkpoints/policy.pt`` ->
    ``checkpoints_policy_pt``; ``_artifact`` added where a param has the name)."""
    artifacts: dict[str, Artifact] = {}
    names: dict[str, str] = {}
    for stage in stages:
        for path in stage.writes:
            name = re.sub(r"\W+", "_", path.replace("${", "").replace("}", "")).strip("_")
            name = f"{name}_artifact" if name in params else name
            where = f"{dvc_yaml}: stage {stage.name!r} writes {path!r}"
            _identifier(where, name)
            if path in artifacts or name in names:
                other = artifacts[path].stage if path in artifacts else names[name]
                raise DvcYamlError(f"{where}, as does stage {other!r} (or a path of that name)")
            names[name] = stage.name
            artifacts[path] = Artifact(name, path, stage.name, path in stage.metrics)
    return artifacts


def make_plan(dvc_yaml: Path, params_file: Path, overrides: Sequence[str] = ()) -> Plan:
    """Check dvc.yaml and the params (with ``key=value`` overrides) and derive the pipeline:
    tasks in order, the artifacts between them, the parameters. Errors are one line."""
    values = load_params(params_file, overrides)
    dvc_yaml = Path(dvc_yaml)
    stages = read_stages(dvc_yaml, values)
    artifacts = _artifact_names(dvc_yaml, stages, values)
    written = {resolve_path(path, values): path for path in artifacts}
    inputs: dict[str, list[str]] = {}
    upstream: dict[str, list[str]] = {}
    for stage in stages:
        reads = [
            written[out]
            for dep in stage.deps
            for out in written
            if _contains(out, interpolate(dep, values))
        ]
        inputs[stage.name] = [p for p in dict.fromkeys(reads) if artifacts[p].stage != stage.name]
        upstream[stage.name] = list(dict.fromkeys(artifacts[p].stage for p in inputs[stage.name]))
    try:
        order = list(TopologicalSorter(upstream).static_order())
    except CycleError as error:
        cycle = " -> ".join(error.args[1])
        raise DvcYamlError(f"{dvc_yaml}: the stages' deps and outs form a cycle: {cycle}") from None
    listed = {key for stage in stages for key in stage.params}
    runtime = [key for key in values if key not in listed]
    task_params = {}
    for stage in stages:
        paths = [*inputs[stage.name], *stage.writes]
        variables = [v for path in paths for v in template_variables(path)]
        task_params[stage.name] = list(dict.fromkeys([*stage.params, *variables, *runtime]))
        for key in task_params[stage.name]:
            _identifier(f"{dvc_yaml}: stage {stage.name!r}: param", key)
    by_name = {stage.name: stage for stage in stages}
    return Plan(
        stages=[by_name[name] for name in order],
        artifacts=artifacts,
        inputs=inputs,
        params={key: yaml_text(value) for key, value in values.items()},
        task_params=task_params,
        values=values,
    )


def _function_source(plan: Plan, stage: Stage, function_name: str) -> str:
    """The component function of a stage, as Python source: KFP ships a lightweight
    component's source to its container and reads the inputs and outputs from the
    function's annotations, and a stage's inputs and outputs come from dvc.yaml."""
    params = plan.task_params[stage.name]
    reads = [plan.artifacts[path] for path in plan.inputs[stage.name]]
    writes = [plan.artifacts[path] for path in stage.writes]
    arguments = [f"{key}: str" for key in params]
    arguments += [f"{a.name}: Input[Artifact]" for a in reads]
    arguments += [f"{a.name}: Output[{'Metrics' if a.metrics else 'Artifact'}]" for a in writes]
    arguments.append(f"{PIPELINE_RUN_INPUT}: str")
    description = f"{shlex.join(stage.argv)}: the dvc.yaml stage {stage.name!r}."

    def mapping(items: list[tuple[str, str]]) -> str:
        return "{" + ", ".join(f"{key!r}: {value}" for key, value in items) + "}"

    return "\n".join(
        [
            f"def {function_name}({', '.join(arguments)}):",
            f"    {description!r}",
            "    from cts_stages.kfp_task import run_task",
            "",
            "    run_task(",
            f"        {list(stage.argv)!r},",
            f"        params={mapping([(key, key) for key in params])},",
            f"        inputs={mapping([(a.path, a.name) for a in reads])},",
            f"        outputs={mapping([(a.path, a.name) for a in writes if not a.metrics])},",
            f"        metrics={mapping([(a.path, a.name) for a in writes if a.metrics])},",
            f"        pipeline_run={PIPELINE_RUN_INPUT},",
            "    )",
            "",
        ]
    )


def _component(plan: Plan, stage: Stage, image: str) -> Callable:
    from kfp import dsl

    function_name = re.sub(r"\W", "_", stage.name)
    function_name = function_name if function_name.isidentifier() else f"stage_{function_name}"
    source = _function_source(plan, stage, function_name)
    # inspect.getsource, which KFP calls, finds the source of generated code in linecache.
    filename = f"<dvc.yaml stage {stage.name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"Input": dsl.Input, "Output": dsl.Output}
    namespace.update(Artifact=dsl.Artifact, Metrics=dsl.Metrics)
    # dont_inherit: annotations evaluated (this module's `annotations` future makes strings).
    code = compile(source, filename, "exec", dont_inherit=True)
    exec(code, namespace)  # noqa: S102 (our own generated code)
    # The image holds cts and kfp (the `cluster` extra): nothing is installed at run time.
    return dsl.component(namespace[function_name], base_image=image, install_kfp_package=False)


def build_pipeline(plan: Plan, image: str, accelerator: str, gpus: int) -> Any:
    """The KFP pipeline (a GraphComponent): one task per stage, ``gpus`` accelerators of
    type ``accelerator`` on each stage that reads `device` (none when ``gpus`` is 0)."""
    from kfp import dsl

    components = {stage.name: _component(plan, stage, image) for stage in plan.stages}
    names = list(plan.params)
    fields = [(a.name, dsl.Metrics if a.metrics else dsl.Artifact) for a in plan.artifacts.values()]
    outputs = NamedTuple("Outputs", fields)

    def pipeline(*values: str) -> Any:
        params = dict(zip(names, values, strict=True))
        produced = {}
        for stage in plan.stages:
            arguments = {key: params[key] for key in plan.task_params[stage.name]}
            arguments.update({plan.artifacts[p].name: produced[p] for p in plan.inputs[stage.name]})
            arguments[PIPELINE_RUN_INPUT] = dsl.PIPELINE_JOB_NAME_PLACEHOLDER
            task = components[stage.name](**arguments)
            if gpus and DEVICE_PARAM in stage.params:
                task.set_accelerator_type(accelerator).set_accelerator_limit(gpus)
            for path in stage.writes:
                produced[path] = task.outputs[plan.artifacts[path].name]
        return outputs(**{a.name: produced[path] for path, a in plan.artifacts.items()})

    # KFP reads the pipeline's parameters from the signature: one per param, YAML text.
    parameter = inspect.Parameter.POSITIONAL_OR_KEYWORD
    pipeline.__signature__ = inspect.Signature(
        [
            inspect.Parameter(key, parameter, default=text, annotation=str)
            for key, text in plan.params.items()
        ],
        return_annotation=outputs,
    )
    description = (
        f"The dvc.yaml pipeline: {', '.join(s.name for s in plan.stages)}. "
        "Parameters are YAML text, as `cts <stage> --set key=value` takes them."
    )
    return dsl.pipeline(name=PIPELINE_NAME, description=description)(pipeline)


def _kfp_installed() -> None:
    try:
        import kfp  # noqa: F401
    except ImportError as error:
        raise RuntimeError(
            "kfp is not installed: install the cluster extra (pip install -e '.[cluster]')"
        ) from error


def compile_pipeline(
    dvc_yaml: Path,
    params_file: Path,
    out: Path,
    overrides: Sequence[str] = (),
    image: str = IMAGE,
    accelerator: str = "nvidia.com/gpu",
    gpus: int = 1,
) -> Plan:
    """Write the pipeline's IR YAML, which a Kubeflow Pipelines server accepts, to ``out``
    (atomically); the params (with ``overrides``) give the parameters' defaults."""
    from cts.data.io import write_bytes_atomic

    if gpus < 0:
        raise ValueError(f"--gpus {gpus}: allowed: an integer >= 0")
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder: name the YAML file to write")
    plan = make_plan(dvc_yaml, params_file, overrides)
    _kfp_installed()
    from kfp import compiler

    pipeline = build_pipeline(plan, image, accelerator, gpus)
    with tempfile.TemporaryDirectory() as folder:
        staged = Path(folder) / "pipeline.yaml"
        compiler.Compiler().compile(pipeline_func=pipeline, package_path=str(staged))
        write_bytes_atomic(out, staged.read_bytes())
    return plan


def run_local(
    dvc_yaml: Path,
    params_file: Path,
    out: Path,
    overrides: Sequence[str] = (),
) -> dict[str, Path]:
    """Run the pipeline with KFP's local subprocess runner (no cluster, no container: every
    task in this Python) and lay its artifacts out in ``out`` as the repository would hold
    them (``out/metrics/eval_ss.json``, ...); ``out`` appears only once complete.

    Returns dvc.yaml path -> the file or folder in ``out``.
    """
    from cts.data.io import staging_dir

    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new folder for the results")
    plan = make_plan(dvc_yaml, params_file, overrides)
    _kfp_installed()
    from kfp import local

    pipeline = build_pipeline(plan, IMAGE, accelerator="", gpus=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.kfp-"))
    placed = {}
    try:
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
        with warnings.catch_warnings():
            # The subprocess runner runs every task in this Python and ignores the image.
            warnings.filterwarnings("ignore", "You may be attem", RuntimeWarning)
            results = pipeline().outputs
        with staging_dir(out) as staging:
            for path, artifact in plan.artifacts.items():
                relative = resolve_path(path, plan.values)
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(results[artifact.name].path, staging / relative)
                placed[path] = out / relative
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return placed
