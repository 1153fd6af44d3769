"""CIDEr-D (Vedantam et al. 2015) as the COCO caption evaluation computes it, so a captioning number
here is comparable with the paper's (COCO CIDEr 88.5 zero-shot, reported x100).

What `pycocoevalcap.cider.Cider` does, and this does too (a parity test checks it against the
toolkit when that is installed):
- n-grams of order 1..4 of each tokenised caption, weighted by TF-IDF: the term frequency in the
  caption times log(N) - log(max(1, df)), where N is the number of evaluated images and df the number
  of them whose reference captions contain the n-gram. The document frequencies come from the
  references of the evaluated set only, so one image alone scores 0 (log 1 = 0 weighs everything 0).
- per order, the candidate's vector against each reference's: the candidate's weights clipped by the
  reference's (min), dotted with the reference's, over the product of the two (unclipped) norms;
  times the Gaussian length penalty exp(-(l_c - l_r)^2 / (2 sigma^2)), sigma = 6;
- mean over the orders, mean over the references, x10; the corpus score is the mean over images.

The toolkit measures lengths in bigrams (words - 1); the difference of two lengths is the same in
words unless a caption is empty, and an empty caption scores 0 either way, so words are used here.

Tokenisation (`tokenize`) stands in for the toolkit's Stanford PTBTokenizer (`-lowerCase`, then the
tokens . ? ! , : ; - -- ... ' '' ` `` dropped) without Java, and keeps what that keeps: lower case;
the clitics `n't 's 're 've 'll 'm 'd` split off ("dog's" -> "dog 's") and `cannot gonna gotta
wanna` split ("can not"); brackets become `-lrb- -rrb- -lsb- -rsb- -lcb- -rcb-` (the toolkit drops
only the upper-case forms, so after lower-casing they stay); words are runs of letters and digits
with inner hyphens and periods ("black-and-white", "3.5"), letter-period runs keep their last period
("u.s."), times keep their colon ("10:30"), and the symbols & % $ # / + = @ * are tokens; everything
else is dropped. Simplified: PTB keeps the period of listed abbreviations ("st." there, "st" here),
keeps runs of marks such as "?!" as a token, and knows more special forms. Measured against the
toolkit's tokenizer (Java, pycocoevalcap 1.2): 19 of 20 made-up captions it was written on agree
("st."), and 18 of 20 written afterwards ("10:30", since handled, and "?!").
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence

N = 4          # the largest n-gram order
SIGMA = 6.0    # the Gaussian length penalty's standard deviation

_CLITIC = re.compile(r"(\w)(n't|'s|'re|'ve|'ll|'m|'d)\b")
_SPLIT = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na"}
_SPLIT_RE = re.compile(r"\b(" + "|".join(_SPLIT) + r")\b")
_BRACKETS = str.maketrans({"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ",
                           "{": " -lcb- ", "}": " -rcb- ", "\u2019": "'"})
_TOKEN = re.compile("|".join([
    r"-[lr][rsc]b-", r"n't", r"'(?:s|re|ve|ll|m|d)\b",   # brackets, clitics
    r"(?:[^\W\d_]\.){2,}", r"\d+(?::\d+)+",            # u.s. 10:30
    r"\w+(?:[-.]\w+)*", r"[&%$#/+=@*]"]))                # words, symbols

Ngrams = Counter  # n-gram (a tuple of words) -> count


def tokenize(caption: str) -> list[str]:
    """The caption's words as the COCO evaluation sees them (lower case, no punctuation)."""
    text = _SPLIT_RE.sub(lambda m: _SPLIT[m.group(1)], caption.lower().translate(_BRACKETS))
    return _TOKEN.findall(_CLITIC.sub(r"\1 \2", text))


def ngrams(words: Sequence[str], n: int = N) -> Ngrams:
    """Every n-gram of order 1..n with its count."""
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _vector(counts: Ngrams, idf: Callable[[tuple[str, ...]], float], n: int) -> tuple[list[dict], list[float]]:
    """TF-IDF weights per order, and each order's norm."""
    vec: list[dict] = [{} for _ in range(n)]
    for gram, tf in counts.items():
        vec[len(gram) - 1][gram] = tf * idf(gram)
    return vec, [math.sqrt(sum(w * w for w in v.values())) for v in vec]


def _similarity(cand: tuple[list[dict], list[float]], ref: tuple[list[dict], list[float]],
                delta: int, sigma: float) -> float:
    """Sum over orders of the clipped cosine times the length penalty."""
    (vc, nc), (vr, nr) = cand, ref
    penalty = math.exp(-(delta ** 2) / (2 * sigma ** 2))
    total = 0.0
    for order in range(len(vc)):
        dot = sum(min(w, vr[order].get(g, 0.0)) * vr[order].get(g, 0.0) for g, w in vc[order].items())
        if nc[order] != 0 and nr[order] != 0:
            dot /= nc[order] * nr[order]
        total += dot * penalty
    return total


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], *, n: int = N,
            sigma: float = SIGMA, tokenizer: Callable[[str], list[str]] = tokenize) -> list[float]:
    """CIDEr-D of each candidate against its image's references (the corpus score is their mean).

    `candidates[i]` is one caption of image i, `references[i]` that image's reference captions (at
    least one). The document frequencies come from all of `references`. `tokenizer=str.split` scores
    text that is already tokenised (as the toolkit's scorer expects it).
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates for {len(references)} reference sets")
    if any(not refs for refs in references):
        raise ValueError("every image needs at least one reference caption")
    cand_words = [tokenizer(c) for c in candidates]
    ref_words = [[tokenizer(r) for r in refs] for refs in references]
    cand_counts = [ngrams(w, n) for w in cand_words]
    ref_counts = [[ngrams(w, n) for w in refs] for refs in ref_words]
    df: Counter = Counter()
    for refs in ref_counts:
        df.update({g for counts in refs for g in counts})
    log_n = math.log(len(candidates)) if candidates else 0.0

    def idf(gram: tuple[str, ...]) -> float:
        return log_n - math.log(max(1.0, df[gram]))

    scores = []
    for words, counts, refs_w, refs_c in zip(cand_words, cand_counts, ref_words, ref_counts):
        cand = _vector(counts, idf, n)
        total = sum(_similarity(cand, _vector(rc, idf, n), len(words) - len(rw), sigma)
                    for rw, rc in zip(refs_w, refs_c))
        scores.append(10.0 * total / n / len(refs_c))
    return scores


def corpus_cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """The COCO toolkit's CIDEr (CIDEr-D) of a set: the mean of the per-image scores (0 when empty)."""
    scores = cider_d(candidates, references)
    return sum(scores) / len(scores) if scores else 0.0
