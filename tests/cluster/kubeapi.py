"""Typed edges of the kubernetes client that the test harness and the demo use.

The client ships types, but a few helpers are untyped (``new_client_from_config``,
``ApiClient.close``), the CustomObjectsApi returns ``object`` and every model's ``metadata``
is Optional. These wrappers keep the ``type: ignore`` comments and the asserts in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from kubernetes import client, config


def new_api_client(kubeconfig: Path) -> client.ApiClient:
    """An ApiClient for ``kubeconfig`` (the caller closes it with ``close_api_client``)."""
    api: client.ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(kubeconfig)
    )
    return api


def close_api_client(api: client.ApiClient) -> None:
    api.close()  # type: ignore[no-untyped-call]


def custom_object(got: object) -> dict[str, Any]:
    """What a CustomObjectsApi method returned: typed ``object``, the decoded JSON object."""
    assert isinstance(got, dict), f"expected a JSON object from the API, got {type(got)}"
    return got


class HasMetadata(Protocol):
    @property
    def metadata(self) -> client.V1ObjectMeta | None: ...


def meta_of(obj: HasMetadata) -> client.V1ObjectMeta:
    """The metadata of an object the API server returned (it always has one)."""
    assert obj.metadata is not None, f"{type(obj).__name__} without metadata"
    return obj.metadata


def name_of(obj: HasMetadata) -> str:
    name = meta_of(obj).name
    assert name is not None, f"{type(obj).__name__} without a name"
    return name


def uid_of(obj: HasMetadata) -> str:
    uid = meta_of(obj).uid
    assert uid is not None, f"{type(obj).__name__} {meta_of(obj).name} without a uid"
    return uid
