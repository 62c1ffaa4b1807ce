"""``cts config``: the paper's settings as complete params files, printed or written.

A row of :data:`cts.paper.PAPER_SETTINGS` is its dataset's file in ``configs/`` (that
dataset's schedule: batch, lr, iterations, augmentation, evaluation) with the row's
backbone, crop and K applied, and for ADE20K ViT-L 640 its image size and sliding window
(``base_size``, ``eval_window``). The file's comments are kept; its header is replaced by one
naming the row. ``sweep_tokens_shared`` is the file's unless the row's crop or K differ from
the file's; then it is K x (0, 1/4, 1/2, 3/4, 1, 3/2, 2), at most the superpatch count.

For ``dvc exp run``, :func:`dvc_args` gives the same params as ``--set-param=key=value``
arguments (``-S``'s long form, one argument each), each read back as the value by DVC's
override parser (Hydra's). ``cts config NAME --dvc-args`` prints them one a line, for a shell
to read into an array: words split by the shell would be glob patterns (a list value such as
``[0.5,2.0]`` matches a file named ``train_scale_range=0``).
"""

from __future__ import annotations

import math
import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from cts.paper import PAPER_SETTINGS, PaperSetting, paper_setting
from cts_stages.params import CHECKS, ParamError, _Loader, validate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SWEEP_FRACTIONS = (0, 0.25, 0.5, 0.75, 1, 1.5, 2)

# ``key: value   # comment`` (the value is flow YAML on one line, without ``#``).
_LINE = re.compile(
    r"^(?P<key>[A-Za-z_]\w*):(?P<gap>[ \t]*)(?P<value>[^#\n]*?)(?P<comment>[ \t]+#.*)?$"
)
# A value that reads back the same wherever the argument goes (a line, a shell word quoted or
# not, Hydra): no whitespace, quotes, ``$`` or other shell characters; brackets and commas only
# in a list (``[0.5,2.0]``). Strings: no ``,`` (a Hydra sweep) either.
_SHELL_WORD = re.compile(r"[A-Za-z0-9_./:@+\-\[\],]+")
_HYDRA_STRING = re.compile(r"[A-Za-z0-9_./:@+\-]+")


def config_file(dataset: str) -> Path:
    return CONFIGS / f"{dataset}.yaml"


def sweep_for(setting: PaperSetting) -> list[int]:
    """K x :data:`SWEEP_FRACTIONS` (half rounded up), at most the row's superpatch count."""
    ks = (math.floor(setting.num_tokens_shared * f + 0.5) for f in SWEEP_FRACTIONS)
    return sorted({min(k, setting.superpatches) for k in ks})


def row_overrides(setting: PaperSetting, base: dict[str, Any]) -> dict[str, Any]:
    """What the row changes in its dataset's params (``base``)."""
    overrides: dict[str, Any] = {
        "backbone": setting.backbone,
        "crop_size": setting.crop_size,
        "num_tokens_shared": setting.num_tokens_shared,
    }
    if setting.base_size is not None:
        overrides["base_size"] = setting.base_size
    if setting.window is not None:
        overrides["eval_window"] = setting.window
    if (base.get("crop_size"), base.get("num_tokens_shared")) != (
        setting.crop_size,
        setting.num_tokens_shared,
    ):
        overrides["sweep_tokens_shared"] = sweep_for(setting)
    return overrides


def yaml_value(value: Any) -> str:
    """One-line YAML of a params value (lists in flow style)."""
    if isinstance(value, list):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _header(setting: PaperSetting, source: Path) -> list[str]:
    return [
        f"# The paper's {setting.dataset_label} {setting.label} setting: Segmenter + CTS, "
        f"crop {setting.crop_size},",
        f"# K={setting.num_tokens_shared} shared superpatches: {setting.patch_tokens} -> "
        f"{setting.tokens} tokens ({setting.reduction:.0%} fewer).",
        f"# Written by `cts config {setting.name}`: configs/{source.name}, the paper's",
        f"# {setting.dataset_label} schedule, with this row's values.",
        "# The no-sharing baseline of this row: dvc exp run -S num_tokens_shared=0",
    ]


def _read(path: Path) -> tuple[str, dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: `cts config` reads the dataset's file there")
    text = path.read_text()
    params = yaml.load(text, Loader=_Loader) or {}  # noqa: S506 (a SafeLoader subclass)
    if not isinstance(params, dict):
        raise ParamError(f"{path}: expected a mapping of key: value")
    return text, params


def _apply(lines: list[str], overrides: dict[str, Any], source: Path) -> list[str]:
    """Replace the value of each overridden ``key: value`` line, keeping its comment."""
    pending = dict(overrides)
    out = []
    for line in lines:
        match = _LINE.match(line)
        if match and match["key"] in pending:
            value = yaml_value(pending.pop(match["key"]))
            new = f"{match['key']}:{match['gap'] or ' '}{value}"
            if match["comment"]:
                column = len(line) - len(match["comment"].lstrip())
                comment = match["comment"].lstrip()
                new = new.ljust(column - 1) + " " + comment
            line = new
        out.append(line)
    if pending:
        raise ParamError(
            f"{source}: no line `{next(iter(pending))}: value` to set for the paper's setting "
            "(every params key belongs in configs/)"
        )
    return out


def render(name: str) -> tuple[str, dict[str, Any]]:
    """The complete params file of the paper's setting ``name`` (text, and its values),
    checked: every key the pipeline knows, each value valid."""
    setting = paper_setting(name)
    source = config_file(setting.dataset)
    text, base = _read(source)
    overrides = row_overrides(setting, base)
    lines = text.splitlines()
    body = 0
    while body < len(lines) and (not lines[body].strip() or lines[body].startswith("#")):
        body += 1
    lines = _header(setting, source) + _apply(lines[body:], overrides, source)
    rendered = "\n".join(lines) + "\n"
    params = yaml.load(rendered, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    if params != {**base, **overrides}:  # a value written as something else
        raise ParamError(f"cts config {name}: the params written do not read back as set")
    missing = [key for key in CHECKS if key not in params]
    unknown = [key for key in params if key not in CHECKS]
    problems = [
        f"{what} {', '.join(keys)}"
        for what, keys in [("missing", missing), ("unknown", unknown)]
        if keys
    ]
    if problems:
        raise ParamError(f"{source}: {'; '.join(problems)}")
    validate(params, CHECKS, source=f"cts config {name}")
    return rendered, params


def _hydra_value(key: str, value: Any) -> str:
    """``value`` as DVC's ``-S`` (Hydra's override grammar) reads it back."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(_hydra_value(key, v) for v in value) + "]"
    if (
        isinstance(value, str)
        and _HYDRA_STRING.fullmatch(value)
        # read back as this string by YAML (`on`, `1_0`: not) and by Hydra (`inf`, `null`: not)
        and yaml.load(value, Loader=_Loader) == value  # noqa: S506 (a SafeLoader subclass)
        and value.lower().lstrip("+-") not in ("inf", "nan", "null", "true", "false")
    ):
        return value
    raise ParamError(
        f"{key}={value!r}: cannot be passed as one `dvc exp run -S` word; write the file "
        "with --out instead"
    )


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same types (``True`` is not ``1``, ``1`` is not ``1.0``)."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def dvc_args(params: dict[str, Any]) -> list[str]:
    """``--set-param=key=value`` for every key, in the file's order, one argument each:
    ``dvc exp run`` with them sets each param of the workspace's params.yaml (in the
    experiment, not the workspace) to this value. Each override is checked against Hydra's
    own parser, the one DVC uses."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    words = []
    for key, value in params.items():
        text = _hydra_value(key, value)
        word = f"{key}={text}"
        override = parser.parse_override(word)
        if (
            not _SHELL_WORD.fullmatch(text)
            or override.is_sweep_override()
            or not _same(override.value(), value)
        ):
            raise ParamError(f"{key}={value!r}: `dvc exp run -S {word}` would not set it")
        words.append(f"--set-param={word}")
    return words


def listing() -> str:
    """The rows as a table: name, dataset, backbone, crop, K, tokens, reduction."""
    header = ("name", "dataset", "backbone", "crop", "K", "tokens", "reduction")
    rows = [
        (
            s.name,
            s.dataset_label,
            s.backbone,
            str(s.crop_size),
            str(s.num_tokens_shared),
            f"{s.patch_tokens} -> {s.tokens}",
            f"{s.reduction:.0%}",
        )
        for s in PAPER_SETTINGS
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    )


def write_config(path: str | os.PathLike, text: str, force: bool = False) -> Path:
    """Write ``text`` to ``path`` through a temporary file beside it, renamed into place; an
    existing ``path`` is kept (FileExistsError) unless ``force``.

    With ``force``, as the shell's ``>`` would: a symlink ``path`` stays a link and its target
    gets the text, and a replaced file keeps its permissions (a 0640 file stays 0640).
    Returns ``path`` as given.
    """
    from cts.data.io import disk_full_error, temp_file

    path, data = Path(path), text.encode()
    target = path.resolve() if force and path.is_symlink() else path
    if not force and path.exists():
        raise FileExistsError(f"{path} exists: pass --force to replace it")
    mode = stat.S_IMODE(target.stat().st_mode) if force and target.exists() else None
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(target)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:  # before the rename: never readable by more than before
                os.fchmod(f.fileno(), mode)
            f.write(data)
        if force:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)  # unlike a rename, fails if path appeared meanwhile
    except FileExistsError as error:
        raise FileExistsError(f"{path} exists: pass --force to replace it") from error
    except OSError as error:
        full = disk_full_error(target, len(data), error, tmp)
        if full is not None:
            raise full from error
        raise
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


class UsageError(ValueError):
    """Options of ``cts config`` that do not go together, or an unknown setting."""


def _wants_listing(
    name: str | None, list_: bool, out: Path | None, force: bool, as_dvc_args: bool
) -> bool:
    """True for the listing (``--list``, or nothing asked); a UsageError for options that do
    not go together."""
    other = name is not None or out is not None or as_dvc_args or force
    if list_ and other:
        raise UsageError("--list takes no setting, --out, --force or --dvc-args")
    if list_ or not other:
        return True
    if name is None:
        raise UsageError("name a setting (`cts config --list` shows them)")
    if force and out is None:
        raise UsageError("--force only goes with --out")
    if as_dvc_args and out is not None:
        raise UsageError("--dvc-args prints to stdout; it does not go with --out")
    return False


def command_output(
    name: str | None = None,
    list_: bool = False,
    out: Path | None = None,
    force: bool = False,
    as_dvc_args: bool = False,
) -> str:
    """What ``cts config`` prints, each line ending in a newline: the listing, the params
    file of setting ``name``, its ``dvc exp run`` arguments one a line (``as_dvc_args``), or
    where it wrote the file (``out``). A UsageError for options that do not go together or
    an unknown setting, before anything is written."""
    if _wants_listing(name, list_, out, force, as_dvc_args):
        return listing() + "\n"
    try:
        paper_setting(name)
    except ValueError as error:
        raise UsageError(str(error)) from error
    text, params = render(name)
    if as_dvc_args:
        return "".join(f"{word}\n" for word in dvc_args(params))
    if out is not None:
        return f"written: {write_config(out, text, force)} ({name})\n"
    return text


__all__ = [
    "CONFIGS",
    "UsageError",
    "command_output",
    "config_file",
    "dvc_args",
    "listing",
    "render",
    "row_overrides",
    "sweep_for",
    "write_config",
    "yaml_value",
]
