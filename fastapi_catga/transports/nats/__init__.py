"""The NATS transport (``pip install "fastapi-catga[nats]"``)::

    transport = NatsTransport("nats://n1:4222,nats://n2:4222", cluster="orders")
    await transport.connect()

- `transport`: messaging over core NATS (request/reply, publish, queue groups).
- `connection`: the nats-py client: connects, reconnects forever, tells listeners when it is up.
- `auth`: credentials (user/password, token, nkey seed, .creds file) and TLS files (`NatsAuth`).
- `membership`: the membership store, a JetStream KV bucket ``catga_<cluster>``.
- `durable`: the durable store (queues, leases, done records, dead letters) on JetStream, with
  `pull` (its consumers), `leases`, `dead_letters` and `streams` (what they share).
- `errors`: how nats-py's errors become ours, in one table.
"""

from fastapi_catga.transports._shared import import_guard

with import_guard("nats", client="nats-py", broker="NATS"):
    from fastapi_catga.transports.nats.auth import NatsAuth
    from fastapi_catga.transports.nats.transport import NatsTransport

__all__ = ["NatsAuth", "NatsTransport"]
