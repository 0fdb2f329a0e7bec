"""Federated learning on Flower's Deployment Engine (SuperLink + SuperNodes over gRPC).

Example::

    from fedge.plugins.fl import FlConfig, run

    result = run(FlConfig(clients=4, rounds=5))
    private = run(FlConfig(clients=4, rounds=5, privacy=PrivacyConfig(dp="central", target_epsilon=8.0)))
"""

from fedge.plugins.fl.config import FlConfig, load_config
from fedge.plugins.fl.privacy import PrivacyConfig
from fedge.plugins.fl.runner import RunResult, run

__all__ = ["FlConfig", "PrivacyConfig", "RunResult", "load_config", "run"]
