"""A dense float32 PyTorch Llama with KV eviction applied after prefill: the reference the engine
tests compare vLLM's logits against.

It shares no code with the engine path: selection (SnapKV / streaming), the evicted set's
partial attention and the decode-time LSE merge are recomputed here on dense tensors, per our
definition in docs/kv_policies.md.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from kv_policies.eviction.options import parse_kv_policy


class RefLlama:
    def __init__(self, model_dir: str) -> None:
        cfg = json.load(open(os.path.join(model_dir, "config.json")))
        self.cfg = cfg
        self.w = {k: v.to(torch.float32) for k, v in
                  load_file(os.path.join(model_dir, "model.safetensors")).items()}
        self.hq = cfg["num_attention_heads"]
        self.hkv = cfg["num_key_value_heads"]
        self.d = cfg.get("head_dim") or cfg["hidden_size"] // self.hq
        self.n_layers = cfg["num_hidden_layers"]
        self.eps = cfg["rms_norm_eps"]
        self.scale = self.d ** -0.5
        inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, self.d, 2, dtype=torch.float64)
                                           / self.d))
        self.inv_freq = inv

    # ------------------------------------------------------------------ blocks

    def _norm(self, x: Tensor, name: str) -> Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps) * self.w[name]

    def _rope(self, x: Tensor, pos: Tensor) -> Tensor:  # x [T, H, D] (neox style, HF Llama)
        ang = pos[:, None].to(torch.float64) * self.inv_freq[None]
        cos = torch.cat([ang.cos(), ang.cos()], -1).to(torch.float32)[:, None]
        sin = torch.cat([ang.sin(), ang.sin()], -1).to(torch.float32)[:, None]
        x1, x2 = x[..., : self.d // 2], x[..., self.d // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def _qkv(self, li: int, x: Tensor, pos: Tensor):
        p = f"model.layers.{li}."
        h = self._norm(x, p + "input_layernorm.weight")
        t = x.shape[0]
        q = (h @ self.w[p + "self_attn.q_proj.weight"].T).view(t, self.hq, self.d)
        k = (h @ self.w[p + "self_attn.k_proj.weight"].T).view(t, self.hkv, self.d)
        v = (h @ self.w[p + "self_attn.v_proj.weight"].T).view(t, self.hkv, self.d)
        return self._rope(q, pos), self._rope(k, pos), v

    def _finish_layer(self, li: int, x: Tensor, attn: Tensor) -> Tensor:
        p = f"model.layers.{li}."
        x = x + attn.reshape(x.shape[0], -1) @ self.w[p + "self_attn.o_proj.weight"].T
        h = self._norm(x, p + "post_attention_layernorm.weight")
        g = h @ self.w[p + "mlp.gate_proj.weight"].T
        u = h @ self.w[p + "mlp.up_proj.weight"].T
        return x + (F.silu(g) * u) @ self.w[p + "mlp.down_proj.weight"].T

    def _logits(self, x: Tensor) -> Tensor:
        return self._norm(x, "model.norm.weight") @ self.w["lm_head.weight"].T

    # ------------------------------------------------------------------ eviction

    def _select(self, opts: dict, q_obs: Tensor, k: Tensor, length: int) -> Tensor:
        """Kept positions [Hkv, B] (dense re-implementation of the policies)."""
        budget = int(opts["budget"])
        if opts["name"] == "streaming":
            sink = int(opts["sink"])
            kept = list(range(sink)) + list(range(length - (budget - sink), length))
            return torch.tensor(kept)[None].expand(self.hkv, budget)
        w = q_obs.shape[0]
        pool, window = int(opts["pool_kernel"]), int(opts["window"])
        g = self.hq // self.hkv
        pos = torch.arange(length - w, length)
        causal = torch.arange(length)[None] <= pos[:, None]
        scores = torch.zeros(self.hkv, length)
        for h in range(self.hq):
            s = (q_obs[:, h] @ k[:, h // g].T) * self.scale
            prob = torch.softmax(s.masked_fill(~causal, float("-inf")), -1).sum(0)
            scores[h // g] += F.max_pool1d(prob[None, None], pool, 1, pool // 2)[0, 0, :length]
        out = []
        for h in range(self.hkv):
            top = torch.topk(scores[h, : length - window], budget - window).indices
            out.append(torch.sort(torch.cat([top, torch.arange(length - window, length)])).values)
        return torch.stack(out)

    # ------------------------------------------------------------------ run

    @torch.no_grad()
    def logits(self, prompt: list[int], outputs: list[int], kv_policy: dict | None,
               flux_sparse: tuple[int, int] | None = None,
               recompute_at: int = 0) -> tuple[Tensor, dict]:
        """Logits ``[len(outputs), vocab]`` predicting each output token (teacher-forced), and
        stats (calibration hits). ``flux_sparse=(sink, window)`` runs every layer's decode with
        the slot-space sink+window mask the backend applies after compaction.
        ``recompute_at=k`` models a request preempted after k output tokens: prompt and those
        k tokens are prefilled together (full attention), then the prompt part is evicted."""
        length = len(prompt)
        total = length + recompute_at
        opts = parse_kv_policy(kv_policy).model_dump() if kv_policy else None
        evict = opts is not None and opts["name"] != "none" and length > int(opts["budget"])
        calib = evict and opts["name"] == "calidrop"
        g = self.hq // self.hkv
        x = self.w["model.embed_tokens.weight"][torch.tensor(prompt + outputs[:recompute_at])]
        pos = torch.arange(total)
        caches = []  # per layer: K [Hkv, n, D], V, slots [n], calibration
        causal = pos[None] <= pos[:, None]
        for li in range(self.n_layers):
            q, k, v = self._qkv(li, x, pos)
            attn = torch.empty(total, self.hq, self.d)
            for h in range(self.hq):
                s = (q[:, h] @ k[:, h // g].T) * self.scale
                if flux_sparse is not None:
                    s = s.masked_fill(~_window_mask(pos, pos, *flux_sparse), float("-inf"))
                attn[:, h] = torch.softmax(s.masked_fill(~causal, float("-inf")), -1) @ v[:, h // g]
            x = self._finish_layer(li, x, attn)
            entry = {"k": k.permute(1, 0, 2), "v": v.permute(1, 0, 2),
                     "slots": torch.arange(total)[None].expand(self.hkv, total), "cal": None}
            if evict:
                q, k, v = q[:length], k[:length], v[:length]
                tail_k = entry["k"][:, length:]
                tail_v = entry["v"][:, length:]
                n_obs = min(int(opts.get("window", 0)), length)
                kept = self._select(opts, q[length - n_obs:], k, length)
                if calib:
                    q_ref = q[-1]
                    o_e, lse_e = torch.zeros(self.hq, self.d), torch.zeros(self.hq)
                    for h in range(self.hq):
                        ev = torch.ones(length, dtype=torch.bool)
                        ev[kept[h // g]] = False
                        s = (q_ref[h] @ k[ev, h // g].T) * self.scale
                        lse_e[h] = torch.logsumexp(s, 0)
                        o_e[h] = torch.softmax(s, 0) @ v[ev, h // g]
                    entry["cal"] = (q_ref, o_e, lse_e, float(opts["tau"]))
                budget = kept.shape[1]
                idx = kept[..., None].expand(-1, -1, self.d)
                entry["k"] = torch.cat([torch.gather(entry["k"], 1, idx), tail_k], 1)
                entry["v"] = torch.cat([torch.gather(entry["v"], 1, idx), tail_v], 1)
                # After compaction the kept tokens sit in slots [0, B); later tokens keep theirs.
                slots = torch.cat([torch.arange(budget), torch.arange(length, total)])
                entry["slots"] = slots[None].expand(self.hkv, -1)
            caches.append(entry)
        out = list(self._logits(x[length - 1:]))
        stats = {"checks": 0, "hits": 0, "near_tau": 0}
        for i, tok in enumerate(outputs[recompute_at:-1], start=recompute_at):
            p = torch.tensor([length + i])
            x = self.w["model.embed_tokens.weight"][torch.tensor([tok])]
            for li in range(self.n_layers):
                c = caches[li]
                q, k, v = self._qkv(li, x, p)
                c["k"] = torch.cat([c["k"], k.permute(1, 0, 2)], 1)
                c["v"] = torch.cat([c["v"], v.permute(1, 0, 2)], 1)
                c["slots"] = torch.cat([c["slots"], p[None].expand(self.hkv, 1)], 1)
                attn = torch.empty(1, self.hq, self.d)
                for h in range(self.hq):
                    s = (q[0, h] @ c["k"][h // g].T) * self.scale
                    if flux_sparse is not None:
                        s = s.masked_fill(~_window_mask(p, c["slots"][h // g], *flux_sparse)[0],
                                          float("-inf"))
                    lse = torch.logsumexp(s, 0)
                    o = torch.softmax(s, 0) @ c["v"][h // g]
                    if c["cal"] is not None:
                        q_ref, o_e, lse_e, tau = c["cal"]
                        cos = F.cosine_similarity(q[0, h], q_ref[h], dim=0)
                        stats["checks"] += 1
                        stats["near_tau"] += int(abs(float(cos) - tau) < 1e-4)
                        if cos >= tau:
                            stats["hits"] += 1
                            m = torch.maximum(lse, lse_e[h])
                            w1, w2 = torch.exp(lse - m), torch.exp(lse_e[h] - m)
                            o = (o * w1 + o_e[h] * w2) / (w1 + w2)
                    attn[0, h] = o
                x = self._finish_layer(li, x, attn)
            out.append(self._logits(x)[0])
        return torch.stack(out), stats


def _window_mask(qpos: Tensor, slots: Tensor, sink: int, window: int) -> Tensor:
    return (slots[None] < sink) | (slots[None] > qpos[:, None] - window)
