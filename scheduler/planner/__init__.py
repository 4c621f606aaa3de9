"""The planner: latency models (latency.py, fitted from profile.py or trace_fit.py), the simulator
(simulator.py: the runtime Cluster on a virtual clock, pipelines as stages), goodput over several arrival
draws (goodput.py, searched by goodput_search.py), the placement search (search.py, placement.py:
DistServe's Algorithms 1 and 2; options.py: the flags it shares with scheduler/simulate.py, the
one-layout CLI), workloads and arrival processes (workload.py), request results judged against SLOs
(results.py). bench/ reuses the last three for its real load runs."""
