"""Training of a small long-context Llama on the evaluation tasks, and of its Flux routers.

Layering: ``training`` sits above ``evaluation`` (task generators, scoring) and
``attention_backends.flux`` (the router module and its pooling); nothing imports it, and it
imports neither vLLM nor the server (tests/unit/test_architecture.py).
"""
