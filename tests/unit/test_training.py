"""training/: data and answers, the router's pooling and mask against the server's, router
training on a tiny random model (the Lagrangian moves each task type's sparsity toward its
target), the files `--flux-router` loads, teacher-forced scoring, and checkpoint packing."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer

from attention_backends.flux.router import load_router_file, pooled_sum
from attention_backends.kernels.reference import visible_mask
from evaluation import scoring, tasks
from training import heldout, pack
from training.data import TASK_TYPES, TYPE_NAMES, Encoded, TaskSampler, answer_text, collate
from training.routers import RouterTrainer, attach, pool_weights, save_routers, sparse_mask
from training.tokenizer import tokenizer_json_path


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(str(tokenizer_json_path()))


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_every_task_sample_fits_and_its_answer_scores_full(tok, name):
    sampler = TaskSampler(0, tok, [name])
    enc = sampler.sample(name, "unit", 1024)
    assert len(enc.ids) <= 1024 and len(enc.ids) > 700
    assert enc.ids[0] == sampler.bos and enc.ids[-1] == sampler.eos
    answer = tok.decode(enc.ids[enc.prompt_len:-1])
    assert scoring.string_match_all(answer, enc.outputs) == 1.0
    assert scoring.string_match_all(answer_text(name, enc.outputs), enc.outputs) == 1.0


def test_collate_predicts_the_answer_and_eos_only_where_marked():
    a = Encoded([0, 5, 6, 7, 8, 1], 4, "vt", ["x"])
    b = Encoded([0, 9, 10, 1], 3, "local_copy", ["y"])
    batch = collate([a, b], 8, pad_id=1)
    assert batch["input_ids"][1].tolist() == [0, 9, 10, 1, 1, 1, 1, 1]
    assert batch["labels"][0].tolist() == [5, 6, 7, 8, 1, -100, -100, -100]
    # positions that predict the answer token(s) and EOS
    assert batch["answer_mask"][0].tolist() == [False, False, False, True, True] + [False] * 3
    assert batch["answer_mask"][1].tolist() == [False, False, True] + [False] * 5
    assert batch["prompt_len"].tolist() == [4, 3]
    names = list(tasks.TASKS)
    assert [names[i] for i in batch["task_index"].tolist()] == ["vt", "local_copy"]


def test_sparse_mask_is_the_served_sink_window_mask():
    t = 40
    pos = torch.arange(t)
    expected = visible_mask(pos, pos, sink=3, window=7, kept_end=t, gap_end=t)
    assert torch.equal(sparse_mask(t, 3, 7, "cpu"), expected)


def test_pool_weights_give_the_servers_pooled_feature():
    torch.manual_seed(0)
    q = torch.randn(2, 50, 4, 8)
    lens = torch.tensor([50, 13])  # the second overlaps: its tokens count twice
    w = pool_weights(lens, 50, pool_size=10)
    ours = torch.einsum("bt,bthd->bd", w, q) / q.shape[2]
    for b, n in enumerate(lens.tolist()):
        total, count = pooled_sum(q[b, :n], 10)
        torch.testing.assert_close(ours[b], total / count)


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=16, max_position_embeddings=1024, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def _batch(tok, names, index):
    sampler = TaskSampler(0, tok, names)
    samples = [sampler.sample(n, f"r:{index}:{i}", 256) for i, n in enumerate(names)]
    return collate(samples, 256, sampler.eos)


def test_router_training_moves_each_types_sparsity_toward_its_target(tok, tmp_path):
    model = _tiny_model()
    state = attach(model, sink=4, window=16, pool_size=16, seed=0)
    targets = {"retrieval": 0.1, "aggregation": 0.5, "local": 0.9}
    trainer = RouterTrainer(model, state, targets, lr=1e-2, lambda_lr=1.0)
    names = ["niah_single_1", "local_copy", "niah_single_2", "local_pattern"]
    batches = [_batch(tok, names, i) for i in range(4)]
    assert all(not p.requires_grad for p in model.parameters())

    def violation(stats):
        return {n: abs(stats["s"][TYPE_NAMES.index(n)].item() - targets[n])
                for n in ("retrieval", "local")}

    first = violation(trainer.step(batches[0]))
    for i in range(25):
        state.tau = 1.0 * 0.2 ** (i / 25)
        stats = trainer.step(batches[i % len(batches)])
    last = violation(stats)
    for name in ("retrieval", "local"):
        assert last[name] < 0.5 * first[name], (first, last)
    # the served decisions (argmax) follow: local prompts mostly sparse, retrieval mostly full
    state.start(batches[0], "hard")
    with torch.no_grad():
        model(input_ids=batches[0]["input_ids"], use_cache=False)
    sparse = torch.stack([state.sparse[i] for i in sorted(state.sparse)], 1).mean(1)
    types = [TASK_TYPES[list(tasks.TASKS)[i]] for i in batches[0]["task_index"].tolist()]
    local = [s for s, t in zip(sparse.tolist(), types, strict=True) if t == "local"]
    retrieval = [s for s, t in zip(sparse.tolist(), types, strict=True) if t == "retrieval"]
    assert min(local) > max(retrieval)

    # the written folder is what the server loads, and decides as training's argmax does
    save_routers(state, tmp_path / "router")
    routers, spec = load_router_file(tmp_path / "router")
    assert (spec.sink, spec.window, spec.pool_size, spec.num_outputs) == (4, 16, 16, 2)
    assert json.loads((tmp_path / "router" / "router_config.json").read_text())[
        "num_hidden_layers"] == 3
    feature = torch.randn(5, 16)
    for i, r in routers.items():
        with torch.no_grad():
            lg = state.routers[i].cls_router_head_agnostic(state.routers[i].cls_feat_extractor(
                feature))
        assert torch.equal(r.decide_sparse(feature), lg.argmax(-1) != 1)


def test_teacher_forced_exact_match_is_greedy_decoding(tok):
    model = _tiny_model()
    prompt = [0, *tok.encode("Below is a long text. Answer:", add_special_tokens=False).ids]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                             eos_token_id=None, pad_token_id=1)
    greedy = out[0, len(prompt):].tolist()
    text = tok.decode(greedy[:5])
    good = Encoded(prompt + greedy, len(prompt), "local_copy", [text], 512)
    bad = Encoded(prompt + greedy[:5] + [(greedy[5] + 1) % 4096], len(prompt), "local_copy",
                  [text], 512)
    recs = heldout.teacher_forced(model, [good, bad], tok, "cpu", 4096, pad_id=1)
    assert [r["exact"] for r in recs] == [1.0, 0.0]
    assert recs[1]["score"] == 1.0  # the wrong token comes after the reference text
    summary = heldout.summarize(recs, "exact")
    assert summary["by_task"]["local_copy"][512] == 50.0


def test_pack_round_trip_and_a_corrupt_piece(tmp_path):
    src = tmp_path / "ckpt"
    (src / "router").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(bytes(range(256)) * 5000)
    (src / "router" / "router_config.json").write_text("{}")
    manifest = pack.pack(src, tmp_path / "out" / "m", piece_bytes=300_000)
    assert len(manifest["pieces"]) == 5
    dest = pack.unpack(tmp_path / "out" / "m.manifest.json", tmp_path / "back" / "ckpt")
    assert (dest / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert (dest / "router" / "router_config.json").read_text() == "{}"
    piece = tmp_path / "out" / manifest["pieces"][2]["name"]
    piece.write_bytes(b"x" + piece.read_bytes()[1:])
    with pytest.raises(ValueError, match="SHA-256"):
        pack.unpack(tmp_path / "out" / "m.manifest.json", tmp_path / "again")


def test_induction_sample_repeats_its_text_as_the_answer(tok):
    import random

    from training.data import INDUCTION, induction_sample

    texts = set()
    for seed in range(8):  # both kinds: uniform random tokens and word texts
        enc = induction_sample(random.Random(seed), tok, 300, 0, 1)
        half = enc.prompt_len - 1
        assert enc.task == INDUCTION and len(enc.ids) <= 300
        assert enc.ids[0] == 0 and enc.ids[-1] == 1
        assert 0 not in enc.ids[1:-1] and 1 not in enc.ids[1:-1]
        assert enc.ids[1:enc.prompt_len] == enc.ids[enc.prompt_len:enc.prompt_len + half]
        batch = collate([enc], 320, 1)
        assert batch["task_index"].tolist() == [-1]
        assert int(batch["answer_mask"].sum()) == half + 1  # the copy and EOS
        # a word text re-encodes to itself; a random token sequence almost never does
        text = tok.decode(enc.ids[1:enc.prompt_len])
        texts.add(tok.encode(text, add_special_tokens=False).ids == enc.ids[1:enc.prompt_len])
    assert texts == {True, False}


def test_answer_loss_weighs_every_sample_equally():
    from training.train_model import loss_fn

    torch.manual_seed(0)
    hidden = torch.randn(2, 10, 4)

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = lambda input_ids, use_cache: type("O", (), {"last_hidden_state": hidden})
            self.lm_head = torch.nn.Linear(4, 16, bias=False)

    model = Fixed()
    short = Encoded([0, 5, 6, 1], 3, "vt", ["x"])  # 1 answer token + EOS
    long = Encoded([0, 5, 6, 7, 8, 9, 10, 11, 1], 3, "cwe", ["x"])  # 6 answer tokens + EOS
    batch = collate([short, long], 10, 1)
    _, stats = loss_fn(model, batch, context_weight=0.0)
    ce = torch.nn.functional.cross_entropy(
        model.lm_head(hidden).transpose(1, 2), batch["labels"].clamp(min=0), reduction="none")
    per_sample = [ce[b][batch["answer_mask"][b]].mean() for b in range(2)]
    assert stats["loss_answer"] == pytest.approx(float(sum(per_sample) / 2), rel=1e-5)
