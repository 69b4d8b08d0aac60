"""``/p2pnode/infer/1.0.0``: one request per stream, tokens streamed back sealed.

Built so far: the token batching policy (``batching``). Messages, machines and
the adapter come next (ARCHITECTURE §6).
"""
