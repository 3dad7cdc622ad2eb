"""Policy decisions: Rego policies in ``policies/`` answer allow or deny, with reasons and
obligations, for every request; anything unexpected fails closed.

>>> from gateway.policy import build_engine
>>> engine = build_engine("regorus")
>>> decision = engine.decide({})
>>> decision.allow, decision.reasons[-2:]
(False, ('request has no action', 'request has no subject role'))
"""

from gateway.policy.bundle import PolicyBundle, load_bundle
from gateway.policy.data import with_grant_index
from gateway.policy.decision import (
    Decision,
    Obligations,
    PolicyTrace,
    note_policy_trace,
    take_policy_trace,
)
from gateway.policy.engine import (
    DECISION_ENTRYPOINT,
    EngineFactory,
    PolicyEngine,
    RegorusEngine,
    build_engine,
    policies_dir,
    register_engine,
)
from gateway.policy.opa import OpaServerEngine

__all__ = [
    "DECISION_ENTRYPOINT",
    "Decision",
    "EngineFactory",
    "Obligations",
    "OpaServerEngine",
    "PolicyBundle",
    "PolicyEngine",
    "PolicyTrace",
    "RegorusEngine",
    "build_engine",
    "load_bundle",
    "note_policy_trace",
    "policies_dir",
    "register_engine",
    "take_policy_trace",
    "with_grant_index",
]
