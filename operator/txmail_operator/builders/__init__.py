"""Pure builders: every object the operator writes, from models and explicit arguments.

No API calls, no clock, no randomness: passwords, key material and times are arguments, so
the same inputs always give the same objects (pinned by golden files in tests/unit/golden).
They are total: every input the API models admit gives an object, none raises.

One module per kind of thing built:

* :mod:`.naming`: names, labels, owner references and the metadata every object shares,
  :class:`~.naming.RelayOwner` (the DedicatedIP that owns a relay's objects), stable ids.
* :mod:`.relay_config`: what the relay reads: its RelayConfig and settings file (the
  ConfigMap), the credential and template shards, the stats ConfigMap, the tracking keys.
* :mod:`.relay_pod`: what runs the relay: Deployment, Service, spool claim, TLS Secret, and
  its ServiceAccount, Role and RoleBinding.
* :mod:`.token`: SmtpToken -> the app Secret and the relay's credential entry.
* :mod:`.email`: TransactionalEmail -> the template entry, sends and the scheduler Secret.
* :mod:`.status`: what to write to an object's status, or nothing.

The names below are re-exported so callers can write ``builders.relay_deployment(...)``;
each is defined (and documented) in the module named above.
"""

from .email import scheduler_secret, send_id, template_entry
from .naming import (
    API_VERSION,
    DEDICATED_IP_LABEL,
    SETTINGS_KEY,
    SETTINGS_PATH,
    SMARTHOST_PATH,
    SPOOL_PATH,
    TLS_PATH,
    TRACKING_PATH,
    Obj,
    RelayOwner,
    owner_reference,
    relay_labels,
    service_dns_names,
    smtp_host,
    spool_claim_name,
    stable_id,
)
from .relay_config import (
    credential_shard,
    relay_config,
    relay_config_map,
    relay_settings,
    relay_settings_model,
    relay_tracking_secret,
    shard_patch,
    stats_config_map,
    template_shard,
    tracking_keys_line,
)
from .relay_pod import (
    RELAY_COMMAND,
    RELAY_UID,
    pod_security,
    relay_api_url,
    relay_deployment,
    relay_role,
    relay_role_binding,
    relay_service,
    relay_service_account,
    relay_spool_claim,
    relay_tls_secret,
    submission_port,
    uses_host_network,
)
from .status import status_patch
from .token import (
    PASSWORD_GENERATION_ANNOTATION,
    SECRET_TYPE,
    TOKEN_LABEL,
    WebhookProblem,
    app_secret,
    app_secret_name,
    credential_entry,
    parse_duration,
    rotated_digests,
    username_for,
    webhook_endpoints,
    webhook_secret_names,
    webhooks_condition,
)

__all__ = [
    "API_VERSION",
    "DEDICATED_IP_LABEL",
    "PASSWORD_GENERATION_ANNOTATION",
    "RELAY_COMMAND",
    "RELAY_UID",
    "SECRET_TYPE",
    "SETTINGS_KEY",
    "SETTINGS_PATH",
    "SMARTHOST_PATH",
    "SPOOL_PATH",
    "TLS_PATH",
    "TOKEN_LABEL",
    "TRACKING_PATH",
    "Obj",
    "RelayOwner",
    "WebhookProblem",
    "app_secret",
    "app_secret_name",
    "credential_entry",
    "credential_shard",
    "owner_reference",
    "parse_duration",
    "pod_security",
    "relay_api_url",
    "relay_config",
    "relay_config_map",
    "relay_deployment",
    "relay_labels",
    "relay_role",
    "relay_role_binding",
    "relay_service",
    "relay_service_account",
    "relay_settings",
    "relay_settings_model",
    "relay_spool_claim",
    "relay_tls_secret",
    "relay_tracking_secret",
    "rotated_digests",
    "scheduler_secret",
    "send_id",
    "service_dns_names",
    "shard_patch",
    "smtp_host",
    "spool_claim_name",
    "stable_id",
    "stats_config_map",
    "status_patch",
    "submission_port",
    "template_entry",
    "template_shard",
    "tracking_keys_line",
    "username_for",
    "uses_host_network",
    "webhook_endpoints",
    "webhook_secret_names",
    "webhooks_condition",
]
