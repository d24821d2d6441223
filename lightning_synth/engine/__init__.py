"""The synthesis engine: the loop of generate → store → weigh → apply settings, with no Lightning import."""

from lightning_synth.engine.comm import Comm, LocalComm, StrategyComm
from lightning_synth.engine.engine import EpochContext, RefreshReport, SynthesisEngine, resolve_budget

__all__ = ["Comm", "EpochContext", "LocalComm", "RefreshReport", "StrategyComm", "SynthesisEngine", "resolve_budget"]
