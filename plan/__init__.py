"""Capacity plans over the simulator: per policy, the cheapest deployment that meets
latency SLOs under a workload's own arrivals.

``staircase.plan.run`` sizes and trims deployments (its simulations are the search's
evaluations, ``staircase.search.run``); ``staircase.plan.report`` writes plan.json, the
deployment files, the frontier table and figure. ``staircase plan`` is ``staircase.plan.cli``.
"""
