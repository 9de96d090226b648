"""Building reward prompts with the smoke-test tokenizer: segments, truncation, template errors."""

from __future__ import annotations

import pytest
from fastapi import HTTPException
from jinja2 import TemplateError
from transformers import AutoTokenizer

from server.default_model import ensure_default_model
from server.reward import scoring
from server.reward.schemas import RewardItem


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return AutoTokenizer.from_pretrained(ensure_default_model(tmp_path_factory.mktemp("cache")))


def _item(context: str, candidates: list[str], **kw) -> RewardItem:
    return RewardItem(messages=[{"role": "user", "content": context}], candidates=candidates,
                      **kw)


def test_scalar_prompt_is_the_chat_template_rendering(tokenizer) -> None:
    item = _item("What is 2+2?", ["4", "five"], mode="scalar")
    prompts = scoring._prepare_scalar(tokenizer, item, 2048, 0)
    for c, prompt in enumerate(prompts):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is 2+2?"},
             {"role": "assistant", "content": item.candidates[c]}], tokenize=False)
        assert tokenizer.decode(prompt.ids) == text
        assert prompt.candidate == c and not prompt.truncation.truncated


def test_scalar_truncation_keeps_the_candidate(tokenizer) -> None:
    item = _item("long context " * 300, ["the answer is 4", "five"], mode="scalar")
    prompt = scoring._prepare_scalar(tokenizer, item, 128, 0)[0]
    assert prompt.truncation.truncated and len(prompt.ids) == 127
    assert tokenizer.decode(prompt.ids).endswith("<|assistant|>\nthe answer is 4<|end|>\n")
    assert tokenizer.decode(prompt.ids).startswith("<|begin_of_text|><|user|>\nlong context")


def test_judge_prompt_shows_candidates_in_each_order(tokenizer) -> None:
    item = _item("Q?", ["first", "second"], mode="judge", swap=True)
    given, reversed_ = scoring._prepare_judge(tokenizer, item, 4096, 0)
    assert (given.order, given.shown, reversed_.order, reversed_.shown) == \
        ("given", [0, 1], "reversed", [1, 0])
    text = tokenizer.decode(reversed_.ids)
    assert text.index("Assistant A's Answer]\nsecond") < text.index("Assistant B's Answer]\nfirst")
    assert text.endswith("<|assistant|>\n") and "[User Question]\nQ?" in text


def test_judge_truncation_cuts_only_the_context(tokenizer) -> None:
    item = _item("filler " * 2000, ["alpha", "beta", "gamma"], mode="judge")
    prompt = scoring._prepare_judge(tokenizer, item, 1000, 0)[0]
    text = tokenizer.decode(prompt.ids)
    assert prompt.truncation.truncated and len(prompt.ids) <= 1000
    assert text.count("[The Start of Assistant") == 3 and "rank 3 responses" in text


def test_candidates_too_long_for_the_budget(tokenizer) -> None:
    item = _item("ctx " * 100, ["long answer " * 200, "b"], mode="judge")
    with pytest.raises(HTTPException) as err:
        scoring._prepare_judge(tokenizer, item, 1000, 3)
    assert err.value.status_code == 400 and "items[3]" in err.value.detail
    assert "too long" in err.value.detail


def test_template_errors_are_bad_requests() -> None:
    class Refusing:
        def apply_chat_template(self, *args, **kwargs):
            raise TemplateError("System role not supported")

    with pytest.raises(HTTPException) as err:
        scoring._prepare_judge(Refusing(), _item("q", ["a", "b"], mode="judge"), 600, 0)
    assert err.value.status_code == 400 and "System role" in err.value.detail


def test_judge_uses_the_chat_models_template_override(tokenizer) -> None:
    template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")
    prompt = scoring._prepare_judge(tokenizer, _item("Q?", ["a", "b"], mode="judge"), 4096, 0,
                                    template)[0]
    text = tokenizer.decode(prompt.ids)
    assert text.startswith("[system] Please act as an impartial judge")
    assert text.endswith("[assistant] ")
