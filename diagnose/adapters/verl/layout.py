"""Where verl puts a run's files, and which files make up one run (`find_layout`).

What verl 0.8.0.dev writes, relative to the directory training was launched from (``cwd``):

* the file logger (``verl/utils/tracking.py`` ``FileLogger``): ``$VERL_FILE_LOGGER_PATH``, else
  ``$VERL_FILE_LOGGER_ROOT`` (default ``.``) ``/<project_name>/<experiment_name>.jsonl``;
* rollout dumps (``RayPPOTrainer._dump_generations`` via ``_log_rollout_data``):
  ``trainer.rollout_data_dir/<step>.jsonl``, steps 1..N (training starts at step 1);
* validation dumps (the same writer via ``_validate``): ``trainer.validation_data_dir/<step>.jsonl``
  at step 0 (``val_before_train``), every ``test_freq`` steps and the last, each line with an
  extra ``reward`` key;
* checkpoints (``_save_checkpoint``): ``trainer.default_local_dir`` =
  ``checkpoints/<project_name>/<experiment_name>/global_step_<N>/actor`` and
  ``latest_checkpointed_iteration.txt``.

Both dump folders are free-form paths. Each start of ``main_ppo`` (Hydra, no chdir) leaves its
config in ``outputs/<date>/<time>/.hydra/config.yaml``, whose ``trainer`` section names them:
those folders are used first (also outside the given folder), with the kind and experiment the
config gives. Otherwise dump folders are recognised by content, at the given folder, up to two
folders down, or in the experiment's checkpoint folder; nothing in a dump names its
experiment, so with several experiments in one folder a dump folder belongs to the experiment
whose name is one of its path components (else it is left out, with a note): runs are never
merged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
import os
from pathlib import Path
from typing import Any

from diagnose.adapters._common.io import first_object, subdirs, visible_files

STEP_FILE_RE = re.compile(r"^(\d+)\.jsonl$")
_VAL_NAME = re.compile(r"(?:^|[^a-z])(val|valid|validation|test|eval)(?:[^a-z]|$)", re.I)
_SKIP_DIRS = re.compile(r"^(global_step_\d+|checkpoints|huggingface|wandb|tensorboard_log|__pycache__)$")


def kind_of(obj: dict[str, Any] | None) -> str | None:
    """'metrics' | 'dump' | 'other' for a first JSONL object, None if there is none."""
    if obj is None:
        return None
    if isinstance(obj.get("data"), dict) and "step" in obj:
        return "metrics"
    if "messages" in obj or "response_tokens" in obj:
        return "other"
    if "output" in obj or ("input" in obj and "score" in obj):
        return "dump"
    return "other"


def step_files(d: Path) -> list[tuple[int, Path]]:
    out = [(int(m.group(1)), f) for f in visible_files(d) if (m := STEP_FILE_RE.match(f.name))]
    out.sort(key=lambda x: x[0])
    return out


def _sniff(files: list[tuple[int, Path]], n: int = 3) -> list[dict[str, Any]]:
    return [o for _, f in files[:n] if (o := first_object(f)) is not None]


def is_dump_dir(d: Path, strict: bool = True) -> bool:
    """``<step>.jsonl`` files whose first readable line is a dump line (``strict=False``: or
    no readable line at all, so a folder of unreadable dumps is still read and reported)."""
    files = step_files(d)
    if not files:
        return False
    kinds = [kind_of(o) for o in _sniff(files)]
    return "dump" in kinds or (not strict and not kinds)


def is_validation_line(obj: dict[str, Any] | None) -> bool:
    """A validation dump line: ``RayPPOTrainer._validate`` puts ``reward`` first into the extra
    keys, so it follows ``step`` (``_dump_generations`` keeps the key order)."""
    if not obj:
        return False
    keys = list(obj)
    return "step" in keys and keys[keys.index("step") + 1:keys.index("step") + 2] == ["reward"]


def is_validation_dir(d: Path) -> bool:
    """Validation dumps: a step-0 file (training dumps start at step 1), lines with the
    ``reward`` key ``_validate`` adds, or else a folder named like ``val``/``test``/``eval``. A
    folder with a step-0 file whose later files hold training lines is both
    (``validation_data_dir`` = ``rollout_data_dir``): a training folder."""
    files = step_files(d)
    if files and files[0][0] == 0:
        later = _sniff(files[1:])
        return not any(not is_validation_line(o) for o in later)
    objs = _sniff(files)
    if objs and all("reward" in o for o in objs):
        return True
    return bool(_VAL_NAME.search(d.name))


def metrics_files_in(d: Path) -> list[Path]:
    """File-logger JSONL files in ``d`` (``$VERL_FILE_LOGGER_PATH``-style, any name) and one
    folder down (``<root>/<project>/<experiment>.jsonl``), found by content."""
    found = [f for f in visible_files(d) if f.suffix == ".jsonl" and not STEP_FILE_RE.match(f.name)
             and kind_of(first_object(f)) == "metrics"]
    for sub in subdirs(d):
        if _SKIP_DIRS.match(sub.name):
            continue
        found += [f for f in visible_files(sub) if f.suffix == ".jsonl" and not STEP_FILE_RE.match(f.name)
                  and kind_of(first_object(f)) == "metrics"]
    return found


def _dump_dirs(p: Path, strict: bool) -> list[Path]:
    """Dump folders: ``p`` itself, else up to two folders down, plus any in the checkpoint
    folders ``checkpoints/<project>/<experiment>/``."""
    if is_dump_dir(p, strict):
        return [p]
    out: list[Path] = []
    for d in subdirs(p):
        if d.name == "checkpoints":
            for proj in subdirs(d):
                for exp in subdirs(proj):
                    out += [x for x in subdirs(exp) if not _SKIP_DIRS.match(x.name) and is_dump_dir(x, strict)]
            continue
        if _SKIP_DIRS.match(d.name):
            continue
        if is_dump_dir(d, strict):
            out.append(d)
            continue
        out += [x for x in subdirs(d) if not _SKIP_DIRS.match(x.name) and is_dump_dir(x, strict)]
    return out


@dataclass
class VerlRun:
    """The files of one verl experiment."""

    name: str
    metrics: Path | None = None
    dumps: Path | None = None
    validation: list[Path] = field(default_factory=list)
    checkpoints: Path | None = None

    @property
    def experiment(self) -> str:
        return self.name.rsplit("/", 1)[-1]

    def newest(self) -> int:
        t = 0
        for f in [self.metrics] + ([x for _, x in step_files(self.dumps)] if self.dumps else []):
            try:
                t = max(t, f.stat().st_mtime_ns) if f is not None else t
            except OSError:
                pass
        return t


@dataclass
class VerlLayout:
    root: Path
    runs: list[VerlRun]
    notes: list[str] = field(default_factory=list)


def _rel_parts(d: Path, root: Path) -> tuple[str, ...]:
    try:
        return d.relative_to(root).parts
    except ValueError:
        return d.parts


def _owner(d: Path, root: Path, runs: list[VerlRun]) -> VerlRun | None:
    """The run whose experiment name is a component of ``d``'s path (the longest such name)."""
    parts = _rel_parts(d, root)
    hits = [r for r in runs if r.experiment in parts]
    return max(hits, key=lambda r: len(r.experiment)) if hits else None


def _metrics_above(p: Path, levels: int = 2) -> tuple[list[Path], Path | None]:
    """File-logger files of the launch directory above a dump or checkpoint folder ``p``: the
    parent of a ``checkpoints`` ancestor, else up to ``levels`` folders up."""
    anc = list(p.resolve().parents)
    for a in anc:
        if a.name == "checkpoints":
            found = metrics_files_in(a.parent)
            if found:
                return found, a.parent
    for a in anc[:levels]:
        found = metrics_files_in(a)
        if found:
            return found, a
    return [], None


@dataclass(frozen=True)
class Launch:
    """One start of ``verl/trainer/main_ppo.py``, from its Hydra config."""

    config: Path
    run: str | None  # <project_name>/<experiment_name>
    rollout_dir: Path | None
    validation_dir: Path | None


def hydra_launches(cwd: Path, limit: int = 500) -> tuple[list[Launch], list[str]]:
    """verl's ``main_ppo`` runs under ``@hydra.main(version_base=None)``: no chdir, and every
    start (a resume included) writes its composed config to
    ``outputs/<date>/<time>/.hydra/config.yaml`` in the launch folder. Its ``trainer`` section
    names the experiment and its dump folders (literal paths only; ``${...}`` is unresolved)."""
    try:
        import yaml
    except ImportError:
        return [], []
    out: list[Launch] = []
    notes: list[str] = []
    for f in sorted(cwd.glob("outputs/*/*/.hydra/config.yaml"))[:limit]:
        try:
            cfg = yaml.safe_load(f.read_text(encoding="utf-8", errors="replace"))
        except (OSError, yaml.YAMLError) as e:
            notes.append(f"{f}: unreadable Hydra config ({type(e).__name__}); ignored")
            continue
        tr = cfg.get("trainer") if isinstance(cfg, dict) else None
        if not isinstance(tr, dict):
            notes.append(f"{f}: no 'trainer' section (not a Hydra config of verl?); ignored")
            continue

        def where(v: Any) -> Path | None:
            if not isinstance(v, str) or not v or "${" in v:
                return None
            q = Path(v).expanduser()
            return Path(os.path.realpath(q if q.is_absolute() else cwd / q))  # a symlink loop: no RuntimeError

        proj, exp = tr.get("project_name"), tr.get("experiment_name")
        name = f"{proj}/{exp}" if isinstance(proj, str) and isinstance(exp, str) else None
        out.append(Launch(f, name, where(tr.get("rollout_data_dir")), where(tr.get("validation_data_dir"))))
    return out, notes


def find_layout(p: Path, strict: bool = False) -> VerlLayout:
    """The verl runs at folder ``p`` (see the module docstring)."""
    notes: list[str] = []
    dumps = _dump_dirs(p, strict)
    metrics = metrics_files_in(p)
    mroot = p
    if not metrics and (dumps or "checkpoints" in p.resolve().parts):
        metrics, mroot = _metrics_above(p)
        if metrics:
            mine = [f for f in metrics if f.stem in p.resolve().parts]
            if len(metrics) > 1 and len(mine) == 1:
                metrics = mine
            elif len(metrics) > 1:
                notes.append(f"several verl file-logger files in {mroot} ({', '.join(f.name for f in metrics)}) and "
                             f"nothing in {p} names one: none used; pass --metrics PATH")
                metrics = []
    if metrics and mroot != p:
        notes.append(f"trainer metrics: {', '.join(map(str, metrics))} (verl's file logger of the launch folder "
                     f"{mroot}); pass --metrics PATH to read another file")
    runs: list[VerlRun] = []
    for f in metrics:
        name = f.stem if f.parent == mroot else f"{f.parent.name}/{f.stem}"
        ck = (mroot or p) / "checkpoints" / f.parent.name / f.stem
        runs.append(VerlRun(name, metrics=f, checkpoints=ck if ck.is_dir() else None))
    launches, hnotes = hydra_launches(mroot) if mroot is not None else ([], [])
    notes += hnotes
    # the dump folders the launches name (also outside p) are theirs, of the kind they name
    conf_train = {x.rollout_dir: x.run for x in launches if x.rollout_dir is not None}
    conf_val = {x.validation_dir: x.run for x in launches if x.validation_dir is not None}
    for kind, attr, table in (("rollout", "rollout_dir", conf_train), ("validation", "validation_dir", conf_val)):
        sharing: dict[Path, list[str]] = {}
        for x in launches:
            d = getattr(x, attr)
            if d is not None and x.run is not None and x.run not in sharing.setdefault(d, []):
                sharing[d].append(x.run)
        for d, names in sharing.items():
            if len(names) > 1:
                notes.append(f"{d} is the trainer.{kind}_data_dir of {len(names)} experiments ({', '.join(names)}): "
                             f"verl overwrites its <step>.jsonl files, so they are read as the last launched one's "
                             f"({table[d]}); the others' dumps there were overwritten and are not read")
    known = {d.resolve() for d in dumps}
    for d in list(conf_train) + list(conf_val):
        if d not in known and d.is_dir() and is_dump_dir(d, strict) and (p.resolve() == mroot.resolve()):
            dumps.append(d)
            known.add(d)
    train = [d for d in dumps if d.resolve() in conf_train or (d.resolve() not in conf_val and not is_validation_dir(d))]
    val = [d for d in dumps if d not in train]
    by_name = {r.name: r for r in runs}

    def configured(d: Path, table: dict[Path, str | None]) -> VerlRun | None:
        return by_name.get(table.get(d.resolve()) or "")

    for r in runs:
        n = sum(x.run == r.name for x in launches)
        if n > 1:
            notes.append(f"{r.name} was launched {n} times (Hydra outputs/*/*/.hydra/config.yaml): verl's file logger "
                         "truncated its metrics file at each start, so it holds the last launch's steps only")
    if not train and val and p in val:  # pointed at a validation folder: read it, say so
        train, val = [p], []
    logged = list(runs)
    for d in sorted(train, key=lambda d: (0 if re.search(r"rollout|train", d.name, re.I) else 1, str(d))):
        owner = configured(d, conf_train) or _owner(d, p, logged) or (logged[0] if len(logged) == 1 else None)
        if owner is not None and owner.dumps is None:
            owner.dumps = d
        elif owner is None and logged:
            notes.append(f"rollout dumps in {d} name none of the experiments here ({', '.join(r.name for r in logged)}): "
                         "not read (a dump does not say which run wrote it); point diagnose at that folder instead")
        else:  # no file logger here, or a second dump folder of one experiment: a run of its own
            name = "/".join(_rel_parts(d, p)) or "."
            runs.append(VerlRun(name, dumps=d))
    for d in val:
        owner = configured(d, conf_val) or _owner(d, p, runs) or (runs[0] if len(runs) == 1 else None)
        if owner is not None:
            owner.validation.append(d)
        else:
            notes.append(f"validation dumps in {d} belong to no single run here: not read")
    return VerlLayout(p, runs, notes)
