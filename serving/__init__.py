"""The HTTP front door's parts (server.py is the app, its lifecycle and the CLI).

state.py: ServerConfig and the per-app State.  generate.py: the completion endpoints, full and streamed.
protocol.py: OpenAI request bodies -> validated engine requests, and ApiError.
responses.py: engine outputs -> OpenAI responses, stream chunks, logprobs, usage.
sse.py: Server-Sent Events framing.  metrics.py: Prometheus metrics.  plan.py: --plan files.
"""
