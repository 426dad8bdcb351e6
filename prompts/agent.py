"""Text the agent adds around the vendor's protocol: repair observations, fallbacks, follow-ups.

The repair observations follow the vendor's demo (InfiniWebSearch answers an unknown function with
an observation in Chinese, "X不在可以使用的工具列表中"); the model was trained on Chinese control text,
so the other two are written the same way. Fallback answers and the follow-up instruction are in the
answer language (Chinese or English; other languages get English).
"""

from __future__ import annotations

from typing import Final

# Observations after a call that cannot be run (one repair per turn; see agent/graph.py).
UNKNOWN_FUNCTION: Final = "{name}不在可以使用的工具列表中"
MALFORMED_CALL: Final = "function call json输入格式错误: {error}"
# Observation after a search that found nothing (the model then answers without sources).
NO_RESULTS: Final = "搜索没有返回任何结果, 请直接回答用户的问题."

# Shown when the model produced no answer text at all.
EMPTY_ANSWER: Final[dict[str, str]] = {
    "Chinese": "抱歉，我没能生成回答，请换个说法再试一次。",
    "English": "Sorry, I could not produce an answer. Please try rephrasing the question.",
}

# Follow-up questions: one user message after the answer, so the whole conversation so far is a
# cached prefix; the output is constrained by RELATED_REGEX (three numbered lines).
RELATED_INSTRUCTION: Final[dict[str, str]] = {
    "Chinese": "请根据以上对话，提出3个用户接下来可能会问的简短问题，每行一个，用1. 2. 3.编号，不要写其他内容。",
    "English": (
        "Based on the conversation above, write 3 short follow-up questions the user might ask next, "
        "one per line, numbered 1. 2. 3., and nothing else."
    ),
}
RELATED_COUNT: Final = 3
RELATED_MAX_CHARS: Final = 100
RELATED_REGEX: Final = "\n".join(rf"{i}\. [^\n]{{2,{RELATED_MAX_CHARS}}}" for i in range(1, RELATED_COUNT + 1))


def in_language(texts: dict[str, str], language: str) -> str:
    """The text for ``language``, English when there is none."""
    return texts.get(language, texts["English"])
