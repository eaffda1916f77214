"""Older names for kiln classes that kept their behaviour but changed name."""

from kiln.tune.periodic import PeriodicOptimizer

QuantumOptimizer = PeriodicOptimizer
"""The periodic hyper-parameter optimizer protocol under its older name."""

__all__ = ["QuantumOptimizer"]
