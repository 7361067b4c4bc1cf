"""Domain-term mining ranks corpus-specific words first and counts tokens per term."""

from tokalign.stages.terms import mine, tokens_per_term


def test_tfidf_prefers_domain_words_over_common_ones():
    corpus = ["the insulin dose and the glucose level"] * 5 + ["the patient and the doctor"] * 5
    reference = ["the cat and the dog", "the house and the car", "a patient waited"] * 3
    by_freq = mine(corpus, top_k=3, min_freq=2, scoring="frequency")
    assert by_freq[0]["term"] == "the"
    by_tfidf = mine(corpus, top_k=4, min_freq=2, scoring="tfidf", reference=reference)
    top = [t["term"] for t in by_tfidf]
    assert "the" not in top and "and" not in top
    assert {"insulin", "glucose"} <= set(top)


def test_min_freq_and_top_k():
    terms = mine(["alpha beta beta gamma gamma gamma"], top_k=1, min_freq=2, scoring="frequency")
    assert terms == [{"term": "gamma", "count": 3, "score": 3.0}]


def test_tokens_per_term_counts_pieces():
    class Tok:
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [list(range(len(t.split("-")))) for t in texts]}

    assert tokens_per_term(Tok(), ["a-b-c", "d"]) == [3, 1]
