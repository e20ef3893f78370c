"""Policy search over the simulator: which policy, for these engines and this workload.

``staircase.search.space`` builds the search space from the knobs each policy class declares;
``staircase.search.objectives`` names the metrics to minimise or maximise and the constraints;
``staircase.search.run`` evaluates candidates (processes or Ray) into a resumable store and
drives optuna; ``staircase.search.report`` gives the Pareto fronts, the best policy and its
command line, and the figure. ``staircase search`` is ``staircase.search.cli``.
"""
