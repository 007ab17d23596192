"""Entity extraction: caption -> concept weights -> multi-hot vectors (MedCLIP's knowledge-extraction step).

Lexicon and rules only (no model, no downloads), so it is fast, deterministic and easy to audit:

1. **Matching.** Precompiled regexes (bucketed by first letter) scan the text for every synonym of every concept
   (case-insensitive, word-bounded, plurals of the last word generated, case-sensitive abbreviations). At one position the
   longest candidate wins, so "femoral head" is an extremity and "mass effect" (an ``ignore`` phrase) is no
   mass; a matched span counts for every concept whose synonyms match it whole ("pancreatitis" -> abdomen and
   inflammation).
2. **Negation and uncertainty** (NegEx-style, findings only: regions and modalities are where and how the image
   was taken, which a "no" does not undo). A trigger before ("no", "without", "negative for", "possible",
   "suspected", ...) or after ("ruled out", "not seen", "cannot be excluded", "?", ...) a finding, in the same
   clause and within ``window`` words, marks it negated (dropped) or uncertain (``uncertain_weight``).
   Clauses end at ``. ; : !``, at "but", "however", "although", "except", "which", ... and at reporting verbs
   ("showing", "revealed"), so "CT without contrast showing a mass" keeps the mass; a trigger's scope also ends
   at the next trigger ("no fracture, possible effusion"). Negation beats uncertainty.
3. **Weights.** A concept's weight is the maximum over its mentions (1.0 present, ``uncertain_weight`` uncertain);
   a mention also sets the concepts it ``implies`` (lung -> chest). Implied regions and modalities get 1.0 even
   from a negated finding: "no pneumothorax" still says the image is of the chest.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

from clipmed.errors import ClipmedError
from clipmed.knowledge.vocabulary import Vocabulary

Status = Literal["present", "uncertain", "negated"]
ENTITY_SOURCES = ("captions", "labels", "both")  # values of --entities-from / TrainConfig.entities_from

# ---------------------------------------------------------------------------------------------- cue lexicon
# (kind, direction, phrases). kind: neg | unc | pseudo (swallows text that looks like a trigger but is not,
# e.g. "no change") | stop (ends a clause). direction: pre (scope follows), post (scope precedes), both.
_CUES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("neg", "pre", (
        "no", "not", "without", "without evidence of", "without any", "no evidence of", "no evidence for",
        "no sign of", "no signs of", "no finding of", "no findings of", "no features of", "negative for",
        "free of", "absence of", "absent", "neither", "nor", "never", "resolution of", "disappearance of",
        "there is no", "there was no", "there are no", "there were no", "showed no", "shows no", "showing no",
        "show no", "revealed no", "reveals no", "revealing no", "demonstrated no", "demonstrates no",
        "demonstrating no", "did not show", "does not show", "do not show", "did not reveal", "does not reveal",
        "did not demonstrate", "does not demonstrate", "not showing", "not revealing", "no obvious",
        "no definite", "no significant", "no apparent", "no visible", "no residual", "no recurrence of",
        "no recurrent", "rules out", "ruling out", "exclusion of", "unlikely",
    )),
    ("neg", "post", (
        "ruled out", "was ruled out", "were ruled out", "has been ruled out", "excluded", "was excluded",
        "were excluded", "is absent", "was absent", "are absent", "absent", "not seen", "not visualized",
        "not visualised", "not identified", "not detected", "not demonstrated", "not present", "not visible",
        "not noted", "not evident", "not observed", "not found", "not appreciated", "no longer seen",
        "no longer visible", "no longer present", "no longer evident", "no longer", "resolved", "has resolved",
        "had resolved", "disappeared", "has disappeared", "unlikely", "was negative", "were negative",
        "is negative",
    )),
    ("unc", "pre", (
        "possible", "possibly", "suspected", "suspect", "suspicion of", "suspicion for", "suspicious for",
        "suspicious of", "probable", "probably", "likely", "most likely", "may represent", "may be",
        "may reflect", "might be", "might represent", "could be", "could represent", "could reflect",
        "suggestive of", "suggesting", "suggests", "suggested", "suggest", "question of", "questionable",
        "presumed", "presumably", "presumptive", "equivocal", "differential diagnosis", "differential diagnoses",
        "rule out", "r/o", "concern for", "concerning for", "worrisome for", "cannot exclude", "can not exclude",
        "could not exclude", "cannot rule out", "could not rule out", "possibility of", "the possibility of",
        "raising the possibility of", "indeterminate", "uncertain", "potential", "doubtful",
    )),
    ("unc", "post", (
        "cannot be excluded", "can not be excluded", "could not be excluded", "can't be excluded",
        "cannot be ruled out", "can not be ruled out", "could not be ruled out", "not excluded",
        "not ruled out", "was suspected", "is suspected", "were suspected", "suspected", "likely", "is likely",
        "was likely", "possible", "questionable", "was considered", "is considered", "considered",
        "is possible", "was possible", "not certain", "uncertain",
    )),
    ("unc", "both", ("versus", "vs", "or possibly")),
    ("pseudo", "both", (
        "no change", "no interval change", "no significant change", "no significant interval change",
        "not only", "no increase", "no decrease", "not necessarily", "without change",
        "without significant change", "gram negative", "no further", "without contrast", "no contrast",
        "with and without contrast", "without and with contrast", "not certain whether", "without difficulty",
        "no complication", "no complications", "without complication", "without complications",
        # a property of the entity is absent, not the entity ("no filling of the aneurysm" after coiling)
        "no filling", "no flow", "no enhancement", "no contrast enhancement", "without enhancement", "no uptake",
        "no opacification", "no signal",
    )),
    ("stop", "both", (
        "but", "however", "although", "though", "except", "apart from", "aside from", "whereas", "while",
        "which", "nevertheless", "nonetheless", "instead", "otherwise", "yet", "showing", "shows", "show",
        "showed", "shown", "reveal", "reveals", "revealed", "revealing", "demonstrate", "demonstrates",
        "demonstrated", "demonstrating", "depicts", "depicting", "depicted", "there is", "there are",
    )),
)
# A full stop ends a clause unless it ends an abbreviation such as "vs." or "e.g.".
_PUNCT_CUES = re.compile(r"\?|(?<!\bvs)(?<!\bfig)(?<!\be\.g)(?<!\bi\.e)(?<!\bapprox)\.(?=\s|$)|[;:!\n]", re.IGNORECASE)
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Mention:
    """One matched concept occurrence in a text, with its assertion status (for inspection and tests)."""

    concept: str
    start: int
    end: int
    text: str
    status: Status


def _inflect(word: str) -> str:
    """Regex for a word and its simple plural(s): cyst(s), metastasis/-es, thrombus/-i, vertebra/-e, artery/-ies."""
    w = word.lower()
    forms = {word}
    if w.endswith("sis"):
        forms.add(word[:-2] + "es")
    elif w.endswith("us"):
        forms.update((word[:-2] + "i", word + "es"))
    elif w.endswith("um"):
        forms.update((word[:-2] + "a", word + "s"))
    elif w.endswith("a"):
        forms.update((word + "e", word + "s"))
    elif w.endswith(("ix", "ex")):
        forms.update((word[:-2] + "ices", word + "es"))
    elif len(w) > 1 and w.endswith("y") and w[-2] not in "aeiou":
        forms.add(word[:-1] + "ies")
    elif w.endswith(("s", "x", "z", "ch", "sh")):
        forms.add(word + "es")
    elif w[-1:].isalpha():
        forms.add(word + "s")
    return "(?:" + "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True)) + ")"


def _synonym_regex(synonym: str) -> str:
    """Case-insensitive regex for a synonym: words joined by optional space/hyphen, * = any word characters."""
    words = [w for w in re.split(r"[\s\-]+", synonym.strip()) if w]
    parts = []
    for i, word in enumerate(words):
        core = word.strip("*") or word
        frag = _inflect(core) if i == len(words) - 1 and not word.endswith("*") else re.escape(core)
        parts.append((r"\w*" if word.startswith("*") else "") + frag + (r"\w*" if word.endswith("*") else ""))
    return "(?i:" + r"[\s\-]*".join(parts) + ")"


def _abbreviation_regex(abbreviation: str) -> str:
    """Case-sensitive regex for an abbreviation; a trailing plural "s" is allowed after a capital (CTs, MRIs)."""
    return re.escape(abbreviation) + ("s?" if abbreviation[-1].isupper() else "")


def _longest_first(items: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Order (source, regex) pairs longest source first, so that at one position the longer phrase wins."""
    return sorted(set(items), key=lambda it: (-len(it[0].replace("*", "")), it[0]))


class _PhraseScanner:
    """Finds non-overlapping phrases that start at word starts, scanning left to right; at one start the
    longest listed phrase wins. Phrases are bucketed by first character (fast: a caption is a few dozen
    dictionary look-ups and small regex matches instead of one huge alternation tried at every position)."""

    def __init__(self, items: Iterable[tuple[str, str, str]]) -> None:
        buckets: dict[str, list[tuple[str, str, str]]] = {}
        wild: list[tuple[str, str, str]] = []  # phrases with a leading "*" may start with any character
        for item in set(items):
            first = item[0][0]
            if first == "*":
                wild.append(item)
            elif not (first.isalnum() or first == "_"):
                raise ClipmedError(f"phrase {item[0]!r} must start with a letter or digit")
            else:
                buckets.setdefault(first.lower(), []).append(item)
        self._buckets = {key: self._compile(group + wild) for key, group in buckets.items()}
        self._wild = self._compile(wild) if wild else None

    @staticmethod
    def _compile(items: list[tuple[str, str, str]]) -> tuple[re.Pattern[str], tuple[str, ...]]:
        items = sorted(items, key=lambda it: (-len(it[0].replace("*", "")), it[0]))
        regex = re.compile("|".join(f"({rx}(?!\\w))" for _, rx, _ in items))
        return regex, tuple(payload for _, _, payload in items)

    def finditer(self, text: str) -> Iterator[tuple[int, int, str]]:
        """(start, end, payload) of each match, in text order."""
        end = 0
        for word in _WORD.finditer(text):
            start = word.start()
            if start < end:
                continue
            entry = self._buckets.get(text[start].lower(), self._wild)
            if entry is None:
                continue
            m = entry[0].match(text, start)
            if m:
                end = m.end()
                yield start, end, entry[1][m.lastindex - 1]


class ConceptExtractor:
    """Compiled matcher for one vocabulary: text -> mentions -> weights -> multi-hot vectors."""

    def __init__(self, vocab: Vocabulary | None = None, uncertain_weight: float = 0.5, window: int = 6) -> None:
        if not 0.0 < uncertain_weight <= 1.0:
            raise ClipmedError(f"uncertain_weight must be in (0, 1], got {uncertain_weight}")
        if window < 1:
            raise ClipmedError(f"negation window must be at least 1 word, got {window}")
        self.vocab = vocab if vocab is not None else Vocabulary.default()
        self.uncertain_weight = float(uncertain_weight)
        self.window = int(window)
        entries = self.vocab.entries
        self._names = [c.name for c in entries]
        self._negatable = [c.group == "finding" for c in entries]
        self._closure = _implication_closure(self.vocab)
        self._index = {n: i for i, n in enumerate(self._names)}
        self._label_aliases: dict[str, list[int]] = {}
        for i, c in enumerate(entries):
            for alias in (c.name, *c.labels):
                self._label_aliases.setdefault(_norm(alias), []).append(i)

        per_concept: list[list[tuple[str, str]]] = []
        for c in entries:
            items = [(s, _synonym_regex(s)) for s in c.synonyms] + [(a, _abbreviation_regex(a)) for a in c.abbreviations]
            per_concept.append(items)
        ignore_items = [(s, _synonym_regex(s)) for s in self.vocab.ignore]
        try:
            # A span first found by the scanner is then assigned to every concept whose synonyms match it whole.
            self._full = [re.compile("|".join(rx for _, rx in _longest_first(items))) for items in per_concept]
            self._ignore = re.compile("|".join(rx for _, rx in _longest_first(ignore_items))) if ignore_items else None
            everything = [it for items in per_concept for it in items] + ignore_items
            self._scanner = _PhraseScanner((src, rx, "") for src, rx in everything)
        except re.error as exc:
            raise ClipmedError(f"vocabulary {self.vocab.source}: a synonym does not compile ({exc})") from exc
        self._span_cache: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------------------------------------ matching
    def _concepts_of(self, span: str) -> tuple[int, ...]:
        hit = self._span_cache.get(span)
        if hit is None:
            if self._ignore is not None and self._ignore.fullmatch(span):
                hit = ()
            else:
                hit = tuple(i for i, rx in enumerate(self._full) if rx.fullmatch(span))
            self._span_cache[span] = hit
        return hit

    def mentions(self, text: str) -> list[Mention]:
        """Every concept occurrence in ``text`` with its status (present / uncertain / negated)."""
        if not text:
            return []
        hits = [(start, end, self._concepts_of(text[start:end])) for start, end, _ in self._scanner.finditer(text)]
        hits = [h for h in hits if h[2]]
        if not hits:
            return []
        words = [m.start() for m in _WORD.finditer(text)]
        stops: list[int] = []
        triggers: list[tuple[str, str, int, int]] = []
        for t0, t1, kind in _cues(text):
            if kind == "stop":
                stops.append(t0)
            elif kind != "pseudo":
                k, direction = kind.split("_")
                triggers.append((k, direction, t0, t1))

        def status_of(start: int, end: int) -> Status:
            # NegEx scoping: only the nearest trigger on each side counts (a later trigger ends an earlier
            # one's scope: "no fracture, possible effusion"), it must sit in the same clause, within the window.
            clause = bisect_right(stops, start)
            before = [t for t in triggers if t[3] <= start and bisect_right(stops, t[2]) == clause]
            after = [t for t in triggers if t[2] >= end and bisect_right(stops, t[2]) == clause]
            found = set()
            if before and before[-1][1] in ("pre", "both"):
                kind, _, _, t1 = before[-1]
                if bisect_left(words, start) - bisect_left(words, t1) <= self.window:
                    found.add(kind)
            if after and after[0][1] in ("post", "both"):
                kind, _, t0, _ = after[0]
                if bisect_left(words, t0) - bisect_left(words, end) <= self.window:
                    found.add(kind)
            return "negated" if "neg" in found else "uncertain" if "unc" in found else "present"

        out = []
        for start, end, concepts in hits:
            needs_status = any(self._negatable[i] for i in concepts)
            status = status_of(start, end) if needs_status and triggers else "present"
            for i in concepts:
                out.append(Mention(self._names[i], start, end, text[start:end], status if self._negatable[i] else "present"))
        return out

    # ------------------------------------------------------------------------------------------- outputs
    def weights(self, text: str) -> dict[str, float]:
        """Concept -> weight (1.0 present, ``uncertain_weight`` uncertain); absent and negated concepts omitted."""
        vec = self.vector(text)
        return {self._names[i]: float(vec[i]) for i in np.flatnonzero(vec)}

    def vector(self, text: str) -> np.ndarray:
        """Multi-hot float32 vector [n_concepts] of concept weights for one text."""
        vec = np.zeros(len(self._names), dtype=np.float32)
        for m in self.mentions(text):
            if m.status == "negated":
                weight = 0.0
            else:
                weight = self.uncertain_weight if m.status == "uncertain" else 1.0
            i = self._index[m.concept]
            vec[i] = max(vec[i], weight)
            for j in self._closure[i]:
                vec[j] = max(vec[j], weight if self._negatable[j] else 1.0)
        return vec

    def matrix(self, texts: Sequence[str | None]) -> np.ndarray:
        """Stacked vectors [N, n_concepts] (float32); ``None`` or empty texts give zero rows."""
        out = np.zeros((len(texts), len(self._names)), dtype=np.float32)
        for row, text in enumerate(texts):
            if text:
                out[row] = self.vector(text)
        return out

    def label_vector(self, label: str | Sequence[str] | None) -> np.ndarray:
        """Concepts named by class label(s), e.g. "Chest", "CT", "Head and Neck" (all weight 1.0).

        A label counts for a concept when it equals the concept's name or one of its ``labels`` (ignoring case
        and punctuation) or when the matcher finds concepts in it; negation does not apply to labels.
        """
        vec = np.zeros(len(self._names), dtype=np.float32)
        labels = [label] if isinstance(label, str) else list(label or [])
        for lab in labels:
            if not lab:
                continue
            hit = set(self._label_aliases.get(_norm(lab), []))
            hit.update(self._index[m.concept] for m in self.mentions(lab))
            for i in hit:
                vec[i] = 1.0
                vec[list(self._closure[i])] = 1.0
        return vec

    def entity_matrix(
        self,
        captions: Sequence[str | None],
        labels: Sequence[str | Sequence[str] | None] | None = None,
        source: str = "captions",
    ) -> np.ndarray:
        """Entity vectors for a dataset, as chosen by ``--entities-from``: from captions, labels, or both
        (elementwise max, so a label adds what its caption does not say)."""
        if source not in ENTITY_SOURCES:
            raise ClipmedError(f"entities-from must be one of {list(ENTITY_SOURCES)}, got {source!r}")
        if source != "captions" and (labels is None or len(labels) != len(captions)):
            raise ClipmedError(f"entities-from {source} needs one label entry per caption")
        if source == "captions":
            return self.matrix(captions)
        from_labels = np.stack([self.label_vector(lab) for lab in labels]) if len(captions) else self.matrix([])
        return from_labels if source == "labels" else np.maximum(self.matrix(captions), from_labels)


def _norm(label: str) -> str:
    return " ".join(re.findall(r"\w+", label.lower()))


def _implication_closure(vocab: Vocabulary) -> list[tuple[int, ...]]:
    """For each concept, every concept it implies directly or through others (cycles are harmless)."""
    direct = [[vocab.index(n) for n in c.implies] for c in vocab.entries]
    closure = []
    for i in range(len(direct)):
        seen: set[int] = set()
        todo = list(direct[i])
        while todo:
            j = todo.pop()
            if j not in seen and j != i:
                seen.add(j)
                todo.extend(direct[j])
        closure.append(tuple(sorted(seen)))
    return closure


@lru_cache(maxsize=1)
def _cue_scanner() -> _PhraseScanner:
    """Scanner for the word cues; payload = cue kind ("neg_pre", "unc_both", "pseudo", "stop", ...)."""
    kinds: dict[str, tuple[str, set[str]]] = {}
    for kind, direction, phrases in _CUES:
        for phrase in phrases:
            known_kind, directions = kinds.setdefault(phrase, (kind, set()))
            assert known_kind == kind, f"cue {phrase!r} is both {known_kind} and {kind}"
            directions.add(direction)
    items = []
    for phrase, (kind, directions) in kinds.items():
        if kind in ("neg", "unc"):
            kind = f"{kind}_{'both' if len(directions) > 1 else next(iter(directions))}"
        items.append((phrase, r"(?i:" + r"\s+".join(re.escape(w) for w in phrase.split()) + ")", kind))
    return _PhraseScanner(items)


def _cues(text: str) -> list[tuple[int, int, str]]:
    """All cues of a text in order: word cues plus "?" (uncertain, both directions) and clause-ending punctuation."""
    found = list(_cue_scanner().finditer(text))
    found += [(m.start(), m.end(), "unc_both" if m.group() == "?" else "stop") for m in _PUNCT_CUES.finditer(text)]
    return sorted(found)


@lru_cache(maxsize=8)
def _cached_extractor(vocab: Vocabulary, uncertain_weight: float) -> ConceptExtractor:
    return ConceptExtractor(vocab, uncertain_weight)


def extract(text: str, vocab: Vocabulary | None = None, uncertain_weight: float = 0.5) -> dict[str, float]:
    """Concept -> weight for one text (1.0 present, ``uncertain_weight`` uncertain; negated/absent omitted)."""
    return _cached_extractor(vocab if vocab is not None else Vocabulary.default(), uncertain_weight).weights(text)


def label_vector(label: str | Sequence[str] | None, vocab: Vocabulary | None = None) -> np.ndarray:
    """Multi-hot vector [n_concepts] of the concepts a class label names (for ``--entities-from labels|both``)."""
    return _cached_extractor(vocab if vocab is not None else Vocabulary.default(), 0.5).label_vector(label)
