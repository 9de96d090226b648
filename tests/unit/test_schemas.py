"""Validation of the request models and how the extension fields reach the engine."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError
from vllm.exceptions import VLLMValidationError

from attention_backends.flux.options import FluxOptions
from kv_policies.eviction.options import parse_kv_policy
from kv_policies.eviction.policies.calidrop import CaliDropOptions
from server.schemas import ChatRequest, CompletionsRequest

MESSAGES = [{"role": "user", "content": "hi"}]


def test_extension_fields_reach_sampling_params_extra_args():
    req = ChatRequest(model="m", messages=MESSAGES,
                      flux={"mode": "layers", "sparse_layers": [1, 3], "sink": 4, "window": 64},
                      kv_policy={"name": "calidrop", "budget": 256, "tau": 0.5},
                      vllm_xargs={"other": 1})
    params = req.to_sampling_params(max_tokens=8, default_sampling_params={})
    assert params.extra_args["flux"]["mode"] == "layers"
    assert params.extra_args["flux"]["sparse_layers"] == [1, 3]
    assert params.extra_args["kv_policy"] == CaliDropOptions(budget=256, tau=0.5).model_dump()
    assert params.extra_args["other"] == 1  # vLLM's own passthrough still works


def test_no_extension_fields_leave_extra_args_untouched():
    params = CompletionsRequest(model="m", prompt="x").to_sampling_params(
        max_tokens=4, default_sampling_params={})
    assert not params.extra_args


@pytest.mark.parametrize("flux", [
    {"mode": "half"}, {"mode": "full", "unknown": 1}, {"mode": "layers"},
    {"mode": "sparse", "sparse_layers": [1]}, {"mode": "layers", "sparse_layers": [-1]},
    {"mode": "sparse", "window": 0}, {"mode": "sparse", "sink": -1},
])
def test_bad_flux_options_are_rejected(flux):
    with pytest.raises(ValidationError):
        FluxOptions(**flux)


@pytest.mark.parametrize("kv", [
    {"name": "bogus"}, {"name": "snapkv", "nope": 1}, {"name": "snapkv", "budget": 8, "window": 8},
    {"name": "snapkv", "pool_kernel": 4}, {"name": "calidrop", "tau": 2.0},
    {"name": "snapkv", "budget": 1}, {"name": "streaming", "window": 8},
])
def test_bad_kv_policy_options_are_rejected(kv):
    with pytest.raises(ValidationError):
        parse_kv_policy(kv)
    with pytest.raises(ValidationError):
        ChatRequest(model="m", messages=MESSAGES, kv_policy=kv)


@pytest.mark.parametrize("overrides", [
    {"messages": []}, {"max_tokens": 0}, {"max_tokens": -3}, {"max_completion_tokens": 0},
])
def test_bad_chat_requests_are_rejected(overrides):
    with pytest.raises(ValidationError):
        ChatRequest(**{"model": "m", "messages": MESSAGES, **overrides})


# OpenAI's message rules: each role with the fields it requires, text content only.
BAD_MESSAGES = {
    "user without content": [{"role": "user"}],
    "user content null": [{"role": "user", "content": None}],
    "system content null": [{"role": "system", "content": None}],
    "developer without content": [{"role": "developer"}],
    "empty content parts": [{"role": "user", "content": []}],
    "part without text": [{"role": "user", "content": [{"type": "text"}]}],
    "image part": [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "http://x/y.png"}}]}],
    "unknown role": [{"role": "narrator", "content": "hi"}],
    "no role": [{"content": "hi"}],
    "not an object": ["hi"],
    "assistant says nothing": [{"role": "user", "content": "hi"}, {"role": "assistant"}],
    "assistant null content, no tool calls": [{"role": "assistant", "content": None}],
    "assistant empty tool_calls": [{"role": "assistant", "content": None, "tool_calls": []}],
    "tool call without id": [{"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}],
    "tool without tool_call_id": [{"role": "tool", "content": "42"}],
    "tool without content": [{"role": "tool", "tool_call_id": "c1"}],
    "function without name": [{"role": "function", "content": "42"}],
}

GOOD_MESSAGES = {
    "text parts": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    "empty string content": [{"role": "user", "content": ""}],
    "developer": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "x"}],
    "assistant with tool calls and null content": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"}],
    "assistant as the openai client dumps it": [
        {"role": "assistant", "content": "ok", "refusal": None, "audio": None,
         "function_call": None, "annotations": None}],
    "assistant refusal part": [{"role": "assistant",
                                "content": [{"type": "refusal", "refusal": "no"}]}],
    "function": [{"role": "function", "content": None, "name": "f"}],
}


@pytest.mark.parametrize("case", list(BAD_MESSAGES))
def test_messages_openai_rejects_are_rejected(case):
    with pytest.raises(ValidationError):
        ChatRequest(model="m", messages=BAD_MESSAGES[case])


@pytest.mark.parametrize("case", list(GOOD_MESSAGES))
def test_messages_openai_accepts_are_accepted_as_plain_dicts(case):
    req = ChatRequest(model="m", messages=GOOD_MESSAGES[case])
    assert req.messages == GOOD_MESSAGES[case]
    assert all(type(m) is dict for m in req.messages)  # what vLLM's renderer reads


def test_reasoning_content_still_reaches_vllm_as_reasoning():
    req = ChatRequest(model="m", messages=[
        {"role": "assistant", "content": "x", "reasoning_content": "because"}])
    assert req.messages[0]["reasoning"] == "because"


@pytest.mark.parametrize("overrides", [
    {"tools": []}, {"n": 0}, {"temperature": -0.1}, {"temperature": 2.5}, {"top_p": 0},
    {"top_k": -2}, {"min_p": 1.5}, {"presence_penalty": 3}, {"repetition_penalty": 0},
    {"stop": ""}, {"stop": ["a", ""]}, {"stop": ["a", "b", "c", "d", "e"]},
    {"stop_token_ids": [-1]}, {"guided_json": {"type": "object"}}, {"guided_regex": "a+"},
    {"min_tokens": -1}, {"prompt_logprobs": -2},
])
def test_bounds_are_enforced_on_chat(overrides):
    with pytest.raises((ValidationError, VLLMValidationError)):  # both answer 400
        ChatRequest(**{"model": "m", "messages": MESSAGES, **overrides})


@pytest.mark.parametrize("overrides", [
    {"prompt": None}, {"prompt": ""}, {"prompt": []}, {"prompt": [[]]}, {"prompt": [-1]},
    {"max_tokens": 0}, {"max_tokens": 0, "echo": False}, {"max_tokens": -1, "echo": True},
    {"logprobs": -2}, {"n": 0}, {"guided_choice": ["a"]},
])
def test_bad_completion_requests_are_rejected(overrides):
    with pytest.raises((ValidationError, VLLMValidationError)):  # both answer 400
        CompletionsRequest(**{"model": "m", "prompt": "x", **overrides})


def test_prompt_scoring_is_accepted_and_generates_nothing_extra():
    req = CompletionsRequest(model="m", prompt="x", echo=True, logprobs=1, max_tokens=0)
    params = req.to_sampling_params(max_tokens=0, default_sampling_params={})
    assert params.prompt_logprobs == 1  # the prompt's logprobs come back
    assert params.max_tokens == 1  # vLLM's echo-only path: one step, its token not returned


def _schema(model) -> dict:
    return model.model_json_schema()


def test_openapi_schema_states_the_constraints():
    chat = _schema(ChatRequest)
    props = chat["properties"]
    assert props["messages"]["minItems"] == 1
    assert {"minItems": 1}.items() <= props["tools"]["anyOf"][0].items()
    assert chat["$defs"]["UserMessage"]["required"] == ["role", "content"]
    assert chat["$defs"]["ToolMessage"]["required"] == ["role", "content", "tool_call_id"]
    assert {b.get("minimum") for b in props["max_completion_tokens"]["anyOf"]} == {1, None}
    completions = _schema(CompletionsRequest)
    prompt = completions["properties"]["prompt"]["anyOf"]
    assert {"type": "null"} not in prompt  # null is rejected, so the schema does not offer it
    assert all(b.get("minLength") == 1 or b.get("minItems") == 1 for b in prompt)


@pytest.mark.parametrize("overrides", [
    {"max_tokens": "5"}, {"temperature": "1"}, {"stop_token_ids": [True]}, {"logprobs": 1},
    {"n": True},
])
def test_no_type_coercion(overrides):
    """What the OpenAPI document calls the wrong type is rejected, as OpenAI does."""
    with pytest.raises(ValidationError):
        ChatRequest(**{"model": "m", "messages": MESSAGES, **overrides})


def test_prompt_embeds_still_arrive_as_base64_strings():
    req = CompletionsRequest.model_validate({"model": "m", "prompt_embeds": "AAAA"})
    assert req.prompt_embeds == b"AAAA"


def test_integral_floats_are_integers_as_in_json_schema():
    req = ChatRequest.model_validate({"model": "m", "messages": MESSAGES, "n": 2.0,
                                      "temperature": 1.0, "stop_token_ids": [7.0],
                                      "max_completion_tokens": 3.0})
    assert (req.n, req.stop_token_ids, req.max_completion_tokens) == (2, [7], 3)
    with pytest.raises(ValidationError):
        ChatRequest.model_validate({"model": "m", "messages": MESSAGES, "n": 2.5})


@pytest.mark.parametrize("overrides", [
    {"flux": {"mode": "sparse", "sink": "4"}}, {"flux": {"mode": "sparse", "window": True}},
    {"flux": {"mode": "layers", "sparse_layers": ["1"]}},
    {"kv_policy": {"name": "calidrop", "tau": "0.5"}},
    {"kv_policy": {"name": "snapkv", "budget": "64"}},
    {"kv_policy": {"name": "streaming", "sink": False}},
])
def test_no_type_coercion_in_the_extension_fields(overrides):
    """The extension objects are as strict as the body around them."""
    with pytest.raises(ValidationError):
        ChatRequest(**{"model": "m", "messages": MESSAGES, **overrides})


def test_integral_floats_are_integers_in_the_extension_fields():
    req = ChatRequest.model_validate({
        "model": "m", "messages": MESSAGES,
        "flux": {"mode": "layers", "sparse_layers": [1.0], "sink": 4.0},
        "kv_policy": {"name": "calidrop", "budget": 64.0, "tau": 1}})
    assert (req.flux.sparse_layers, req.flux.sink, req.kv_policy.budget) == ([1], 4, 64)
    assert req.kv_policy.tau == 1.0
    with pytest.raises(ValidationError):
        ChatRequest.model_validate({"model": "m", "messages": MESSAGES,
                                    "kv_policy": {"name": "snapkv", "budget": 64.5}})


@pytest.mark.parametrize("item", [
    {"swap": "yes"}, {"max_tokens": "8"}, {"flux": {"mode": "sparse", "sink": "4"}},
    {"messages": [{"role": "user", "content": 5}]}, {"candidates": ["a", 1]},
])
def test_no_type_coercion_in_reward_items(item):
    from server.reward.schemas import RewardRequest
    base = {"mode": "judge", "messages": MESSAGES, "candidates": ["a", "b"]}
    assert RewardRequest.model_validate({"items": [{**base, "max_tokens": 8.0}]}).items[0] \
        .max_tokens == 8
    with pytest.raises(ValidationError):
        RewardRequest.model_validate({"items": [{**base, **item}]})


# --- limits that need the model: the prompt and the completion share the context ------------

# what build_tok_params reads of the model config (at least /v1/completions' default max_tokens)
CONTEXT = SimpleNamespace(max_model_len=32)


def _fit(request, prompt_tokens: int) -> dict:
    """The tokenized prompt after the request's checks (tokenizer-free: token ids)."""
    return request.build_tok_params(CONTEXT).apply_post_tokenization(
        None, {"prompt_token_ids": list(range(prompt_tokens))})


def _refused(request, prompt_tokens: int) -> VLLMValidationError:
    with pytest.raises(VLLMValidationError) as err:
        _fit(request, prompt_tokens)
    return err.value


def _chat(**kw) -> ChatRequest:
    return ChatRequest(model="m", messages=MESSAGES, **kw)


def _completion(**kw) -> CompletionsRequest:
    return CompletionsRequest(model="m", prompt=[1], **kw)


@pytest.mark.parametrize("request_, param", [
    (_completion(max_tokens=2), "max_tokens"), (_chat(max_tokens=2), "max_tokens"),
    (_chat(max_completion_tokens=2), "max_completion_tokens"),
    (_completion(max_tokens=2, n=3, echo=True), "max_tokens"),
])
def test_an_explicit_output_limit_past_the_context_left_is_refused(request_, param):
    assert len(_fit(request_, 30)["prompt_token_ids"]) == 30  # 30 + 2 = 32 fits
    err = _refused(request_, 31)
    assert err.parameter == param
    msg = str(err)
    assert "maximum context length is 32 tokens" in msg and "requested 33 tokens" in msg
    assert f"31 in the {'messages' if isinstance(request_, ChatRequest) else 'prompt'}" in msg
    assert f"2 in {param}" in msg and "at most 1" in msg


@pytest.mark.parametrize("request_, param", [
    (_completion(max_tokens=1), "prompt"), (_completion(), "prompt"),
    (_chat(max_tokens=1), "messages"), (_chat(), "messages"),
])
def test_a_prompt_that_fills_the_context_is_refused_naming_it(request_, param):
    """Used to be vLLM's "max_tokens must be at least 1, got 0"."""
    err = _refused(request_, 32)
    assert err.parameter == param and "the " + param + " has 32 tokens" in str(err)
    assert "leaves no room" in str(err)
    assert _refused(request_, 33).parameter == param  # longer than the context: vLLM's message


def test_without_a_limit_the_completion_gets_the_context_left():
    # vLLM then clamps its max_tokens (16 on /v1/completions, the context on chat) to what is left
    for request_ in (_completion(), _chat(), _completion(max_tokens=None)):
        assert len(_fit(request_, 31)["prompt_token_ids"]) == 31


def test_min_tokens_needs_its_room_too():
    err = _refused(_chat(min_tokens=3), 30)
    assert err.parameter == "min_tokens" and "leaves 2" in str(err)
    _fit(_chat(min_tokens=2), 30)
    assert _refused(_chat(min_tokens=3), 32).parameter == "messages"


def test_prompt_scoring_needs_the_one_token_vllm_decodes():
    request_ = _completion(max_tokens=0, echo=True)
    assert len(_fit(request_, 31)["prompt_token_ids"]) == 31
    err = _refused(request_, 32)
    assert err.parameter == "prompt" and "max_tokens=0 scores the prompt" in str(err)


def test_truncation_to_fit_keeps_room_for_the_requested_completion():
    ids = _fit(_completion(max_tokens=3, truncate_prompt_tokens=-1), 40)["prompt_token_ids"]
    assert ids == list(range(29))  # right truncation: no tokenizer to say otherwise
    assert len(_fit(_chat(truncate_prompt_tokens=-1), 40)["prompt_token_ids"]) == 31
    # an explicit truncation is kept as asked, and then checked like any prompt
    assert _refused(_completion(max_tokens=3, truncate_prompt_tokens=30), 40).parameter == \
        "max_tokens"


def test_text_past_the_character_bound_names_the_prompt():
    tokenizer = SimpleNamespace(max_chars_per_token=2)
    params = _chat(max_tokens=1).build_tok_params(CONTEXT)
    with pytest.raises(VLLMValidationError) as err:
        params.apply_pre_tokenization(tokenizer, {"prompt": "x" * 65})
    assert err.value.parameter == "messages"  # vLLM's own check said `input_text`


@pytest.mark.parametrize("make, overrides, limit", [
    (_chat, {"min_tokens": 5, "max_tokens": 3}, "max_tokens=3"),
    (_completion, {"min_tokens": 5, "max_tokens": 3}, "max_tokens=3"),
    (_chat, {"min_tokens": 5, "max_completion_tokens": 3}, "max_completion_tokens=3"),
    (_completion, {"min_tokens": 17}, "max_tokens=16 (the default"),
    (_completion, {"min_tokens": 1, "max_tokens": 0, "echo": True}, "max_tokens=0"),
])
def test_min_tokens_past_max_tokens_names_min_tokens(make, overrides, limit):
    """Was vLLM's "min_tokens must be less than or equal to max_tokens" with `param: null`."""
    with pytest.raises(VLLMValidationError) as err:
        make(**overrides)
    assert err.value.parameter == "min_tokens" and limit in str(err.value)
    assert _chat(min_tokens=17).min_tokens == 17  # chat's default limit is the context left


@pytest.mark.parametrize("value", [0, -2, 1.5])
def test_truncate_prompt_tokens_keeps_at_least_one_token(value):
    for make in (_chat, _completion):
        with pytest.raises(ValidationError) as err:
            make(truncate_prompt_tokens=value)
        assert {e["loc"][0] for e in err.value.errors()} == {"truncate_prompt_tokens"}
    assert _chat(truncate_prompt_tokens=-1).truncate_prompt_tokens == -1
    assert _completion(truncate_prompt_tokens=1).truncate_prompt_tokens == 1


@pytest.mark.parametrize("request_id", ["a" * 129, "", "a b", "a\nb", "é", "a\tb"])
def test_request_id_is_bounded(request_id):
    for make in (_chat, _completion):
        with pytest.raises(ValidationError) as err:
            make(request_id=request_id)
        assert err.value.errors()[0]["loc"] == ("request_id",)


def test_request_ids_of_common_shapes_are_accepted():
    for request_id in ("a" * 128, "0f8c1e7e-3a5b-4c2d-9e1f-2b3c4d5e6f70", "req_01H:x/y.z+1=@"):
        assert _completion(request_id=request_id).request_id == request_id
    assert _chat().request_id  # a random one when not sent


@pytest.mark.parametrize("seed, sampled", [(-1, None), (-2, -2), (-2**63, -2**63),
                                           (2**63 - 1, 2**63 - 1), (0, 0)])
def test_any_int64_seed_is_a_seed_and_minus_one_is_none(seed, sampled):
    for make in (_chat, _completion):
        params = make(seed=seed).to_sampling_params(4, {})
        assert params.seed == sampled


@pytest.mark.parametrize("seed", [2**63, -2**63 - 1])
def test_seeds_past_int64_are_rejected(seed):
    with pytest.raises(ValidationError):
        _chat(seed=seed)
