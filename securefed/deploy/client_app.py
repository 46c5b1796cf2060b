"""The Flower ClientApp: one site's handlers (:mod:`securefed.deploy.node`) behind Flower.

Every message type of :mod:`securefed.deploy.wire` is registered: ``query.setup`` and one
``train.<stage>`` per masking stage. The site's settings come from the SuperNode's
``--node-config`` only; what the coordinator sends is validated by the handlers. A handler that
fails replies ``{"error": ...}`` (the coordinator counts the site as dropped for the round) and
logs the traceback on the site.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from securefed.secagg.masking.stages import Stage

__all__ = ["app"]

log = logging.getLogger(__name__)

RECORD = "securefed"

app = ClientApp()


def _handle(msg: Message, context: Context) -> Message:
    from securefed.deploy.node import NodeOptions, Site, dispatch
    from securefed.deploy.simulation_runtime import site_node_config

    reply: dict[str, Any]
    try:
        node_config = site_node_config(context.node_config, context.run_config)
        site = Site(NodeOptions.from_node_config(node_config))
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


for _stage in Stage.ORDER:
    _register(_stage)
