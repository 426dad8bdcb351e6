"""A tiny, offline stand-in for the Megrez tokenizer (for tests and benchmarks; never the product).

The real Megrez-3B tokenizer is a ~120k-entry download; the tests only need something with the
same *shape*: byte-level BPE (so any text is encodable and decodes back exactly), the Megrez special
tokens as single ids, eos ``<|turn_end|>`` and a chat template producing the Megrez chat format.
It is trained at test time on a small corpus written here, which takes well under a second.

Use: ``tok = build_megrez_tokenizer(tmp_path)``; afterwards ``AutoTokenizer.from_pretrained(tmp_path)``
loads the same tokenizer (vLLM does exactly that), and ``len(tok)`` is the vocabulary size a tiny
checkpoint saved next to it must use.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

# Order matters only in that it fixes the ids (0..len-1), which keeps saved checkpoints stable.
MEGREZ_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|unk|>",
    "<|eos|>",
    "<|pad|>",
    "<|role_start|>",
    "<|role_end|>",
    "<|turn_end|>",
    "<|function_start|>",
    "<|function_end|>",
    "<|turn_end>",  # a typo token present in the real vocabulary; the model sometimes emits it
    "<image>",
    "</image>",
    "<audio>",
    "</audio>",
)

# Same shape as the vendor's template: no BOS, one block per message, optional generation prompt.
MEGREZ_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|role_start|>' + message['role'] + '<|role_end|>' + message['content'] + '<|turn_end|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|role_start|>assistant<|role_end|>' }}{%- endif -%}"
)

# An upper bound: the small corpus yields ~800 entries; read the real size from ``len(tokenizer)``.
VOCAB_SIZE = 1000

_EN_SUBJECTS = ("The weather", "The exchange rate", "The search engine", "The answer", "This city", "The model")
_EN_PREDICATES = (
    "changes quickly today",
    "is reported by several sources",
    "depends on the current events",
    "was updated on Friday evening",
    "cannot be found in the results",
    "is described in the first context",
)
_EN_TAILS = ("according to the news.", "in Beijing and Shanghai.", "as of 2024.", "[citation:1]", "[citation:2].")
_ZH_SUBJECTS = ("今天的天气", "人民币汇率", "搜索引擎", "这个问题的答案", "北京市", "模型")
_ZH_PREDICATES = (
    "变化很快",
    "由多个来源报道",
    "取决于当前事件",
    "在星期五晚上更新",
    "无法在搜索结果中找到",
    "在第一段上下文中描述",
)
_ZH_TAILS = ("。", "，请注意。", "[citation:1]。", "（根据新闻）。")
_EXTRA = (
    '{"name": "googleWebSearch", "arguments": {"query": "北京天气"}}',
    "You will be given a set of related contexts to the question.",
    "The current time is 2024-09-20 18:00:00, Friday.",
    "你是Megrez-3B-Instruct, 将针对用户的问题给出详细的、积极的回答.",
    "0123456789 +-*/=()[]{}<>|:;,.!?'\"\n\t",
)


def _corpus() -> list[str]:
    """A few hundred English and Chinese sentences (combinations of the phrases above)."""
    lines = [f"{s} {p} {t}" for s in _EN_SUBJECTS for p in _EN_PREDICATES for t in _EN_TAILS]
    lines += [f"{s}{p}{t}" for s in _ZH_SUBJECTS for p in _ZH_PREDICATES for t in _ZH_TAILS]
    return lines + list(_EXTRA) * 5


def build_megrez_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """Train the tiny Megrez-shaped tokenizer, ``save_pretrained(path)`` it and return it."""
    backend = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    # Byte-level: every byte has a token, so no input is ever unknown and decoding is lossless.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in MEGREZ_SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer=trainer)

    named = {"<|unk|>", "<|pad|>", "<|turn_end|>"}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<|unk|>",
        pad_token="<|pad|>",
        eos_token="<|turn_end|>",
        additional_special_tokens=[t for t in MEGREZ_SPECIAL_TOKENS if t not in named],
        chat_template=MEGREZ_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    # transformers 5 writes its own class name and a list-valued ``extra_special_tokens``; a vLLM
    # environment may still run transformers 4.x, which knows neither. The 4.x spelling loads in both.
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["additional_special_tokens"] = config.pop("extra_special_tokens", [])
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    # Hand back what ``from_pretrained`` (and so vLLM) sees, not the in-memory original.
    return AutoTokenizer.from_pretrained(path)
