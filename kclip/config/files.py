"""Reading and writing configs: named YAML files (`kclip/configs/NAME.yaml`) or a path, `a.b.c=value` overrides, and
the comparison that guards a resume. Every mistake is one ConfigError line naming the key or the file."""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import yaml

from kclip.config.schema import Config, ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2's float syntax. PyYAML implements YAML 1.1, where a float needs a dot and a signed
    exponent, so `1e-4` or `5e-4` (how learning rates are written) load as strings. Fixing the resolver rather than
    coercing strings in `_check_type` also covers numbers nested in dict fields (`teacher.random_config`, which goes
    to transformers as is) and keeps a quoted "1e-4" a string, as YAML means it."""


_FLOAT_TAG = "tag:yaml.org,2002:float"
# PyYAML's float pattern with the dot optional before an exponent and the exponent's sign optional.
_FLOAT_1_2 = re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)
# Replaced in place: the float pattern is tried before the int one for the same first characters, as in PyYAML.
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, _FLOAT_1_2 if tag == _FLOAT_TAG else regexp) for tag, regexp in resolvers]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _parse_yaml(text: str | bytes, what: str, column_offset: int = 0):
    """`text` as YAML; a syntax error raises one ConfigError line: `what`, then the line and column (the first line's
    columns shifted by `column_offset`, so they count from where the user's text starts)."""
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        column = mark.column + 1 + (column_offset if mark.line == 0 else 0)
        raise ConfigError(f"{what} at line {mark.line + 1}, column {column}: {e.problem or e.context}") from e
    except yaml.YAMLError as e:  # e.g. bytes that are not UTF-8: the reader's message already gives the position
        raise ConfigError(f"{what}: {' '.join(str(e).split())}") from e


def _check_type(key: str, annotation: str, value):
    """Coerce a YAML value to the field's annotated type, or raise naming the key."""
    if value is None:
        if "None" in annotation:
            return None
        raise ConfigError(f"{key}: must not be null")
    kinds = {"bool": bool, "int": int, "float": float, "str": str, "dict": dict, "list": list}
    allowed = [kinds[t.strip()] for t in annotation.split("|") if t.strip() in kinds]
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in allowed):
        return value
    raise ConfigError(f"{key}: expected {annotation}, got {value!r}")


def _update(obj, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise ConfigError(f"{key}: unknown key (valid: {', '.join(sorted(fields))})")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _update(current, value, f"{key}.")
        else:
            setattr(obj, name, _check_type(key, fields[name].type, value))


def apply_override(cfg: Config, override: str) -> None:
    """`a.b.c=value`; the value is parsed as YAML (numbers, booleans, null, lists, mappings)."""
    if "=" not in override:
        raise ConfigError(f"{override}: overrides look like section.key=value")
    dotted, raw = override.split("=", 1)
    nested: dict = _parse_yaml(raw, f"{dotted.strip()}: invalid YAML in override {override!r}",
                              column_offset=len(dotted) + 1) if raw != "" else ""
    for part in reversed(dotted.strip().split(".")):
        nested = {part: nested}
    _update(cfg, nested)


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"--config: no such file {path}")
        return path
    named = CONFIG_DIR / f"{name_or_path}.yaml"
    if not named.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"--config: {name_or_path!r} is neither a YAML file nor a named config ({', '.join(names)})")
    return named


def load_config(name_or_path: str, overrides: list[str] = ()) -> Config:
    cfg = Config()
    path = resolve_config_path(name_or_path)
    # Bytes: the YAML reader decodes them itself, so a file that is not UTF-8 is one ConfigError line, too.
    _update(cfg, _parse_yaml(path.read_bytes(), f"--config: invalid YAML in {path}") or {})
    for override in overrides:
        apply_override(cfg, override)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    cfg = Config()
    _update(cfg, data)
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def diff_configs(a: Config, b: Config, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ (used to refuse resuming under a changed config)."""
    out = []
    for f in dataclasses.fields(a):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(va):
            out += diff_configs(va, vb, f"{prefix}{f.name}.")
        elif va != vb:
            out.append(f"{prefix}{f.name}: {va!r} -> {vb!r}")
    return out
