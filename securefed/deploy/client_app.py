"""The Flower ClientApp: one site's handlers (:mod:`securefed.deploy.node`) behind Flower.

Every message type of :mod:`securefed.deploy.wire` is registered: ``query.setup`` and one
``train.<stage>`` per masking stage. The site's settings come from the SuperNode's
``--node-config`` only; what the coordinator sends is validated by the handlers. Run either by
Flower (a ``flwr-clientapp`` process per message) or, warm, by ``securefed site-worker``
(:mod:`securefed.deploy.worker`). A handler that
fails replies ``{"error": ...}`` (the coordinator counts the site as dropped for the round) and
logs the traceback on the site.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from securefed.deploy.node import NodeOptions, Site, dispatch
from securefed.deploy.simulation_runtime import site_node_config
from securefed.deploy.wire import MESSAGE_CKKS_DECRYPT, MESSAGE_CKKS_UPLOAD, MESSAGE_PHASE0
from securefed.secagg.masking.messages import Stage

__all__ = ["app"]

log = logging.getLogger(__name__)

RECORD = "securefed"

app = ClientApp()


#: node config -> Site: in a long-lived process (``securefed site-worker``) the site's parsed
#: experiment, data and keys stay loaded across messages (see :class:`~securefed.deploy.node.Site`)
_SITES: dict[tuple[tuple[str, str], ...], Any] = {}


def _site(node_config: dict[str, Any]) -> Any:
    key = tuple(sorted((str(k), repr(v)) for k, v in node_config.items()))
    site = _SITES.get(key)
    if site is None:
        site = _SITES[key] = Site(NodeOptions.from_node_config(node_config))
    return site


def _handle(msg: Message, context: Context) -> Message:
    reply: dict[str, Any]
    try:
        site = _site(site_node_config(context.node_config, context.run_config))
        rec = msg.content.config_records.get(RECORD)
        if rec is None:
            raise ValueError(f"coordinator: message has no {RECORD!r} record")
        reply = dispatch(site, msg.metadata.message_type, dict(rec))
    except Exception as exc:  # the site stays up; the coordinator treats it as dropped
        log.exception("securefed site: %s failed", msg.metadata.message_type)
        reply = {"error": f"{type(exc).__name__}: {exc}"}
    return Message(RecordDict({RECORD: ConfigRecord(reply)}), reply_to=msg)


@app.query("setup")
def setup(msg: Message, context: Context) -> Message:
    return _handle(msg, context)


def _register(stage: str) -> None:
    def handler(msg: Message, context: Context) -> Message:
        return _handle(msg, context)

    handler.__name__ = f"stage_{stage}"
    app.train(stage)(handler)


# every train.* message the coordinator sends: the masking stages, FedDDPM's phase 0 and the
# two CKKS messages (a message type without a handler would fail at the site)
for _stage in (*Stage.ORDER, *(m.partition(".")[2] for m in (
    MESSAGE_PHASE0, MESSAGE_CKKS_UPLOAD, MESSAGE_CKKS_DECRYPT
))):
    _register(_stage)
