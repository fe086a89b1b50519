"""The lexical baseline simulator: per-token predictions from an explanation's TEXT alone.

It reads what a person would read in an explanation and nothing else (no activations, no mode
components): quoted phrases and the items of a ``label: a, b, c`` list (``after "x"`` meaning the
token that follows ``x``; the label predicts nothing itself, so a list labelled ``numbers`` or
``mixed`` simulates the same), the content words of free text, and, in free text, a small
vocabulary of named patterns
("numbers", "punctuation", "line breaks", "superlatives", "words ending in -ing", ...). Tokens are
matched as words: subword pieces (byte-BPE, WordPiece ``##`` and SentencePiece ``▁``) are merged
first, so "biggest" lights both " big" and "gest"; a phrase of several words lights its last word
(its earlier words at half weight). Items listed earlier weigh more; quoted or listed items weigh
more than free-text words. The output is raw: calibration is fitted afterwards on a
calibration pool (:mod:`rangelens.explain.scoring`), as in Bills et al. (2023).
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from rangelens.explain.roles import FailureLog

MARKERS = ("Ġ", "▁", "Ċ")


def _vocab(words: str) -> frozenset[str]:
    return frozenset(words.split())


SPECIAL = re.compile(r"^(\[[A-Z]+\]|<\|?[a-z_]+\|?>|</?s>)$")
STOPWORDS = _vocab(
    "the a an and or of to in on at for with by from as is are was were be been it "
    "its this that these those neuron fires fire firing activates activate activation "
    "activations token tokens word words phrase phrases text texts about mode related such like when "
    "which also often mostly mainly especially including include includes responds "
    "respond response strongly weakly on their there them they has have had not but "
    "into than then other various appear appears appearing contexts context "
    "containing contain contains used uses use following after before"
)
PUNCT = frozenset(string.punctuation + "“”‘’«»–—…")
NUMBER_WORDS = _vocab(
    "zero one two three four five six seven eight nine ten eleven twelve twenty "
    "thirty forty fifty hundred thousand million billion trillion"
)
MONTHS = _vocab(
    "january february march april may june july august september october november december"
)
WEEKDAYS = _vocab("monday tuesday wednesday thursday friday saturday sunday")
PRONOUNS = _vocab("i me my we us our you your he him his she her they them their it its")
DETERMINERS = _vocab("the a an this that these those some any each every no")
PREPOSITIONS = _vocab(
    "of in on at for with by from to into onto over under about after before between "
    "during through against within without across"
)
CONJUNCTIONS = _vocab("and or but nor yet so because although while whereas if")
AUXILIARIES = _vocab(
    "is are was were be been being am has have had do does did will would shall "
    "should can could may might must"
)
NOT_SUPERLATIVE = _vocab(
    "interest honest forest request protest contest suggest invest arrest harvest "
    "digest modest guest quest west test rest nest chest pest manifest"
)


@dataclass(frozen=True)
class Words:
    """Tokens grouped into words: ``index[t]`` is token t's word, ``text[w]`` the word's merged
    normalised form (lower-cased, markers and surrounding whitespace removed), ``shown[w]`` its
    readable form."""

    index: np.ndarray
    text: list[str]
    shown: list[str]
    wordpiece: bool = False
    partial_first: bool = False

    def is_word(self, w: int) -> bool:
        """Whether word ``w`` is a whole word: the first word of a text whose first token does not
        start a word (no leading space or marker in byte-BPE, a ``##`` piece in WordPiece) is the
        tail of a word cut off before the text, a subword fragment."""
        return not (w == 0 and self.partial_first)


def _clean(token: str) -> str:
    for m in MARKERS:
        token = token.replace(m, " ")
    return token[2:] if token.startswith("##") else token


def segment(tokens: Sequence[str]) -> Words:
    """Merge subword tokens into words (memoised; see :func:`_segment`)."""
    return _segment(tuple(tokens))


@functools.lru_cache(maxsize=4096)
def _segment(tokens: tuple[str, ...]) -> Words:
    """Merge subword tokens into words (byte-BPE: a word starts at a leading space; WordPiece: every
    token not starting with ``##`` starts one; SentencePiece: at ``▁``). Punctuation and whitespace
    runs are words of their own; special tokens ([CLS], <s>) too."""
    wordpiece = any(t.startswith("##") for t in tokens) or (
        len(tokens) > 2 and not any(t[:1].isspace() or t[:1] in MARKERS for t in tokens[1:])
    )
    index = np.zeros(len(tokens), dtype=np.int64)
    pieces: list[list[str]] = []
    prev = ""
    for t, tok in enumerate(tokens):
        clean = _clean(tok)
        if t == 0 or SPECIAL.match(tok) or SPECIAL.match(prev):
            new = True
        elif wordpiece:
            new = not tok.startswith("##")
        elif prev.isspace() and "\n" not in prev:  # a lone space token leads the next word
            new = False
        else:
            new = (
                not clean[:1]
                or clean[:1].isspace()
                or prev[-1:].isspace()
                or (clean[:1].isalnum() != prev[-1:].isalnum())
            )
        if new:
            pieces.append([])
        pieces[-1].append(clean)
        index[t] = len(pieces) - 1
        prev = clean or prev
    shown = ["".join(p).strip() or "".join(p) for p in pieces]
    first = tokens[0] if len(tokens) else ""
    partial = (
        first.startswith("##")
        if wordpiece
        else first[:1].isalnum() and first[:1] not in MARKERS and not SPECIAL.match(first)
    )
    index.setflags(write=False)  # shared by every caller of the memoised segmentation
    return Words(index, [s.lower() for s in shown], shown, wordpiece, partial)


def render(tokens: Sequence[str]) -> list[str]:
    """Each token as it reads in running text, so that ``"".join(render(tokens))`` is the text a
    person (or an LLM) sees: markers resolved, WordPiece words separated by spaces."""
    words = segment(tokens)
    out = []
    for t, tok in enumerate(tokens):
        clean = _clean(tok)
        starts_word = t > 0 and words.index[t] != words.index[t - 1]
        out.append(" " + clean if words.wordpiece and starts_word else clean)
    return out


def plain_text(tokens: Sequence[str]) -> str:
    """The text a person (or an LLM prompt) reads for ``tokens``: ``"".join(render(tokens))``."""
    return "".join(render(tokens))


def readable(token: str) -> str:
    """One-line readable form of a token or word (markers removed; whitespace escaped, e.g. \\n)."""
    clean = _clean(token)
    return clean.strip() or clean.encode("unicode_escape").decode("ascii")


def _same(a: str, b: str) -> bool:
    """Equal words, allowing a plural/possessive ``s``."""
    return a == b or (len(a) > 3 and (a + "s" == b or b + "s" == a))


Predicate = Callable[[str, str, bool], bool]  # (lower-cased word, shown word, starts the text)


def _suffix(s: str) -> Predicate:
    return lambda w, _s, _f: len(w) > len(s) + 2 and w.endswith(s) and w.isalpha()


def _in(vocab: frozenset[str]) -> Predicate:
    return lambda w, _s, _f: w in vocab


def _number(w: str, _s: str, _f: bool) -> bool:
    return any(c.isdigit() for c in w) or w in NUMBER_WORDS


def _superlative(w: str, _s: str, _f: bool) -> bool:
    if w in {"most", "least", "best", "worst"}:
        return True
    return w.endswith("est") and len(w) > 4 and w.isalpha() and w not in NOT_SUPERLATIVE


CATEGORIES: list[tuple[str, str, Predicate]] = [
    # (name used in rendered labels, regex a reader's text may use, predicate)
    ("numbers", r"numbers?|numerals?|digits?|figures|years?", _number),
    ("line breaks", r"line ?breaks?|newlines?|paragraph breaks?", lambda w, _s, _f: "\n" in w),
    (
        "punctuation",
        r"punctuation",
        lambda w, _s, _f: bool(w.strip()) and set(w.strip()) <= PUNCT,
    ),
    ("months", r"months?", _in(MONTHS)),
    ("weekdays", r"weekdays?|days of the week", _in(WEEKDAYS)),
    ("superlatives", r"superlatives?", _superlative),
    ("pronouns", r"pronouns?", _in(PRONOUNS)),
    ("determiners", r"determiners?|articles", _in(DETERMINERS)),
    ("prepositions", r"prepositions?", _in(PREPOSITIONS)),
    ("conjunctions", r"conjunctions?", _in(CONJUNCTIONS)),
    ("auxiliary verbs", r"auxiliar(?:y|ies)(?: verbs?)?|modal verbs?", _in(AUXILIARIES)),
    (
        "capitalised words",
        r"capitali[sz]ed(?: words)?|proper nouns?|names",
        lambda _w, shown, first: not first and shown[:1].isupper(),
    ),
]
SUFFIX = re.compile(r"ending in -?([a-z]{2,5})\b|-([a-z]{2,5}) (?:words|forms|endings?)\b")


@dataclass(frozen=True)
class Item:
    """One thing an explanation says the neuron responds to. ``kind``: ``phrase`` (these words),
    ``after`` (the token following these words), ``pattern`` (a named pattern's predicate)."""

    kind: str
    words: tuple[str, ...]
    weight: float
    predicate: Predicate | None = None


QUOTED = re.compile(r"\"([^\"]{1,60})\"|“([^”]{1,60})”|(?<![\w'])'([^']{1,60})'(?![\w'])")
AFTER = re.compile(r"(?:after|following|preceded by)\s*$", re.IGNORECASE)
BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")


def _unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _item(text: str, weight: float, after: bool = False) -> Item | None:
    text = _unescape(text)
    words = tuple(text.lower().split()) or ((text,) if text else ())
    if not words:
        return None
    return Item("after" if after else "phrase", words, weight)


def _patterns(text: str, weight: float) -> list[Item]:
    low = text.lower()
    out = [
        Item("pattern", (name,), weight, pred)
        for name, regex, pred in CATEGORIES
        if re.search(rf"\b(?:{regex})\b", low)
    ]
    for m in SUFFIX.finditer(low):
        suffix = m.group(1) or m.group(2)
        out.append(Item("pattern", (f"-{suffix}",), weight, _suffix(suffix)))
    return out


def _list_items(body: str) -> list[str] | None:
    """The items of ``a, b, "c, d", after "e"`` or None when ``body`` reads as prose."""
    parts = re.findall(r'(?:after\s+)?"[^"]*"|(?:after\s+)?“[^”]*”|[^,;]+', body)
    items = [p.strip() for p in parts if p.strip()]
    if not items or any(len(i.split()) > 4 for i in items):
        return None
    return items


def parse(explanation: str) -> list[Item]:
    """Read an explanation into :class:`Item` s (see the module docstring)."""
    items: list[Item] = []
    for raw_line in explanation.splitlines():
        line = BULLET.sub("", raw_line).strip()
        if not line:
            continue
        label, sep, body = line.partition(":")
        listed = _list_items(body) if sep and len(label.split()) <= 10 else None
        if listed is not None:  # the label names the items; it adds no prediction of its own
            for rank, entry in enumerate(listed):
                w = 1.0 / (1.0 + 0.1 * rank)
                after = entry.lower().startswith("after ")
                entry = entry[6:].strip() if after else entry
                q = QUOTED.fullmatch(entry)
                entry = next(g for g in q.groups() if g is not None) if q else entry
                got = _item(entry, w, after)
                items += [got] if got else []
            continue
        rest = line
        for rank, m in enumerate(QUOTED.finditer(line)):
            text = next(g for g in m.groups() if g is not None)
            got = _item(text, 1.0 / (1.0 + 0.1 * rank), bool(AFTER.search(line[: m.start()])))
            items += [got] if got else []
            rest = rest.replace(m.group(0), " ")
        items += _patterns(rest, 0.8)
        words = [w for w in re.findall(r"[a-z0-9][a-z0-9'-]*", rest.lower()) if w not in STOPWORDS]
        for rank, w in enumerate(dict.fromkeys(w for w in words if len(w) >= 3)):
            items.append(Item("phrase", (w,), 0.5 / (1.0 + 0.1 * rank)))
    return items


def _phrase_hits(
    words: Words, phrase: tuple[str, ...], where: dict[str, list[int]] | None = None
) -> list[tuple[int, int]]:
    """(first word, last word) of every occurrence of ``phrase`` in the word sequence; a phrase
    written without spaces (``"'s"``, ``"."``) may also match a single token's text. ``where``
    (word -> positions) answers one-word phrases without a scan."""
    text = [w.strip() or w for w in words.text]
    n = len(phrase)
    if n == 1 and where is not None:
        p = phrase[0]
        forms = {p, p + "s"} | ({p[:-1]} if p.endswith("s") else set())
        hits = sorted(i for f in forms for i in where.get(f, []) if _same(text[i], p))
        return [(i, i) for i in hits]
    return [
        (i, i + n - 1)
        for i in range(len(text) - n + 1)
        if all(_same(text[i + k], phrase[k]) for k in range(n))
    ]


def predict(items: Sequence[Item], tokens: Sequence[str]) -> np.ndarray:
    """Per-token prediction: the largest weight of any item matching the token."""
    out = np.zeros(len(tokens))
    if not tokens:
        return out
    words = segment(tokens)
    norm_tokens = [(_clean(t).strip() or _clean(t)).lower() for t in tokens]
    where: dict[str, list[int]] = {}
    for i, w in enumerate(words.text):
        where.setdefault(w.strip() or w, []).append(i)
    for item in items:
        hit = np.zeros(len(tokens), dtype=bool)
        if item.kind == "pattern" and item.predicate is not None:
            ok = [
                item.predicate(w, shown, i == 0)
                for i, (w, shown) in enumerate(zip(words.text, words.shown, strict=True))
            ]
            hit = np.array(ok, dtype=bool)[words.index]
        else:
            spans = _phrase_hits(words, item.words, where)
            if item.kind == "after":
                for _, last in spans:
                    following = np.flatnonzero(words.index > last)
                    if len(following):
                        hit[following[0]] = True
            else:  # a phrase lights its last word; its earlier words get half
                for first, last in spans:
                    hit |= words.index == last
                    lead = (words.index >= first) & (words.index < last)
                    np.maximum(out, 0.5 * item.weight * lead, out=out)
            if len(item.words) == 1:  # a piece written alone may be a subword token
                piece = item.words[0]
                same = np.array([t == piece for t in norm_tokens], dtype=bool)
                if item.kind == "after":
                    hit[1:] |= same[:-1]
                else:
                    hit |= same
        np.maximum(out, item.weight * hit, out=out)
    return out


class LexicalSimulator:
    """The lexical baseline :class:`~rangelens.explain.roles.Simulator`: reads the explanation text
    (parsed once per explanation) and matches it against each text's tokens; never fails."""

    name = "lexical"

    def __init__(self) -> None:
        self._parsed: dict[str, list[Item]] = {}

    def items(self, explanation: str) -> list[Item]:
        if explanation not in self._parsed:
            if len(self._parsed) > 5000:
                self._parsed.clear()
            self._parsed[explanation] = parse(explanation)
        return self._parsed[explanation]

    def simulate(
        self, explanation: str, texts: Sequence[Sequence[str]], trace: FailureLog
    ) -> list[np.ndarray | None]:
        items = self.items(explanation)
        return [predict(items, tokens) for tokens in texts]
