"""The round engine and its in-process transport (the Flower transport is ``securefed.deploy``)."""

from securefed.federation.engine import ClientRound, ClientTransport, RoundEngine
from securefed.federation.record import RoundRecord, read_records
from securefed.federation.simulation import InProcessClients, SimClient, SimulationEvaluation
from securefed.seeds import derive_seed

__all__ = [
    "ClientRound",
    "ClientTransport",
    "InProcessClients",
    "RoundEngine",
    "RoundRecord",
    "SimClient",
    "SimulationEvaluation",
    "derive_seed",
    "read_records",
]
