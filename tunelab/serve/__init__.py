"""Serving: an OpenAI-compatible endpoint for one base model and many LoRA adapters.

adapters.py (what is served, by name), batching.py (continuous batching over one KV cache),
openai_api.py (the HTTP API), server.py (``tunelab serve``). Guide: docs/serve.md.
"""
