"""Federated learning on Flower's Deployment Engine (SuperLink + SuperNodes over gRPC)."""
