"""The three HTTP listeners are separate: the public tracking port reaches nothing else.

An Ingress for tracking forwards whatever path a visitor asks for; these tests ask each port,
over real HTTP, for every route of the other two and expect a bare 404 every time.
"""

from __future__ import annotations

from relay.relaykit import RelayEnv, bearer, http
from txmail_relay.http.api import CONTACTS_PATH, SEND_PATH
from txmail_relay.tracking.tokens import TRANSPARENT_GIF

STATUS = "/marketing/v3/email/send-statuses/abc"
SEND_DOC = {"emailId": 1, "message": {"to": "user@dest.test"}}
TRACKING_ROUTES = [("GET", "/o/nothing.gif"), ("GET", "/c/nothing")]
API_ROUTES = [("POST", SEND_PATH), ("GET", STATUS), ("GET", CONTACTS_PATH)]
METRICS_ROUTES = [("GET", "/metrics"), ("GET", "/healthz"), ("GET", "/readyz")]


def _not_found(port: int, method: str, path: str, password: str) -> None:
    body = SEND_DOC if method == "POST" else None
    reply = http(port, method, path, body=body, headers=bearer(password))
    assert reply.status == 404, (port, method, path, reply.status)
    assert "server" not in reply.headers
    assert b"aiohttp" not in reply.body.lower() and b"python" not in reply.body.lower()


def test_each_listener_serves_only_its_own_routes(env: RelayEnv) -> None:
    relay = env.start()
    tracking, api, metrics = relay.tracking_port, relay.api_port, relay.metrics_port
    assert len({tracking, api, metrics, relay.port, relay.tls_port}) == 5

    pixel = http(tracking, "GET", "/o/nothing.gif")
    assert (pixel.status, pixel.body) == (200, TRANSPARENT_GIF)
    assert "server" not in pixel.headers  # no banner on the public port
    assert http(tracking, "GET", "/c/nothing").status == 400  # a bad token, never a redirect
    assert http(api, "POST", SEND_PATH, body=SEND_DOC).status == 401
    assert http(metrics, "GET", "/readyz").status == 200
    assert b"txmail_relay_messages_accepted_total" in http(metrics, "GET", "/metrics").body

    # A valid token changes nothing: the API is simply not on the tracking port.
    for method, path in [*API_ROUTES, *METRICS_ROUTES, ("GET", "/"), ("GET", "/../metrics")]:
        _not_found(tracking, method, path, env.password)
    for method, path in [*TRACKING_ROUTES, *METRICS_ROUTES]:
        _not_found(api, method, path, env.password)
    for method, path in [*TRACKING_ROUTES, *API_ROUTES]:
        _not_found(metrics, method, path, env.password)


def test_a_listener_set_to_null_is_not_opened(env: RelayEnv) -> None:
    relay = env.start(env.settings(overrides={"listen": {"api": None, "tracking": None}}))
    assert relay.relay is not None
    assert set(relay.relay.ports) == {"submission", "submissions", "metrics"}
    assert http(relay.metrics_port, "GET", "/healthz").status == 200
