"""Prefect orchestration of the DVC pipeline. Flows run DVC; they never import torch."""
