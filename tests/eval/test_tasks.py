"""The task generators: determinism, needles where they are said to be, lengths on target."""

from __future__ import annotations

import re

import pytest

from evaluation import tasks

ALL = list(tasks.TASKS)
# The other-needles haystack grows by whole needle sentences (up to ~60 tokens with this
# small-vocabulary tokenizer), so below 4K it can land further than 2 % under the target.
COARSE = {"niah_multikey_2", "niah_multikey_3"}


def test_registry_covers_ruler_and_local_tasks():
    assert set(tasks.RULER_TASKS) == {
        "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
        "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"}
    assert set(tasks.LOCAL_TASKS) == {"local_pattern", "local_copy"}
    assert tasks.resolve_tasks(["niah", "vt", "niah_single_1"])[-1] == "vt"
    with pytest.raises(ValueError, match="unknown task"):
        tasks.resolve_tasks(["qa_1"])


@pytest.mark.parametrize("name", ALL)
def test_deterministic_from_seed(name, count):
    a, _ = tasks.generate(name, 2048, 3, 7, count)
    b, _ = tasks.generate(name, 2048, 3, 7, count)
    assert a == b
    c, _ = tasks.generate(name, 2048, 3, 8, count)
    d, _ = tasks.generate(name, 2048, 4, 7, count)
    assert c.prompt != a.prompt and d.prompt != a.prompt


# cwe's solved example and its ten common words x 6 take most of 1K tokens with this
# tokenizer: at 1K it may not fit (test_too_short_a_length_is_refused covers that case).
@pytest.mark.parametrize("name,length", [(n, ln) for ln in (1024, 4096) for n in ALL
                                         if (n, ln) != ("cwe", 1024)])
def test_length_within_two_percent(name, length, count):
    units = None
    for index in range(3):
        sample, units = tasks.generate(name, length, index, 1, count, start_units=units)
        built = tasks.Built(sample.prompt, sample.answer_prefix, sample.outputs)
        assert sample.num_tokens == count(built) + sample.max_tokens
        assert sample.num_tokens <= length
        if length >= 4096 or name not in COARSE:
            assert sample.num_tokens >= (1 - tasks.LENGTH_TOLERANCE) * length, (
                name, length, index, sample.num_tokens)


def test_long_lengths_hit_the_target(count):
    for name in ("niah_single_2", "niah_multikey_3", "cwe", "fwe", "vt"):
        sample, _ = tasks.generate(name, 16384, 0, 5, count)
        assert 0.98 * 16384 <= sample.num_tokens <= 16384, (name, sample.num_tokens)


def test_too_short_a_length_is_refused(count):
    with pytest.raises(tasks.LengthError):
        tasks.generate("vt", 512, 0, 1, count)
    with pytest.raises(tasks.LengthError):
        tasks.generate("niah_single_1", 100, 0, 1, count)
    with pytest.raises(tasks.LengthError, match="too short"):
        for index in range(10):
            tasks.generate("cwe", 1024, index, 1, count)


@pytest.mark.parametrize("name", [n for n in ALL if n.startswith(("niah_", "local_", "vt"))])
def test_needles_at_their_stated_depth(name, count):
    for index in range(4):
        sample, _ = tasks.generate(name, 4096, index, 11, count)
        assert sample.needles
        # the haystack is the text between the instruction and the question
        for needle in sample.needles:
            assert sample.prompt[needle.char_start:].startswith(needle.text)
        first = min(n.char_start for n in sample.needles)
        body_start = sample.prompt.rfind("\n\n", 0, first) + 1 if name == "vt" else \
            sample.prompt.index("\n") + 1
        body_end = sample.prompt.rindex("\nQuestion:" if "Question:" in sample.prompt
                                        else "\nWhat ")
        needle_chars = sum(len(n.text) + 1 for n in sample.needles)
        span = body_end - body_start - needle_chars  # the haystack alone
        unit = max(len(n.text) for n in sample.needles)  # no haystack unit is longer
        for needle in sample.needles:
            before = sum(len(n.text) + 1 for n in sample.needles
                         if n.char_start < needle.char_start)
            at = 100 * (needle.char_start - body_start - before) / span
            # placed before haystack unit int(n * depth / 100): off by less than one unit
            assert abs(at - needle.depth) <= 100 * unit / span + 0.5, (
                name, index, needle.depth, at)


@pytest.mark.parametrize("name", tasks.NEEDLE_TASKS)
def test_every_answer_is_in_a_needle_of_the_context(name, count):
    sample, _ = tasks.generate(name, 4096, 2, 3, count)
    spec = tasks.TASKS[name]
    assert len(sample.outputs) == spec.num_queries * spec.num_values
    assert len(sample.needles) == spec.num_keys * spec.num_values
    for answer in sample.outputs:
        holders = [n for n in sample.needles if n.text.endswith(f"is: {answer}.")]
        assert len(holders) == 1
        key = re.match(r"One of the special magic \w+ for (.+) is:", holders[0].text).group(1)
        assert key in sample.answer_prefix  # the question asks for this key
        assert sample.prompt.count(answer) == 1  # nowhere else: no leak, no duplicate


def test_variable_tracking_chain(count):
    sample, _ = tasks.generate("vt", 4096, 0, 1, count)
    names = sample.outputs
    assert len(names) == 5
    task_text = sample.prompt[sample.needles[0].char_start:]
    value = re.search(rf"VAR {names[0]} = (\d+)", task_text).group(1)
    assert f"assigned the value {value}" in task_text
    positions = [task_text.index(f"VAR {names[i + 1]} = VAR {names[i]}") for i in range(4)]
    assert positions == sorted(positions)


def test_common_words_are_the_most_frequent(count):
    sample, _ = tasks.generate("cwe", 8192, 0, 1, count)
    task_list = sample.prompt.split(tasks.CWE_HEAD)[-1].split(tasks.CWE_TAIL)[0]
    words = re.findall(r"\d+\. (\S+)", task_list)
    freq = {w: words.count(w) for w in set(words)}
    top = sorted(freq, key=lambda w: -freq[w])[:10]
    assert set(top) == set(sample.outputs)
    assert all(freq[w] == 30 for w in sample.outputs)


def test_frequent_words_follow_zipf(count):
    sample, _ = tasks.generate("fwe", 8192, 0, 1, count)
    body = sample.prompt[len(tasks.FWE_HEAD):sample.prompt.index(tasks.FWE_TAIL)].split()
    freq = {w: body.count(w) for w in set(body)}
    ranked = sorted(freq, key=lambda w: -freq[w])
    assert ranked[0] == "..."
    assert ranked[1:4] == sample.outputs
    assert freq[ranked[1]] > freq[ranked[2]] > freq[ranked[3]] > freq[ranked[4]]


def test_local_tasks_ask_about_the_end(count):
    pattern, _ = tasks.generate("local_pattern", 4096, 0, 1, count)
    seq = [int(x) for x in re.findall(r"\d+", pattern.needles[0].text)]
    step = seq[1] - seq[0]
    assert [int(x) for x in pattern.outputs] == [seq[-1] + step * k for k in (1, 2, 3)]
    assert all(o not in pattern.prompt for o in pattern.outputs)
    copy, _ = tasks.generate("local_copy", 4096, 0, 1, count)
    assert copy.needles[0].text == "Last line: " + " ".join(copy.outputs) + "."
    for sample in (pattern, copy):
        tail = sample.prompt[sample.needles[0].char_start:]
        assert len(tail) < 300  # within the last few dozen tokens


def test_common_words_stop_at_the_vocabulary(count):
    task = tasks.TASKS["cwe"]
    # a target far beyond what the vocabulary can fill: every word is used, none repeats
    sample, units = tasks.generate("cwe", 1 << 20, 0, 1, lambda b: len(b.prompt) // 4)
    assert units == task.max_units() and sample.num_tokens < 1 << 20
