"""Reuse of a step's routing and eviction parts across steps (vllm_glue.metadata._StepReuse).

``build_step_metadata`` keeps the last step's parts and hands them to the next step of the same
requests in the same order when it would build equal ones. These tests pin that: over random
step sequences (rows joining, leaving and swapping places, prompts in chunks, prompts completing,
``auto`` requests routed, requests released and preempted, padding rows), every step built
with reuse equals the step built from scratch by an independent registry and runtime fed the
same calls.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_backends.flux.request_state import BatchRow, FluxRegistry
from attention_backends.flux.router import RouterSpec
from attention_backends.vllm_glue import metadata
from kv_policies.eviction.runtime import KVPolicyRuntime

LAYERS, BLOCK = 4, 16

OPTIONS = {
    "none": None,
    "full": {"flux": {"mode": "full"}},
    "sparse": {"flux": {"mode": "sparse", "sink": 4, "window": 32}},
    "layers": {"flux": {"mode": "layers", "sparse_layers": [1, 2], "sink": 2, "window": 8}},
    "auto": {"flux": {"mode": "auto"}},
    "snapkv": {"kv_policy": {"name": "snapkv", "budget": 64, "window": 8}},
    "calidrop": {"kv_policy": {"name": "calidrop", "budget": 48, "window": 8}},
    "sparse+calidrop": {"flux": {"mode": "sparse", "sink": 4, "window": 16},
                        "kv_policy": {"name": "calidrop", "budget": 64, "window": 8}},
}


class World:
    """One worker's registry and eviction runtime."""

    def __init__(self) -> None:
        self.registry = FluxRegistry()
        self.registry.set_routers({i: object() for i in range(LAYERS)}, RouterSpec())
        self.runtime = KVPolicyRuntime()

    def build(self, num_rows, qsl, rows, block_size, none_when_dense):
        return metadata.build_step_metadata(num_rows, qsl, rows, self.registry, LAYERS,
                                            block_size, self.runtime,
                                            none_when_dense=none_when_dense)

    def route(self, step, decide) -> None:
        """What ``flux.routing.route_layer`` records, layer by layer, for the routed rows."""
        if step is None:
            return
        for layer in range(LAYERS):
            sparse = [decide(rr.req_id, layer) for rr in step.routing.route_rows]
            step.routing.set_decisions(layer, sparse)
            for rr, sp in zip(step.routing.route_rows, sparse, strict=True):
                self.registry.record_decision(rr.req_id, layer, sp, LAYERS)

    def end_step(self) -> None:
        """The runner hook's bookkeeping before the next step (``vllm_private``)."""
        for s in self.registry.states.values():
            if s.prefill_done_at is None and s.prompt_done_pending:
                s.prefill_done_at = 1.0

    def release(self, req_id: str) -> None:
        self.registry.release(req_id)
        self.runtime.release(req_id)


def assert_same(a, b) -> None:
    """Two steps' metadata hold equal values."""
    assert (a is None) == (b is None)
    if a is None:
        return
    ra, rb = a.routing, b.routing
    assert ra.req_ids == rb.req_ids and ra.num_layers == rb.num_layers
    assert torch.equal(ra.sparse, rb.sparse)
    assert torch.equal(ra.sink, rb.sink) and torch.equal(ra.window, rb.window)
    assert ra.sink.dtype == rb.sink.dtype == torch.int32
    assert [vars(r) for r in ra.route_rows] == [vars(r) for r in rb.route_rows]
    assert ra.prompt_done == rb.prompt_done
    for layer in range(LAYERS):  # what the attention reads per layer (kept on shared steps)
        assert ra.any_sparse(layer) == rb.any_sparse(layer) == bool(ra.sparse[layer].any())
        for x, y in zip(ra.layer_window(layer, torch.device("cpu")),
                        rb.layer_window(layer, torch.device("cpu")), strict=True):
            assert torch.equal(x, y)
    ea, eb = a.eviction, b.eviction
    assert ea.plans == eb.plans and ea.policies == eb.policies
    assert (ea.kept_end is None) == (eb.kept_end is None)
    if ea.kept_end is not None:
        assert torch.equal(ea.kept_end, eb.kept_end) and torch.equal(ea.gap_end, eb.gap_end)
    assert ea.compress_rows == eb.compress_rows
    assert ea.any_compressed == eb.any_compressed and ea.active == eb.active
    assert a.max_kv_tokens == b.max_kv_tokens
    assert a.query_start_loc == b.query_start_loc


def build_both(cached: World, fresh: World, num_rows, qsl, rows, block_size, none_when_dense):
    """The step built by ``cached`` (which may reuse its last step) and by ``fresh`` from
    scratch; ``fresh``'s build does not replace what ``cached`` keeps."""
    got = cached.build(num_rows, qsl, rows, block_size, none_when_dense)
    kept = metadata._REUSE
    want = fresh.build(num_rows, qsl, rows, block_size, none_when_dense)
    # fresh's registry is not the kept one, so it built from scratch; put cached's back
    metadata._REUSE = kept
    return got, want


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_steps_built_with_reuse_equal_fresh_builds(data):
    names = data.draw(st.lists(st.sampled_from(sorted(OPTIONS)), min_size=1, max_size=6),
                      label="requests")
    prompt = data.draw(st.lists(st.integers(1, 160), min_size=len(names),
                                max_size=len(names)), label="prompt lengths")
    block_size = data.draw(st.sampled_from([BLOCK, None]), label="block size")
    none_when_dense = data.draw(st.booleans(), label="none_when_dense")
    worlds = World(), World()
    metadata._REUSE = None
    ids = [f"q{i}-{n}" for i, n in enumerate(names)]
    computed = [0] * len(names)
    live = set(range(len(names)))
    batch: list[int] = []

    def decide(req_id: str, layer: int) -> bool:
        return (zlib.crc32(req_id.encode()) + layer) % 3 == 0

    for _ in range(data.draw(st.integers(1, 40), label="steps")):
        action = data.draw(st.sampled_from(
            ["same"] * 10 + ["join", "leave", "swap", "preempt", "recompute", "release",
                             "pad", "idle"]))
        waiting = sorted(live - set(batch))
        if action == "join" and waiting:
            batch.insert(data.draw(st.integers(0, len(batch))), data.draw(
                st.sampled_from(waiting)))
        elif action == "leave" and batch:
            batch.pop(data.draw(st.integers(0, len(batch) - 1)))
        elif action == "swap" and len(batch) > 1:
            i = data.draw(st.integers(0, len(batch) - 2))
            batch[i], batch[i + 1] = batch[i + 1], batch[i]
        elif action == "preempt" and batch:
            r = batch.pop(data.draw(st.integers(0, len(batch) - 1)))
            for w in worlds:  # as the runner hook: eviction state goes, routing stays
                w.runtime.release(ids[r])
            computed[r] = 0
        elif action == "recompute" and batch:  # preempted and resumed in place
            r = batch[data.draw(st.integers(0, len(batch) - 1))]
            for w in worlds:
                w.runtime.release(ids[r])
            computed[r] = 0
        elif action == "release" and batch:
            r = batch.pop(data.draw(st.integers(0, len(batch) - 1)))
            for w in worlds:
                w.release(ids[r])
            live.discard(r)
        q_lens = []
        for r in batch:
            left = prompt[r] - computed[r]
            q_lens.append(data.draw(st.integers(1, left)) if left > 0
                          else data.draw(st.sampled_from([1, 1, 1, 2])))
        rows: list[BatchRow | None] = [BatchRow(ids[r], prompt[r], computed[r], OPTIONS[names[r]])
                                       for r in batch]
        num_rows = len(rows)
        if action == "idle" and batch:  # a row with no token in this step
            i = data.draw(st.integers(0, len(batch) - 1))
            q_lens[i] = 0
        if action == "pad":  # a padding row, inside or after the given rows
            if rows and data.draw(st.booleans()):
                rows[data.draw(st.integers(0, len(rows) - 1))] = None
            else:
                num_rows += 1
                q_lens.append(0)
        qsl = torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32)
        got, want = build_both(*worlds, num_rows, qsl, rows, block_size, none_when_dense)
        assert_same(got, want)
        for w, step in zip(worlds, (got, want), strict=True):
            w.route(step, decide)
            w.end_step()
        for a, b in zip(worlds[0].registry.states.values(), worlds[1].registry.states.values(),
                        strict=True):
            assert (a.req_id, a.prompt_done_pending) == (b.req_id, b.prompt_done_pending)
        for r, q, row in zip(batch, q_lens, rows, strict=False):
            if row is not None:
                computed[r] += q
    metadata._REUSE = None


def _decode_rows(computed: int, names=("sparse", "calidrop", "none")) -> list[BatchRow]:
    return [BatchRow(f"d-{n}", 200, computed, OPTIONS[n]) for n in names]


def test_decode_steps_of_one_batch_share_their_parts_until_the_batch_changes():
    w = World()
    metadata._REUSE = None
    qsl = torch.arange(4, dtype=torch.int32)
    first = w.build(3, torch.tensor([0, 200, 400, 600], dtype=torch.int32),
                    _decode_rows(0), BLOCK, True)  # the prompts complete: compressed here
    assert first is not None and first.eviction.compress_rows
    s1 = w.build(3, qsl, _decode_rows(200), BLOCK, True)
    s2 = w.build(3, qsl, _decode_rows(201), BLOCK, True)
    assert s2.routing is s1.routing and s2.eviction is s1.eviction  # reused, device copies too
    assert s2.max_kv_tokens == [s + 1 for s in s1.max_kv_tokens]  # ...but its own bounds
    assert s1.routing is not first.routing
    # a row leaves: built again
    s3 = w.build(2, qsl[:3], _decode_rows(202)[:2], BLOCK, True)
    assert s3.routing is not s2.routing and s3.routing.req_ids == ["d-sparse", "d-calidrop"]
    # another request starts (the registry changes): built again
    w.build(1, qsl[:2], [BatchRow("new", 50, 0, OPTIONS["sparse"])], BLOCK, True)
    s4 = w.build(2, qsl[:3], _decode_rows(203)[:2], BLOCK, True)
    s5 = w.build(2, qsl[:3], _decode_rows(204)[:2], BLOCK, True)
    assert s4.routing is not s3.routing and s5.routing is s4.routing
    # another registry (another worker's, a test's): never the kept parts
    other = World().build(2, qsl[:3], _decode_rows(205)[:2], BLOCK, True)
    assert other.routing is not s5.routing
    metadata._REUSE = None


def test_a_pending_auto_request_is_routed_in_the_step_that_schedules_it():
    """A request still to be routed is never covered by a kept step, even when its first
    scheduled step comes after steps that left it out."""
    w = World()
    metadata._REUSE = None
    rows = [BatchRow("s", 100, 100, OPTIONS["sparse"]), BatchRow("a", 100, 0, OPTIONS["auto"])]
    # "a" in the batch with no token scheduled (a padding-like row): registered, not routed
    idle = w.build(2, torch.tensor([0, 1, 1], dtype=torch.int32), rows, BLOCK, False)
    assert idle.routing.route_rows == []
    step = w.build(2, torch.tensor([0, 1, 41], dtype=torch.int32),
                   [rows[0], BatchRow("a", 100, 0, OPTIONS["auto"])], BLOCK, False)
    assert [r.req_id for r in step.routing.route_rows] == ["a"]
    metadata._REUSE = None
