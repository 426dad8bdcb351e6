"""The text of the Megrez search protocol, exactly as the model was trained on it.

Every string here is compared byte for byte with the vendor's own rendering
(``shared/data/protocol/infiniwebsearch_rendered.json``) by ``tests/test_protocol.py``. The odd
spacing ("current events.Never", "etc.If"), the ASCII punctuation after Chinese text and
"Here is the keywords" are what the model saw in training: do not tidy them up.
Rendering (time formatting, JSON serialisation, chat tokens) lives in ``engine.protocol``.
"""

from __future__ import annotations

from typing import Any, Final

ROLE_LINE: Final = "你是Megrez-3B-Instruct, 将针对用户的问题给出详细的、积极的回答."

# ``time`` is ``YYYY-MM-DD HH:MM:SS``; ``weekday`` an English weekday name (never locale-dependent).
TIME_LINE_TEMPLATE: Final = "The current time is {time}, {weekday}."

FUNCTIONS_INTRO: Final = "You have access to the following functions. Use them if required -"

SEARCH_FUNCTION_NAME: Final = "googleWebSearch"

# The vendor's schema; ``engine.protocol.function_schema()`` hands out copies so nobody mutates it.
GOOGLE_WEB_SEARCH: Final[dict[str, Any]] = {
    "name": SEARCH_FUNCTION_NAME,
    "description": (
        "A Google Search Engine. Useful when you need to search information you don't know such as "
        "weather, exchange rate, current events.Never ever use this tool when user want to translate"
    ),
    "parameters": {
        "type": "object",
        "properties": {
            "query": {
                "type": "string",
                "description": (
                    "Content that users want to search for, such as 'weather', 'current events', "
                    "etc.If special characters such as '\n' appear in the search, "
                    "these special characters must be ignored."
                ),
            }
        },
        "required": ["query"],
    },
}

# The vendor hard-codes "Chinese" in this sentence; it is the one part we parameterise.
DEFAULT_ANSWER_LANGUAGE: Final = "Chinese"

# Placeholders: {language}, {question}, {keywords}, {contexts} (see ``render_contexts``).
OBSERVATION_TEMPLATE: Final = (
    "You will be given a set of related contexts to the question, "
    "each starting with a reference number like [[citation:x]], where x is a number. "
    "Please use the context and cite the context at the end of each sentence if applicable."
    "\n\n"
    "Please cite the contexts with the reference numbers, in the format [citation:x]. "
    "If a sentence comes from multiple contexts, please list all applicable citations, "
    "like [citation:3][citation:5]. "
    "If the context does not provide relevant information to answer the question, "
    "inform the user that there is no relevant information in the search results "
    "and that the question cannot be answered."
    "\n\n"
    "Other than code and specific names and citations, your answer must be written in {language}."
    "\n\n"
    "Ensure that your response is concise and clearly formatted. "
    "Group related content together and use Markdown points or lists where appropriate."
    "\n\n"
    "Remember, summarize and don't blindly repeat the contexts verbatim. And here is the user question:\n"
    "{question}\n"
    "Here is the keywords of the question:\n"
    "{keywords}"
    "\n\n"
    "Here are the set of contexts:"
    "\n\n"
    "{contexts}"
)

# One context block; blocks are joined with a single newline and numbered from 1.
CONTEXT_TEMPLATE: Final = "[[citation:{number}]]\n{text}"
