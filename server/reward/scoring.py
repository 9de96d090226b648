"""Scoring one `/v1/reward` request: prompts are built and checked for every item first (so a bad
item fails the request before any engine work starts), then all engine calls run concurrently.

- scalar: each candidate is rendered as context messages + an assistant turn through the reward
  model's chat template and encoded with `PoolingParams(task="classify", use_activation=False)`;
  its score is the first raw logit (LongRM's discriminative score).
- judge: the chat model gets LongRM's pairwise or ranking prompt, greedy decoding; the verdict is
  parsed (:mod:`server.reward.parsing`); with ``swap`` the reversed order is judged too.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Literal

from fastapi import HTTPException, Request
from jinja2 import TemplateError
from vllm import PoolingParams, SamplingParams
from vllm.entrypoints.serve.engine.protocol import UsageInfo
from vllm.inputs import TokensPrompt
from vllm.renderers.chat_utils import load_chat_template
from vllm.v1.engine.async_llm import AsyncLLM

from server.reward import parsing, prompts
from server.reward.engine import RewardEngineState
from server.reward.metrics import (
    JUDGE_PARSE_FAILURES,
    REWARD_LATENCY,
    REWARD_REQUESTS,
    SWAP_DISAGREEMENTS,
)
from server.reward.schemas import (
    CandidateResult,
    Judgment,
    PromptTruncation,
    RewardItem,
    RewardItemResult,
)
from server.reward.truncation import PromptTooLong, Truncation, truncate
from server.routes.openai import apply_policies  # the chat routes' `flux` / `kv_policy` rules
from server.schemas import with_extensions

# Stands in for the text that may be truncated while the chat template is rendered; the rendered
# text is split around it so that the kept parts are tokenized apart from the context.
_PLACEHOLDER = "\x00fluxserve-reward-placeholder\x00"

Order = Literal["given", "reversed"]


def bad_request(message: str) -> HTTPException:
    return HTTPException(HTTPStatus.BAD_REQUEST, message)


@dataclass
class PreparedPrompt:
    ids: list[int]
    truncation: Truncation
    candidate: int | None = None  # scalar
    order: Order | None = None  # judge
    shown: list[int] = field(default_factory=list)  # judge: candidate indices shown as A, B, ...


@dataclass
class PreparedItem:
    index: int
    item: RewardItem
    model: str
    prompts: list[PreparedPrompt]


def _render_segments(tokenizer, messages: list[dict[str, str]], value: str, *,
                     add_generation_prompt: bool, keep_value: bool,
                     chat_template: str | None = None) -> tuple[list[int], list[int], list[int]]:
    """Render ``messages`` (one content holding ``_PLACEHOLDER``, which stands for ``value``)
    through the chat template; return ``(prefix, middle, suffix)`` token ids.

    keep_value=False (judge): ``value`` is the context, the truncatable middle.
    keep_value=True (scalar): ``value`` is the candidate; the text before it is the middle.
    chat_template: a template to use instead of the tokenizer's own (the chat model's
    ``--chat-template``).
    """
    try:
        # enable_thinking=False: as LongRM renders judge prompts (Qwen3-style templates)
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             chat_template=chat_template, enable_thinking=False)
    except (ValueError, TemplateError) as exc:
        # no chat template (transformers' ValueError), or the template refuses these messages
        # (e.g. a system turn, via raise_exception): the caller's input, not a server fault
        raise bad_request(f"the model's chat template cannot render these messages: {exc}"
                          ) from exc
    parts = text.split(_PLACEHOLDER)
    if len(parts) != 2:  # the template altered the content: no protected parts, as in LongRM
        whole = text.replace(_PLACEHOLDER, value)
        return [], tokenizer.encode(whole, add_special_tokens=False), []

    def encode(s: str) -> list[int]:
        return tokenizer.encode(s, add_special_tokens=False) if s else []

    before, after = parts
    if keep_value:
        return [], encode(before), encode(value + after)
    return encode(before), encode(value), encode(after)


def _fit(segments: tuple[list[int], list[int], list[int]], budget: int, what: str
         ) -> tuple[list[int], Truncation]:
    try:
        return truncate(*segments, budget)
    except PromptTooLong as exc:
        raise bad_request(f"{what}: candidates too long for the context: {exc}") from exc


def _prepare_scalar(tokenizer, item: RewardItem, budget: int, index: int
                    ) -> list[PreparedPrompt]:
    context = [m.model_dump() for m in item.messages]
    out = []
    for c, candidate in enumerate(item.candidates):
        messages = context + [{"role": "assistant", "content": _PLACEHOLDER}]
        segments = _render_segments(tokenizer, messages, candidate, add_generation_prompt=False,
                                    keep_value=True)
        ids, info = _fit(segments, budget, f"items[{index}].candidates[{c}]")
        out.append(PreparedPrompt(ids, info, candidate=c))
    return out


def _prepare_judge(tokenizer, item: RewardItem, budget: int, index: int,
                   chat_template: str | None = None) -> list[PreparedPrompt]:
    kind = item.resolved_judge_prompt
    question = prompts.context_text([m.content for m in item.messages])
    orders: list[tuple[Order, list[int]]] = [("given", list(range(len(item.candidates))))]
    if item.swap:
        orders.append(("reversed", orders[0][1][::-1]))
    out = []
    for order, shown in orders:
        messages = prompts.judge_messages(kind, _PLACEHOLDER, [item.candidates[c] for c in shown])
        segments = _render_segments(tokenizer, messages, question, add_generation_prompt=True,
                                    keep_value=False, chat_template=chat_template)
        ids, info = _fit(segments, budget, f"items[{index}] ({order} order)")
        out.append(PreparedPrompt(ids, info, order=order, shown=shown))
    return out


def _chat_names(request: Request) -> list[str]:
    args = request.app.state.args
    return list(args.served_model_name or [args.model])


def _chat_template(request: Request) -> str | None:
    """The chat model's ``--chat-template`` (a file or literal), else None: the tokenizer's."""
    template = getattr(request.app.state.args, "chat_template", None)
    return load_chat_template(template) if template else None


def _check_model(item: RewardItem, served: str, mode: str, index: int) -> None:
    if item.model is not None and item.model != served:
        raise HTTPException(HTTPStatus.NOT_FOUND,
                            f"items[{index}].model {item.model!r} does not exist: mode={mode!r} "
                            f"uses {served!r} on this server.")


async def prepare(items: list[RewardItem], request: Request) -> list[PreparedItem]:
    """Validate every item against the served models and build its token prompts.

    Raises HTTPException: 400 (bad input, candidates too long, no reward model), 404 (unknown
    model), 503 (the reward engine is still starting).
    """
    chat: AsyncLLM = request.app.state.engine.client
    reward: RewardEngineState | None = request.app.state.reward_engine
    prepared = []
    for index, item in enumerate(items):
        if item.mode == "scalar":
            if reward is None:
                raise bad_request("mode='scalar' needs a reward model, and this server has none: "
                                  "start it with --reward-model PATH (or use mode='judge').")
            if not reward.ready or reward.client is None:
                raise HTTPException(HTTPStatus.SERVICE_UNAVAILABLE,
                                    "The reward engine is still starting; retry when /ready "
                                    "returns 200.")
            _check_model(item, reward.model_name, item.mode, index)
            engine, model = reward.client, reward.model_name
            budget = engine.model_config.max_model_len
            build = _prepare_scalar
            extra = ()
        else:
            names = _chat_names(request)
            if item.model is not None and item.model in names:
                model = item.model
            else:
                _check_model(item, names[0], item.mode, index)
                model = names[0]
            apply_policies(item, request)
            engine = chat
            budget = engine.model_config.max_model_len - item.max_tokens
            if budget < 2:
                raise bad_request(f"items[{index}].max_tokens={item.max_tokens} leaves no room "
                                  f"for the prompt in the model's {budget + item.max_tokens}-"
                                  "token context")
            build = _prepare_judge
            extra = (_chat_template(request),)
        tokenizer = engine.get_tokenizer()
        built = await asyncio.to_thread(build, tokenizer, item, budget, index, *extra)
        prepared.append(PreparedItem(index, item, model, built))
    return prepared


async def _encode_score(client: AsyncLLM, ids: list[int], request_id: str) -> tuple[float, int]:
    final = None
    async for out in client.encode(TokensPrompt(prompt_token_ids=ids),
                                   PoolingParams(task="classify", use_activation=False),
                                   request_id=request_id):
        final = out
    assert final is not None and final.finished
    return float(final.outputs.data.reshape(-1)[0]), len(final.prompt_token_ids)


async def _judge(client: AsyncLLM, ids: list[int], params: SamplingParams, request_id: str
                 ) -> tuple[str, str | None, int, int]:
    final = None
    async for out in client.generate(TokensPrompt(prompt_token_ids=ids), params,
                                     request_id=request_id):
        final = out
    assert final is not None and final.finished
    completion = final.outputs[0]
    return (completion.text, completion.finish_reason, len(final.prompt_token_ids),
            len(completion.token_ids))


def _truncations(p: PreparedItem) -> list[PromptTruncation]:
    return [PromptTruncation(candidate=pp.candidate, order=pp.order,
                             original_tokens=pp.truncation.original_tokens,
                             kept_tokens=pp.truncation.kept_tokens,
                             head_tokens=pp.truncation.head_tokens,
                             tail_tokens=pp.truncation.tail_tokens,
                             budget_tokens=pp.truncation.budget_tokens)
            for pp in p.prompts if pp.truncation.truncated]


async def _run_scalar(p: PreparedItem, client: AsyncLLM, base_id: str) -> RewardItemResult:
    results = await asyncio.gather(*(
        _encode_score(client, pp.ids, f"{base_id}-{p.index}-{pp.candidate}") for pp in p.prompts))
    scores = [score for score, _ in results]
    prompt_tokens = sum(n for _, n in results)
    best = max(range(len(scores)), key=scores.__getitem__)
    truncation = _truncations(p)
    return RewardItemResult(
        index=p.index, mode="scalar", model=p.model,
        candidates=[CandidateResult(index=c, score=s) for c, s in enumerate(scores)],
        preferred=best, truncated=bool(truncation), truncation=truncation,
        usage=UsageInfo(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens,
                        completion_tokens=0))


def _show(ranking: list[int]) -> str:
    return ">".join(str(c) for c in ranking)


async def _run_judge(p: PreparedItem, client: AsyncLLM, base_id: str) -> RewardItemResult:
    item = p.item
    kind = item.resolved_judge_prompt
    n = len(item.candidates)

    def params() -> SamplingParams:
        return with_extensions(SamplingParams(temperature=0.0, max_tokens=item.max_tokens),
                               item.flux, item.kv_policy)

    outs = await asyncio.gather(*(
        _judge(client, pp.ids, params(), f"{base_id}-{p.index}-{pp.order}") for pp in p.prompts))
    judgments = []
    for pp, (text, finish, _, _) in zip(p.prompts, outs, strict=True):
        verdict = parsing.parse_verdict(text, kind, n)
        if verdict.ranking is None:
            JUDGE_PARSE_FAILURES.labels(kind).inc()
        ranking = None if verdict.ranking is None else [pp.shown[s] for s in verdict.ranking]
        judgments.append(Judgment(order=pp.order, shown=pp.shown, text=text,
                                  finish_reason=finish, ranking=ranking, error=verdict.error))

    ranking, reason, agreement = judgments[0].ranking, None, None
    failed = [j for j in judgments if j.ranking is None]
    if failed:
        ranking = None
        reason = "; ".join(f"{j.order} order: {j.error}" for j in failed)
    elif len(judgments) == 2:
        agreement = judgments[0].ranking == judgments[1].ranking
        if not agreement:
            SWAP_DISAGREEMENTS.inc()
            ranking = None
            reason = (f"the two candidate orders disagree: given order ranks "
                      f"{_show(judgments[0].ranking)}, reversed order ranks "
                      f"{_show(judgments[1].ranking)}")
    ranks = {c: r + 1 for r, c in enumerate(ranking)} if ranking is not None else {}
    prompt_tokens = sum(o[2] for o in outs)
    completion_tokens = sum(o[3] for o in outs)
    truncation = _truncations(p)
    return RewardItemResult(
        index=p.index, mode="judge", model=p.model,
        candidates=[CandidateResult(index=c, rank=ranks.get(c)) for c in range(n)],
        preferred=ranking[0] if ranking is not None else None, reason=reason,
        judge_prompt=kind, judgments=judgments, swap_agreement=agreement,
        truncated=bool(truncation), truncation=truncation,
        usage=UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                        total_tokens=prompt_tokens + completion_tokens))


async def _timed(p: PreparedItem, request: Request, base_id: str) -> RewardItemResult:
    start = time.perf_counter()
    if p.item.mode == "scalar":
        result = await _run_scalar(p, request.app.state.reward_engine.client, base_id)
    else:
        result = await _run_judge(p, request.app.state.engine.client, base_id)
    REWARD_LATENCY.labels(p.item.mode).observe(time.perf_counter() - start)
    REWARD_REQUESTS.labels(p.item.mode).inc()
    return result


async def run(prepared: list[PreparedItem], request: Request) -> list[RewardItemResult]:
    """Run every prepared item's engine calls concurrently. If one fails (or the client goes
    away), the others are cancelled, which aborts their engine requests."""
    base_id = f"reward-{uuid.uuid4().hex}"
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_timed(p, request, base_id)) for p in prepared]
    except BaseExceptionGroup as group_error:
        raise group_error.exceptions[0] from None
    return [t.result() for t in tasks]
