"""Accuracy and latency evaluation of a served model through its HTTP API (`fluxserve eval`,
`fluxserve bench`).

This package is a pure HTTP client of any OpenAI-compatible server (fluxserve, stock vLLM, ...)
plus an offline retrieval-head profiler on Hugging Face transformers. It must not import the
server, the vLLM glue, the attention backends or the KV policies.

Modules:
- `client`: HTTP client with bounded concurrency, retries and a progress bar; server discovery.
- `tokenization`: exact prompt lengths with the served model's tokenizer.
- `words`, `tasks`: RULER's synthetic tasks and fluxserve's local tasks, generated from a seed.
- `scoring`: RULER's string-match metrics.
- `policies`: the policy-spec syntax (`calidrop:1024`, `sparse+snapkv:512`, ...).
- `results`, `plotting`: resumable JSONL results, CSV/JSON writers, matplotlib figures.
- `long_context`: the `fluxserve eval` run; `heads`: `fluxserve eval heads`;
  `bench`: the `fluxserve bench` latency sweep; `cli`: arguments.
"""
