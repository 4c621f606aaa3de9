"""Runtime scheduling: policies (prefill.py, decode.py, colocated.py), dispatch.py, the step lifecycle
(lifecycle.py: complete() -> events), the Cluster that applies it (cluster.py), the step trace (trace.py)."""
