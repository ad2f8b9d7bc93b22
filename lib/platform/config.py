"""Layered job configuration: a base file of typed defaults, an environment overlay, --set overrides.

The base layer is the schema: every key a job understands appears there with a default whose type
is the key's type. Overlays may only use known keys with values of that type, except under the
open tables listed in ``OPEN_TABLES`` (free-form maps such as per-event-type weights or Spark
settings), whose new keys take the type of their siblings. Everything here is a pure function of
already-parsed data; reading files is the job's business.
"""
from __future__ import annotations

import copy
import json
import tomllib
from typing import Any

# Open tables whose values are strings whatever their siblings (their base table is empty).
STRING_TABLES = ("input.columns", "input.event_type_map", "input.item_columns", "products.columns")
# Open tables of tables, e.g. ``[campaigns.<name>]``: a new entry is a table whose keys and types are
# those of its siblings (the base's entries); lib.platform.settings types and validates each entry.
TABLES_OF_TABLES = ("campaigns", "ab_variants")
OPEN_TABLES = ("interactions.weights", "spark.conf", *STRING_TABLES, *TABLES_OF_TABLES)


class ConfigError(ValueError):
    """A configuration value is unknown or has the wrong type; the message names the key."""


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """Parse TOML text, naming ``source`` in the error."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: invalid TOML: {err}") from err


def _type_name(value: Any) -> str:
    return type(value).__name__


def _check_value(key: str, default: Any, value: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects a bool, got {_type_name(value)} {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' expects an int, got {_type_name(value)} {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' expects a float, got {_type_name(value)} {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' expects a string, got {_type_name(value)} {value!r}")
        return value
    if isinstance(default, list):
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' expects a list, got {_type_name(value)} {value!r}")
        if default:
            return [_check_value(f"{key}[]", default[0], item) for item in value]
        return value
    raise ConfigError(f"config key '{key}' has an unsupported default type {_type_name(default)}")


def merge(base: dict[str, Any], overlay: dict[str, Any], prefix: str = "",
          shipped: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return ``base`` updated by ``overlay``; unknown keys and wrong types raise ConfigError.

    ``shipped``: conf/base.toml's table at this level (default ``base``): a new entry of a table of
    tables is typed by the shipped entries, never by one an earlier overlay added."""
    shipped = base if shipped is None else shipped
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        dotted = f"{prefix}{key}"
        if prefix.rstrip(".") in TABLES_OF_TABLES:  # an entry: keys and types of its shipped siblings
            own = base.get(key, {}) if isinstance(base.get(key), dict) else {}
            template = {**next(iter(shipped.values())), **shipped.get(key, {})} if shipped else None
            merged[key] = {**own, **_check_entry(dotted, template, value)}
            continue
        if key not in base:
            parent = prefix.rstrip(".")
            if parent in STRING_TABLES:
                merged[key] = _check_value(dotted, "", value)
                continue
            if parent in OPEN_TABLES:
                sibling = next(iter(base.values()), value)
                merged[key] = _check_value(dotted, sibling, value) if base else value
                continue
            raise ConfigError(f"unknown config key '{dotted}'")
        default = base[key]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' is a table, got {_type_name(value)} {value!r}")
            below = shipped.get(key) if isinstance(shipped.get(key), dict) else default
            merged[key] = merge(default, value, f"{dotted}.", below)
        else:
            merged[key] = _check_value(dotted, default, value)
    return merged


def _check_entry(dotted: str, template: dict[str, Any] | None, value: Any) -> dict[str, Any]:
    """A new entry of a table of tables, its keys and types checked against a sibling entry (if any)."""
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{dotted}' is a table, got {_type_name(value)} {value!r}")
    if template is None:
        return copy.deepcopy(value)
    checked = {}
    for key, item in value.items():
        if key not in template:
            raise ConfigError(f"unknown config key '{dotted}.{key}'")
        checked[key] = _check_value(f"{dotted}.{key}", template[key], item)
    return checked


def _split_key(dotted: str) -> list[str]:
    """Dotted path to parts; under an open table the rest is one key (Spark settings contain dots)."""
    for table in TABLES_OF_TABLES:
        if dotted.startswith(table + "."):
            return table.split(".") + dotted[len(table) + 1:].split(".", 1)
    for table in OPEN_TABLES:
        if dotted.startswith(table + ".") and len(dotted) > len(table) + 1:
            return table.split(".") + [dotted[len(table) + 1:]]
    return dotted.split(".")


def _lookup_default(base: dict[str, Any], dotted: str) -> Any:
    node: Any = base
    parts = _split_key(dotted)
    if len(parts) == 3 and parts[0] in TABLES_OF_TABLES:  # campaigns.<name>.<key>: typed by the siblings
        entries = base.get(parts[0]) or {}
        template = {**next(iter(entries.values()), {}), **entries.get(parts[1], {})}
        if template and parts[2] not in template:
            raise ConfigError(f"unknown config key '{dotted}'")
        return template.get(parts[2], "")
    for depth, part in enumerate(parts):
        if not isinstance(node, dict):
            raise ConfigError(f"unknown config key '{dotted}'")
        if part not in node:
            parent = ".".join(parts[:depth])
            if parent in OPEN_TABLES and depth == len(parts) - 1:
                return next(iter(node.values()), "")
            raise ConfigError(f"unknown config key '{dotted}'")
        node = node[part]
    if isinstance(node, dict):
        raise ConfigError(f"config key '{dotted}' is a table; set one of its keys instead")
    return node


def _parse_scalar(dotted: str, default: Any, text: str) -> Any:
    if isinstance(default, bool):
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"config key '{dotted}' expects a bool (true/false), got {text!r}")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"config key '{dotted}' expects an int, got {text!r}") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"config key '{dotted}' expects a float, got {text!r}") from None
    if isinstance(default, list):
        stripped = text.strip()
        if stripped.startswith("["):
            try:
                items = json.loads(stripped)
            except json.JSONDecodeError as err:
                raise ConfigError(f"config key '{dotted}' expects a JSON list: {err}") from None
        else:
            items = [part.strip() for part in stripped.split(",") if part.strip()]
            if default:
                items = [_parse_scalar(f"{dotted}[]", default[0], part) for part in items]
        return items
    return text


def parse_set(base: dict[str, Any], assignment: str) -> dict[str, Any]:
    """Turn one ``dotted.key=value`` into a nested overlay, parsing value by the key's type."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects dotted.key=value, got {assignment!r}")
    dotted, text = assignment.split("=", 1)
    dotted = dotted.strip()
    value = _parse_scalar(dotted, _lookup_default(base, dotted), text)
    overlay: dict[str, Any] = {}
    node = overlay
    parts = _split_key(dotted)
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return overlay


def resolve(base: dict[str, Any], overlays: list[dict[str, Any]], assignments: list[str]) -> dict[str, Any]:
    """Apply overlays in order, then ``--set`` assignments, validating each against ``base``."""
    config = copy.deepcopy(base)
    for overlay in overlays:
        config = merge(config, overlay, shipped=base)
    for assignment in assignments:
        config = merge(config, parse_set(base, assignment), shipped=base)
    return config
