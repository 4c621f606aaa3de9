"""The HTTP front door's helpers (server.py is the app and the CLI).

protocol.py: OpenAI request bodies -> validated engine requests, and ApiError.
responses.py: engine outputs -> OpenAI responses, stream chunks, logprobs, usage.
sse.py: Server-Sent Events framing.  metrics.py: Prometheus metrics.  plan.py: --plan files.
"""
