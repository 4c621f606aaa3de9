"""The planner: latency models (latency.py, fitted from profile.py or trace_fit.py), the simulator
(simulator.py: the runtime Cluster on a virtual clock), goodput (goodput.py), the placement search
(search.py, placement.py: DistServe's Algorithms 1 and 2), workloads (workload.py)."""
