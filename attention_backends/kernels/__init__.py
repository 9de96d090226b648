"""Attention kernels: the public ``ops`` API, the float32 PyTorch references (``reference``,
``sdpa_prefill``) and the Triton kernels (``paged_attention``, ``snapkv``, imported lazily by
``ops``). No vLLM import and no fluxserve import outside this package.
"""
