"""Demonstration retrievers: score every indexed text by its similarity to a query text.

The IKE paper (and EasyEdit) rank demonstrations with a sentence-embedding model
(all-MiniLM-L6-v2), which cannot be fetched offline and is not part of this harness. Two
retrievers replace it:

  * ``tfidf``: word uni- and bigram TF-IDF (scikit-learn), cosine similarity; lexical overlap
    (the same subject, the same relation wording) is what decides, which is what matters most
    for CounterFact / zsRE style facts;
  * ``embedding``: the mean of the edited model's own input-embedding vectors over a text's
    tokens, cosine similarity; no extra model, but weaker than a trained sentence encoder.

Another retriever is plugged in by adding its class to `RETRIEVERS` (before the run checks its
hyperparameters): a class with `fit(texts, model, tokenizer)`, `scores(query) -> np.ndarray`
(one similarity per fitted text, higher = more similar) and `settings() -> dict` (JSON, recorded
in config.json).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bench.core.errors import BenchError


class Retriever:
    name = ""

    def fit(self, texts: list[str], model, tokenizer) -> None:
        raise NotImplementedError

    def scores(self, query: str) -> np.ndarray:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        return {}


class TfidfRetriever(Retriever):
    """Cosine similarity of TF-IDF vectors (rows L2-normalised, so a dot product)."""

    name = "tfidf"
    OPTIONS = {"ngram_range": (1, 2), "sublinear_tf": True, "lowercase": True}

    def __init__(self):
        self._vectorizer = None
        self._matrix = None

    def fit(self, texts: list[str], model, tokenizer) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer  # late: scikit-learn, only for this retriever

        self._vectorizer = TfidfVectorizer(**self.OPTIONS)
        try:
            self._matrix = self._vectorizer.fit_transform(texts)
        except ValueError as exc:  # empty vocabulary: nothing but stop words / punctuation
            raise BenchError(f"ike: the tfidf retriever cannot index these texts ({exc})") from None

    def scores(self, query: str) -> np.ndarray:
        q = self._vectorizer.transform([query])
        return np.asarray((self._matrix @ q.T).todense()).ravel().astype(np.float64)

    def settings(self) -> dict[str, Any]:
        return {"library": "scikit-learn TfidfVectorizer", "ngram_range": [1, 2], "sublinear_tf": True,
                "lowercase": True, "similarity": "cosine"}


class EmbeddingRetriever(Retriever):
    """Cosine similarity of mean-pooled input embeddings of the (edited) model itself."""

    name = "embedding"
    CHUNK = 2048  # texts embedded per call

    def __init__(self):
        self._model = None
        self._tokenizer = None
        self._vectors: torch.Tensor | None = None

    def fit(self, texts: list[str], model, tokenizer) -> None:
        self._model, self._tokenizer = model, tokenizer
        self._vectors = torch.cat([self._embed(texts[i:i + self.CHUNK])
                                   for i in range(0, len(texts), self.CHUNK)]) if texts else torch.zeros(0, 1)

    @torch.no_grad()
    def _embed(self, texts: list[str]) -> torch.Tensor:
        weight = self._model.get_input_embeddings().weight
        ids = self._tokenizer(texts, add_special_tokens=False)["input_ids"]
        lengths = [max(len(x), 1) for x in ids]
        flat = torch.tensor([t for x in ids for t in (x or [0])], dtype=torch.long, device=weight.device)
        offsets = torch.tensor([0] + lengths[:-1], device=weight.device).cumsum(0)
        vecs = torch.nn.functional.embedding_bag(flat, weight, offsets, mode="mean").float().cpu()
        return torch.nn.functional.normalize(vecs, dim=-1)

    def scores(self, query: str) -> np.ndarray:
        return (self._vectors @ self._embed([query])[0]).double().numpy()

    def settings(self) -> dict[str, Any]:
        return {"vectors": "mean of the edited model's input embeddings over the text's tokens "
                           "(no special tokens)", "similarity": "cosine"}


# name -> retriever class; add an entry to plug in another retriever.
RETRIEVERS: dict[str, type[Retriever]] = {"tfidf": TfidfRetriever, "embedding": EmbeddingRetriever}


def make_retriever(name: str) -> Retriever:
    if name not in RETRIEVERS:
        raise BenchError(f"ike: unknown retriever {name!r}; known: {', '.join(sorted(RETRIEVERS))}")
    return RETRIEVERS[name]()
