"""Synthetic long-context tasks, generated deterministically from a seed.

The RULER tasks (Hsieh et al., 2024, `hsiehjackson/RULER`) follow RULER's task definitions,
prompt templates, answer prefixes, output lengths and metrics, so that scores are comparable with
published RULER numbers. Two changes, both because no data set may be downloaded:

- RULER's Paul Graham essay haystack (``niah_single_2/3``, ``niah_multikey_1``,
  ``niah_multivalue``, ``niah_multiquery``) is replaced by a haystack of random English words
  (``words``), grouped into sentences;
- RULER's QA tasks (SQuAD, HotpotQA) are not included.

Two local tasks are fluxserve's own: what they ask lies in the last few hundred tokens, so sparse
attention (sink + local window) should do as well as full attention on them.

Every sample is fitted to a target length in tokens of the served model's tokenizer, counted as
RULER does: prompt tokens (with the answer prefix, and the chat template when chat is used) plus
the task's output tokens.
"""

from __future__ import annotations

import math
import random
import string
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

from evaluation import words

if TYPE_CHECKING:
    from evaluation.results import JsonlStore

Metric = Literal["all", "part"]

# The length tolerance the generators promise: a fitted sample is within this fraction below
# its target and never above it.
LENGTH_TOLERANCE = 0.02
MIN_LENGTH = 256

# RULER's needle depths: 40 evenly spaced depths from 0 % to 100 %.
DEPTHS = [round(100 * i / 39) for i in range(40)]

NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
         "There and back again.")


@dataclass(frozen=True)
class Needle:
    """One piece of the answer placed in the context: its text, the depth it was placed at (in
    percent of the haystack) and where it starts in `Sample.prompt` (characters)."""

    text: str
    depth: float
    char_start: int


@dataclass(frozen=True)
class Sample:
    """One generated prompt and its references.

    `prompt` is the user turn; the model continues after `answer_prefix` (in chat, as a
    pre-filled assistant turn; with completions, appended to the prompt). `num_tokens` is the
    sample's length as fitted: prompt tokens (template and prefix included) + `max_tokens`.
    """

    task: str
    length: int
    index: int
    prompt: str
    answer_prefix: str
    outputs: list[str]
    max_tokens: int
    metric: Metric
    num_tokens: int
    needles: list[Needle] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.task, self.length, self.index)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Sample:
        return cls(**{**data, "needles": [Needle(**n) for n in data.get("needles", [])]})


@dataclass
class Built:
    """What a task builds for a given haystack size, before the length is known."""

    prompt: str
    answer_prefix: str
    outputs: list[str]
    needles: list[Needle] = field(default_factory=list)


class Task:
    """A task family. Subclasses implement `build(rng_seed, n)`, which must be a pure function
    of its arguments: `n` is the haystack size in the task's own units (sentences, words, ...)
    and the token count grows with it."""

    name: str
    max_tokens: int
    metric: Metric = "all"

    def build(self, seed: str, n: int, length: int) -> Built:
        raise NotImplementedError

    def tokens_per_unit_guess(self) -> float:
        return 8.0

    def min_units(self) -> int:
        return 1

    def max_units(self) -> int | None:
        """The most units the task can use (None: unbounded)."""
        return None


# ---------------------------------------------------------------------------------------------
# haystacks


def _noise_units(n: int) -> list[str]:
    """RULER's repeated noise paragraph, one sentence per unit; a paragraph ends with a newline."""
    return [NOISE[i % 5] + ("\n" if i % 5 == 4 else " ") for i in range(n)]


def _word_units(rng: random.Random, n: int) -> list[str]:
    """Random English words in sentences of 8 to 16 words, one word per unit (fine units let a
    sample land close to its target length)."""
    vocab = words.vocabulary()
    units: list[str] = []
    while len(units) < n:
        size = rng.randint(8, 16)
        sentence = [rng.choice(vocab) for _ in range(size)]
        sentence[0] = sentence[0].capitalize()
        units += [w + " " for w in sentence[:-1]] + [sentence[-1] + ". "]
    return units[:n]


def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return words.key_word(rng)
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


def _assemble(units: list[str], inserts: list[tuple[float, str]]) -> tuple[str, list[Needle]]:
    """Join `units` with each `(depth, text)` inserted before unit ``int(n * depth / 100)``.

    Returns the text and the needles with their character offsets within it."""
    n = len(units)
    at: dict[int, list[tuple[float, str]]] = {}
    for depth, text in inserts:
        # the epsilon keeps a depth computed as 100 * i / n on unit i despite rounding
        at.setdefault(min(n, int(n * depth / 100 + 1e-9)), []).append((depth, text))
    parts: list[str] = []
    needles: list[Needle] = []
    offset = 0
    for i in range(n + 1):
        for depth, text in at.get(i, []):
            piece = text if text.endswith(("\n", " ")) else text + " "
            lead = len(text) - len(text.lstrip())
            needles.append(Needle(text=text.strip(), depth=depth, char_start=offset + lead))
            parts.append(piece)
            offset += len(piece)
        if i < n:
            parts.append(units[i])
            offset += len(units[i])
    return "".join(parts).rstrip(), needles


def _shift(needles: list[Needle], by: int) -> list[Needle]:
    return [Needle(n.text, n.depth, n.char_start + by) for n in needles]


# ---------------------------------------------------------------------------------------------
# needle in a haystack (RULER: niah)

NIAH_NEEDLE = "One of the special magic {kind} for {key} is: {value}."


class Niah(Task):
    """RULER's needle-in-a-haystack family: `num_keys` keys, `num_values` values per key,
    `num_queries` keys asked; the haystack is repeated noise, random words or other needles."""

    max_tokens = 128

    def __init__(self, name: str, haystack: str, key_type: str, value_type: str,
                 num_keys: int = 1, num_values: int = 1, num_queries: int = 1):
        self.name = name
        self.haystack = haystack
        self.key_type, self.value_type = key_type, value_type
        self.num_keys = max(num_keys, num_queries)
        self.num_values, self.num_queries = num_values, num_queries

    def tokens_per_unit_guess(self) -> float:
        return {"repeat": 5.0, "words": 2.0, "needle": 20.0}[self.haystack]

    def build(self, seed: str, n: int, length: int) -> Built:
        rng = random.Random(f"{seed}:needles")
        keys: list[str] = []
        values: list[list[str]] = []
        needles: list[str] = []
        while len(keys) < self.num_keys:
            key = _random_value(rng, self.key_type)
            if key in keys:
                continue
            keys.append(key)
            values.append([_random_value(rng, self.value_type) for _ in range(self.num_values)])
            needles += [NIAH_NEEDLE.format(kind=self.value_type, key=key, value=v)
                        for v in values[-1]]
        rng.shuffle(needles)
        depths = sorted(rng.sample(DEPTHS, len(needles)))
        queried = rng.sample(range(self.num_keys), self.num_queries)
        answers = [v for i in queried for v in values[i]]
        query_keys = [keys[i] for i in queried]
        query = (", ".join(query_keys[:-1]) + ", and " + query_keys[-1]
                 if len(query_keys) > 1 else query_keys[0])

        hay_rng = random.Random(f"{seed}:haystack")
        if self.haystack == "repeat":
            units = _noise_units(n)
        elif self.haystack == "words":
            units = _word_units(hay_rng, n)
        else:  # other needles: same sentence shape, keys that are never queried
            units = []
            while len(units) < n:
                key = _random_value(hay_rng, self.key_type)
                if key not in keys:
                    units.append(NIAH_NEEDLE.format(
                        kind=self.value_type, key=key,
                        value=_random_value(hay_rng, self.value_type)) + "\n")
        context, placed = _assemble(units, list(zip(depths, needles, strict=True)))

        kind = self.value_type
        if self.num_queries * self.num_values == 1:
            singular = kind[:-1]
            head = (f"A special magic {singular} is hidden within the following text. "
                    f"Make sure to memorize it. I will quiz you about the {singular} afterwards.\n")
            tail = (f"\nWhat is the special magic {singular} for {query} mentioned in the "
                    "provided text?")
            prefix = f" The special magic {singular} for {query} mentioned in the provided text is"
        else:
            head = (f"Some special magic {kind} are hidden within the following text. "
                    f"Make sure to memorize it. I will quiz you about the {kind} afterwards.\n")
            tail = (f"\nWhat are all the special magic {kind} for {query} mentioned in the "
                    f"provided text?")
            prefix = f" The special magic {kind} for {query} mentioned in the provided text are"
        return Built(head + context + tail, prefix, answers, _shift(placed, len(head)))


# ---------------------------------------------------------------------------------------------
# variable tracking (RULER: vt)

VT_HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_TAIL = "\nQuestion: Find all variables that are assigned the value {value} in the text above."
# RULER's answer prefix, its spelling included, so that prompts match.
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, "
             "{count} variables are assgined the value {value}, they are: ")


class VariableTracking(Task):
    """RULER's variable tracking: one chain ``VAR A = 12345``, ``VAR B = VAR A``, ... of
    `num_hops` hops hidden in repeated noise; asked for every variable holding the value. A
    solved example of about 20 noise sentences comes first, as in RULER."""

    name = "vt"
    max_tokens = 30
    EXAMPLE_UNITS = 20

    def __init__(self, num_chains: int = 1, num_hops: int = 4):
        self.num_chains, self.num_hops = num_chains, num_hops

    def tokens_per_unit_guess(self) -> float:
        return 5.0

    def min_units(self) -> int:
        return self.num_hops + 2

    def _one(self, rng: random.Random, n: int) -> tuple[str, str, list[str], list[Needle]]:
        names: list[str] = []
        while len(names) < (self.num_hops + 1) * self.num_chains:
            name = "".join(rng.choices(string.ascii_uppercase, k=5))
            if name not in names:
                names.append(name)
        chains = []
        for c in range(self.num_chains):
            chain_vars = names[c * (self.num_hops + 1):(c + 1) * (self.num_hops + 1)]
            value = str(rng.randint(10000, 99999))
            lines = [f"VAR {chain_vars[0]} = {value}"]
            lines += [f"VAR {chain_vars[j + 1]} = VAR {chain_vars[j]}"
                      for j in range(self.num_hops)]
            chains.append((chain_vars, value, lines))
        inserts: list[tuple[float, str]] = []
        for _, _, lines in chains:
            # distinct sorted positions keep each chain in assignment order
            slots = sorted(rng.sample(range(n + 1), len(lines)))
            inserts += [(100 * s / n, line + ".") for s, line in zip(slots, lines, strict=True)]
        inserts.sort(key=lambda x: x[0])
        context, placed = _assemble(_noise_units(n), inserts)
        chain_vars, value, _ = chains[0]
        text = VT_HEAD + context + VT_TAIL.format(value=value)
        return text, value, chain_vars, _shift(placed, len(VT_HEAD))

    def build(self, seed: str, n: int, length: int) -> Built:
        rng = random.Random(f"{seed}:example")
        ex_text, ex_value, ex_vars, _ = self._one(rng, self.EXAMPLE_UNITS)
        example = (ex_text + VT_PREFIX.format(count=self.num_hops + 1, value=ex_value)
                   + " ".join(ex_vars) + "\n\n")
        text, value, chain_vars, placed = self._one(random.Random(f"{seed}:task"), n)
        prefix = VT_PREFIX.format(count=self.num_hops + 1, value=value).rstrip()
        return Built(example + text, prefix, chain_vars, _shift(placed, len(example)))


# ---------------------------------------------------------------------------------------------
# common words extraction (RULER: cwe)

CWE_HEAD = ("Below is a numbered list of words. In these words, some appear more often than "
            "others. Memorize the ones that appear most often.\n")
CWE_TAIL = "\nQuestion: What are the 10 most common words in the above list?"
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"


class CommonWords(Task):
    """RULER's common words extraction: 10 words repeated often among many repeated rarely (30
    and 3 times from 4K tokens up, 6 and 1 below); asked for the 10 common ones. A solved
    example comes first, as in RULER."""

    name = "cwe"
    max_tokens = 120
    num_common = 10

    def tokens_per_unit_guess(self) -> float:
        return 10.0

    def min_units(self) -> int:
        return self.num_common + 1

    def max_units(self) -> int:
        # every word of the vocabulary used once: as in RULER, the longest lengths (about
        # 100K tokens and up) then end shorter than their target
        return len(words.vocabulary())

    def _list(self, rng: random.Random, num_words: int, common_reps: int, rare_reps: int
              ) -> tuple[str, list[str]]:
        chosen = rng.sample(words.vocabulary(), num_words)
        common, rare = chosen[:self.num_common], chosen[self.num_common:]
        items = common * common_reps + rare * rare_reps
        rng.shuffle(items)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)), common

    def build(self, seed: str, n: int, length: int) -> Built:
        rng = random.Random(f"{seed}:words")
        if length < 4096:
            ex_list, ex_answer = self._list(rng, 20, 3, 1)
            ctx, answer = self._list(rng, n, 6, 1)
        else:
            ex_list, ex_answer = self._list(rng, 40, 10, 3)
            ctx, answer = self._list(rng, n, 30, 3)
        example = (CWE_HEAD + ex_list + CWE_TAIL + CWE_PREFIX + " "
                   + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_answer)) + "\n")
        return Built(example + CWE_HEAD + ctx + CWE_TAIL, CWE_PREFIX, answer)


# ---------------------------------------------------------------------------------------------
# frequent words extraction (RULER: fwe)

FWE_HEAD = ("Read the following coded text and track the frequency of each coded word. Find the "
            "three most frequently appeared coded words. ")
FWE_TAIL = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are "
            "the three most frequently appeared words in the above coded text?")
FWE_PREFIX = (" Answer: According to the coded text above, the three most frequently appeared "
              "words are:")


def _zeta(s: float, terms: int = 10_000) -> float:
    """Riemann zeta for s > 1: a partial sum plus the Euler-Maclaurin tail (error < 1e-12)."""
    partial = math.fsum(k ** -s for k in range(1, terms))
    n = float(terms)
    return partial + n ** (1 - s) / (s - 1) + 0.5 * n ** -s + s * n ** (-s - 1) / 12


class FrequentWords(Task):
    """RULER's frequent words extraction: coded words of 6 letters drawn from a Zipf law
    (``alpha``), the most frequent one replaced by ``...`` noise; asked for the next three. The
    vocabulary holds ``length // 50`` words, as in RULER."""

    name = "fwe"
    max_tokens = 50

    def __init__(self, alpha: float = 2.0, word_len: int = 6):
        self.alpha, self.word_len = alpha, word_len
        self.zeta = _zeta(alpha)

    def tokens_per_unit_guess(self) -> float:
        return 2.5

    def min_units(self) -> int:
        return 8

    def build(self, seed: str, n: int, length: int) -> Built:
        rng = random.Random(f"{seed}:vocab")
        size = max(10, length // 50)
        vocab: set[str] = set()
        while len(vocab) < size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=self.word_len)))
        ranked = sorted(vocab)
        rng.shuffle(ranked)
        ranked[0] = "..."  # the most frequent "word" is noise
        counts = [int(n * k ** -self.alpha / self.zeta) for k in range(1, size + 1)]
        items = [w for w, c in zip(ranked, counts, strict=True) for _ in range(c)]
        random.Random(f"{seed}:order").shuffle(items)
        return Built(FWE_HEAD + " ".join(items) + FWE_TAIL, FWE_PREFIX, ranked[1:4])


# ---------------------------------------------------------------------------------------------
# local tasks (fluxserve): the answer needs only the last few hundred tokens


class LocalPattern(Task):
    """Continue a pattern: repeated noise, then an arithmetic sequence of 7-digit numbers at the
    very end; asked for its next three terms, which appear nowhere in the context."""

    name = "local_pattern"
    max_tokens = 48
    TERMS, ASKED = 8, 3

    def tokens_per_unit_guess(self) -> float:
        return 5.0

    def build(self, seed: str, n: int, length: int) -> Built:
        rng = random.Random(f"{seed}:pattern")
        start, step = rng.randint(10**6, 5 * 10**6), rng.randint(3, 997)
        terms = [str(start + i * step) for i in range(self.TERMS + self.ASKED)]
        seq = "Sequence: " + ", ".join(terms[:self.TERMS]) + ","
        head = "Below is a long text that ends with a sequence of numbers.\n"
        context, placed = _assemble(_noise_units(n), [(100.0, seq)])
        prompt = (head + context + f"\nQuestion: What are the next {self.ASKED} numbers of the "
                  "sequence at the end of the text above?")
        prefix = f" Answer: The next {self.ASKED} numbers of the sequence are:"
        return Built(prompt, prefix, terms[self.TERMS:], _shift(placed, len(head)))


class LocalCopy(Task):
    """Copy the recent past: repeated noise whose last line lists five random words; asked to
    repeat that line."""

    name = "local_copy"
    max_tokens = 32
    WORDS = 5

    def tokens_per_unit_guess(self) -> float:
        return 5.0

    def build(self, seed: str, n: int, length: int) -> Built:
        rng = random.Random(f"{seed}:copy")
        chosen = rng.sample(words.vocabulary(), self.WORDS)
        line = "Last line: " + " ".join(chosen) + "."
        head = "Below is a long text. Read its last line carefully.\n"
        context, placed = _assemble(_noise_units(n), [(100.0, "\n" + line)])
        prompt = head + context + "\nQuestion: Repeat the words of the last line of the text above."
        prefix = " Answer: The words of the last line are:"
        return Built(prompt, prefix, chosen, _shift(placed, len(head)))


# ---------------------------------------------------------------------------------------------
# registry

TASKS: dict[str, Task] = {t.name: t for t in [
    Niah("niah_single_1", "repeat", "words", "numbers"),
    Niah("niah_single_2", "words", "words", "numbers"),
    Niah("niah_single_3", "words", "words", "uuids"),
    Niah("niah_multikey_1", "words", "words", "numbers", num_keys=4),
    Niah("niah_multikey_2", "needle", "words", "numbers"),
    Niah("niah_multikey_3", "needle", "uuids", "uuids"),
    Niah("niah_multivalue", "words", "words", "numbers", num_values=4),
    Niah("niah_multiquery", "words", "words", "numbers", num_queries=4),
    VariableTracking(),
    CommonWords(),
    FrequentWords(),
    LocalPattern(),
    LocalCopy(),
]}
RULER_TASKS = [name for name in TASKS if not name.startswith("local_")]
LOCAL_TASKS = [name for name in TASKS if name.startswith("local_")]
NEEDLE_TASKS = [name for name in TASKS if name.startswith("niah_")]


def resolve_tasks(names: list[str]) -> list[str]:
    """Expand ``all``, ``ruler``, ``niah`` and ``local``; raise ValueError on an unknown name."""
    groups = {"all": list(TASKS), "ruler": RULER_TASKS, "niah": NEEDLE_TASKS, "local": LOCAL_TASKS}
    out: list[str] = []
    for name in names:
        for task in groups.get(name, [name]):
            if task not in TASKS:
                raise ValueError(f"unknown task {task!r}; expected one of "
                                 f"{sorted(TASKS) + sorted(groups)}")
            if task not in out:
                out.append(task)
    return out


# ---------------------------------------------------------------------------------------------
# fitting to a token length

TokenCount = Callable[[Built], int]


class LengthError(ValueError):
    """The target length is too short for the task's fixed text."""


def _fit(task: Task, seed: str, length: int, count: TokenCount, start: int | None
         ) -> tuple[int, Built, int]:
    """The largest haystack size (or one within tolerance of it) whose sample fits `length`.

    Secant steps from `start` (or a guess) inside a bracket, then bisection; about 3 token counts
    when `start` comes from a sibling sample, 5-8 from scratch. A task with `max_units` stops
    there, short of the target, when even that fits."""
    budget = length - task.max_tokens
    lo_n, hi_n = task.min_units() - 1, None  # lo fits (or is below the minimum), hi does not
    lo_t: int | None = None
    lo_built: Built | None = None
    floor = length * (1 - LENGTH_TOLERANCE / 2) - task.max_tokens  # aim inside the tolerance
    n = start or max(task.min_units(), int(budget / task.tokens_per_unit_guess()))
    prev: tuple[int, int] | None = None
    cap = task.max_units()
    for _ in range(60):
        n = max(task.min_units(), n if cap is None else min(n, cap))
        built = task.build(seed, n, length)
        t = count(built)
        if t <= budget:
            lo_n, lo_t, lo_built = n, t, built
            if t >= floor or n == cap:
                break
        else:
            hi_n = n
        if hi_n is not None and hi_n - lo_n <= 1:
            break
        # next guess: secant on the last two points, kept strictly inside the bracket
        rate = task.tokens_per_unit_guess()
        if prev is not None and prev[0] != n:
            rate = max(0.1, (t - prev[1]) / (n - prev[0]))
        prev = (n, t)
        target = (budget + floor) / 2
        guess = n + int((target - t) / rate)
        upper = hi_n - 1 if hi_n is not None else None
        if guess <= lo_n or (upper is not None and guess > upper):
            guess = (lo_n + hi_n) // 2 if hi_n is not None else max(lo_n + 1, 2 * n)
        n = guess
    if lo_built is None or lo_t is None:
        raise LengthError(f"{task.name}: a {length}-token sample is too short for the task "
                          f"(its smallest form needs more tokens)")
    return lo_n, lo_built, lo_t


def generate(task_name: str, length: int, index: int, seed: int, count: TokenCount,
             start_units: int | None = None) -> tuple[Sample, int]:
    """Generate sample `index` of `task_name` at `length` tokens.

    `count` gives a built sample's prompt length in tokens (template, answer prefix and chat
    rendering included). `start_units` is a haystack size to start the search from (the size
    found for a previous sample of the same task and length). Returns the sample and the
    haystack size it used. Raises `LengthError` when the task does not fit `length`."""
    if length < MIN_LENGTH:
        raise LengthError(f"lengths start at {MIN_LENGTH} tokens, got {length}")
    task = TASKS[task_name]
    sample_seed = f"{seed}:{task_name}:{length}:{index}"
    n, built, tokens = _fit(task, sample_seed, length, count, start_units)
    sample = Sample(task=task_name, length=length, index=index, prompt=built.prompt,
                    answer_prefix=built.answer_prefix, outputs=built.outputs,
                    max_tokens=task.max_tokens, metric=task.metric,
                    num_tokens=tokens + task.max_tokens, needles=built.needles)
    return sample, n


def generate_samples(task_names: list[str], lengths: list[int], samples: int, seed: int,
                     count: TokenCount, notes: list[str], progress: bool = True,
                     cache: JsonlStore | None = None) -> list[Sample]:
    """Samples ``0 .. samples - 1`` of every task at every length (tasks outer, then lengths),
    as `generate` makes them, each search starting from the haystack size the previous sample
    of the same task and length found. A task that does not fit a length is skipped there, with
    a note appended to `notes`. With `cache` (a store keyed by ``(task, length, index)``), a
    sample found in it is read back instead of generated and every new one is appended to it.
    A tqdm bar counts the samples unless `progress` is False."""
    from tqdm import tqdm

    cached = cache.load() if cache is not None else {}
    out: list[Sample] = []
    wanted = [(t, n) for t in task_names for n in lengths]
    with tqdm(total=len(wanted) * samples, desc="samples", unit="sample", disable=not progress,
              dynamic_ncols=True) as bar:
        for task_name, length in wanted:
            units: int | None = None
            for index in range(samples):
                hit = cached.get((task_name, length, index))
                if hit is not None:
                    out.append(Sample.from_json(hit["sample"]))
                    units = units or hit.get("units")
                    bar.update(1)
                    continue
                try:
                    sample, units = generate(task_name, length, index, seed, count,
                                             start_units=units)
                except LengthError as exc:
                    notes.append(f"skipped {task_name} at {length}: {exc}")
                    bar.update(samples - index)
                    break
                if cache is not None:
                    cache.append({"task": task_name, "length": length, "index": index,
                                  "units": units, "sample": sample.to_json()})
                out.append(sample)
                bar.update(1)
    return out
