"""Passage selection: chunk boundaries, budgets, ranking, de-duplication and prompt order."""

from __future__ import annotations

import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from retrieval.passages import CONTEXT_OVERHEAD, chunk, dedupe, pack, rank, select_passages, split_sentences
from retrieval.tokenize import estimate_tokens
from retrieval.types import Page, Passage

OVERHEAD = estimate_tokens(CONTEXT_OVERHEAD)
ENDS = re.compile(r"[.?!。！？；][\"'”’」』）)]*$")


def body(p: Passage) -> str:
    return p.text.split("\n", 1)[1] if p.title else p.text


def numbered(n: int, words: int = 12) -> str:
    return " ".join(f"Sentence {i} says " + " ".join(["something"] * words) + "." for i in range(n))


# --- chunking -------------------------------------------------------------------------------


def test_split_sentences_keeps_abbreviations_and_initials():
    text = 'Dr. Smith met J. K. Rowling in the U.S. in 1990. She said "Hello!" Then she left. Did she? Yes.'
    assert split_sentences(text) == [
        "Dr. Smith met J. K. Rowling in the U.S. in 1990. ",
        'She said "Hello!" ',
        "Then she left. ",
        "Did she? ",
        "Yes.",
    ]


def test_split_sentences_chinese():
    text = "北京是中国的首都。上海是最大的城市！你去过吗？去过；很喜欢“外滩”。"
    assert split_sentences(text) == [
        "北京是中国的首都。",
        "上海是最大的城市！",
        "你去过吗？",
        "去过；",
        "很喜欢“外滩”。",
    ]


def test_chunks_are_whole_sentences_near_the_target_size():
    text = numbered(40) + "\n\n" + numbered(7, words=3)
    passages = chunk(Page(url="u", title="Title", text=text), passage_tokens=80)
    assert len(passages) > 3
    sentences = [s.strip() for line in text.splitlines() for s in split_sentences(line) if s.strip()]
    rebuilt = [s.strip() for p in passages for line in body(p).splitlines() for s in split_sentences(line)]
    assert rebuilt == sentences
    for p in passages:
        assert p.tokens <= 80
        assert ENDS.search(p.text)
        assert p.text.startswith("Title\n")


def test_chinese_page_chunks_at_chinese_sentence_ends():
    sentence = "长城是中国古代的军事防御工程，修筑的历史可上溯到西周时期。"
    page = Page(url="https://zh.example/changcheng", title="长城", text=sentence * 12)
    passages = chunk(page, passage_tokens=90)
    assert len(passages) > 1
    for p in passages:
        assert p.tokens <= 90
        assert body(p).endswith("。")
        assert body(p) == sentence * (len(body(p)) // len(sentence))


def test_a_sentence_longer_than_a_passage_is_cut_into_pieces_that_fit():
    long_sentence = " ".join(f"word{i}" for i in range(400)) + "."
    passages = chunk(Page(url="u", title="T", text=long_sentence + " Short one."), passage_tokens=64)
    assert all(p.tokens <= 64 for p in passages)
    assert " ".join(body(p) for p in passages).split() == (long_sentence + " Short one.").split()


def test_a_long_chinese_sentence_is_cut_between_characters():
    sentence = "这是一个非常长的句子" * 30 + " 后面还有一些文字" * 3 + "。"
    passages = chunk(Page(url="u", title="长句", text=sentence), passage_tokens=50)
    assert len(passages) > 1
    assert all(p.tokens <= 50 for p in passages)
    assert "".join(body(p) for p in passages).replace(" ", "") == sentence.replace(" ", "")


def test_chunk_keeps_url_title_rank_and_source():
    page = Page(url="https://a.example/x", title="  A   page ", text=numbered(20), rank=3, source="snippet")
    passages = chunk(page, passage_tokens=60)
    assert [p.meta["chunk"] for p in passages] == list(range(len(passages)))
    for p in passages:
        assert (p.url, p.title, p.meta["rank"], p.meta["source"]) == ("https://a.example/x", "A page", 3, "snippet")
        assert p.text.startswith("A page\n")


def test_empty_pages_give_no_passages():
    assert chunk(Page(url="u", title="Title only", text="")) == []
    assert chunk(Page(url="u", title="", text=" \n\n \t")) == []
    assert select_passages("anything?", [], budget_tokens=1000) == []
    assert select_passages("anything?", [Page(url="u", title="T", text="")], budget_tokens=1000) == []


# --- ranking and de-duplication --------------------------------------------------------------

EIFFEL = "When was the Eiffel Tower completed?"


def eiffel_pages() -> list[Page]:
    stuffed = Page(
        url="https://tickets.example/eiffel",
        title="Eiffel Tower Tickets | Eiffel Tower Tours",
        text="Eiffel Tower tickets. Eiffel Tower tours. Best Eiffel Tower deals. Eiffel Tower hotels near "
        "the Eiffel Tower. Book your Eiffel Tower visit today: Eiffel Tower, Eiffel Tower, Eiffel Tower.",
        rank=1,
    )
    article = Page(
        url="https://en.wikipedia.org/wiki/Eiffel_Tower",
        title="Eiffel Tower - Wikipedia",
        text="The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
        "It is named after the engineer Gustave Eiffel, whose company designed and built the tower.\n"
        "Locally nicknamed La dame de fer, it was constructed as the centrepiece of the 1889 World's Fair. "
        "Work on the foundations started in January 1887, and the structure was completed on 31 March 1889. "
        "The tower received 1.9 million visitors during the exposition.\n"
        "The tower is 330 metres tall, about the same height as an 81-storey building. Its base is square, "
        "measuring 125 metres on each side. It is the tallest structure in Paris.",
        rank=2,
    )
    other = Page(
        url="https://travel.example/paris",
        title="Things to do in Paris",
        text="Paris has many museums, such as the Louvre and the Musée d'Orsay. Cafés line the boulevards. "
        "A river cruise on the Seine is a relaxing way to see the city at night.",
        rank=3,
    )
    return [stuffed, article, other]


def test_passage_with_the_answer_beats_keyword_stuffing():
    passages = [p for page in eiffel_pages() for p in chunk(page, passage_tokens=60)]
    best = rank(EIFFEL, passages)[0]
    assert "completed on 31 March 1889" in best.text
    chosen = select_passages(EIFFEL, eiffel_pages(), budget_tokens=90, passage_tokens=60)
    assert any("completed on 31 March 1889" in p.text for p in chosen)
    assert all(p.url == "https://en.wikipedia.org/wiki/Eiffel_Tower" for p in chosen)


def test_search_query_terms_count_too():
    pages = [
        Page(url="a", title="Rivers", text="The Nile is long.", rank=1),
        Page(url="b", title="Europe", text="The Danube is 2,850 km long.", rank=2),
    ]
    passages = [p for page in pages for p in chunk(page)]
    assert rank("How long is it?", passages)[0].url == "a"
    assert rank("How long is it?", passages, query="Danube length")[0].url == "b"


def test_empty_question_keeps_search_order():
    texts = {1: "Cats purr when content.", 2: "Dogs bark at strangers.", 3: "Birds sing at dawn."}
    pages = [Page(url=f"https://s.example/{i}", title=f"Page {i}", text=t, rank=i) for i, t in texts.items()]
    chosen = select_passages("", pages, budget_tokens=1000)
    assert [p.url for p in chosen] == [page.url for page in pages]


def test_near_duplicates_across_pages_are_dropped():
    story = (
        "The city council approved the new budget on Monday after a long debate. The plan adds money for "
        "schools and public transport, and it cuts spending on administration by five percent."
    )
    pages = [
        Page(url="https://news.example/budget", title="Council passes budget", text=story, rank=1),
        Page(url="https://mirror.example/budget", title="Budget passed (copy)", text=story.replace("five", "5"), rank=2),
        Page(url="https://other.example/budget", title="Opinion", text="The new budget helps schools and transport "
             "but the debate showed how divided the council is about spending.", rank=3),
    ]  # fmt: skip
    chosen = select_passages("What did the council's new budget change?", pages, budget_tokens=2000)
    urls = [p.url for p in chosen]
    assert "https://other.example/budget" in urls
    assert len({"https://news.example/budget", "https://mirror.example/budget"} & set(urls)) == 1


def test_dedupe_keeps_the_first_of_each_copy_and_distinct_passages():
    a = Passage(url="a", title="", text="one two three four five six seven eight")
    b = Passage(url="b", title="", text="one two three four five six seven eight nine")
    c = Passage(url="c", title="", text="completely different words in this passage here")
    assert [p.url for p in dedupe([a, b, c])] == ["a", "c"]


def test_snippet_only_pages_contribute_their_snippet():
    pages = [
        Page(url="https://down.example/", title="Mount Everest height", text="Mount Everest is 8,849 metres high.",
             source="snippet", error="timeout", rank=1),
        Page(url="https://ok.example/", title="Nepal", text="Nepal is a country in South Asia.", rank=2),
    ]  # fmt: skip
    chosen = select_passages("How high is Mount Everest?", pages, budget_tokens=500)
    assert chosen[0].url == "https://down.example/"
    assert chosen[0].meta["source"] == "snippet"
    assert "8,849 metres" in chosen[0].text


# --- packing and budgets ----------------------------------------------------------------------


def test_prompt_order_groups_pages_best_first_and_keeps_reading_order():
    pages = eiffel_pages()
    chosen = select_passages(EIFFEL, pages, budget_tokens=3000, passage_tokens=40)
    urls = [p.url for p in chosen]
    assert urls[0] == "https://en.wikipedia.org/wiki/Eiffel_Tower"
    runs = [u for i, u in enumerate(urls) if i == 0 or urls[i - 1] != u]
    assert len(runs) == len(set(urls))  # each page's passages are contiguous
    for url in set(urls):
        chunks = [p.meta["chunk"] for p in chosen if p.url == url]
        assert chunks == sorted(chunks)


def test_last_passage_is_cut_at_a_sentence_end():
    passages = rank("sentence something", chunk(Page(url="u", title="T", text=numbered(30)), passage_tokens=120))
    chosen = pack(passages, passages[0].tokens + 2 * OVERHEAD + 60)
    assert len(chosen) == 2
    assert chosen[1].meta.get("cut") and ENDS.search(chosen[1].text)
    assert passages[1].text.startswith(chosen[1].text) and len(chosen[1].text) < len(passages[1].text)


def test_budget_smaller_than_any_passage_still_fits():
    pages = [Page(url="u", title="T", text=numbered(10, words=40))]
    chosen = select_passages("something", pages, budget_tokens=60)
    assert chosen and sum(p.tokens + OVERHEAD for p in chosen) <= 60
    assert select_passages("something", pages, budget_tokens=0) == []


def test_custom_count_tokens_is_used_for_chunking_and_budget():
    def chars(text: str) -> int:
        return len(text)

    pages = eiffel_pages()
    chosen = select_passages(EIFFEL, pages, budget_tokens=400, count_tokens=chars, passage_tokens=150)
    assert chosen
    assert all(p.tokens == len(p.text) <= 150 for p in chosen)
    assert sum(len(p.text) + len(CONTEXT_OVERHEAD) for p in chosen) <= 400


WORDS = st.sampled_from(
    ["alpha", "beta", "gamma", "delta", "river", "tower", "city", "1889", "长城", "北京", "中国", "的", "是"]
)
SENTENCE = st.builds(
    lambda ws, end: " ".join(ws) + end, st.lists(WORDS, min_size=1, max_size=30), st.sampled_from([".", "?", "!", "。"])
)
PAGE_TEXT = st.lists(st.lists(SENTENCE, max_size=8).map(" ".join), max_size=5).map("\n".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# found by this test: the last-resort cut at a word used to stop inside the title line ("Page")
@example(texts=["alpha."], budget=21, passage_tokens=32, question="")
@given(
    texts=st.lists(PAGE_TEXT, max_size=5),
    budget=st.integers(min_value=0, max_value=1500),
    passage_tokens=st.integers(min_value=32, max_value=300),
    question=st.lists(WORDS, max_size=6).map(" ".join),
)
def test_budget_is_never_exceeded(texts, budget, passage_tokens, question):
    def strict(text: str) -> int:  # one token per UTF-8 byte: exact, and not the default estimate
        return len(text.encode())

    pages = [Page(url=f"https://p{i}.example/", title=f"Page {i}", text=t, rank=i + 1) for i, t in enumerate(texts)]
    chosen = select_passages(question, pages, budget_tokens=budget, count_tokens=strict, passage_tokens=passage_tokens)
    assert sum(strict(p.text) + strict(CONTEXT_OVERHEAD) for p in chosen) <= budget
    by_url = {page.url: page for page in pages}
    for p in chosen:
        assert p.tokens == strict(p.text)
        page = by_url[p.url]
        assert p.title == page.title and p.text.startswith(page.title + "\n")
        assert all(line in page.text for line in body(p).splitlines())


def test_twenty_copies_of_a_page_give_its_passages_once_in_reading_order():
    # A hundred candidate passages (timed in bench.timings), each one five times over.
    pages = [
        Page(url=f"https://p{i}.example/", title=f"Result {i}", text=numbered(25, words=8), rank=i + 1)
        for i in range(20)
    ]
    chosen = select_passages("What does sentence 7 say?", pages, budget_tokens=3000)
    assert len({p.url for p in chosen}) == 1
    assert [body(p) for p in chosen] == [body(p) for p in chunk(pages[0])]
