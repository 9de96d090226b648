"""`fluxserve eval heads-ablate` on a tiny random Llama made here: the per-head masks checked
against transformers' own eager attention given masks built independently, the SnapKV selection
against the paper's recipe on eager attention weights, and the command end to end."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from evaluation import head_ablation as ha
from evaluation.head_masks import HeadMask, MaskedRunner
from tests.eval.conftest import save_tiny_llama

ROOT = Path(__file__).resolve().parents[2]
LAYERS, HEADS, KV_HEADS = 3, 4, 2
GROUP = HEADS // KV_HEADS
TOL = 2e-5


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                       num_key_value_heads=KV_HEADS, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def models():
    """(a model run by MaskedRunner, the same weights on transformers' eager attention)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    reference = LlamaForCausalLM(_config()).eval()
    reference.set_attn_implementation("eager")
    masked = LlamaForCausalLM(copy.deepcopy(reference.config)).eval()
    masked.load_state_dict(reference.state_dict())
    return MaskedRunner(masked), reference


def _reference_logits(reference, ids: list[int], per_layer: list[torch.Tensor]) -> torch.Tensor:
    """Logits ``[L, vocab]`` of transformers' eager attention with ``per_layer[l]`` (bool
    ``[Hq, L, L]``, True = visible) as the additive mask of layer ``l``'s attention."""
    def swap(layer):
        bias = torch.zeros(1, HEADS, len(ids), len(ids)).masked_fill(~per_layer[layer],
                                                                     float("-inf"))

        def hook(_module, args, kwargs):
            kwargs["attention_mask"] = bias
            return args, kwargs
        return hook

    attn = [layer.self_attn for layer in reference.model.layers]
    handles = [m.register_forward_pre_hook(swap(i), with_kwargs=True) for i, m in enumerate(attn)]
    try:
        with torch.no_grad():
            return reference(input_ids=torch.tensor([ids])).logits[0]
    finally:
        for h in handles:
            h.remove()


def _causal(n: int) -> torch.Tensor:
    pos = torch.arange(n)
    return (pos[None, :] <= pos[:, None]).expand(HEADS, n, n).clone()


def _run(runner: MaskedRunner, prompt: list[int], extra: list[int], mask: HeadMask
         ) -> torch.Tensor:
    """Logits after the prompt and after each of `extra` (teacher-forced decode steps)."""
    out = [runner.prefill(prompt, mask, reserve=len(extra))]
    out += [runner.step(t, mask) for t in extra]
    return torch.stack(out)


def test_no_mask_matches_transformers(models):
    runner, reference = models
    ids = torch.randint(0, 300, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    got = _run(runner, ids[:64], ids[64:], HeadMask())
    want = _reference_logits(reference, ids, [_causal(len(ids))] * LAYERS)[63:]
    assert torch.allclose(got, want, atol=TOL)


def test_forced_heads_equal_an_independent_sink_window_mask(models):
    runner, reference = models
    ids = torch.randint(0, 300, (90,), generator=torch.Generator().manual_seed(2)).tolist()
    sink, window, forced = 3, 10, {(0, 1), (2, 3)}
    masks = []
    for layer in range(LAYERS):
        visible = _causal(len(ids))
        for head in range(HEADS):
            if (layer, head) in forced:
                for p in range(len(ids)):
                    for j in range(len(ids)):
                        visible[head, p, j] = j <= p and (j < sink or j > p - window)
        masks.append(visible)
    mask = ha.sparse_mask(sorted(forced), sink, window)
    got = _run(runner, ids[:80], ids[80:], mask)
    want = _reference_logits(reference, ids, masks)[79:]
    assert torch.allclose(got, want, atol=TOL)
    unforced = _run(runner, ids[:80], ids[80:], HeadMask())
    assert (got - unforced).abs().max() > 1e-3  # the mask changed something


def test_local_prefill_spans_several_chunks(models, monkeypatch):
    """The prefill's chunked recomputation of a forced head, across chunk boundaries."""
    from evaluation import head_masks

    runner, reference = models
    monkeypatch.setattr(head_masks, "_LOCAL_CHUNK", 16)
    ids = torch.randint(0, 300, (75,), generator=torch.Generator().manual_seed(3)).tolist()
    sink, window = 2, 20
    pos = torch.arange(len(ids))
    local = (pos[None] <= pos[:, None]) & ((pos[None] < sink) | (pos[None] > pos[:, None] - window))
    masks = [_causal(len(ids)) for _ in range(LAYERS)]
    masks[1][0] = local
    got = runner.prefill(ids, ha.sparse_mask([(1, 0)], sink, window))
    want = _reference_logits(reference, ids, masks)[-1]
    assert torch.allclose(got, want, atol=TOL)


def test_kept_keys_bind_decode_queries_only(models):
    runner, reference = models
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 300, (72,), generator=gen).tolist()
    prompt = 64
    kept = {layer: torch.rand(KV_HEADS, prompt, generator=gen) < 0.3 for layer in range(LAYERS)}
    masks = []
    for layer in range(LAYERS):
        visible = _causal(len(ids))
        for head in range(HEADS):
            for p in range(prompt, len(ids)):
                for j in range(prompt):
                    visible[head, p, j] = bool(kept[layer][head // GROUP, j])
        masks.append(visible)
    got = _run(runner, ids[:prompt], ids[prompt:], HeadMask(kept=kept, prompt_len=prompt))
    want = _reference_logits(reference, ids, masks)[prompt - 1:]
    assert torch.allclose(got, want, atol=TOL)
    # the prefill (first row) is full attention: identical to no eviction
    full = _run(runner, ids[:prompt], ids[prompt:], HeadMask())
    assert torch.equal(got[0], full[0]) and (got[1:] - full[1:]).abs().max() > 1e-3


def test_truncate_replays_the_same_decode(models):
    runner, _ = models
    ids = list(range(1, 50))
    first = runner.prefill(ids, reserve=8)
    a = runner.greedy(first, 8, set())
    runner.truncate(len(ids))
    b = runner.greedy(first, 8, set())
    assert a == b and len(a) == 8


def test_snapkv_selection_follows_the_papers_recipe(models):
    """Kept slots = top (B - w) of the observation window's attention (summed over the window's
    queries, summed over each GQA group; pool kernel 1) + the window, from eager weights."""
    runner, reference = models
    ids = torch.randint(0, 300, (60,), generator=torch.Generator().manual_seed(5)).tolist()
    window, budget = 4, 16
    runner.prefill(ids, capture=window)
    selection = ha.SnapKVSelection(runner, len(ids), window, pool_kernel=1)
    kept = selection.kept([[budget] * KV_HEADS for _ in range(LAYERS)])
    with torch.no_grad():
        weights = reference(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    for layer in range(LAYERS):
        obs = weights[layer][0, :, -window:, :].sum(1)  # [Hq, L]
        obs = F.max_pool1d(obs[:, None], 1)[:, 0]
        per_kv = obs.view(KV_HEADS, GROUP, -1).sum(1)
        for h in range(KV_HEADS):
            top = torch.topk(per_kv[h, :len(ids) - window], budget - window).indices
            want = set(top.tolist()) | set(range(len(ids) - window, len(ids)))
            assert set(torch.nonzero(kept[layer][h]).flatten().tolist()) == want


def test_budgets_per_kv_head_and_the_equal_total():
    heads = ha.HeadSets(top=[(0, 1), (2, 3)], random=[], protected_kv=[(0, 0), (2, 1)],
                        num_layers=3, num_heads=4, num_kv_heads=2)
    rows, other = ha.variant_budgets("snapkv", 100, 1000, heads)
    assert rows == [[100, 100]] * 3 and other == 100
    rows, other = ha.variant_budgets("protect", 100, 1000, heads)
    assert rows == [[1000, 100], [100, 100], [100, 1000]]
    rows, other = ha.variant_budgets("protect-equal", 500, 1000, heads)
    assert other == (6 * 500 - 2 * 1000) // 4 == 250
    assert sum(map(sum, rows)) == 6 * 500
    rows, other = ha.variant_budgets("protect-equal", 500, 1000, heads, protected_budget=600)
    assert rows[0] == [600, 450] and other == (6 * 500 - 2 * 600) // 4 == 450
    assert ha.equal_total_budget(100, 1000, 6, 2) < 1  # the protected heads alone are too many
    assert ha.equal_total_budget(2000, 1000, 6, 2) == 1000  # nothing evicted


def test_head_choice():
    ranked = [{"layer": la, "head": h, "retrieval_score": 1.0 - 0.01 * (4 * la + h)}
              for la in range(5) for h in range(4)]
    sets = ha.choose_heads(ranked, 5, 4, 2, 10.0, 3, seed=7)
    assert sets.top == [(0, 0), (0, 1)] and sets.count == 2 and sets.total == 20
    assert sets.protected_kv == [(0, 0)]
    assert len(sets.random) == 3
    for draw in sets.random:
        assert len(draw) == 2 and not set(draw) & set(sets.top)
    assert ha.choose_heads(ranked, 5, 4, 2, 10.0, 3, seed=7).random == sets.random
    assert ha.choose_heads(ranked, 5, 4, 2, 1.0, 1, seed=7).count == 1  # at least one head
    with pytest.raises(ValueError, match="does not match the model"):
        ha.choose_heads(ranked[:-1], 5, 4, 2, 10.0, 1, seed=7)
    with pytest.raises(ValueError, match="top percent"):
        ha.choose_heads(ranked, 5, 4, 2, 60.0, 1, seed=7)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), layers=LAYERS, heads=HEADS,
                           kv_heads=KV_HEADS, max_position_embeddings=1024)
    ranked = [{"layer": la, "head": h, "retrieval_score": 0.5} for la in range(LAYERS)
              for h in range(HEADS)]
    (path / "heads.json").write_text(json.dumps({"num_layers": LAYERS, "num_heads": HEADS,
                                                 "ranked": ranked}))
    return path


def test_command_end_to_end(checkpoint, tmp_path, capsys):
    """The command writes its tables and files; protecting heads with budgets at least the
    prompt length changes nothing; a rerun resumes with nothing left to do. (That it imports
    neither vLLM nor the server is an import-linter contract: tests/unit/test_architecture.py.)"""
    from evaluation.cli import main

    out = tmp_path / "ablate"
    argv = ["heads-ablate", str(checkpoint), "--heads", str(checkpoint / "heads.json"),
            "--tasks", "niah_single_1", "local_copy", "--lengths", "512", "--samples", "1",
            "--budgets", "24", "200", "1024", "--obs-window", "8", "--sink", "4",
            "--window", "32", "--random-draws", "2", "--top-percent", "10",
            "--max-new-tokens", "4", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "top 1/12" in stdout and "protect-equal" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heads"]["count"] == 1 and summary["heads"]["total"] == 12
    assert len(summary["heads"]["random"]) == 2
    for name in ("force.png", "evict.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "force.csv").read_text().startswith("task,length,condition")

    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    # 2 tasks x 1 sample x (none, top, 2 random, 3 budgets x 3 variants)
    assert len(records) == 2 * 13
    by = {(r["task"], r["index"], r["condition"], r["draw"], r["budget"]): r for r in records}
    for task in ("niah_single_1", "local_copy"):
        for index in range(1):
            none = by[(task, index, "none", None, None)]
            assert 300 < none["prompt_tokens"] < 512
            for variant in ha.EVICT_VARIANTS:
                big = by[(task, index, variant, None, 1024)]
                assert big["prediction"] == none["prediction"]
                assert big["kv_tokens"] == LAYERS * KV_HEADS * none["prompt_tokens"]
            small = by[(task, index, "snapkv", None, 24)]
            assert small["kv_tokens"] == LAYERS * KV_HEADS * 24
            protect = by[(task, index, "protect", None, 24)]
            assert protect["kv_tokens"] == (LAYERS * KV_HEADS - 1) * 24 + none["prompt_tokens"]
            # one protected KV head of 6 holding the prompt (> 120 tokens) leaves the other five
            # (6 * 24 - 120) / 5 < 8 tokens each: fewer than the observation window
            assert by[(task, index, "protect-equal", None, 24)]["skipped"]
            equal = by[(task, index, "protect-equal", None, 200)]
            assert equal["kv_tokens"] <= LAYERS * KV_HEADS * 200 and equal["score"] is not None

    assert main(argv) == 0  # the same command again: resumed, nothing left to run
    assert "2 of 2 samples already done" in capsys.readouterr().err
    assert len((out / "results.jsonl").read_text().splitlines()) == len(records)
    assert main([*argv, "--experiments", "evict"]) == 0  # one experiment's summary only
    assert json.loads((out / "summary.json").read_text())["force"] == []
    assert main([*argv, "--seed", "1"]) == 2  # other settings: refused, not mixed
    assert "holds a run with other settings (random_heads, seed)" in capsys.readouterr().err


def test_bad_options_exit_with_a_message(checkpoint, tmp_path, capsys):
    from evaluation.cli import main

    proc = subprocess.run([sys.executable, "-m", "server.cli", "eval", "heads-ablate",
                           str(checkpoint), "--top-percent", "60"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "must be in (0, 50] percent" in proc.stderr
    # checked before the model is loaded: the served snapkv's own bound
    assert main(["heads-ablate", str(checkpoint), "--budgets", "16", "--obs-window", "32",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "budget 16" in err and "kv_policy.window (32)" in err
    assert main(["heads-ablate", str(checkpoint), "--heads", str(tmp_path / "missing.json"),
                 "--out", str(tmp_path / "y"), "--lengths", "512"]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_help_states_the_served_defaults():
    import argparse

    from attention_backends.flux.router import DEFAULT_SINK, DEFAULT_WINDOW
    from evaluation.cli import add_ablate_arguments
    from kv_policies.eviction.policies.snapkv import SnapKVOptions
    parser = argparse.ArgumentParser()
    add_ablate_arguments(parser)
    text = " ".join(parser.format_help().split())
    fields = SnapKVOptions.model_fields
    assert f"default Flux's ({DEFAULT_SINK})" in text
    assert f"default Flux's ({DEFAULT_WINDOW})" in text
    assert f"default snapkv's ({fields['window'].default})" in text
    assert f"default snapkv's ({fields['pool_kernel'].default})" in text
