"""Runtime scheduling: policies (prefill.py, decode.py, colocated.py; policy.py: which role runs which, and
their queue counts), dispatch.py, the step lifecycle (lifecycle.py: complete() -> events), the Cluster that
applies it (cluster.py), the step trace (trace.py)."""
