"""Training and held-out data from the evaluation task generators (`evaluation.tasks`).

A training sample is one task prompt, its answer prefix and the answer RULER expects, as token
ids: ``<BOS> prompt answer_prefix answer <EOS>``. It is built by haystack size rather than fitted
exactly to a length (the evaluation fits every sample; training only needs lengths in a range):
the sampler keeps, per task and length bucket, the last haystack size and the tokens it gave,
and scales it to land a little under the target.

Held-out samples are the evaluation's own (`tasks.generate` fitted with this tokenizer, as
``fluxserve eval --api completions`` would send them), with seeds that training never uses.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from evaluation import tasks

# Task types for router training: a Lagrangian sparsity target per type (training.routers).
TASK_TYPES: dict[str, str] = {
    **{name: "retrieval" for name in tasks.NEEDLE_TASKS}, "vt": "retrieval",
    "cwe": "aggregation", "fwe": "aggregation",
    **{name: "local" for name in tasks.LOCAL_TASKS},
}
TYPE_NAMES = ("retrieval", "aggregation", "local")
# The auxiliary copying task (training only, never evaluated): a random text repeated twice.
# Its samples' task names, and their ``task_index`` in a batch (task samples index
# ``tasks.TASKS``): copies of word texts, and copies of uniform random token ids.
INDUCTION = "induction"
INDUCTION_RANDOM = "induction_random"
AUX_TASK_INDEX = {INDUCTION: -1, INDUCTION_RANDOM: -2}
# The share of induction samples whose text is uniform random tokens rather than words.
RANDOM_TOKEN_SHARE = 0.5


def answer_text(task_name: str, outputs: list[str]) -> str:
    """The text after the answer prefix that training teaches: the references in the form of
    each task's solved example (cwe's numbered list, vt's space-separated names), or a list."""
    if task_name == "cwe":
        return " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(outputs))
    if task_name in ("vt", "local_copy"):
        return " " + " ".join(outputs)
    if task_name.startswith("niah_"):
        return " " + ", ".join(outputs) + "."
    return " " + ", ".join(outputs)


@dataclass
class Encoded:
    """One tokenized sample. ``ids`` [n] int64: BOS, prompt, answer prefix, answer, EOS;
    ``prompt_len``: tokens before the answer (BOS, prompt and prefix: what a server prefills);
    ``task``: task name."""

    ids: list[int]
    prompt_len: int
    task: str
    outputs: list[str]
    length: int = 0  # held-out samples: the evaluation length it was fitted to


class TaskSampler:
    """Builds task samples with a `tokenizers.Tokenizer` (None: text only, for the tokenizer's own
    training corpus)."""

    def __init__(self, seed: int, tokenizer=None, task_names: list[str] | None = None):
        self.seed = seed
        self.tokenizer = tokenizer
        self.task_names = list(task_names or tasks.TASKS)
        self._units: dict[tuple[str, int], tuple[int, int]] = {}  # (task, bucket) -> (n, tokens)
        if tokenizer is not None:
            self.bos = tokenizer.token_to_id("<|begin_of_text|>")
            self.eos = tokenizer.token_to_id("<|end_of_text|>")

    def build(self, name: str, sample_seed: str, length: int, n: int | None = None
              ) -> tuple[tasks.Built, str]:
        task = tasks.TASKS[name]
        if n is None:
            n = max(task.min_units(), int(length / task.tokens_per_unit_guess()))
        cap = task.max_units()
        n = max(task.min_units(), n if cap is None else min(n, cap))
        built = task.build(sample_seed, n, length)
        return built, answer_text(name, built.outputs)

    def encode(self, name: str, built: tasks.Built, answer: str) -> Encoded:
        enc = self.tokenizer.encode_batch([built.prompt + built.answer_prefix, answer],
                                          add_special_tokens=False)
        prompt = [self.bos, *enc[0].ids]
        return Encoded(prompt + enc[1].ids + [self.eos], len(prompt), name, built.outputs)

    def sample(self, name: str, sample_seed: str, target: int) -> Encoded:
        """A sample of at most `target` tokens (BOS to EOS), usually within 10 % of it."""
        task = tasks.TASKS[name]
        key = (name, target)
        n, tokens = self._units.get(key, (None, None))
        if n is not None:
            n = max(task.min_units(), int(n * 0.97 * target / tokens))
        enc = None
        for _ in range(8):
            built, answer = self.build(name, sample_seed, target, n)
            used_n = n if n is not None else max(
                task.min_units(), int(target / task.tokens_per_unit_guess()))
            enc = self.encode(name, built, answer)
            self._units[key] = (used_n, len(enc.ids))
            if len(enc.ids) <= target:
                return enc
            n = max(task.min_units(), int(used_n * 0.95 * target / len(enc.ids)))
            if used_n == task.min_units():
                break
        raise ValueError(f"{name}: no sample fits {target} tokens")


# ---------------------------------------------------------------------------------------------
# batches


@dataclass(frozen=True)
class LengthMix:
    """Which padded lengths (buckets) to draw and how often (by batches), and the token budget of
    one batch: ``batch = tokens_per_batch // bucket`` samples, each of a target length drawn
    uniformly in ``[min_fill * bucket, bucket]``. ``induction_fraction``, when set, overrides the
    stream's share of auxiliary copying samples while this mix is in force (1.0: copies only);
    ``random_token_share`` is the share of those copies whose text is uniform random token ids
    (the rest are word texts)."""

    buckets: tuple[int, ...]
    weights: tuple[float, ...]
    tokens_per_batch: int
    min_fill: float = 0.55
    induction_fraction: float | None = None
    random_token_share: float = RANDOM_TOKEN_SHARE


def induction_sample(rng: random.Random, tokenizer, target: int, bos: int, eos: int,
                     random_token_share: float = RANDOM_TOKEN_SHARE) -> Encoded:
    """The auxiliary copying task: BOS, a random text of words, 7-digit numbers and UUIDs, then
    the same text again, whose tokens are the "answer". Every answer token is predictable only
    by looking back, so the copying (induction) heads that retrieval needs form early, instead
    of from the few answer tokens of the task samples alone. A `random_token_share` of them are
    uniform random token ids instead of words: on word text a model first fits the words' own
    statistics and the copy forms much later (no copying after 400 tiny-model steps at 256
    tokens, against about 125 steps on random tokens)."""
    from evaluation import words

    half = max(8, (target - 2) // 2)
    if rng.random() < random_token_share:
        # uniform token ids (specials excluded): no n-gram statistic predicts the copy, so
        # looking back is the only route, and the copying heads form within a few hundred steps
        first = [rng.randrange(2, tokenizer.get_vocab_size()) for _ in range(half)]
        return Encoded([bos, *first, *first, eos], half + 1, INDUCTION_RANDOM, [])
    vocab = words.vocabulary()
    pieces: list[str] = []
    ids: list[int] = []
    while len(ids) < half:
        r = rng.random()
        piece = (str(rng.randint(10**6, 10**7 - 1)) if r < 0.15 else
                 tasks._random_value(rng, "uuids") if r < 0.2 else rng.choice(vocab))
        pieces.append(piece)
        if len(pieces) % 16 == 0:
            ids = tokenizer.encode(" ".join(pieces), add_special_tokens=False).ids
    text = " " + " ".join(pieces)
    first = tokenizer.encode(text, add_special_tokens=False).ids[:half]
    prompt = [bos, *first]
    return Encoded(prompt + first + [eos], len(prompt), INDUCTION, [])


def collate(samples: list[Encoded], pad_to: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to `pad_to`. Returns ``input_ids`` [B, T] int64, ``labels`` [B, T] int64 (the
    next token, -100 where nothing is predicted), ``answer_mask`` [B, T] bool (positions that
    predict an answer or EOS token), ``prompt_len`` [B] int64, ``task_index`` [B] int64 (into
    ``tasks.TASKS``; `AUX_TASK_INDEX` for the auxiliary copying samples: -1 word texts, -2
    random tokens)."""
    b = len(samples)
    ids = torch.full((b, pad_to), pad_id, dtype=torch.long)
    labels = torch.full((b, pad_to), -100, dtype=torch.long)
    answer = torch.zeros((b, pad_to), dtype=torch.bool)
    names = list(tasks.TASKS)
    for i, s in enumerate(samples):
        n = len(s.ids)
        t = torch.tensor(s.ids, dtype=torch.long)
        ids[i, :n] = t
        labels[i, :n - 1] = t[1:]
        answer[i, s.prompt_len - 1:n - 1] = True
    return {"input_ids": ids, "labels": labels, "answer_mask": answer,
            "prompt_len": torch.tensor([s.prompt_len for s in samples]),
            "task_index": torch.tensor([names.index(s.task) if s.task in names
                                        else AUX_TASK_INDEX[s.task] for s in samples])}


class TaskBatches(torch.utils.data.IterableDataset):
    """An endless stream of padded batches; each DataLoader worker draws its own.

    `mixes` holds one `LengthMix` per curriculum stage; the mix in force is ``mixes[i]`` with
    ``i`` the value of the shared `stage` (a ``multiprocessing.Value`` the training loop writes
    when it switches stages; None: always the first mix). Each batch carries ``stage``, a 0-d
    int64 tensor: the stage it was drawn for, so that batches prefetched before a switch are not
    counted as the new stage's."""

    def __init__(self, tokenizer_path: str, seed: int, mixes: list[LengthMix],
                 task_weights: dict[str, float], stage=None, namespace: str = "train",
                 induction_fraction: float = 0.0):
        super().__init__()
        self.induction_fraction = induction_fraction
        self.tokenizer_path = tokenizer_path
        self.seed, self.mixes, self.stage = seed, mixes, stage
        self.task_weights = task_weights
        self.namespace = namespace

    def _stage(self) -> int:
        return min(self.stage.value, len(self.mixes) - 1) if self.stage is not None else 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        from tokenizers import Tokenizer

        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        tok = Tokenizer.from_file(self.tokenizer_path)
        names = list(self.task_weights)
        weights = [self.task_weights[n] for n in names]
        sampler = TaskSampler(self.seed, tok, names)
        rng = random.Random(f"{self.namespace}:{self.seed}:{worker}")
        count = 0
        while True:
            stage = self._stage()
            mix = self.mixes[stage]
            bucket = rng.choices(mix.buckets, mix.weights)[0]
            size = max(1, mix.tokens_per_batch // bucket)
            induction = (self.induction_fraction if mix.induction_fraction is None
                         else mix.induction_fraction)
            batch = []
            for _ in range(size):
                name = rng.choices(names, weights)[0]
                target = rng.randint(math.ceil(mix.min_fill * bucket), bucket)
                seed = f"{self.namespace}:{self.seed}:{worker}:{count}"
                count += 1
                if rng.random() < induction:
                    batch.append(induction_sample(rng, tok, target, sampler.bos, sampler.eos,
                                                  mix.random_token_share))
                    continue
                try:
                    batch.append(sampler.sample(name, seed, target))
                except ValueError:  # the task's fixed text does not fit this short target
                    continue
            if not batch:
                continue
            yield {**collate(batch, bucket, sampler.eos),
                   "stage": torch.tensor(stage, dtype=torch.long)}


# ---------------------------------------------------------------------------------------------
# held-out samples: the evaluation's own, fitted to exact lengths


def heldout_samples(tokenizer_path: str, task_names: list[str], lengths: list[int],
                    samples: int, seed: int) -> list[Encoded]:
    """``samples`` fitted samples per task and length, as ``fluxserve eval --seed SEED --api
    completions`` generates them with this tokenizer (same prompts, same lengths)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_path)
    sampler = TaskSampler(seed, tok, task_names)

    def count(built: tasks.Built) -> int:
        return len(tok.encode(built.prompt + built.answer_prefix).ids)  # BOS included

    out = []
    for name in task_names:
        for length in lengths:
            units = None
            for index in range(samples):
                try:
                    s, units = tasks.generate(name, length, index, seed, count, start_units=units)
                except tasks.LengthError:
                    break
                built = tasks.Built(s.prompt, s.answer_prefix, s.outputs)
                enc = sampler.encode(name, built, answer_text(name, s.outputs))
                out.append(Encoded(enc.ids, enc.prompt_len, name, s.outputs, length))
    return out
