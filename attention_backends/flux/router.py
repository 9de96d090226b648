"""The Flux layer router: per layer, pooled pre-RoPE queries -> a two-stage MLP -> FA or SA.

Parameter names and config keys follow the released Flux checkpoints, so their weights load
unchanged: each layer's ``self_attn.mask_allocator`` holds

    cls_feat_extractor        = Linear(D, 8D) -> SiLU -> Linear(8D, 2D)
    cls_router_head_agnostic  = Linear(2D, 4D) -> SiLU -> Linear(4D, D) -> SiLU -> Linear(D, 2)

(``.0/.2/.4`` index the Linear layers inside the ``Sequential``). With two outputs the argmax
picks the class; class 1 is full attention, class 0 sparse (the released code's convention).
Checkpoints trained with ``use_softmax: false`` have a single output instead: a positive logit
means full attention.

Pooling (the checkpoints' ``pooling_mode: ctx_q``): the first ``pool_size`` and the last
``pool_size`` query tokens are concatenated (tokens are counted twice when they overlap, exactly
as in training) and averaged, then averaged over all query heads. The feature is a sum divided by
a count, so under tensor parallelism each rank sums its own heads and one all-reduce gives every
rank the same feature, hence the same decision.

A standalone router for a stock model (``--flux-router PATH``) is a directory holding
``router.safetensors`` and ``router_config.json`` (or the two files given by the ``.safetensors``
path, the JSON beside it with the same stem). Tensor names are either the checkpoint's
(``model.layers.{i}.self_attn.mask_allocator.<param>``) or short (``layers.{i}.<param>``). The
JSON uses the checkpoint's keys: ``num_hidden_layers``, ``head_dim``, ``pool_size``,
``sink_size``, ``local_window_size`` and optionally ``use_softmax``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

# The released Flux checkpoints' architecture names (``config.json``); the vLLM glue registers
# a model class under each (``vllm_glue.models``).
PAW_ARCHITECTURES = ("PawLlamaForCausalLM", "PawQwen3ForCausalLM")
ROUTER_WEIGHTS_FILE = "router.safetensors"
ROUTER_CONFIG_FILE = "router_config.json"
DEFAULT_POOL_SIZE = 150
DEFAULT_SINK = 128
DEFAULT_WINDOW = 2048
FULL_CLASS = 1  # argmax index meaning full attention

_PARAM_RE = re.compile(
    r"^(?:model\.)?layers\.(\d+)\.(?:self_attn\.mask_allocator\.)?"
    r"((?:cls_feat_extractor|cls_router_head_agnostic)\.\d+\.(?:weight|bias))$"
)


class FluxRouter(nn.Module):
    """One layer's router; float32 whatever the model dtype (it is tiny and decides routing)."""

    def __init__(self, head_dim: int, num_outputs: int = 2) -> None:
        super().__init__()
        d = head_dim
        f32 = torch.float32
        self.cls_feat_extractor = nn.Sequential(
            nn.Linear(d, 8 * d, dtype=f32), nn.SiLU(), nn.Linear(8 * d, 2 * d, dtype=f32)
        )
        self.cls_router_head_agnostic = nn.Sequential(
            nn.Linear(2 * d, 4 * d, dtype=f32), nn.SiLU(),
            nn.Linear(4 * d, d, dtype=f32), nn.SiLU(),
            nn.Linear(d, num_outputs, dtype=f32),
        )
        self.num_outputs = num_outputs

    @torch.no_grad()
    def logits(self, feature: Tensor) -> Tensor:
        """``feature [R, D]`` (pooled queries) -> logits ``[R, num_outputs]``."""
        x = feature.to(self.cls_feat_extractor[0].weight.dtype)
        return self.cls_router_head_agnostic(self.cls_feat_extractor(x))

    @torch.no_grad()
    def decide_sparse(self, feature: Tensor) -> Tensor:
        """``feature [R, D]`` -> ``[R]`` bool, True where the layer runs sparse attention."""
        lg = self.logits(feature)
        if self.num_outputs == 1:
            return lg[:, 0] <= 0
        return lg.argmax(dim=-1) != FULL_CLASS


def pool_indices(n: int, pool_size: int) -> Tensor:
    """Token offsets pooled for a query of ``n`` tokens: first and last ``min(pool, n)``."""
    p = min(pool_size, n)
    return torch.cat([torch.arange(p), torch.arange(n - p, n)])


def pooled_sum(q: Tensor, pool_size: int) -> tuple[Tensor, int]:
    """``q [n, H, D]`` -> (sum over pooled tokens and heads ``[D]`` float32, count)."""
    idx = pool_indices(q.shape[0], pool_size).to(q.device)
    sel = q.index_select(0, idx).float()
    return sel.sum(dim=(0, 1)), sel.shape[0] * sel.shape[1]


@dataclass
class RouterSpec:
    """What routing needs besides the weights: read from the checkpoint or router config."""

    pool_size: int = DEFAULT_POOL_SIZE
    sink: int = DEFAULT_SINK
    window: int = DEFAULT_WINDOW
    num_outputs: int = 2

    @classmethod
    def from_config(cls, cfg) -> RouterSpec:
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        use_softmax = get("use_softmax", None)
        return cls(
            pool_size=int(get("pool_size", None) or DEFAULT_POOL_SIZE),
            sink=int(get("sink_size", None) if get("sink_size", None) is not None
                     else DEFAULT_SINK),
            window=int(get("local_window_size", None) or DEFAULT_WINDOW),
            # The released checkpoints use two outputs; only an explicit false means one.
            num_outputs=1 if use_softmax is False else 2,
        )


def _router_files(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path).expanduser()
    if p.is_dir():
        return p / ROUTER_WEIGHTS_FILE, p / ROUTER_CONFIG_FILE
    return p, p.with_suffix(".json")


def split_router_state(tensors: dict[str, Tensor]) -> dict[int, dict[str, Tensor]]:
    """Group router tensors by layer: ``{layer: {"cls_feat_extractor.0.weight": t, ...}}``.

    Names that are not router parameters (the rest of a checkpoint, training-only
    ``task_embedding``/``log_temp``) are ignored.
    """
    out: dict[int, dict[str, Tensor]] = {}
    for name, t in tensors.items():
        m = _PARAM_RE.match(name)
        if m:
            out.setdefault(int(m.group(1)), {})[m.group(2)] = t
    return out


def save_router_file(routers: list[FluxRouter], out: str | os.PathLike, spec: RouterSpec,
                     extra: dict | None = None) -> None:
    """Write ``router.safetensors`` and ``router_config.json`` into the folder ``out`` (what
    ``load_router_file`` and ``--flux-router`` read): router ``i`` is layer ``i``'s, float32;
    ``extra`` adds keys to the config."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"layers.{i}.{k}": v.detach().float().cpu().contiguous()
               for i, r in enumerate(routers) for k, v in r.state_dict().items()}
    save_file(tensors, str(out / ROUTER_WEIGHTS_FILE), {"format": "pt"})
    cfg = {"num_hidden_layers": len(routers),
           "head_dim": routers[0].cls_feat_extractor[0].in_features,
           "pool_size": spec.pool_size, "pooling_mode": "ctx_q", "sink_size": spec.sink,
           "local_window_size": spec.window, "use_softmax": spec.num_outputs != 1,
           **(extra or {})}
    (out / ROUTER_CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")


def load_router_file(path: str | os.PathLike) -> tuple[dict[int, FluxRouter], RouterSpec]:
    """Load a standalone router: ``({layer: FluxRouter}, RouterSpec)``."""
    from safetensors.torch import load_file

    wfile, cfile = _router_files(path)
    cfg = json.loads(cfile.read_text()) if cfile.exists() else {}
    spec = RouterSpec.from_config(cfg)
    per_layer = split_router_state(load_file(str(wfile)))
    if not per_layer:
        raise ValueError(f"{wfile} holds no Flux router tensors")
    routers: dict[int, FluxRouter] = {}
    for layer, sd in sorted(per_layer.items()):
        head_dim = sd["cls_feat_extractor.0.weight"].shape[1]
        n_out = sd["cls_router_head_agnostic.4.weight"].shape[0]
        r = FluxRouter(head_dim, n_out)
        r.load_state_dict({k: v.float() for k, v in sd.items()})
        routers[layer] = r.eval()
    spec.num_outputs = next(iter(routers.values())).num_outputs
    n_layers = cfg.get("num_hidden_layers")
    if n_layers is not None and sorted(routers) != list(range(int(n_layers))):
        raise ValueError(f"{wfile}: router layers {sorted(routers)} != 0..{int(n_layers) - 1}")
    return routers, spec


def is_flux_checkpoint(model_dir: str | os.PathLike | None) -> bool:
    """True when ``model_dir/config.json`` names a Flux (Paw*) architecture."""
    if not model_dir:
        return False
    cfg = Path(model_dir).expanduser() / "config.json"
    try:
        archs = json.loads(cfg.read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(a in PAW_ARCHITECTURES for a in archs)


def router_available(model_dir: str | os.PathLike | None,
                     flux_router_path: str | os.PathLike | None) -> bool:
    """Whether ``flux.mode = "auto"`` can be served: a Flux checkpoint, or a router file.

    Cheap (reads a JSON and checks a file); the server calls it once at start and answers 400
    to ``auto`` requests when it is False.
    """
    if flux_router_path:
        wfile, _ = _router_files(flux_router_path)
        return wfile.is_file()
    return is_flux_checkpoint(model_dir)
