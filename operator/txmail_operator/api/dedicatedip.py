"""DedicatedIP: one sending IP, its EHLO hostname and sending domains (cluster-scoped)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, ClassVar

from pydantic import ConfigDict, Field, model_validator

from txmail_relay.contract import DeliveryMode, SmarthostTLS

from .bounces import Bounces
from .common import (
    DOMAIN,
    EMAIL,
    Condition,
    LabelSelector,
    LocalObjectReference,
    Model,
    cel,
    conditions_field,
    immutable,
    observed_generation_field,
)
from .dkim import DKIM_SPEC_RULES, DkimSpec
from .dns import DnsRecordStatus, DnsSpec, DomainStatus
from .shaping import PausedDestination, Shaping
from .warmup import WarmupSpec, WarmupStatus

Domain = Annotated[str, Field(min_length=3, max_length=253, pattern=DOMAIN)]
Quantity = Annotated[
    str, Field(max_length=64, pattern=r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$")
]


class Smarthost(Model):
    host: str = Field(
        min_length=1,
        max_length=253,
        description="Host name or IP address of the upstream relay (for example a provider's "
        "SMTP endpoint).",
    )
    port: int = Field(default=587, ge=1, le=65535, description="TCP port of the upstream relay.")
    tls: SmarthostTLS = Field(
        default=SmarthostTLS.STARTTLS,
        description="StartTLS upgrades a plain connection (port 587), Implicit speaks TLS from "
        "the first byte (port 465), None sends in the clear (only for a trusted local network).",
    )
    credentials_secret_ref: LocalObjectReference | None = Field(
        default=None,
        alias="credentialsSecretRef",
        description="A Secret in the operator's namespace with keys 'username' and 'password' "
        "for AUTH at the upstream. Omit when the upstream needs no authentication.",
    )


class Delivery(Model):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.mode != 'Smarthost' || has(self.smarthost)",
                    "delivery.smarthost is required when delivery.mode is Smarthost",
                ),
                cel(
                    "self.mode != 'Direct' || !has(self.smarthost)",
                    "delivery.smarthost must be omitted when delivery.mode is Direct",
                ),
            ]
        }
    )

    mode: DeliveryMode = Field(
        default=DeliveryMode.DIRECT,
        description="Direct looks up each recipient domain's MX records and delivers from this "
        "IP; Smarthost hands every message to one upstream relay.",
    )
    smarthost: Smarthost | None = Field(
        default=None, description="The upstream relay; required when mode is Smarthost."
    )


class EgressMode(StrEnum):
    HOST_NETWORK = "HostNetwork"
    EGRESS_GATEWAY = "EgressGateway"
    NONE = "None"


class Egress(Model):
    mode: EgressMode = Field(
        default=EgressMode.NONE,
        description="How outbound mail leaves from the dedicated address. HostNetwork runs the "
        "relay on the node's network and binds every outbound connection to spec.address (the "
        "pod is then not Pod Security 'restricted'). EgressGateway leaves source NAT to the "
        "cluster's egress gateway (Cilium, Calico, a cloud NAT). None does nothing special.",
    )
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        default=None,
        max_length=16,
        description="Nodes the relay may run on, for example the node that holds the address.",
    )


class SpoolStorage(Model):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!(has(self.emptyDir) && has(self.persistentVolumeClaim))",
                    "choose one of spool.emptyDir and spool.persistentVolumeClaim",
                )
            ]
        }
    )

    empty_dir: EmptyDirSpool | None = Field(
        default=None,
        alias="emptyDir",
        description="Keep the spool in an emptyDir: survives container restarts, not pod "
        "rescheduling. The default when nothing is chosen.",
    )
    persistent_volume_claim: PvcSpool | None = Field(
        default=None,
        alias="persistentVolumeClaim",
        description="Keep the spool on a PersistentVolumeClaim the operator creates: accepted "
        "mail survives the pod moving to another node.",
    )


class EmptyDirSpool(Model):
    size_limit: Quantity = Field(
        default="1Gi", alias="sizeLimit", description="Largest size of the spool folder."
    )


class PvcSpool(Model):
    size: Quantity = Field(default="10Gi", description="Requested size of the volume.")
    storage_class_name: str | None = Field(
        default=None,
        alias="storageClassName",
        max_length=253,
        description="StorageClass of the volume; the cluster default when omitted.",
    )


class Resources(Model):
    requests: dict[str, Quantity] | None = Field(
        default=None,
        max_length=8,
        description="Minimum cpu and memory for the relay container, e.g. {cpu: 100m}.",
    )
    limits: dict[str, Quantity] | None = Field(
        default=None,
        max_length=8,
        description="Maximum cpu and memory for the relay container, e.g. {memory: 512Mi}.",
    )


class RelayPorts(Model):
    submission: int = Field(
        default=587, ge=1, le=65535, description="Service port for SMTP with STARTTLS."
    )
    submissions: int = Field(
        default=465, ge=1, le=65535, description="Service port for SMTP over implicit TLS."
    )
    tracking: int = Field(
        default=80,
        ge=1,
        le=65535,
        description="Service port of the tracking listener: open pixels and click redirects "
        "only, every other path is 404. The one HTTP port meant to be public (an Ingress for "
        "spec.tracking.baseURL points here).",
    )
    api: int = Field(
        default=8081,
        ge=1,
        le=65535,
        description="Service port of the single-send API, send statuses and contacts "
        "(authenticated with an SmtpToken). Keep it inside the cluster.",
    )
    metrics: int = Field(
        default=9090,
        ge=1,
        le=65535,
        description="Service port of /metrics, /healthz and /readyz (Prometheus and the "
        "probes). Keep it inside the cluster.",
    )
    inbound: int = Field(
        default=25,
        ge=1,
        le=65535,
        description="Service port 'smtp-in' of the inbound listener (no AUTH): DSNs to the "
        "return path and ARF reports to feedback.complaintsAddress, from the outside world; "
        "every other recipient is refused with 550. The listener and the port exist only "
        "when spec.dns.returnPathDomain or spec.feedback.complaintsAddress is set. The MX of "
        "spec.dns.returnPathDomain names spec.hostname: port 25 of its address must reach "
        "this port.",
    )


class RelayLimits(Model):
    """Connection caps of the relay (docs/relay.md "Limits"); unset fields keep its defaults."""

    max_connections: int | None = Field(
        default=None,
        ge=1,
        le=65536,
        description="SMTP connections the relay takes at once, both ports together; past it a "
        "client gets 421. Relay default 1000.",
    )
    max_connections_per_address: int | None = Field(
        default=None,
        ge=1,
        le=65536,
        description="SMTP connections from one client address (IPv6: one /64); past it 421. "
        "Relay default 50. Raise it when many apps reach the relay through one NAT address.",
    )
    max_http_connections: int | None = Field(
        default=None,
        ge=1,
        le=65536,
        description="Connections each of the tracking and API listeners takes at once; past "
        "it 503. Relay default 1000.",
    )
    max_http_connections_per_address: int | None = Field(
        default=None,
        ge=1,
        le=65536,
        description="Connections from one address to each of the tracking and API listeners; "
        "past it 429. Relay default 200. Behind an Ingress every tracking connection comes "
        "from the controller's pods: raise it to what they may open.",
    )


RETRY_ORDER = "retry.minBackoffSeconds must not exceed retry.maxBackoffSeconds"


class RelayRetry(Model):
    """When the relay tries a deferred recipient again (docs/relay.md "Delivery"); unset
    fields keep its defaults, Postfix's and RFC 5321 4.5.4.1's."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.minBackoffSeconds) || !has(self.maxBackoffSeconds) || "
                    "self.minBackoffSeconds <= self.maxBackoffSeconds",
                    RETRY_ORDER,
                )
            ]
        }
    )

    min_backoff_seconds: int | None = Field(
        default=None,
        ge=1,
        le=86400,
        description="Wait after the first failed attempt; it doubles after each further one. "
        "Relay default 300 (RFC 5321 asks for at least 30 minutes between attempts to one "
        "destination over time; the doubling gets there).",
    )
    max_backoff_seconds: int | None = Field(
        default=None,
        ge=1,
        le=86400,
        description="The longest wait between two attempts. Relay default 4000.",
    )
    max_lifetime_seconds: int | None = Field(
        default=None,
        ge=60,
        le=30 * 86400,
        description="How long the relay keeps trying before it gives up on a recipient (a "
        "bounce, and a DSN when asked for). Relay default 432000 (5 days; RFC 5321 asks for "
        "4-5 days).",
    )

    @model_validator(mode="after")
    def _ordered(self) -> RelayRetry:
        low, high = self.min_backoff_seconds, self.max_backoff_seconds
        if low is not None and high is not None and low > high:
            raise ValueError(RETRY_ORDER)
        return self


class Relay(Model):
    retry: RelayRetry | None = Field(
        default=None,
        description="The retry schedule of deferred mail. A change restarts the relay pod "
        "(read at start); the schedule of mail already deferred is kept.",
    )
    limits: RelayLimits | None = Field(
        default=None,
        description="Connection caps of the relay. A change restarts the relay pod (they are "
        "read at start).",
    )
    resources: Resources | None = Field(
        default=None, description="Compute resources of the relay container."
    )
    spool: SpoolStorage | None = Field(
        default=None, description="Where accepted mail waits for delivery."
    )
    ports: RelayPorts | None = Field(default=None, description="Ports of the relay's Service.")
    api_url: str | None = Field(
        default=None,
        alias="apiURL",
        max_length=2048,
        pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        description="Where the operator reaches the relay's single-send API (for spec.send "
        "of TransactionalEmails); the relay's Service, port ports.api, when omitted. Set it for "
        "a relay that runs outside the cluster.",
    )


class TLS(Model):
    certificate_secret_ref: LocalObjectReference | None = Field(
        default=None,
        alias="certificateSecretRef",
        description="A kubernetes.io/tls Secret in the operator's namespace (for example one "
        "cert-manager issues) with the relay's serving certificate. When omitted, the operator "
        "creates a private CA and a certificate for the relay's Service names, and adds the CA "
        "as 'ca.crt' to every app Secret of this IP.",
    )


class Tracking(Model):
    base_url: str | None = Field(
        default=None,
        alias="baseURL",
        max_length=2048,
        pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        description="Public URL that reaches the relay's tracking port (through an Ingress to "
        "the Service's 'tracking' port), used in open pixels and rewritten links. Tracking is "
        "off for this IP when omitted. The "
        "signing keys are in the Secret txmail-relay-<name>-tracking (key 'keys', one "
        "'kid:hexkey' line per key) in the operator's namespace: created with one random key "
        "the first time this is set, never changed by the operator. Rotate by adding a line "
        "with a higher kid; the last line signs, every line verifies.",
    )


class Feedback(Model):
    complaints_address: str | None = Field(
        default=None,
        alias="complaintsAddress",
        max_length=320,
        pattern=EMAIL,
        description="Where mailbox providers' ARF feedback reports (RFC 5965) are forwarded "
        "to, accepted over authenticated submission and on the inbound listener (Service port "
        "'smtp-in', from the outside world): a report about a message this relay sent "
        "is recorded as a complaint and an unsubscribe of its token and recipient, never "
        "relayed. Reports are not accepted when omitted.",
    )


class Suppression(Model):
    complaints: bool = Field(
        default=False,
        description="Refuse new mail to recipients who complained about mail from this relay "
        "(SMTP: 550 5.7.1 at RCPT; API: sendResult PREVIOUS_SPAM). Off by default: "
        "transactional mail bypasses subscription status.",
    )
    bounces: bool = Field(
        default=False,
        description="Refuse new mail to recipients whose mail from this relay bounced "
        "(a permanent 5xx failure; SMTP: 550 5.7.1 at RCPT; API: sendResult "
        "PREVIOUSLY_BOUNCED).",
    )


# The inbound listener (Service port 'smtp-in') runs only for what it takes: DSNs to the return
# path and ARF reports to the complaints address. CEL for "it is in use", beside uses_inbound.
_INBOUND_USED = (
    "(has(self.dns) && has(self.dns.returnPathDomain)) || "
    "(has(self.feedback) && has(self.feedback.complaintsAddress))"
)
_PORTS = "self.relay.ports"
_NAMES = ("submission", "submissions", "tracking", "api", "metrics")
_FIVE = "[" + ", ".join(f"{_PORTS}.{n}" for n in _NAMES) + "]"
DISTINCT_PORTS_RULE = (
    f"!has(self.relay) || !has({_PORTS}) || ({_FIVE}.all(p, {_FIVE}.exists_one(q, q == p)) && "
    f"(!({_INBOUND_USED}) || !({_PORTS}.inbound in {_FIVE})))"
)
DISTINCT_PORTS = (
    "relay.ports must be distinct: submission, submissions, tracking, api, metrics and (with "
    "dns.returnPathDomain or feedback.complaintsAddress set) inbound each a port of its own"
)


def uses_inbound(spec: DedicatedIPSpec) -> bool:
    """Whether the relay runs its inbound listener (and its pod and Service the port
    'smtp-in'): only with a return-path domain (DSNs) or a complaints address (ARF reports);
    otherwise nothing would reach it (and a HostNetwork relay would hold the node's port)."""
    return spec.dns.return_path_domain is not None or spec.feedback.complaints_address is not None


RETURN_PATH_OWN_DOMAIN = (
    "dns.returnPathDomain must be a domain of its own, not one of domains (for example "
    "bounces.example.com): its MX points at the relay, which takes only bounces and complaints"
)


class DedicatedIPSpec(Model):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                *DKIM_SPEC_RULES,
                cel(
                    "!has(self.dns) || !has(self.dns.returnPathDomain) || "
                    "!(self.dns.returnPathDomain in self.domains)",
                    RETURN_PATH_OWN_DOMAIN,
                    field=".dns.returnPathDomain",
                ),
                cel(DISTINCT_PORTS_RULE, DISTINCT_PORTS, field=".relay.ports"),
            ]
        }
    )

    address: str = Field(
        max_length=45,
        description="The sending IP address (IPv4 or IPv6). Immutable: a new address is a new "
        "DedicatedIP with its own reputation.",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("isIP(self)", "address must be an IPv4 or IPv6 address"),
                *immutable("address")["x-kubernetes-validations"],
            ]
        },
    )
    hostname: Domain = Field(
        description="Fully qualified name the relay greets with (EHLO). It should be the "
        "address's PTR record, and resolve back to the address."
    )
    domains: list[Domain] = Field(
        min_length=1,
        max_length=100,
        description="Sending domains allowed through this IP: the domain of every envelope and "
        "header From address must be one of them.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    allowed_namespaces: LabelSelector | None = Field(
        default=None,
        description="Namespaces whose SmtpTokens and TransactionalEmails may use this IP. "
        "Omitted or empty ({}) allows every namespace.",
    )
    delivery: Delivery = Field(
        default_factory=Delivery, description="How the relay hands mail onward."
    )
    egress: Egress = Field(
        default_factory=Egress, description="How outbound connections leave from the address."
    )
    relay: Relay = Field(default_factory=Relay, description="The relay's pod and Service.")
    tls: TLS = Field(default_factory=TLS, description="The relay's serving certificate.")
    tracking: Tracking = Field(default_factory=Tracking, description="Open and click tracking.")
    feedback: Feedback = Field(
        default_factory=Feedback, description="Feedback loops: where complaints arrive."
    )
    bounces: Bounces = Field(
        default_factory=Bounces,
        description="DSNs the relay sends to the senders of SMTP submissions it gave up on.",
    )
    suppression: Suppression = Field(
        default_factory=Suppression,
        description="Recipients the relay refuses new mail to, from what it recorded itself. "
        "Changes apply to the next message without a restart.",
    )
    dns: DnsSpec = Field(default_factory=DnsSpec, description="DNS readiness (DNSVerified).")
    dkim: DkimSpec = Field(default_factory=DkimSpec, description="DKIM signing keys.")
    warmup: WarmupSpec | None = Field(default=None, description="IP warm-up; off when omitted.")
    shaping: Shaping | None = Field(
        default=None, description="Per-destination shaping; the relay's defaults when omitted."
    )

    @model_validator(mode="after")
    def _cross_field_rules(self) -> DedicatedIPSpec:
        """The CEL rules above, for pydantic (same messages). A return-path domain that is a
        sending domain would have the operator list an MX taking that domain's mail over to
        the relay; two ports alike would make the relay's Service invalid."""
        rp = self.dns.return_path_domain
        if rp is not None and rp in self.domains:
            raise ValueError(RETURN_PATH_OWN_DOMAIN)
        ports = self.relay.ports
        if ports is not None:
            five = [ports.submission, ports.submissions, ports.tracking, ports.api, ports.metrics]
            if len(set(five)) != len(five) or (uses_inbound(self) and ports.inbound in five):
                raise ValueError(DISTINCT_PORTS)
        return self


class RelayStatus(Model):
    deployment_name: str | None = Field(default=None, description="The relay's Deployment.")
    service_name: str | None = Field(default=None, description="The relay's Service.")
    smtp_endpoint: str | None = Field(
        default=None,
        alias="smtpEndpoint",
        description="In-cluster host:port apps submit to (STARTTLS).",
    )
    pod_security: str | None = Field(
        default=None,
        description="Pod Security Standard the relay pod meets: 'restricted', or 'privileged' "
        "with the reason when egress mode HostNetwork needs the node's network.",
    )


class DedicatedIPStatus(Model):
    conditions: list[Condition] | None = conditions_field()
    relay: RelayStatus | None = Field(default=None, description="What the operator runs.")
    tokens: int | None = Field(default=None, ge=0, description="SmtpTokens attached to this IP.")
    emails: int | None = Field(
        default=None, ge=0, description="TransactionalEmails attached to this IP."
    )
    dns_records: list[DnsRecordStatus] | None = Field(
        default=None, max_length=1024, description="Every DNS record to publish, as checked."
    )
    domains: list[DomainStatus] | None = Field(
        default=None, max_length=100, description="Each sending domain's DNS verdict."
    )
    warmup: WarmupStatus | None = Field(default=None, description="IP warm-up progress.")
    destinations: list[PausedDestination] | None = Field(
        default=None,
        description="Destinations the relay has paused (they answered 421 or only 4xx), "
        "from its last stats report; absent when none is.",
    )
    observed_generation: int | None = observed_generation_field()


class DedicatedIP(Model):
    """One dedicated sending IP. Becomes a relay Deployment with exactly one pod."""

    KIND: ClassVar[str] = "DedicatedIP"
    PLURAL: ClassVar[str] = "dedicatedips"
    SCOPE: ClassVar[str] = "Cluster"
    SHORT_NAMES: ClassVar[list[str]] = ["dip"]
    PRINTER_COLUMNS: ClassVar[list[dict[str, Any]]] = [
        {"name": "Address", "type": "string", "jsonPath": ".spec.address"},
        {"name": "Hostname", "type": "string", "jsonPath": ".spec.hostname"},
        {
            "name": "Ready",
            "type": "string",
            "jsonPath": ".status.conditions[?(@.type=='Ready')].status",
        },
        {"name": "Tokens", "type": "integer", "jsonPath": ".status.tokens"},
        {
            "name": "Endpoint",
            "type": "string",
            "jsonPath": ".status.relay.smtpEndpoint",
            "priority": 1,
        },
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    NAME_MAX: ClassVar[int] = 50  # txmail-relay-<name> must stay a 63-character DNS label

    spec: DedicatedIPSpec = Field(description="The IP, its names and how its relay runs.")
    status: DedicatedIPStatus | None = Field(
        default=None, description="What the operator observed and runs."
    )
