"""Federated learning on Flower's Deployment Engine (SuperLink + SuperNodes over gRPC).

Example::

    from fedge.plugins.fl import FlConfig, run

    result = run(FlConfig(clients=4, rounds=5))
"""

from fedge.plugins.fl.config import FlConfig, load_config
from fedge.plugins.fl.runner import RunResult, run

__all__ = ["FlConfig", "RunResult", "load_config", "run"]
