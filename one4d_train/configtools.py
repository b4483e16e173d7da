"""Config machinery: dataclass defaults -> YAML files (with `_base_` includes) -> command-line dotlist.

Every layer is merged onto the typed schema one at a time, so an unknown key or a wrong type is reported
with the key's full name and the file (or `command line`) it came from. After merging, each dataclass's
`validate()` runs with its path, so value errors name their key too.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from typing import Any, Callable, Iterable

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config problem, naming the key and where it came from."""


def _load_yaml_layers(path: str, seen: tuple[str, ...] = ()) -> list[tuple[str, DictConfig]]:
    """The file's `_base_` files (recursively, in order) followed by the file itself."""
    if not path:
        raise ConfigError("config=: names no file (config=EXPERIMENT.yaml)")
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"{path}: `_base_` include cycle: {' -> '.join(seen + (path,))}")
    if os.path.isdir(path):
        raise ConfigError(f"config={path}: is a folder; a config is a YAML file (configs/experiment/*.yaml)")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml syntax errors
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping")
    bases = node.pop("_base_", [])
    if OmegaConf.is_config(bases):
        bases = OmegaConf.to_container(bases)
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: key '_base_': must be a file name or a list of file names (relative to this "
                          f"file), got {bases!r}")
    layers: list[tuple[str, DictConfig]] = []
    for base in bases:
        base_path = os.path.abspath(os.path.join(os.path.dirname(path), base))
        if not os.path.isfile(base_path):
            raise ConfigError(f"{path}: key '_base_': config file not found: {base_path}")
        # a file two bases both include applies once, where it came first: applied again, it undid what the
        # files between set (a shared defaults file under a model and a data config reverted the model's)
        layered = {q for q, _ in layers}
        layers += [(p, n) for p, n in _load_yaml_layers(base_path, seen + (path,)) if p not in layered]
    layers.append((path, node))
    return layers


def _merge(schema: DictConfig, layer: DictConfig, source: str, origins: dict[str, str]) -> DictConfig:
    """schema <- layer; records in `origins` which source set each (dotted) key."""
    replaced = _container_clashes(schema, layer, source)
    if replaced:  # free-form values the layer gives as the other kind of container: its value replaces them
        schema = copy.deepcopy(schema)
        for *parents, key in replaced:
            node = schema
            for parent in parents:
                node = node._get_node(parent)
            del node[key]
    try:
        merged = OmegaConf.merge(schema, layer)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"{source}: key '{key}': {msg}") from None
    for key in flatten(OmegaConf.to_container(layer, resolve=False)):
        origins[key] = source
    return merged


def _kind(node: Any) -> str | None:
    return "mapping" if OmegaConf.is_dict(node) else "list" if OmegaConf.is_list(node) else None


def _container_clashes(schema: DictConfig, layer: DictConfig, source: str,
                       path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Refuse, naming the key, a layer value that is not the mapping or list the schema has there (a section or a
    mapping given a list or a plain value, a list given a mapping or a plain value): OmegaConf's merge raises a
    bare TypeError for a list onto a mapping and names no key for a plain value onto a section. Inside a free-form
    mapping (train.deepspeed_overrides) a later layer's value replaces the earlier one whatever its kind, as a
    plain value does in OmegaConf: returns the paths of those whose kind changes, to be dropped before merging."""
    replaced: list[tuple[str, ...]] = []
    for key in layer:
        if key not in schema or OmegaConf.is_missing(layer, key) or OmegaConf.is_interpolation(layer, key):
            continue
        node, value = schema._get_node(key), layer._get_node(key)
        want, got = _kind(node), _kind(value)
        if want is None or layer[key] is None:  # a plain key (OmegaConf converts or names it), or null: not Optional
            continue
        if want == got == "mapping":
            replaced += _container_clashes(node, value, source, path + (key,))
        elif want != got and node._metadata.ref_type is Any:
            if got is not None:
                replaced.append(path + (key,))
        elif want != got:
            full = ".".join(path + (key,))
            shown = OmegaConf.to_container(value) if got else layer[key]
            given = f"a {got} {shown!r}" if got else repr(shown)
            if want == "mapping" and dataclasses.is_dataclass(node._metadata.object_type):
                raise ConfigError(f"{source}: key '{full}': is a section: set its keys ({full}.KEY=...) or give "
                                  f"a mapping {{KEY: value, ...}}, not {given}")
            what = "a mapping {key: value, ...}" if want == "mapping" else "a list [a, b, ...]"
            raise ConfigError(f"{source}: key '{full}': must be {what}, got {given}")
    return replaced


Problems = list[tuple[str, str]]  # (key, what is wrong with its value)


def _bad_yaml_item(dotlist: list[str]) -> str:
    """The message for a command line whose values do not all parse as YAML, naming the first that does not."""
    for item in dotlist:
        try:
            OmegaConf.from_dotlist([item])
        except yaml.YAMLError as exc:
            return (f"command line: '{item}': the value is not YAML ({str(exc).splitlines()[0]}); a mapping is "
                    "written {key: value, ...} with a space after each colon, a list [a, b]")
        except OmegaConfBaseException:
            pass
    return f"command line: the values are not YAML: {dotlist}"


def build_config(schema_cls: type, args: Iterable[str] = (), checks: Callable[[Any], Problems] | None = None,
                 prepare: Callable[[Any], Any] | None = None) -> Any:
    """Merge defaults -> `config=FILE` (with its `_base_` chain) -> other `key=value` args, validate, return
    the dataclass instance (`prepare(obj)`'s, when given: e.g. paths resolved). `checks(obj)` then returns problems
    by full key (files, imports: what a command needs beyond valid values); all of them are reported at once."""
    args = list(args)
    files = [a.split("=", 1)[1] for a in args if a.startswith("config=")]
    # `key=` means the empty string (OmegaConf would read it as null)
    dotlist = [a + "''" if a.partition("=")[1] and not a.partition("=")[2] else a
               for a in args if not a.startswith("config=")]
    for item in dotlist:
        if item.startswith("-"):
            raise ConfigError(f"command line: '{item}': settings are written key=value without dashes "
                              "(a config file as config=FILE)")
        if "=" not in item:
            hint = " (a config file is given as config=FILE)" if item.endswith((".yaml", ".yml")) else ""
            raise ConfigError(f"command line: '{item}' is not of the form key=value{hint}")
    cfg = OmegaConf.structured(schema_cls)
    origins: dict[str, str] = {}
    for f in files:
        for source, layer in _load_yaml_layers(f):
            _as_written_in_file(source, cfg)
            cfg = _merge(cfg, layer, source, origins)
    if dotlist:
        dotlist = _text_as_typed(cfg, dotlist)
        try:
            cli = OmegaConf.from_dotlist(dotlist)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"command line: {exc}") from None
        except yaml.YAMLError:  # a value that is not YAML: name the item (a flow mapping needs `key: value` spaces)
            raise ConfigError(_bad_yaml_item(dotlist)) from None
        _as_written(cfg, cli, dotlist)
        cfg = _merge(cfg, cli, "command line", origins)
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"{_origin(key, origins)}: key '{key}': {str(exc).splitlines()[0]}") from None
    validate_tree(obj, origins=origins)
    if prepare is not None:
        obj = prepare(obj)
    if checks is not None:
        problems = checks(obj)
        if problems:
            raise ConfigError("\n".join(f"{_origin(key, origins)}: key '{key}': {problem}" for key, problem in problems))
    return obj


def _node(cfg: DictConfig, key: str):
    """The node of `key` (dotted) in `cfg`, unresolved, or None where there is none."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return None
        node = node._get_node(part)
    return node


def _text_as_typed(cfg: DictConfig, dotlist: list[str]) -> list[str]:
    """A text key's command-line value quoted as YAML text, so that it is the text typed, not what YAML 1.1 reads in
    it: name=2024_01_05 was the integer 20240105, name=1.10 the float 1.1, name=yes True, "run_dir=/x/a #1" the
    path /x/a (the rest a comment), run_dir=&runs an anchor (null), and a value starting with *, @, %, !, |, > or a
    backtick was no YAML at all. A value the user quoted is left as YAML reads it; interpolations (${...}) stay
    interpolations inside the quotes."""
    out = []
    for item in dotlist:
        key, _, raw = item.partition("=")
        field = _node(cfg, key)
        if field is not None and not _kind(field) and field._metadata.ref_type is str and raw \
                and raw[0] not in "'\"":
            item = f"{key}='{raw.replace(chr(39), chr(39) * 2)}'"
        out.append(item)
    return out


_DECIMAL_INT = r"[+-]?(0|[1-9][0-9_]*)"
# (leading zeros only before a point: 017 is YAML's octal, 01.5 its 1.5)
_DECIMAL_FLOAT = r"[+-]?(([0-9][0-9_]*)?\.[0-9_]*|0|[1-9][0-9_]*)([eE][+-]?[0-9]+)?|[+-]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)"
_YAML = "tag:yaml.org,2002:"


def _as_written_in_file(path: str, cfg: DictConfig) -> None:
    """A config file's plain (unquoted) values against their keys' types, as the command line's: YAML 1.1 read
    `name: 2024_01_05` as the integer 20240105, `name: 1.10` as 1.1, `name: yes` as true (each then the text
    '20240105', '1.1', 'True'), `steps: 017` as octal 15 and `steps: 1:30` as base-60 90, silently. A text key
    asks for quotes; a number key for decimal."""
    try:  # the loader OmegaConf.load reads the file with (its float resolver also takes 1e3)
        from omegaconf._yaml import get_yaml_loader
        loader = get_yaml_loader()
    except ImportError:  # pragma: no cover - another OmegaConf layout
        loader = yaml.SafeLoader
    with open(path) as f:
        try:
            root = yaml.compose(f, Loader=loader)
        except yaml.YAMLError:
            return  # (reported by the load, naming the file)

    def walk(node, prefix: str) -> None:
        for k, v in node.value if isinstance(node, yaml.MappingNode) else ():
            key = f"{prefix}{k.value}"
            if isinstance(v, yaml.MappingNode):
                walk(v, key + ".")
                continue
            field = _node(cfg, key)
            plain = isinstance(v, yaml.ScalarNode) and v.style in (None, "")  # (not quoted, not a block)
            if not plain or field is None or _kind(field):
                continue
            kind, tag, raw = field._metadata.ref_type, v.tag.removeprefix(_YAML), v.value
            if kind is str and tag in ("int", "float", "bool", "timestamp"):
                article = "an" if tag == "int" else "a"
                raise ConfigError(f"{path}: key '{key}': {raw} is read by YAML as {article} {tag}, not the text "
                                  f"written: quote it ('{raw}')")
            if (kind is int and tag == "int" and not re.fullmatch(_DECIMAL_INT, raw)) or \
                    (kind is float and tag in ("int", "float") and not re.fullmatch(_DECIMAL_FLOAT, raw)):
                raise ConfigError(f"{path}: key '{key}': {raw} is read by YAML in its octal, hexadecimal, base-60 or "
                                  "binary form: write the number in decimal")
    walk(root, "")


def _as_written(cfg: DictConfig, cli: DictConfig, dotlist: list[str]) -> None:
    """Command-line values as their keys take them, not as YAML 1.1 reads them (text keys: `_text_as_typed`): an
    integer key refuses what is not written in decimal (train.steps=017 was octal 15, 1:30 base-60 90, 0b101 5)."""
    for item in dotlist:
        key, _, raw = item.partition("=")
        field, given = _node(cfg, key), _node(cli, key)
        if field is None or given is None or _kind(field) or _kind(given):
            continue
        kind, value = field._metadata.ref_type, given._value()  # unresolved: an interpolation stays its text
        if kind is bool and isinstance(value, (int, float)) and not isinstance(value, bool) and value not in (0, 1):
            raise ConfigError(f"command line: key '{key}': {raw!r} is no truth value (OmegaConf reads any number "
                              "but 0 as true): write true or false")
        if kind is int and isinstance(value, int) and not isinstance(value, bool) \
                and not re.fullmatch(_DECIMAL_INT, raw.strip()):
            raise ConfigError(f"command line: key '{key}': {raw!r} is read as {value} (YAML's octal, base-60 or "
                              f"binary form): write the number in decimal")
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool) \
                and not re.fullmatch(_DECIMAL_FLOAT, raw.strip()):
            raise ConfigError(f"command line: key '{key}': {raw!r} is read as {value} (YAML's octal, hexadecimal, "
                              f"base-60 or binary form): write the number in decimal")


def _origin(key: str, origins: dict[str, str]) -> str:
    """Where the value of `key` came from; for a check on several keys of one section (named by one of them),
    where the section's keys that were set came from."""
    if key in origins:
        return origins[key]
    inside = sorted({src for k, src in origins.items() if k.startswith(key + ".")})
    if len(inside) == 1:  # a section (or mapping value) set in one place
        return inside[0]
    section = key.rpartition(".")[0]
    sources = sorted({src for k, src in origins.items() if k.startswith(section + ".")}) if section else []
    return f"{' / '.join(sources)} (set keys of '{section}')" if sources else "defaults"


INF_OK = "inf_ok"  # dataclass field metadata: +inf is a meaningful value of this key (e.g. "no cap")


def validate_tree(obj: Any, path: str = "", origins: dict[str, str] | None = None) -> None:
    """Call `validate()` on every dataclass in the tree; problems come back as ConfigError naming the key and,
    with `origins` (key -> the file or "command line" that set it), where its value came from."""
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):  # NaN passes every comparison a validate() makes, inf most
        value = getattr(obj, f.name)
        allowed = (lambda v: v == math.inf) if f.metadata.get(INF_OK) else (lambda v: False)
        if any(isinstance(v, float) and not math.isfinite(v) and not allowed(v)
               for v in (value if isinstance(value, list) else [value])):
            full = f"{path}{f.name}"
            what = "a number (inf allowed)" if f.metadata.get(INF_OK) else "a finite number"
            raise ConfigError(f"{_origin(full, origins or {})}: key '{full}': must be {what}, got {value!r}")
    check = getattr(obj, "validate", None)
    if check is not None:
        for key, problem in check() or []:
            full = f"{path}{key}"
            raise ConfigError(f"{_origin(full, origins or {})}: key '{full}': {problem}")
    for f in dataclasses.fields(obj):
        validate_tree(getattr(obj, f.name), f"{path}{f.name}.", origins)


def to_yaml(obj: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(obj))


def to_dict(obj: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(obj), resolve=True)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists are kept as values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def choice(value: Any, allowed: Iterable[Any], key: str) -> list[tuple[str, str]]:
    allowed = list(allowed)
    return [] if value in allowed else [(key, f"must be one of {allowed}, got {value!r}")]


def in_range(value: float, lo: float | None, hi: float | None, key: str) -> list[tuple[str, str]]:
    bounds = f"in [{lo}, {hi}]" if lo is not None and hi is not None else f">= {lo}" if lo is not None else f"<= {hi}"
    if not math.isfinite(value):  # NaN compares false with both bounds
        return [(key, f"must be a finite number {bounds}, got {value!r}")]
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        return [(key, f"must be {bounds}, got {value!r}")]
    return []
