"""``/p2pnode/infer/1.0.0``: one request per stream, tokens streamed back sealed.

Built so far: the messages (``messages``: a clear ``InferOpen``, then sealed
Request / Chunk / Done with a provider-signed cumulative ``Receipt`` / Ack)
and the token batching policy (``batching``). The machines and the adapter
come next (ARCHITECTURE §6).
"""
