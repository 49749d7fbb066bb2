"""Standalone mode: the settings file and the JSON documents it names, polled for changes."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from txmail_relay.config.live import DynamicConfig, LiveConfig
from txmail_relay.contract import CredentialEntry, RelayConfig, TemplateEntry
from txmail_relay.settings import (
    Settings,
    SettingsError,
    describe_json,
    describe_validation,
    load_settings,
    read_text,
)

log = logging.getLogger(__name__)

_Entry = TypeVar("_Entry", CredentialEntry, TemplateEntry)
T = TypeVar("T")


def credentials_from_json(text: str) -> dict[str, CredentialEntry]:
    """A credentials file: a list of entries, or an object username -> entry (or its JSON)."""
    return {e.username: e for e in _entries(json.loads(text), CredentialEntry)}


def templates_from_json(text: str) -> dict[int, TemplateEntry]:
    """A templates file: a list of entries, or an object emailId -> entry (or its JSON)."""
    return {e.email_id: e for e in _entries(json.loads(text), TemplateEntry)}


def _entries(doc: Any, model: type[_Entry]) -> list[_Entry]:
    values: Iterable[Any]
    if isinstance(doc, list):
        values = doc
    elif isinstance(doc, dict):
        values = doc.values()
    else:
        raise TypeError("expected a JSON list or object")
    return [
        model.model_validate_json(v) if isinstance(v, str) else model.model_validate(v)
        for v in values
    ]


def _relay_from_json(text: str) -> RelayConfig:
    return RelayConfig.model_validate(json.loads(text))


def _parse_file(path: Path, parse: Callable[[str], T]) -> T:
    """Read and parse one JSON file; any problem is a :class:`SettingsError` naming it."""
    text = read_text(path)
    try:
        return parse(text)
    except json.JSONDecodeError as exc:
        raise SettingsError(path, describe_json(exc)) from None
    except ValidationError as exc:
        raise SettingsError(path, describe_validation(exc)) from None
    except (TypeError, ValueError) as exc:
        raise SettingsError(path, str(exc)) from None


def load_dynamic(settings: Settings) -> DynamicConfig:
    """Assemble the snapshot a settings file describes (inline documents and JSON files).

    Raises :class:`SettingsError` naming the first file that cannot be used.
    """
    if settings.relay_file is not None:
        relay = _parse_file(settings.relay_file, _relay_from_json)
    elif settings.relay is not None:
        relay = settings.relay
    else:
        raise ValueError("settings name no relay configuration")
    credentials = {e.username: e for e in settings.credentials}
    for path in settings.credential_files:
        credentials.update(_parse_file(path, credentials_from_json))
    templates = {t.email_id: t for t in settings.templates}
    for path in settings.template_files:
        templates.update(_parse_file(path, templates_from_json))
    return DynamicConfig(relay=relay, credentials=credentials, templates=templates)


def _fingerprint(paths: Iterable[Path]) -> tuple[tuple[str, int, int, int], ...]:
    result = []
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            result.append((str(p), -1, -1, -1))
        else:
            result.append((str(p), st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(result)


class FileConfigSource:
    """Standalone mode: the settings file and the JSON files it names, polled for changes.

    A file that cannot be used (a YAML or JSON syntax error, an invalid document, a file
    missing for a moment) is logged in one line, once per change, and the previous snapshot
    stays in force; the next change is tried again, so fixing the file is enough. Only the
    dynamic documents are reloaded: listen ports, TLS files, spool and limits apply at start.
    """

    def __init__(self, path: Path, poll_interval: float = 1.0) -> None:
        self._path = path
        self._poll_interval = poll_interval

    def _watched(self, settings: Settings | None) -> list[Path]:
        paths = [self._path]
        if settings is not None:
            if settings.relay_file is not None:
                paths.append(settings.relay_file)
            paths += settings.credential_files + settings.template_files
        return paths

    async def run(self, store: LiveConfig) -> None:
        settings: Settings | None = None
        seen: tuple[tuple[str, int, int, int], ...] = ()
        while True:
            current = _fingerprint(self._watched(settings))
            if current != seen:
                try:
                    settings = load_settings(self._path)  # names the files to watch next
                    config = load_dynamic(settings)
                except SettingsError as exc:
                    log.error(  # noqa: TRY400 - the reason is enough, no traceback
                        "configuration not loaded, keeping the previous one: %s", exc
                    )
                except Exception as exc:  # a bug must not end reloading for good
                    log.exception(
                        "configuration not loaded, keeping the previous one: %s",
                        type(exc).__name__,
                    )
                else:
                    store.publish(config)
                    log.info(
                        "configuration loaded",
                        extra={"credentials": len(config.credentials)},
                    )
                # Taken before loading: a change made while loading is seen next time.
                seen = current
            await asyncio.sleep(self._poll_interval)
