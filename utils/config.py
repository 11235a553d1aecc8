"""Typed configs: frozen dataclasses, YAML profiles and type-checked ``--set a.b=value`` overrides.

A config is built in layers, each validated against the dataclass schema:

1. the dataclass defaults (the paper's values);
2. the profile YAML (``configs/<name>.yaml`` or a path), following its ``extends:`` chain. Its shared sections
   (``run``, ``paths``, ``data``, ``model``, ...) apply to every stage; its ``stage<k>:`` section to stage k only;
3. the fixed command-line arguments (``--subj``, ``--exp``, ``--mode``);
4. ``--set`` overrides, in order.

An unknown key, a bad value type or a bad YAML file is a :class:`ConfigError` with a one-line message that names the
key, its source and the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeGuard, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from utils.errors import ConfigError
from utils.stage_configs import (
    SHARED_SECTIONS,
    STAGE_CONFIGS,
    STAGE_KEY_OF,
    STAGE_SECTIONS,
    TOOL_CONFIGS,
    SharedConfig,
)
from utils.stages import PROFILES

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
BUILTIN_PROFILES = PROFILES

C = TypeVar("C", bound=SharedConfig)  # a stage's (or tool's) config class
D = TypeVar("D", bound="DataclassInstance")  # any config dataclass, a section included


# --------------------------------------------------------------------------------------------------------------------
# schema helpers


def _hints(cls: type[DataclassInstance]) -> dict[str, Any]:
    return get_type_hints(cls)


def _is_section(tp: Any) -> TypeGuard[type[DataclassInstance]]:
    """Whether a field's type is a nested config section (a dataclass) rather than a value."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def dotted_keys(cls: type[DataclassInstance], prefix: str = "", sections: bool = False) -> list[str]:
    """Leaf keys of a dataclass schema, e.g. ``["train.batch_size", ...]`` (with ``sections``: also ``"train"``)."""
    keys = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if _is_section(tp):
            keys += [f"{prefix}{f.name}"] if sections else []
            keys += dotted_keys(tp, f"{prefix}{f.name}.", sections)
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _nearest(key: str, candidates: Iterable[str]) -> str:
    candidates = list(candidates)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not close:  # compare the last component too: "batchsize" -> "train.batch_size"
        tails = {c.rsplit(".", 1)[-1]: c for c in candidates}
        hit = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(tails), n=1, cutoff=0.6)
        close = [tails[hit[0]]] if hit else []
    return f"did you mean '{close[0]}'?" if close else f"valid keys start with: {_roots(candidates)}"


def _roots(keys: Iterable[str]) -> str:
    return ", ".join(sorted({k.split(".", 1)[0] for k in keys}))


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return ", or ".join(_type_name(a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list of {_type_name(args[0])}"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return ``value`` checked (and losslessly converted) against type ``tp``."""
    origin, args = get_origin(tp), get_args(tp)

    def bad() -> ConfigError:
        return ConfigError(
            f"bad value {value!r} for '{key}' from {source}: expected {_type_name(tp)}",
            f"set '{key}' to a value of type {_type_name(tp)}",
        )

    if tp is Any:
        return value
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(
            f"bad value {value!r} for '{key}' from {source}",
            f"use one of {', '.join(repr(a) for a in args)}",
        )
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                continue
        raise bad()
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            return float(value) if isinstance(value, str) else _raise(bad())
        except ValueError:
            raise bad() from None
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):  # YAML reads `exp=1` as an int
            return str(value)
        raise bad()
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise bad()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad()
        return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad()
        return {str(k): _coerce(v, args[1], f"{key}.{k}", source) for k, v in value.items()}
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a schema bug, not a user error


def _raise(err: Exception) -> Any:
    raise err


def build(cls: type[D], data: Mapping[str, Any] | None, source: str, prefix: str = "", base: D | None = None) -> D:
    """Build dataclass ``cls`` from ``data`` on top of ``base`` (default: the defaults), type-checking each key."""
    data = dict(data or {})
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            full = f"{prefix}{key}"
            raise ConfigError(
                f"unknown config key '{full}' in {source}", _nearest(full, dotted_keys(cls, prefix, sections=True))
            )
    base = base if base is not None else cls()
    kwargs = {}
    for f in dataclasses.fields(cls):
        current = getattr(base, f.name)
        if f.name not in data:
            kwargs[f.name] = current
            continue
        tp, value = hints[f.name], data[f.name]
        if _is_section(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"'{prefix}{f.name}' from {source} must be a mapping of keys",
                    f"write it as '{prefix}{f.name}.<key>=value'",
                )
            kwargs[f.name] = build(tp, value, source, f"{prefix}{f.name}.", current)
        elif get_origin(tp) is dict and isinstance(value, Mapping) and current:
            kwargs[f.name] = _merge_known(current, value, tp, f"{prefix}{f.name}", source)
        else:
            kwargs[f.name] = _coerce(value, tp, f"{prefix}{f.name}", source)
    return cls(**kwargs)


def _merge_known(
    current: Mapping[str, Any], value: Mapping[str, Any], tp: Any, key: str, source: str
) -> dict[str, Any]:
    """Update a non-empty dict field key by key; its key set is fixed by the defaults (typos are errors)."""
    for name in value:
        if name not in current:
            raise ConfigError(
                f"unknown config key '{key}.{name}' in {source}",
                _nearest(f"{key}.{name}", [f"{key}.{k}" for k in current]),
            )
    return {**current, **_coerce(dict(value), tp, key, source)}


# --------------------------------------------------------------------------------------------------------------------
# profiles and overrides


def resolve_profile(profile: str) -> Path:
    """Map a built-in profile name (:data:`utils.stages.PROFILES`) or a YAML path to its file."""
    if profile in BUILTIN_PROFILES:
        return CONFIG_DIR / f"{profile}.yaml"
    path = Path(profile)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(
                f"profile file {path} does not exist", f"pass an existing YAML file or one of {', '.join(PROFILES)}"
            )
        return path
    raise ConfigError(f"unknown profile '{profile}'", f"use one of {', '.join(PROFILES)}, or a path to a .yaml file")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"bad YAML in {path}{where}: {problem}", "fix the YAML syntax in that file") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}", "check the path") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections", "start the file with 'section:' keys")
    return data


def load_profile(profile: str, _seen: tuple[Path, ...] = ()) -> list[tuple[str, dict[str, Any]]]:
    """Return the profile's layers, base first: ``[(source, mapping), ...]`` following ``extends:``, which names one
    profile or a list of them (layered left to right, so a later one overrides an earlier one)."""
    path = resolve_profile(profile)
    if path.resolve() in _seen:
        raise ConfigError(f"profile {path} extends itself in a cycle", "remove the cyclic 'extends:' entry")
    data = read_yaml(path)
    parents = data.pop("extends", None)
    if parents is not None and not isinstance(parents, list):
        parents = [parents]
    layers: list[tuple[str, dict[str, Any]]] = []
    for parent in parents or []:
        parent_ref = str(parent)
        if parent_ref not in BUILTIN_PROFILES and not Path(parent_ref).is_absolute():
            parent_ref = str(path.parent / parent_ref)
        layers += load_profile(parent_ref, (*_seen, path.resolve()))
    return [*layers, (f"profile {path}", data)]


def parse_set(items: Iterable[str]) -> list[tuple[str, dict[str, Any]]]:
    """Turn ``["train.batch_size=8", ...]`` into nested mappings, one layer each, values parsed as YAML scalars."""
    layers = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"bad override '{item}'", "write overrides as --set section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        nested: dict[str, Any] = {}
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        layers.append((f"--set {item}", nested))
    return layers


def split_profile_layer(
    data: Mapping[str, Any], section: str | None, cls: type[SharedConfig], source: str
) -> dict[str, Any]:
    """Pick from one profile mapping the shared sections that ``cls`` has plus its own ``section`` block."""
    own = {f.name for f in dataclasses.fields(cls)}
    known = set(SHARED_SECTIONS) | set(STAGE_SECTIONS.values())
    picked: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            if key in all_stage_sections():
                raise ConfigError(
                    f"section '{key}' in {source} is stage-specific",
                    f"nest it under a stage block, e.g. 'stage1: {{{key}: ...}}'",
                )
            raise ConfigError(f"unknown section '{key}' in {source}", _nearest(key, sorted(known)))
        if key in own and key in SHARED_SECTIONS:
            picked[key] = value
    stage_block = (data.get(section) if section else None) or {}
    if not isinstance(stage_block, Mapping):
        raise ConfigError(f"section '{section}' in {source} must be a mapping", f"write '{section}:' then keys")
    return _deep_merge(picked, stage_block)


def _deep_merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    cls: type[C],
    profile: str = "paper",
    overrides: Iterable[str] = (),
    cli: Mapping[str, Any] | None = None,
) -> C:
    """Build a ``cls`` (a stage's config class, e.g. ``Stage1Config``, or a tool's) from defaults, profile, CLI and
    ``--set``; a stage's config also takes its own ``stage<k>:`` profile block and ``stage<k>.`` overrides."""
    key = STAGE_KEY_OF.get(cls)
    section = STAGE_SECTIONS[key] if key is not None else None
    cfg = cls()
    for source, data in load_profile(profile):
        cfg = build(cls, split_profile_layer(data, section, cls, source), source, base=cfg)
    run_layer = {"run": {"profile": profile, **{k: v for k, v in (cli or {}).items() if v is not None}}}
    cfg = build(cls, run_layer, "the command line", base=cfg)
    for source, data in parse_set(overrides):
        data = _for_stage(data, section)
        if data:
            cfg = build(cls, data, source, base=cfg)
    return cfg


def _for_stage(data: dict[str, Any], section: str | None) -> dict[str, Any]:
    """``--set stage3.sample.batch_size=4`` applies to stage 3 only (and is skipped by the other stages), so one list
    of overrides can serve a whole driver run; keys without a stage prefix apply to every stage."""
    ((key, value),) = data.items()
    if key in STAGE_SECTIONS.values():
        return value if key == section else {}
    return data


# --------------------------------------------------------------------------------------------------------------------
# serialisation


def to_dict(cfg: DataclassInstance) -> dict[str, Any]:
    """Plain nested dict (tuples become lists), suitable for YAML/JSON and checkpoints."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def to_yaml(cfg: DataclassInstance) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def from_dict(cls: type[D], data: Mapping[str, Any], source: str = "a saved config") -> D:
    return build(cls, data, source)


def config_hash(cfg: DataclassInstance) -> str:
    """Short, stable hash of the resolved config (12 hex digits)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict → ``{"section.key": value}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_diff(cls: type[C], profile: str, other: str, overrides: Iterable[str] = (),
                cli: Mapping[str, Any] | None = None) -> list[tuple[str, Any, Any]]:  # fmt: skip
    """The resolved keys of ``cls`` that differ between two profiles (same ``--set`` and CLI values), sorted:
    ``[(dotted key, value under profile, value under other)]``; ``run.profile`` itself is left out."""
    a = _flatten(to_dict(load_config(cls, profile, overrides, cli)))
    b = _flatten(to_dict(load_config(cls, other, overrides, cli)))
    keys = sorted((a.keys() | b.keys()) - {"run.profile"})
    return [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)]


def run_dir(cfg: SharedConfig) -> Path:
    """``<exp_root>/exp_<exp>/subj_<subj>``; a subject set's folder names every subject: ``subj_1-2-3``, and a set's
    decoding pass of subject k (``run.decode_subj``) has its own folder inside it, ``subj_1-2-3/subj_k``."""
    root = Path(cfg.paths.exp_root) / f"exp_{cfg.run.exp}" / f"subj_{'-'.join(map(str, cfg.run.subjects))}"
    return root / f"subj_{cfg.run.decode_subj}" if cfg.run.decode_subj else root


def all_stage_sections() -> set[str]:
    """Every field name of every stage config (``train``, ``sample``, ``eval``, ...)."""
    names: set[str] = set()
    for cls in [*STAGE_CONFIGS.values(), *TOOL_CONFIGS.values()]:
        names |= {f.name for f in dataclasses.fields(cls)}
    return names
