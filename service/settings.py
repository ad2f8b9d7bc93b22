"""The service's settings, all from environment variables, checked once at start.

A missing or malformed setting stops the service before it listens, with a message naming the
variable (``SettingsError``); nothing is guessed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

# name -> (default, meaning); the README and docs/service.md list the same.
DEFAULTS = {
    "RECS_WAREHOUSE": ("warehouse", "directory of the path-based Delta tables (<root>/<table>)"),
    "RECS_TOKEN_ENV": ("RECS_API_TOKEN", "name of the environment variable holding the bearer token"),
    "RECS_ALLOW_NO_AUTH": ("0", "1: serve without a token (local development only)"),
    "RECS_UNKNOWN_USER": ("fallback", "fallback: popular items flagged fallback=true; 404: not found"),
    "RECS_DEFAULT_N": ("10", "list length when the request has no n"),
    "RECS_MAX_N": ("100", "largest n a request may ask for (more: 400)"),
    "RECS_MAX_USER_ID_LENGTH": ("128", "longest user id accepted (more: 400)"),
    "RECS_RELOAD_SECONDS": ("30", "how often the latest Delta version of each table is polled, 0 .. 86400; 0: never"),
    "RECS_DEFAULT_STRATEGY": ("blended", "strategy served without ?strategy= when the table has that column"),
    "RECS_SUPPRESSED_USER": ("fallback", "a suppressed customer: fallback (popular items flagged fallback=true, "
                                         "fallback_reason=suppressed) or 404 (no_personal_content)"),
    "RECS_PSEUDONYM_KEY_ENV": ("", "name of the variable holding the pipeline's pseudonym key (its "
                                   "privacy.key_env); set: raw ids in requests are mapped to their pseudonyms"),
}


# A bearer token shorter than this is guessable by brute force against the API.
MIN_TOKEN_LENGTH = 16
# Polling less often than daily serves a nightly run's output a day late.
MAX_RELOAD_SECONDS = 86_400


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the environment variable."""


@dataclass(frozen=True)
class Settings:
    warehouse: str = "warehouse"
    token: str | None = None
    token_env: str = "RECS_API_TOKEN"
    allow_no_auth: bool = False
    unknown_user: str = "fallback"
    default_n: int = 10
    max_n: int = 100
    max_user_id_length: int = 128
    reload_seconds: float = 30.0
    default_strategy: str = "blended"
    suppressed_user: str = "fallback"
    pseudonym_key: bytes | None = field(default=None, repr=False)

    @property
    def auth_required(self) -> bool:
        return not self.allow_no_auth

    def table_uri(self, table: str) -> str:
        return f"{self.warehouse.rstrip('/')}/{table}"


def _get(env: Mapping[str, str], name: str) -> str:
    value = env.get(name)
    return DEFAULTS[name][0] if value is None or value.strip() == "" else value.strip()


def _int(env: Mapping[str, str], name: str, low: int, high: int) -> int:
    raw = _get(env, name)
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise SettingsError(f"{name}={value} is out of range [{low}, {high}]")
    return value


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = _get(env, name).lower()
    if raw in ("1", "true", "yes"):
        return True
    if raw in ("0", "false", "no"):
        return False
    raise SettingsError(f"{name}={raw!r} must be 1/0 (true/false)")


def from_env(env: Mapping[str, str] | None = None, check_warehouse: bool = True) -> Settings:
    """Read and check every setting; raise ``SettingsError`` naming the first bad one."""
    env = os.environ if env is None else env
    warehouse = _get(env, "RECS_WAREHOUSE")
    if check_warehouse and "://" not in warehouse and not os.path.isdir(warehouse):
        raise SettingsError(f"RECS_WAREHOUSE={warehouse!r} is not a directory (the Delta tables' root)")
    token_env = _get(env, "RECS_TOKEN_ENV")
    allow_no_auth = _flag(env, "RECS_ALLOW_NO_AUTH")
    token = env.get(token_env) or None
    if token is None and not allow_no_auth:
        raise SettingsError(
            f"{token_env} is not set: clients must send 'Authorization: Bearer <{token_env}>' "
            f"(RECS_TOKEN_ENV names this variable; RECS_ALLOW_NO_AUTH=1 serves without auth, local development only)"
        )
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise SettingsError(f"{token_env} holds {len(token)} characters, fewer than {MIN_TOKEN_LENGTH}: use a random "
                            f"token, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    unknown_user = _get(env, "RECS_UNKNOWN_USER").lower()
    if unknown_user not in ("fallback", "404"):
        raise SettingsError(f"RECS_UNKNOWN_USER={unknown_user!r} must be 'fallback' or '404'")
    suppressed_user = _get(env, "RECS_SUPPRESSED_USER").lower()
    if suppressed_user not in ("fallback", "404"):
        raise SettingsError(f"RECS_SUPPRESSED_USER={suppressed_user!r} must be 'fallback' or '404'")
    key_env = _get(env, "RECS_PSEUDONYM_KEY_ENV")
    pseudonym_key = env.get(key_env, "").encode() if key_env else None
    if pseudonym_key is not None and len(pseudonym_key) < 16:
        raise SettingsError(f"{key_env} must hold the pipeline's pseudonym key (at least 16 characters): "
                            "RECS_PSEUDONYM_KEY_ENV names it")
    max_n = _int(env, "RECS_MAX_N", 1, 10_000)
    default_n = _int(env, "RECS_DEFAULT_N", 1, 10_000)
    if default_n > max_n:
        raise SettingsError(f"RECS_DEFAULT_N={default_n} is larger than RECS_MAX_N={max_n}")
    raw_reload = _get(env, "RECS_RELOAD_SECONDS")
    try:
        reload_seconds = float(raw_reload)
    except ValueError:
        raise SettingsError(f"RECS_RELOAD_SECONDS={raw_reload!r} is not a number") from None
    # inf or nan would kill the reload thread at its first wait, leaving stale data behind a healthy /healthz.
    if not 0 <= reload_seconds <= MAX_RELOAD_SECONDS:
        raise SettingsError(f"RECS_RELOAD_SECONDS={raw_reload!r} must be a number of seconds in [0, "
                            f"{MAX_RELOAD_SECONDS}] (0: never reload)")
    return Settings(
        warehouse=warehouse,
        token=token,
        token_env=token_env,
        allow_no_auth=allow_no_auth,
        unknown_user=unknown_user,
        default_n=default_n,
        max_n=max_n,
        max_user_id_length=_int(env, "RECS_MAX_USER_ID_LENGTH", 1, 10_000),
        reload_seconds=reload_seconds,
        default_strategy=_get(env, "RECS_DEFAULT_STRATEGY"),
        suppressed_user=suppressed_user,
        pseudonym_key=pseudonym_key,
    )
