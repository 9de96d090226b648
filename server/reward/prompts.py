"""LongRM's judge prompts (arXiv 2510.06915; github LCM-Lab/Long-RM,
`evaluate/evaluating/longreward_bench/utils/prompt.py`).

The wording is kept verbatim: LongRM's generative reward models were trained on these exact
prompts, and their verdict formats (`[[A]]` / `[[B]]`, `[Ranking]` then `[[A>B>C]]`) are what
:mod:`server.reward.parsing` reads back. Candidates are shown as assistants A, B, C, ... in the
order the caller chooses (the swap check shows them reversed).
"""

from __future__ import annotations

from typing import Literal

JudgePrompt = Literal["pairwise", "ranking"]

PAIRWISE_SYSTEM_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two "
    "AI assistants to the user questions. You should focus on who provides a better answer to the "
    "second user question. You should choose the assistant that follows the user's instructions "
    "and answers the user's question better. Your evaluation should consider factors such as the "
    "helpfulness, relevance, accuracy, depth, creativity, and level of detail of their responses. "
    "Begin your evaluation by comparing the two responses and provide a short explanation. Avoid "
    "any position biases and ensure that the order in which the responses were presented does not "
    "influence your decision. Do not allow the length of the responses to influence your "
    "evaluation. Do not favor certain names of the assistants. Be as objective as possible. After "
    "providing your explanation, output your final verdict by strictly following this format: "
    '"[[A]]" if assistant A is better, "[[B]]" if assistant B is better.'
)

RANKING_SYSTEM_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by "
    "multiple AI assistants to the user's question. You should rank {number} responses based on "
    "their quality, with the highest quality response first, followed by the next best, and so "
    "on. Consider the following factors in your evaluation: helpfulness, relevance, accuracy, "
    "depth, creativity, and level of detail. Do not allow the order in which the responses were "
    "presented to influence your decision. Your ranking should be based purely on the overall "
    "quality of each response, not on the length or the name of the assistants. After evaluating "
    "the responses, please output the ranking of the assistants in the following format: "
    "{pattern}Please reply strictly in the following format, starting with [Analysis] and ending "
    "with patterns like {pattern}:\n[Analysis]\n(your analysis)\n[Ranking]\n(your ranking in the "
    "format of {pattern})"
)

# Letters name the shown candidates; the ranking format (and LongRM's parser) needs one per slot.
MAX_JUDGE_CANDIDATES = 26


def letter(slot: int) -> str:
    """The name of the candidate shown in position ``slot`` (0 -> "A")."""
    return chr(ord("A") + slot)


def ranking_pattern(n: int) -> str:
    """``[[A>B>...]]`` over ``n`` letters: the format the ranking prompt asks for."""
    return "[[" + ">".join(letter(i) for i in range(n)) + "]]"


def system_prompt(prompt: JudgePrompt, n: int) -> str:
    if prompt == "pairwise":
        return PAIRWISE_SYSTEM_PROMPT
    return RANKING_SYSTEM_PROMPT.format(number=n, pattern=ranking_pattern(n))


def context_text(contents: list[str]) -> str:
    """The user question the judge sees: LongRM joins the context messages' contents with a
    blank line."""
    return "\n\n".join(contents)


def user_prompt(question: str, answers: list[str]) -> str:
    """LongRM's user turn: the question, then each answer between start/end markers."""
    parts = [f"[User Question]\n{question}"]
    for slot, answer in enumerate(answers):
        name = letter(slot)
        parts.append(f"[The Start of Assistant {name}'s Answer]\n{answer}\n"
                     f"[The End of Assistant {name}'s Answer]")
    return "\n\n".join(parts)


def judge_messages(prompt: JudgePrompt, question: str, answers: list[str]) -> list[dict[str, str]]:
    """The chat messages (system + user) sent to the judge; ``answers`` in display order."""
    return [
        {"role": "system", "content": system_prompt(prompt, len(answers))},
        {"role": "user", "content": user_prompt(question, answers)},
    ]
