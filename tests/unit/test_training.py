"""training/: data and answers, the router's pooling and mask against the server's, router
training on a tiny random model (the Lagrangian moves each task type's sparsity toward its
target), the files `--flux-router` loads, teacher-forced scoring, and checkpoint packing."""

from __future__ import annotations

import json
import math

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

    from training.data import INDUCTION, INDUCTION_RANDOM, induction_sample

    texts = set()
    for seed in range(8):  # both kinds: uniform random tokens and word texts
        enc = induction_sample(random.Random(seed), tok, 300, 0, 1)
        half = enc.prompt_len - 1
        assert enc.task in (INDUCTION, INDUCTION_RANDOM) and len(enc.ids) <= 300
        assert enc.ids[0] == 0 and enc.ids[-1] == 1
        assert 0 not in enc.ids[1:-1] and 1 not in enc.ids[1:-1]
        assert enc.ids[1:enc.prompt_len] == enc.ids[enc.prompt_len:enc.prompt_len + half]
        batch = collate([enc], 320, 1)
        assert batch["task_index"].tolist() == [-2 if enc.task == INDUCTION_RANDOM else -1]
        assert int(batch["answer_mask"].sum()) == half + 1  # the copy and EOS
        # a word text re-encodes to itself; a random token sequence almost never does
        text = tok.decode(enc.ids[1:enc.prompt_len])
        same = tok.encode(text, add_special_tokens=False).ids == enc.ids[1:enc.prompt_len]
        assert same == (enc.task == INDUCTION)
        texts.add(same)
    assert texts == {True, False}
    # a stage of random copies only
    assert {induction_sample(random.Random(seed), tok, 64, 0, 1, random_token_share=1.0).task
            for seed in range(8)} == {INDUCTION_RANDOM}


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


# ---------------------------------------------------------------------------------------------
# the curriculum: loss-gated stage switches, the learning-rate schedule, split loss logging


def _stages():
    from training.curriculum import Stage
    from training.data import LengthMix

    mix = LengthMix((64,), (1.0,), 256, induction_fraction=1.0)
    return [Stage("copy", mix, copy_loss_below=1.0, min_steps=3, max_steps=10,
                  until_progress=0.5),
            Stage("tasks", mix, until_progress=0.8),
            Stage("long", mix)]


def test_gated_stage_switches_once_the_copy_loss_ema_is_low_after_min_steps():
    from training.curriculum import Curriculum

    cur = Curriculum(_stages(), ema_decay=0.5)
    assert cur.observe(0, 8.0, 0.01, 1) == []
    assert cur.observe(0, 0.1, 0.02, 2) == []  # EMA 4.05
    assert cur.observe(0, 0.1, 0.03, 3) == []  # EMA 2.075: min_steps reached, still high
    assert cur.observe(0, None, 0.04, 4) == []  # a batch without copies leaves the EMA
    assert cur.copy_loss_ema == pytest.approx(2.075)
    assert cur.observe(0, 0.1, 0.05, 5) == []  # EMA 1.0875
    [sw] = cur.observe(0, 0.1, 0.06, 6)  # EMA 0.59375 < 1.0
    assert (sw.reason, sw.step, sw.stage_steps) == ("copy_loss", 6, 6)
    assert sw.copy_loss_ema == pytest.approx(0.59375)
    assert sw.to_json() == {"stage": "copy", "next_stage": "tasks", "reason": "copy_loss",
                            "step": 6, "stage_steps": 6, "progress": 0.06,
                            "copy_loss_ema": 0.5938}
    assert cur.index == 1 and cur.switches == [sw]


def test_gate_waits_for_min_steps_and_ignores_prefetched_batches():
    from training.curriculum import Curriculum

    cur = Curriculum(_stages(), ema_decay=0.5)
    assert cur.observe(0, 0.2, 0.01, 1) == []  # low at once, but min_steps is 3
    assert cur.observe(0, 0.2, 0.02, 2) == []
    [sw] = cur.observe(0, 0.2, 0.03, 3)
    assert (sw.stage, sw.next_stage, sw.reason, sw.step, sw.stage_steps) == (
        "copy", "tasks", "copy_loss", 3, 3)
    assert sw.copy_loss_ema == pytest.approx(0.2)
    assert cur.stage.name == "tasks" and cur.copy_loss_ema is None
    # batches drawn for the previous stage (prefetched) count neither as steps nor in the EMA
    for i in range(5):
        assert cur.observe(0, 9.0, 0.1, 4 + i) == []
    assert cur.stage_steps == 0 and cur.copy_loss_ema is None
    assert cur.observe(1, None, 0.2, 9) == [] and cur.stage_steps == 1
    assert [s.to_json()["reason"] for s in cur.switches] == ["copy_loss"]


def test_step_cap_and_progress_end_a_stage_and_the_last_stage_never_ends():
    from training.curriculum import Curriculum, Stage

    cur = Curriculum(_stages())
    for i in range(9):  # never learns to copy
        assert cur.observe(0, 8.0, 0.01 * i, i + 1) == []
    [sw] = cur.observe(0, 8.0, 0.1, 10)
    assert (sw.reason, sw.stage_steps, sw.copy_loss_ema) == ("max_steps", 10, pytest.approx(8.0))
    assert cur.observe(1, None, 0.79, 11) == []
    [sw] = cur.observe(1, None, 0.8, 12)
    assert (sw.stage, sw.reason) == ("tasks", "progress")
    for i in range(50):
        assert cur.observe(2, 0.0, 1.0, 13 + i) == []
    assert cur.stage.name == "long"

    # a slow run: the time limit ends the gated stage and skips a stage whose time has passed
    cur = Curriculum(_stages())
    switches = cur.observe(0, 8.0, 0.85, 1)
    assert [(s.stage, s.reason) for s in switches] == [("copy", "progress"),
                                                       ("tasks", "progress")]
    assert cur.stage.name == "long"
    with pytest.raises(ValueError, match="no step cap"):
        Curriculum([Stage("gate", _stages()[0].mix, copy_loss_below=1.0), _stages()[2]])
    with pytest.raises(ValueError):
        Curriculum([])


def test_lr_warms_up_holds_its_peak_then_decays_to_a_tenth():
    from training.curriculum import lr_at

    assert lr_at(0, 0.0, 1e-3, 10) == pytest.approx(1e-4)
    assert lr_at(9, 0.0, 1e-3, 10) == pytest.approx(1e-3)
    assert lr_at(500, 0.3, 1e-3, 10) == lr_at(5000, 0.6, 1e-3, 10) == 1e-3
    assert lr_at(500, 0.8, 1e-3, 10) == pytest.approx(0.55e-3)
    assert lr_at(500, 1.0, 1e-3, 10) == pytest.approx(1e-4)
    mids = [lr_at(100, p / 10, 1e-3, 10) for p in range(6, 11)]
    assert mids == sorted(mids, reverse=True)


def test_copy_and_task_answer_losses_and_accuracies_are_logged_apart():
    from training.data import INDUCTION, INDUCTION_RANDOM
    from training.train_model import GROUPS, copy_loss, loss_fn, window_means

    torch.manual_seed(0)

    class Embed(torch.nn.Module):  # a sample's logits depend on its own tokens only
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(16, 4)
            self.model = lambda input_ids, use_cache: type(
                "O", (), {"last_hidden_state": self.emb(input_ids)})
            self.lm_head = torch.nn.Linear(4, 16, bias=False)

    model = Embed()
    copy = Encoded([0, 5, 6, 7, 5, 6, 7, 1], 4, INDUCTION_RANDOM, [])  # 3 tokens again + EOS
    words = Encoded([0, 8, 9, 8, 9, 1], 3, INDUCTION, [])  # 2 tokens again + EOS
    task_a = Encoded([0, 5, 6, 1], 3, "vt", ["x"])  # EOS only
    task_b = Encoded([0, 5, 6, 7, 8, 9, 1], 3, "cwe", ["x"])  # 3 answer tokens + EOS
    batch = collate([copy, words, task_a, task_b], 10, 1)
    assert batch["task_index"].tolist()[:2] == [-2, -1]
    loss, stats = loss_fn(model, batch, context_weight=0.0)
    with torch.no_grad():
        logits = model.lm_head(model.emb(batch["input_ids"]))
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"].clamp(min=0),
                                           reduction="none")
    mask = batch["answer_mask"]
    per = [float(ce[b][mask[b]].mean()) for b in range(4)]
    hit = ((logits.argmax(-1) == batch["labels"]) & mask).sum(1).tolist()
    assert [stats[f"{g}_samples"] for g in GROUPS] == [1, 1, 2]
    assert [stats[f"{g}_tokens"] for g in GROUPS] == [4, 3, 1 + 4]
    assert [stats[f"{g}_correct"] for g in GROUPS] == [hit[0], hit[1], hit[2] + hit[3]]
    assert copy_loss(stats) == pytest.approx(per[0], rel=1e-5)
    assert stats["copy_words_loss_sum"] == pytest.approx(per[1], rel=1e-5)
    assert stats["task_loss_sum"] == pytest.approx(per[2] + per[3], rel=1e-5)
    assert stats["loss_answer"] == pytest.approx(sum(per) / 4, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(sum(per) / 4, rel=1e-5)
    assert stats["answer_token_acc"] == pytest.approx(sum(hit) / 12)

    # a window: losses are means over samples, accuracies over tokens, across steps
    _, only_tasks = loss_fn(model, collate([task_a], 10, 1), context_weight=0.0)
    assert copy_loss(only_tasks) is None
    means = window_means([stats, only_tasks])
    assert means["loss_copy"] == pytest.approx(per[0], abs=1e-4)
    assert means["loss_copy_words"] == pytest.approx(per[1], abs=1e-4)
    assert means["loss_task"] == pytest.approx((2 * per[2] + per[3]) / 3, abs=1e-4)
    assert means["acc_task"] == pytest.approx((2 * hit[2] + hit[3]) / 6, abs=1e-4)
    assert means["copy_share"] == pytest.approx(2 / 5)
    alone = window_means([only_tasks])
    assert alone["loss_copy"] is alone["acc_copy"] is alone["acc_copy_words"] is None
    assert alone["copy_share"] == 0.0


def test_batches_follow_the_shared_stage_and_carry_it():
    import multiprocessing as mp

    from training.data import LengthMix, TaskBatches

    stage = mp.get_context("fork").Value("i", 0)
    mixes = [LengthMix((64,), (1.0,), 512, induction_fraction=1.0, random_token_share=1.0),
             LengthMix((256,), (1.0,), 512, induction_fraction=0.0)]
    stream = iter(TaskBatches(str(tokenizer_json_path()), 0, mixes, {"local_copy": 1.0},
                              stage))
    first = next(stream)
    assert int(first["stage"]) == 0 and first["input_ids"].shape == (8, 64)
    assert first["task_index"].tolist() == [-2] * 8  # random-token copies only
    stage.value = 1
    second = next(stream)
    assert int(second["stage"]) == 1 and second["input_ids"].shape[1] == 256
    assert (second["task_index"] == list(tasks.TASKS).index("local_copy")).all()


def test_training_run_writes_split_copy_and_task_curves(tmp_path):
    import csv

    from training.train_model import CSV_FIELDS, main

    # 6 steps: progress is step / 6, so the copy stages (until progress 0.4 and 0.5 in the tiny
    # recipe) end by their time limit at step 4, steps 5-6 draw task batches, and the short
    # task stage (until 0.7) ends after step 6
    info = main(["--preset", "tiny", "--out", str(tmp_path / "m"), "--device", "cpu",
                 "--max-steps", "6", "--tokens-per-batch", "512", "--workers", "0",
                 "--eval-samples", "0", "--threads", "1",
                 "--metrics", str(tmp_path / "m.log.jsonl")])
    assert info["steps"] == 6 and info["final_stage"] == "tasks-1k"
    assert [(s["stage"], s["reason"], s["step"]) for s in info["stage_switches"]] == [
        ("copy-64", "progress", 4), ("copy-256", "progress", 4), ("tasks-512", "progress", 6)]
    rows = list(csv.DictReader((tmp_path / "m.log.csv").open()))
    assert list(rows[0]) == list(CSV_FIELDS)
    assert [(int(r["step"]), r["stage"]) for r in rows] == [
        (1, "copy-64"), (4, "copy-64"), (6, "tasks-512")]
    for r in rows[:2]:  # copies of uniform random tokens only, not yet learned
        assert float(r["copy_share"]) == 1.0 and r["loss_task"] == r["acc_task"] == ""
        assert 7.0 < float(r["loss_copy"]) < 9.0 and 0 <= float(r["acc_copy"]) < 0.1
    assert float(rows[2]["copy_share"]) < 1.0 and float(rows[2]["loss_task"]) > 0
    records = [json.loads(x) for x in (tmp_path / "m.log.jsonl").read_text().splitlines()]
    assert [r["next_stage"] for r in records if r["event"] == "stage"] == [
        "copy-256", "tasks-512", "tasks-1k"]
    saved = json.loads((tmp_path / "m" / "training_info.json").read_text())
    assert saved["last_train"]["loss_task"] == pytest.approx(float(rows[-1]["loss_task"]))
    assert saved["heldout"] is None
    assert (tmp_path / "m" / "training_curves.csv").read_text() == (
        tmp_path / "m.log.csv").read_text()
    # the held-out copy probe: 6 steps have not learned to copy (ln 4096 = 8.3 nats)
    assert sorted(saved["copy_probe"], key=int) == ["64", "256", "1024"]
    assert all(v["loss"] > 6 and v["acc"] < 0.1 for v in saved["copy_probe"].values())


def test_copy_probe_scores_an_oracle_full_and_a_blind_model_at_chance(tok):
    class Oracle(torch.nn.Module):  # reads the next token: every prediction right
        def forward(self, input_ids, use_cache):
            nxt = torch.roll(input_ids, -1, dims=1)
            return type("O", (), {"logits": 30.0 * torch.nn.functional.one_hot(
                nxt, tok.get_vocab_size()).float()})

    class Blind(torch.nn.Module):  # uniform logits: ln(vocab) nats, argmax token 0 (BOS)
        def forward(self, input_ids, use_cache):
            return type("O", (), {"logits": torch.zeros(*input_ids.shape, tok.get_vocab_size())})

    res = heldout.copy_probe(Oracle(), tok, [64, 200], 3, "cpu", 256)
    assert res == {64: {"loss": 0.0, "acc": 1.0, "samples": 3},
                   200: {"loss": 0.0, "acc": 1.0, "samples": 3}}
    blind = heldout.copy_probe(Blind(), tok, [64], 2, "cpu", 64)[64]
    assert blind["loss"] == pytest.approx(math.log(tok.get_vocab_size()), rel=1e-4)
    assert blind["acc"] == 0.0
