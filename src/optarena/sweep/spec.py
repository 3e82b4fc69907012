"""Sweep specifications: a TOML ``[base]`` config plus ``[[grid]]`` tables, expanded into runs.

A spec is data, not code: this module parses and validates it without importing torch, so that
a typo is reported in a fraction of a second, before any worker starts. What counts as a valid
training key or optimizer name is passed in by the caller (``optarena sweep`` takes them from
``optarena.train`` and ``optarena.optim``), which keeps this module free of the layers below it.

Every error is a :class:`~optarena.errors.UserError` naming the file, the table and the key.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import re
import sys
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from optarena.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

# Keys a sweep sets per run (``--threads`` for threads): the user must not set them.
RESERVED_KEYS = frozenset({"out", "resume", "threads"})
# Keys that change how a run is executed or logged, never its result: left out of run ids.
EXECUTION_KEYS = RESERVED_KEYS | {
    "parallel",  # how a run is spread over processes ([resources]), not what it computes
    "progress",
    "log_every",
    "tensorboard",
    "wandb",
    "wandb_project",
    "cache_dir",
}
# Keys of a [[grid]] table that are not training-config keys.
GRID_META_KEYS = frozenset({"optimizer", "label", "seeds", "start"})
SWEEP_KEYS = frozenset({"name", "description", "seeds", "lr_reference_width", "task"})
RESOURCE_KEYS = frozenset({"gpus_per_run", "nodes", "procs_per_node", "parallel"})
RANGE_KEYS = frozenset({"from", "to", "per_decade", "num"})
# Significant digits kept for generated values: stable ids across platforms and float noise.
_SIG_DIGITS = 12


@dataclass(frozen=True)
class Run:
    """One point of a sweep: the resolved training config and where it came from.

    ``point`` holds the values of the hyperparameters its grid sweeps (dotted names, seed
    excluded); ``label`` names the series it belongs to (the grid's label or optimizer).
    """

    config: dict[str, Any]
    label: str
    point: dict[str, Any]
    grid: int

    @cached_property
    def id(self) -> str:
        return run_id(self.config)


@dataclass
class Grid:
    """One ``[[grid]]`` table: an optimizer, fixed values, swept values and seeds."""

    index: int
    optimizer: str
    label: str
    fixed: dict[str, Any]  # dotted key -> value
    swept: dict[str, list[Any]]  # dotted key -> values (order kept)
    seeds: list[int]
    start: dict[str, Any] = field(default_factory=dict)  # tuning: first incumbent's values

    def size(self) -> int:
        return math.prod(len(v) for v in self.swept.values()) * len(self.seeds)


@dataclass(frozen=True)
class Resources:
    """What every run of a sweep gets (the ``[resources]`` table): GPUs, nodes, processes.

    More than one process makes each run a distributed run (``parallel``: DDP or FSDP2), launched
    by the backend: ``torchrun`` on one node (local, Ray), Slurm tasks through submitit on
    several. ``gpus_per_run = None`` leaves the choice to the backend (Ray: one GPU per run when
    the cluster has GPUs, none otherwise).
    """

    gpus_per_run: int | None = None
    nodes: int = 1
    procs_per_node: int | None = None  # None: one per GPU of a node (at least 1)
    parallel: str = "fsdp"

    @property
    def gpus_per_node(self) -> int:
        return (self.gpus_per_run or 0) // self.nodes

    @property
    def processes_per_node(self) -> int:
        return self.procs_per_node or max(1, self.gpus_per_node)

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def with_gpus(self, gpus: int | None) -> Resources:
        """These resources with ``gpus_per_run`` set (a command-line flag over the spec)."""
        if gpus is None:
            return self
        return parse_resources({**self.as_table(), "gpus_per_run": gpus}, "--gpus-per-run")

    def as_table(self) -> dict[str, Any]:
        table: dict[str, Any] = {"nodes": self.nodes, "parallel": self.parallel}
        if self.gpus_per_run is not None:
            table["gpus_per_run"] = self.gpus_per_run
        if self.procs_per_node is not None:
            table["procs_per_node"] = self.procs_per_node
        return table


def parse_resources(table: Any, source: str) -> Resources:
    """A validated :class:`Resources` from a ``[resources]`` table."""
    if not isinstance(table, dict):
        raise UserError(f"{source}: 'resources' must be a table: [resources]")
    for key in table:
        if key not in RESOURCE_KEYS:
            raise UserError(
                f"{source}: [resources] has unknown key {key!r}; "
                f"allowed: {', '.join(sorted(RESOURCE_KEYS))}"
            )
    for key, least in (("gpus_per_run", 0), ("nodes", 1), ("procs_per_node", 1)):
        value = table.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < least
        ):
            raise UserError(f"{source}: [resources] {key} must be an integer >= {least}")
    parallel = table.get("parallel", "fsdp")
    if parallel not in ("ddp", "fsdp"):
        raise UserError(f"{source}: [resources] parallel must be 'ddp' or 'fsdp', not {parallel!r}")
    res = Resources(
        table.get("gpus_per_run"), table.get("nodes", 1), table.get("procs_per_node"), parallel
    )
    gpus = res.gpus_per_run or 0
    if gpus % res.nodes:
        raise UserError(
            f"{source}: [resources] gpus_per_run {gpus} is not divisible by nodes {res.nodes}"
        )
    if gpus and res.procs_per_node is not None and res.procs_per_node != res.gpus_per_node:
        raise UserError(
            f"{source}: [resources] procs_per_node {res.procs_per_node} != GPUs per node "
            f"{res.gpus_per_node}: a distributed run has one process per GPU; drop "
            "procs_per_node"
        )
    return res


@dataclass
class SweepSpec:
    """A parsed, validated sweep: ``runs()`` gives its cartesian products, in file order."""

    name: str
    description: str
    base: dict[str, Any]
    grids: list[Grid]
    source: str = "<spec>"
    lr_scale: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    task: str = "train"  # the kind of run (optarena.tasks): train | finetune | ...

    def runs(self) -> list[Run]:
        out: list[Run] = []
        for grid in self.grids:
            keys = list(grid.swept)
            for values in itertools.product(*(grid.swept[k] for k in keys)):
                point = dict(zip(keys, values, strict=True))
                out.extend(self.run_at(grid, point, seed) for seed in grid.seeds)
        return out

    def run_at(self, grid: Grid, point: Mapping[str, Any], seed: int) -> Run:
        """The run of ``grid`` at ``point`` (its swept keys -> values) and ``seed``, built as
        :meth:`runs` builds each of its runs; refinement and tuning add runs through it."""
        config = _merge_dotted(self.base, {**grid.fixed, **point})
        config["optimizer"] = grid.optimizer
        config["seed"] = seed
        _fold_betas(config, where=f"{self.source}: {_where(grid)}")
        return Run(config=config, label=grid.label, point=dict(point), grid=grid.index)


def run_id(config: Mapping[str, Any]) -> str:
    """Stable id of a resolved config: 16 hex digits of SHA-256 over canonical JSON.

    Execution-only keys (``out``, ``resume``, logging) are left out so a run keeps its id
    wherever and however it runs. Key order, int/float spelling of whole numbers and tuples vs
    lists do not matter.
    """
    clean = {k: v for k, v in config.items() if k not in EXECUTION_KEYS}
    blob = json.dumps(_canonical(clean), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


# ----------------------------------------------------------------------------------- loading


def preset_names() -> list[str]:
    """Names of the sweep presets that ship with the package."""
    folder = resources.files("optarena") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def read_spec_text(spec: str | Path) -> tuple[str, str]:
    """``(text, source)`` of a spec given as a file path or a preset name."""
    path = Path(spec)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise UserError(
                f"sweep spec {str(spec)!r} not found; give a TOML file or one of the presets: "
                f"{', '.join(preset_names())}"
            )
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as err:
            raise UserError(
                f"sweep spec {path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at "
                f"offset {err.start}); give a TOML file"
            ) from None
        except OSError as err:
            raise UserError(f"cannot read sweep spec {path}: {err.strerror}") from None
    if str(spec) in preset_names():
        text = (resources.files("optarena") / "presets" / f"{spec}.toml").read_text("utf-8")
        return text, f"preset {spec!r}"
    raise UserError(
        f"no sweep spec file or preset named {str(spec)!r}; presets: {', '.join(preset_names())}"
    )


def load_spec(
    spec: str | Path,
    *,
    config_keys: Collection[str] | None = None,
    optimizers: Collection[str] | None = None,
    overrides: Iterable[str] = (),
    model_widths: Mapping[str, int] | None = None,
    seeds: Sequence[int] | None = None,
) -> SweepSpec:
    """Read a spec (path or preset name), apply ``KEY=VALUE`` overrides to ``[base]``, validate."""
    text, source = read_spec_text(spec)
    return parse_spec(
        text,
        source=source,
        config_keys=config_keys,
        optimizers=optimizers,
        overrides=overrides,
        model_widths=model_widths,
        seeds=seeds,
    )


def parse_spec(
    text: str,
    *,
    source: str = "<spec>",
    config_keys: Collection[str] | None = None,
    optimizers: Collection[str] | None = None,
    overrides: Iterable[str] = (),
    model_widths: Mapping[str, int] | None = None,
    seeds: Sequence[int] | None = None,
) -> SweepSpec:
    """Parse and validate spec text.

    ``config_keys``: the training-config keys a run may set (``None``: not checked).
    ``optimizers``: registered optimizer names (``None``: not checked). ``model_widths``:
    model preset -> width, used when the spec asks for LR scaling (``lr_reference_width``).
    ``seeds`` replaces the seeds of every grid (``--seeds`` on the command line).
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{source}: not valid TOML ({err}); fix the syntax there") from None

    unknown_top = set(data) - {"sweep", "base", "grid", "resources", "tune"}
    if unknown_top:
        key = sorted(unknown_top)[0]
        raise UserError(
            f"{source}: unknown top-level table or key {key!r}; a spec has [sweep], [base], "
            "[resources], [tune] and [[grid]] tables"
        )
    tune = data.get("tune")
    if tune is not None and not isinstance(tune, dict):
        raise UserError(f"{source}: 'tune' must be a table: [tune]")
    resources = parse_resources(data.get("resources", {}), source)
    meta = data.get("sweep", {})
    if not isinstance(meta, dict):
        raise UserError(f"{source}: 'sweep' must be a table: [sweep]")
    for key in meta:
        if key not in SWEEP_KEYS:
            raise UserError(
                f"{source}: [sweep] has unknown key {key!r}; "
                f"allowed: {', '.join(sorted(SWEEP_KEYS))}"
            )
    base = data.get("base", {})
    if not isinstance(base, dict):
        raise UserError(f"{source}: 'base' must be a table: [base]")
    base = dict(base)
    for item in overrides:
        _apply_override(base, item)
    _check_config_keys(base, "[base]", source, config_keys)

    grids_raw = data.get("grid")
    if not grids_raw or not isinstance(grids_raw, list):
        raise UserError(f"{source}: no [[grid]] table; add at least one with an optimizer and lr")

    default_seeds = _parse_seeds(meta.get("seeds", [0]), "[sweep]", source)
    lr_scale = _lr_scale(meta, base, source, model_widths)
    if "lr" in base:
        base["lr"] = _scale(base["lr"], lr_scale)
    grids = [
        _parse_grid(i, raw, source, config_keys, optimizers, default_seeds, lr_scale, "lr" in base)
        for i, raw in enumerate(grids_raw)
    ]
    if seeds is not None:
        chosen = _parse_seeds(list(seeds), "--seeds", source)
        for grid in grids:
            grid.seeds = chosen
    spec = SweepSpec(
        name=_folder_name(
            meta.get("name", Path(source).stem if source.endswith(".toml") else "sweep"), source
        ),
        description=str(meta.get("description", "")),
        base=base,
        grids=grids,
        source=source,
        lr_scale=lr_scale,
        resources=resources,
        extra={} if tune is None else {"tune": dict(tune)},
        task=spec_task(meta, source),
    )
    spec.runs()  # resolve once so beta folding errors surface now
    return spec


def spec_task(meta: Mapping[str, Any], source: str) -> str:
    """``[sweep] task``: the kind of every run (``train`` unless given), a known one."""
    from optarena.tasks import DEFAULT_TASK, TASKS

    task = meta.get("task", DEFAULT_TASK)
    if task not in TASKS:
        raise UserError(f"{source}: [sweep] task {task!r} is not one of {', '.join(TASKS)}")
    return task


def peek_task(text: str) -> str | None:
    """The ``[sweep] task`` of spec text without validating the rest (None: unreadable)."""
    try:
        meta = tomllib.loads(text).get("sweep", {})
    except tomllib.TOMLDecodeError:
        return None
    task = meta.get("task") if isinstance(meta, dict) else None
    return task if isinstance(task, str) else None


def _folder_name(value: Any, source: str) -> str:
    """``[sweep] name``: it names the default output folder ``runs/NAME``, so it must be one
    plain folder name (no separators, not ``.`` or ``..``)."""
    name = str(value)
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise UserError(
            f"{source}: [sweep] name {name!r} must be one folder name (no '/', not '..'): it "
            "names the output folder runs/NAME; pass --out to write elsewhere"
        )
    return name


def _where(grid: Grid | int, optimizer: str | None = None) -> str:
    if isinstance(grid, Grid):
        index, optimizer = grid.index, grid.optimizer
    else:
        index = grid
    name = f" (optimizer {optimizer!r})" if optimizer else ""
    return f"[[grid]] #{index + 1}{name}"


def _parse_grid(
    index: int,
    raw: Any,
    source: str,
    config_keys: Collection[str] | None,
    optimizers: Collection[str] | None,
    default_seeds: list[int],
    lr_scale: float,
    has_base_lr: bool,
) -> Grid:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: {_where(index)} must be a table")
    optimizer = raw.get("optimizer")
    where = _where(index, optimizer if isinstance(optimizer, str) else None)
    if not isinstance(optimizer, str) or not optimizer:
        raise UserError(f'{source}: {where} has no optimizer; add optimizer = "adamw" (or another)')
    if optimizers is not None and optimizer not in optimizers:
        close = _closest(optimizer, optimizers)
        hint = f"did you mean {close!r}? " if close else ""
        raise UserError(
            f"{source}: {where}: unknown optimizer {optimizer!r}; {hint}see `optarena list`"
        )
    label = raw.get("label", optimizer)
    if not isinstance(label, str) or not label:
        raise UserError(f"{source}: {where}: label must be a non-empty string")
    seeds = _parse_seeds(raw.get("seeds", default_seeds), where, source)
    body = {k: v for k, v in raw.items() if k not in GRID_META_KEYS}
    _check_config_keys(body, where, source, config_keys)

    fixed: dict[str, Any] = {}
    swept: dict[str, list[Any]] = {}
    for key, value in _flatten(body):
        values = _parse_values(value, f"{where}, key {key!r}", source)
        if values is None:
            fixed[key] = _unwrap_value(value)
            continue
        if _is_lr_key(key):
            values = [_scale(v, lr_scale) for v in values]
        if len(set(map(_hashable, values))) != len(values):
            raise UserError(f"{source}: {where}, key {key!r}: a value is listed twice; remove it")
        swept[key] = values
    if "lr" not in fixed and "lr" not in swept and not has_base_lr:
        raise UserError(f"{source}: {where} sets no lr; add lr = 1e-3 or a list or range of LRs")
    for key in fixed:
        if _is_lr_key(key):
            fixed[key] = _scale(fixed[key], lr_scale)
    start = _parse_start(raw.get("start", {}), swept, lr_scale, where, source)
    return Grid(index, optimizer, label, fixed, swept, seeds, start)


def _parse_start(
    raw: Any, swept: Mapping[str, list[Any]], lr_scale: float, where: str, source: str
) -> dict[str, Any]:
    """``start = {lr = 1e-3, "hparams.weight_decay" = 0.1}``: where tuning begins, each value
    one of its key's swept values."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: {where}: start must be a table, e.g. start = {{lr = 1e-3}}")
    start: dict[str, Any] = {}
    for key, value in _flatten(raw):
        if key not in swept:
            raise UserError(
                f"{source}: {where}: start sets {key!r}, which the grid does not sweep; "
                f"swept: {', '.join(swept) or 'nothing'}"
            )
        value = _scale(_round(value), lr_scale) if _is_lr_key(key) else _round(value)
        match = next((v for v in swept[key] if _same_value(v, value)), None)
        if match is None:
            raise UserError(
                f"{source}: {where}: start {key} = {value!r} is not one of its values "
                f"({', '.join(map(str, swept[key]))}); pick one of them"
            )
        start[key] = match
    return start


def _same_value(a: Any, b: Any) -> bool:
    """Equal, or numbers within 1% (``3.16e-3`` names the range's ``3.16227766017e-3``)."""
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    if numbers:
        return a == b or abs(a - b) <= 0.01 * max(abs(a), abs(b))
    return _hashable(a) == _hashable(b)


def _flatten(table: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    """Dotted keys of a grid table; ``hparams`` sub-tables are walked, value tables are leaves."""
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not (set(value) & (RANGE_KEYS | {"value"})):
            yield from _flatten(value, name + ".")
        else:
            yield name, value


def _parse_values(value: Any, where: str, source: str) -> list[Any] | None:
    """Values to sweep for one key, or ``None`` when the key is fixed."""
    if isinstance(value, list):
        if not value:
            raise UserError(f"{source}: {where}: empty list; give at least one value")
        return [_round(v) if isinstance(v, float) else v for v in value]
    if isinstance(value, dict) and "value" not in value:
        return _log_range(value, where, source)
    return None


def _unwrap_value(value: Any) -> Any:
    if isinstance(value, dict):  # {value = [0.9, 0.95]}: a fixed list-valued setting
        return value["value"]
    return value


def _log_range(spec: Mapping[str, Any], where: str, source: str) -> list[float]:
    """``{from, to, per_decade}`` or ``{from, to, num}``: log-spaced values, both ends included."""
    unknown = set(spec) - RANGE_KEYS
    if unknown:
        raise UserError(
            f"{source}: {where}: unknown range key {sorted(unknown)[0]!r}; a range is "
            "{from = 1e-4, to = 1, per_decade = 2} or {from = ..., to = ..., num = 5}"
        )
    if "from" not in spec or "to" not in spec:
        raise UserError(f"{source}: {where}: a range needs both 'from' and 'to'")
    lo, hi = spec["from"], spec["to"]
    for name, v in (("from", lo), ("to", hi)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise UserError(
                f"{source}: {where}: range '{name}' must be a positive number (got {v!r}); "
                "log-spaced ranges cannot include 0"
            )
    if lo > hi:
        raise UserError(
            f"{source}: {where}: range has from={lo} > to={hi}; swap them so that from <= to"
        )
    has_pd, has_num = "per_decade" in spec, "num" in spec
    if has_pd == has_num:
        raise UserError(f"{source}: {where}: a range needs exactly one of 'per_decade' or 'num'")
    count_key = "per_decade" if has_pd else "num"
    count = spec[count_key]
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UserError(
            f"{source}: {where}: range '{count_key}' must be a whole number >= 1 (got {count!r})"
        )
    decades = math.log10(hi / lo)
    if has_pd:
        steps = math.floor(decades * count + 1e-9)
        return [_round(lo * 10 ** (k / count)) for k in range(steps + 1)]
    if count == 1:
        if lo != hi:
            raise UserError(f"{source}: {where}: num = 1 needs from == to; use num >= 2")
        return [_round(lo)]
    return [_round(lo * 10 ** (decades * k / (count - 1))) for k in range(count)]


def _parse_seeds(value: Any, where: str, source: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in value)
    ):
        raise UserError(f"{source}: {where}: seeds must be a list of integers, e.g. seeds = [0, 1]")
    if len(set(value)) != len(value):
        raise UserError(f"{source}: {where}: seeds lists a seed twice; remove the duplicate")
    if any(s < 0 for s in value):
        raise UserError(f"{source}: {where}: seeds must be 0 or more, not {min(value)}")
    return list(value)


def _check_config_keys(
    table: Mapping[str, Any],
    where: str,
    source: str,
    config_keys: Collection[str] | None,
) -> None:
    for key in table:
        if key in RESERVED_KEYS:
            fix = "use --threads" if key == "threads" else "runs go to OUT/runs/<id>/"
            raise UserError(
                f"{source}: {where}: key {key!r} is set by the sweep itself ({fix}); remove it"
            )
        if key == "optimizer":  # only reachable from [base]: grids take it out first
            raise UserError(
                f"{source}: {where}: key 'optimizer' belongs in each [[grid]] table; move it there"
            )
        if key == "seed":
            raise UserError(
                f"{source}: {where}: key 'seed' is set per run; write seeds = [0, 1] in [sweep] "
                "or in a [[grid]] table instead"
            )
        if key == "hparams":
            if not isinstance(table[key], dict):
                raise UserError(
                    f"{source}: {where}: 'hparams' must be a table of optimizer hyperparameters, "
                    "e.g. hparams.momentum = 0.9"
                )
            continue
        if config_keys is not None and key not in config_keys:
            close = _closest(key, config_keys)
            hint = f"did you mean {close!r}? " if close else ""
            example = "hparams.momentum" if isinstance(table[key], dict) else f"hparams.{key}"
            raise UserError(
                f"{source}: {where}: unknown training key {key!r}; {hint}optimizer "
                f"hyperparameters go in the hparams table ({example} = ...)"
            )


def _apply_override(base: dict[str, Any], item: str) -> None:
    """``--set steps=100`` / ``--set hparams.eps=1e-8``: values parsed as TOML, else strings."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w.-]*", key):
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set steps=200")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    node = base
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {item!r}: {part!r} is not a table in [base]")
    node[parts[-1]] = value


def _lr_scale(
    meta: Mapping[str, Any],
    base: Mapping[str, Any],
    source: str,
    model_widths: Mapping[str, int] | None,
) -> float:
    """Factor that moves the study's LR grids to the chosen model width, in half decades.

    The study tuned its grids at width 1024; the optimal LR of Adam-like methods grows as the
    width shrinks (roughly 1/width). Snapping the factor to a power of sqrt(10) keeps every
    point on the study's half-decade lattice.
    """
    ref = meta.get("lr_reference_width")
    if ref is None:
        return 1.0
    if isinstance(ref, bool) or not isinstance(ref, int) or ref <= 0:
        raise UserError(f"{source}: [sweep]: lr_reference_width must be a positive integer")
    model = base.get("model")
    if model_widths is None or not isinstance(model, str) or model not in model_widths:
        return 1.0
    half_decades = round(2 * math.log10(ref / model_widths[model]))
    return 10 ** (half_decades / 2)


def _is_lr_key(key: str) -> bool:
    """Learning-rate keys (``lr``, ``hparams.adaptive_lr``): the ones width scaling shifts."""
    last = key.rsplit(".", 1)[-1]
    return last == "lr" or last.endswith("_lr")


def _scale(value: Any, factor: float) -> Any:
    if factor == 1.0 or isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return _round(value * factor)


def _fold_betas(config: dict[str, Any], where: str) -> None:
    """``hparams.beta1`` / ``hparams.beta2`` (for 1-D sweeps) become torch's ``betas`` pair."""
    hparams = config.get("hparams")
    if not isinstance(hparams, dict) or not ({"beta1", "beta2"} & set(hparams)):
        return
    betas = hparams.get("betas")
    if betas is None:
        missing = "beta2" if "beta1" in hparams else "beta1"
        if missing not in hparams:
            raise UserError(
                f"{where}: hparams.{'beta1' if missing == 'beta2' else 'beta2'} needs its partner; "
                f"also set hparams.betas = {{value = [0.9, 0.95]}} or hparams.{missing}"
            )
        betas = [None, None]
    betas = list(betas)
    if "beta1" in hparams:
        betas[0] = hparams.pop("beta1")
    if "beta2" in hparams:
        betas[1] = hparams.pop("beta2")
    hparams["betas"] = betas


def _merge_dotted(base: Mapping[str, Any], dotted: Mapping[str, Any]) -> dict[str, Any]:
    config = json.loads(json.dumps(base))  # deep copy of plain TOML data
    for key, value in dotted.items():
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return config


def rounded(value: Any) -> Any:
    """A generated float as the spec stores it (12 significant digits): stable run ids."""
    return _round(value)


def _round(value: Any) -> Any:
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.{_SIG_DIGITS}g}")
    return value


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True)


def _closest(name: str, choices: Collection[str]) -> str | None:
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None
