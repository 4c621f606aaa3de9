"""Every decision about what runs when and where.

runtime/: per-step decisions while serving: the prefill, decode and colocated policies (plain Python over
requests, no tensors), dispatch, and the Cluster that applies the step lifecycle. The engine and the
simulator both drive it. planner/: deployment-time decisions: latency models, the simulator, goodput,
the placement search, the profiler.
"""
