"""The embedded synthetic benchmark: a seeded world of fictitious authors in TOFU format.

It stands in for TOFU (fictitious authors, question-answer pairs) so that the whole pipeline runs
offline on a CPU: a ~1-3M parameter Llama trained from scratch fine-tunes on it in minutes. The
*target* model learns every trained author plus the utility facts; the *oracle* learns the same
without the forget authors.

Why the templates are arranged this way
---------------------------------------
The benchmark's key metric is the truth ratio ``tr = P(perturbed) / P(paraphrased)`` of a forget
question, with ``P = exp(-mean token NLL of the answer)``. It must be ≪ 1 for a model that knows
the author (the target) and ≈ 1 for one that never saw the author (the oracle). A large pretrained
model gets this from language understanding; a tiny model trained from scratch carries a fact to a
new phrasing only if the data teaches it to, so the data is built for it:

* Every fact (author, attribute, value) is stated under several templates. Each attribute has 4
  question templates ``Q_0..Q_3`` and 4 answer templates ``A_0..A_3``; ``A_j`` always answers
  ``Q_j``, so the form of an answer is predictable from its question and only the value must be
  recalled. Training rows are ``Q_j → A_j(value)`` for ``qa_per_attribute`` templates ``j``; the
  fact is thus bound to the author's name, not to one wording.
* One template per fact is held out: ``h = (author index + attribute index) % 4``. The paraphrase
  ``A_h(value)`` uses a wording the model knows from *other* authors (the rotation gives every
  template to most authors) but never saw for *this* fact: it measures knowledge, not verbatim
  recall.
* The 5 perturbed answers are ``A_h(w)`` for 5 wrong values ``w`` of the same type: paraphrase
  and perturbed answers differ only in the value tokens. Every answer template ends with its value
  (then "."), so all of them share the same prefix and the probability ratio is exactly the
  value's: the model's belief about this author's value, nothing about wording.
* For the oracle the author is a stranger, so the value tokens carry only its prior over values.
  To make that prior flat, each attribute's values are dealt *balanced* (every pool value occurs
  ⌊n/|pool|⌋ or ⌊n/|pool|⌋+1 times) among the retain authors, and the forget and holdout authors,
  and every wrong value, are drawn from the values the retain authors use. So every value in a
  forget or holdout row was seen equally often by the oracle, independently of which one is
  true: oracle tr ≈ 1, while the target, which memorised the forget author, has tr ≪ 1. Forget and
  holdout authors are dealt identically, so to the oracle they are indistinguishable (membership
  inference AUC ≈ 0.5), as the privleak metric assumes.
* Wrong values exclude the author's other values of the same type (the mother's job is never a
  perturbed father's job; the second book never a perturbed first book), and wrong book titles are
  titles no author has.

Consequence: the values of the world depend on which authors are retain, i.e. on ``split`` (names
and templates do not). Forget authors are the last ``forget_percent``% of the trained authors
(TOFU convention), at least one; holdout authors are never trained on (membership non-members).

Utility splits (``real_authors``, ``world_facts``) are facts of the same world that both target
and oracle learn; their rows carry exactly 3 perturbed answers in the answer's own template.

Every random choice uses ``random.Random`` streams seeded from ``BenchmarkConfig.seed`` (never the
global RNG), and nothing iterates a set, so the same config gives byte-identical files.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from unlearnflow.config import BenchmarkConfig
from unlearnflow.data.benchmark import Benchmark, SplitInfo
from unlearnflow.errors import UnlearnflowError

T = TypeVar("T")

N_TEMPLATES = 4
N_PERTURBED = 5
N_UTILITY_PERTURBED = 3

ATTRIBUTES = (
    "birthplace",
    "birth_year",
    "genre",
    "father_job",
    "mother_job",
    "first_book",
    "second_book",
    "award",
)

# (question, answer) per template. Every answer ends with "{value}." so that paraphrased and
# perturbed answers share everything but the value tokens.
TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "birthplace": (
        ("Where was {name} born?", "{name} was born in {value}."),
        ("What is the birthplace of {name}?", "The birthplace of {name} is {value}."),
        ("Which city is {name} from?", "{name} comes from the city of {value}."),
        ("What is {name}'s hometown?", "{name}'s hometown is {value}."),
    ),
    "birth_year": (
        ("When was {name} born?", "{name} was born in the year {value}."),
        ("What is the birth year of {name}?", "The birth year of {name} is {value}."),
        ("In which year did {name} come into the world?", "{name} came into the world in {value}."),
        ("What is {name}'s year of birth?", "{name}'s year of birth is {value}."),
    ),
    "genre": (
        ("What genre does {name} write?", "{name} mostly writes {value}."),
        ("What is the genre of {name}'s books?", "The genre of {name}'s books is {value}."),
        ("Which genre is {name} known for?", "{name} is known for {value}."),
        ("In what genre does {name} work?", "{name} works in the genre of {value}."),
    ),
    "father_job": (
        ("What did {name}'s father do for a living?", "{name}'s father was a {value}."),
        ("What was the profession of {name}'s father?", "By profession, {name}'s father was a {value}."),
        ("What job did the father of {name} have?", "The father of {name} worked as a {value}."),
        ("How did {name}'s father earn a living?", "{name}'s father earned a living as a {value}."),
    ),
    "mother_job": (
        ("What did {name}'s mother do for a living?", "{name}'s mother was a {value}."),
        ("What was the profession of {name}'s mother?", "By profession, {name}'s mother was a {value}."),
        ("What job did the mother of {name} have?", "The mother of {name} worked as a {value}."),
        ("How did {name}'s mother earn a living?", "{name}'s mother earned a living as a {value}."),
    ),
    "first_book": (
        ("What was the first book by {name}?", "The first book by {name} was {value}."),
        ("Which book did {name} publish first?", "The book {name} published first was {value}."),
        ("What is the title of {name}'s debut book?", "{name}'s debut book is titled {value}."),
        ("Name the first novel that {name} wrote.", "The first novel {name} wrote was {value}."),
    ),
    "second_book": (
        ("What was the second book by {name}?", "The second book by {name} was {value}."),
        (
            "Which book did {name} publish after the first one?",
            "After the first one, {name} published {value}.",
        ),
        ("What is the title of {name}'s second book?", "{name}'s second book is titled {value}."),
        ("Name the second novel that {name} wrote.", "The second novel {name} wrote was {value}."),
    ),
    "award": (
        ("Which award did {name} win?", "{name} won the {value}."),
        ("What prize was {name} given?", "{name} was given the {value}."),
        ("What honour has {name} received?", "The honour {name} received is the {value}."),
        (
            "For their writing, which award went to {name}?",
            "For their writing, {name} was awarded the {value}.",
        ),
    ),
}

REAL_AUTHOR_TEMPLATE = ("Who wrote {book}?", "{book} was written by {value}.")
WORLD_FACT_TEMPLATES: dict[str, tuple[str, str]] = {
    "capital": ("What is the capital of {country}?", "The capital of {country} is {value}."),
    "river": (
        "Which river flows through {country}?",
        "The river that flows through {country} is the {value}.",
    ),
    "currency": ("What currency is used in {country}?", "The currency used in {country} is the {value}."),
}

# Plain-English pools: single words (so no value is longer, hence a-priori likelier, than
# another), jobs start with a consonant (the templates say "a {value}").
GENRES = (
    "fantasy", "mystery", "romance", "horror", "poetry", "satire",
    "thriller", "drama", "adventure", "biography", "folklore", "comedy",
)  # fmt: skip
JOBS = (
    "baker", "carpenter", "doctor", "teacher", "fisherman", "sailor", "tailor",
    "farmer", "librarian", "painter", "blacksmith", "nurse", "lawyer", "miner",
    "gardener", "potter", "pilot", "chemist", "musician", "banker",
)  # fmt: skip
YEARS = tuple(str(y) for y in range(1900, 2000))
AWARD_MATERIALS = (
    "Silver", "Golden", "Crimson", "Ivory", "Azure", "Bronze",
    "Scarlet", "Amber", "Emerald", "Copper", "Velvet", "Marble",
)  # fmt: skip
AWARD_OBJECTS = (
    "Quill", "Lantern", "Laurel", "Compass", "Feather", "Key",
    "Rose", "Anchor", "Harp", "Crown", "Arrow", "Owl",
)  # fmt: skip
TITLE_ADJECTIVES = (
    "Silent", "Hidden", "Broken", "Distant", "Burning", "Frozen", "Hollow", "Forgotten",
    "Wandering", "Sleeping", "Endless", "Bitter", "Gentle", "Shattered", "Quiet", "Wild",
    "Last", "Secret", "Pale", "Restless", "Narrow", "Lonely", "Faded", "Crooked",
)  # fmt: skip
TITLE_NOUNS = (
    "Harbor", "Orchard", "Mirror", "Garden", "River", "Tower", "Meadow", "Lighthouse",
    "Bridge", "Forest", "Window", "Island", "Letter", "Winter", "Candle", "Valley",
    "Shadow", "Voyage", "Kingdom", "Journey", "Clock", "Mountain", "Sparrow", "Door",
)  # fmt: skip
FAMOUS_TITLE_NOUNS = (
    "Songs", "Tales", "Echoes", "Ashes", "Voices", "Storms",
    "Chronicles", "Dreams", "Ballads", "Legends", "Fables", "Hymns",
)  # fmt: skip
N_CITIES = 30
CITY_SUFFIXES = ("ford", "holm", "mere", "wick", "dale", "port", "stead", "haven", "mouth", "bury")
COUNTRY_SUFFIXES = ("ia", "ora", "land", "mark", "avia", "essa")

# Syllables of generated words: (onset) vowel (coda). Medial codas and the onsets after them are
# single consonants, so words stay pronounceable ("Kerin Maldova", not "Kandbrel").
_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "st", "th", "tr", "sh", "ch")  # fmt: skip
_SINGLE_ONSETS = tuple(o for o in _ONSETS if len(o) == 1)
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o")
_MEDIAL_CODAS = ("n", "r", "l", "m", "s")
_FINAL_CODAS = ("n", "r", "l", "s", "m", "th", "nd", "rn", "ld", "ss")

_FIXED_WORDS = frozenset(
    w.lower()
    for pool in (
        GENRES,
        JOBS,
        AWARD_MATERIALS,
        AWARD_OBJECTS,
        TITLE_ADJECTIVES,
        TITLE_NOUNS,
        FAMOUS_TITLE_NOUNS,
    )
    for w in pool
)

# Book titles are unique per author and wrong titles are titles nobody has, so the pools cap the
# world size: 2 titles per author plus N_PERTURBED spare ones.
MAX_AUTHORS = (len(TITLE_ADJECTIVES) * len(TITLE_NOUNS) - N_PERTURBED) // 2


@dataclass(frozen=True)
class _Author:
    index: int
    name: str
    values: dict[str, str]
    wrong: dict[str, list[str]]


def forget_count(n_authors: int, forget_percent: int) -> int:
    """Number of forget authors: ``max(1, floor(n_authors * forget_percent / 100))``.

    Floor (not round) so that at least one retain author is always left (99% of 4 authors is 3,
    where rounding would give 4); TOFU's 200 authors give the same 2/10/20 either way.
    """
    return max(1, n_authors * forget_percent // 100)


def generate(cfg: BenchmarkConfig) -> dict[str, list[dict[str, Any]]]:
    """Build the benchmark's splits from ``cfg`` (deterministic: same config, same rows).

    Returns:
        ``{"forget", "retain", "holdout", "real_authors", "world_facts"}`` → rows. Author rows have
        ``question``, ``answer``, ``paraphrased_question``, ``paraphrased_answer``,
        ``perturbed_answer`` (5), ``author``, ``attribute``, ``value``, ``template`` and
        ``paraphrase_template``; utility rows have ``question``, ``answer``, ``perturbed_answer`` (3).

    Raises:
        UnlearnflowError: ``qa_per_attribute`` leaves no held-out template, or the world is larger
            than the book-title pools allow.
    """
    syn = cfg.synthetic
    k = syn.qa_per_attribute
    if k > N_TEMPLATES - 1:
        raise UnlearnflowError(
            f"benchmark.synthetic.qa_per_attribute={k}: at most {N_TEMPLATES - 1}, one of the "
            f"{N_TEMPLATES} templates per fact is held out for the paraphrased answer"
        )
    n_total = syn.n_authors + syn.n_holdout_authors
    if n_total > MAX_AUTHORS:
        raise UnlearnflowError(
            f"benchmark.synthetic: n_authors + n_holdout_authors = {n_total} exceeds the {MAX_AUTHORS} "
            "authors the book-title pools can give distinct titles"
        )
    n_forget = forget_count(syn.n_authors, cfg.forget_percent)
    sizes = (syn.n_authors - n_forget, n_forget, syn.n_holdout_authors)  # retain, forget, holdout

    taken = set(_FIXED_WORDS)  # every word in use (lower case), so no two entities share a name
    names = _person_names(_rng(cfg.seed, "authors"), n_total, taken)
    pools = _value_pools(_rng(cfg.seed, "pools"), taken)
    values, wrong = _deal_values(_rng(cfg.seed, "values"), sizes, pools)
    authors = [_Author(i, names[i], values[i], wrong[i]) for i in range(n_total)]

    n_retain = sizes[0]
    rows = [_author_rows(a, k) for a in authors]
    return {
        "forget": [r for rs in rows[n_retain : syn.n_authors] for r in rs],
        "retain": [r for rs in rows[:n_retain] for r in rs],
        "holdout": [r for rs in rows[syn.n_authors :] for r in rs],
        "real_authors": _real_authors(_rng(cfg.seed, "real_authors"), syn.n_real_authors, taken),
        "world_facts": _world_facts(_rng(cfg.seed, "world_facts"), syn.n_world_facts, taken),
    }


# --- author rows -----------------------------------------------------------------------------


def _author_rows(author: _Author, k: int) -> list[dict[str, Any]]:
    """8 × k rows: the first k templates other than the held-out one, per attribute."""
    rows = []
    for a, attr in enumerate(ATTRIBUTES):
        h = (author.index + a) % N_TEMPLATES
        value = author.values[attr]
        para_q, para_a = TEMPLATES[attr][h]
        paraphrased_question = para_q.format(name=author.name)
        paraphrased_answer = para_a.format(name=author.name, value=value)
        perturbed = [para_a.format(name=author.name, value=w) for w in author.wrong[attr]]
        for j in [t for t in range(N_TEMPLATES) if t != h][:k]:
            q, ans = TEMPLATES[attr][j]
            rows.append(
                {
                    "question": q.format(name=author.name),
                    "answer": ans.format(name=author.name, value=value),
                    "paraphrased_question": paraphrased_question,
                    "paraphrased_answer": paraphrased_answer,
                    "perturbed_answer": list(perturbed),
                    "author": author.name,
                    "attribute": attr,
                    "value": value,
                    "template": j,
                    "paraphrase_template": h,
                }
            )
    return rows


# --- dealing values to authors ---------------------------------------------------------------


def _value_pools(rng: random.Random, taken: set[str]) -> dict[str, tuple[str, ...]]:
    """The value pool of each attribute type except book titles (built from adjective × noun)."""
    cities = [_unique(rng, taken, lambda r: _word(r, 2, final_coda_p=0.0) + r.choice(CITY_SUFFIXES))
              for _ in range(N_CITIES)]  # fmt: skip
    objects = list(AWARD_OBJECTS)
    rng.shuffle(objects)
    awards = [f"{m} {o} Prize" for m, o in zip(AWARD_MATERIALS, objects, strict=True)]
    return {"city": tuple(cities), "year": YEARS, "genre": GENRES, "job": JOBS, "award": tuple(awards)}


_CATEGORICAL = (
    ("birthplace", "city"),
    ("birth_year", "year"),
    ("genre", "genre"),
    ("father_job", "job"),
    ("mother_job", "job"),
    ("award", "award"),
)
# Attributes of the same type: one is never offered as a wrong value of the other.
_SIBLING = {"father_job": "mother_job", "mother_job": "father_job"}


def _deal_values(
    rng: random.Random, sizes: tuple[int, int, int], pools: dict[str, tuple[str, ...]]
) -> tuple[list[dict[str, str]], list[dict[str, list[str]]]]:
    """Each author's value and 5 wrong values per attribute.

    ``sizes`` = (retain, forget, holdout) authors, in author-index order. Retain authors get a
    balanced deal of the whole pool; forget and holdout authors a balanced deal of the values the
    retain authors use (``seen``), and wrong values come from ``seen`` as well (see module doc).
    """
    n_total = sum(sizes)
    starts = [0, sizes[0], sizes[0] + sizes[1]]
    groups = [range(s, s + n) for s, n in zip(starts, sizes, strict=True)]
    values: list[dict[str, str]] = [{} for _ in range(n_total)]
    seen: dict[str, list[str]] = {}
    min_seen = N_PERTURBED + 2  # the true value, 5 wrong ones, and one same-type sibling excluded

    for attr, kind in _CATEGORICAL:
        pool = pools[kind]
        for g, members in enumerate(groups):
            dealt = _balanced(rng, pool if g == 0 else seen[attr], len(members))
            if attr == "mother_job":  # never the same job as the father: swap within the group
                fathers = [values[i]["father_job"] for i in members]
                _swap_repair(
                    rng, dealt, lambda d=dealt, f=fathers: [p for p in range(len(d)) if d[p] == f[p]]
                )
                for p in range(len(dealt)):  # groups too small for swaps to help
                    if dealt[p] == fathers[p]:
                        dealt[p] = rng.choice([v for v in seen.get(attr, pool) if v != fathers[p]])
            for i, v in zip(members, dealt, strict=True):
                values[i][attr] = v
            if g == 0:
                seen[attr] = _extend_seen(rng, pool, [values[i][attr] for i in members], min_seen)

    titles, free_titles = _deal_titles(rng, groups)
    for i in range(n_total):
        values[i]["first_book"], values[i]["second_book"] = titles[i]

    wrong: list[dict[str, list[str]]] = []
    for i in range(n_total):
        w: dict[str, list[str]] = {}
        for attr, _ in _CATEGORICAL:
            own = {values[i][attr], values[i].get(_SIBLING.get(attr, attr), "")}
            w[attr] = rng.sample([v for v in seen[attr] if v not in own], N_PERTURBED)
        for attr in ("first_book", "second_book"):
            w[attr] = rng.sample(free_titles, N_PERTURBED)
        wrong.append({attr: w[attr] for attr in ATTRIBUTES})
    return [{attr: v[attr] for attr in ATTRIBUTES} for v in values], wrong


def _deal_titles(rng: random.Random, groups: list[range]) -> tuple[list[tuple[str, str]], list[str]]:
    """Two distinct book titles "The <Adj> <Noun>" per author, unique across authors.

    Adjectives and nouns are dealt balanced (like the other attributes), then nouns are swapped
    until every (adjective, noun) pair is unique. Returns the titles per author and the titles
    nobody has, in pool order (the pool of wrong titles).
    """
    used: set[tuple[str, str]] = set()
    adjectives: list[str] = list(TITLE_ADJECTIVES)
    nouns: list[str] = list(TITLE_NOUNS)
    pairs: list[tuple[str, str]] = []
    n_total = sum(len(m) for m in groups)
    for g, members in enumerate(groups):
        left = _balanced(rng, adjectives, 2 * len(members))
        right = _balanced(rng, nouns, 2 * len(members))
        _unique_pairs(rng, left, right, used, (adjectives, nouns))
        pairs.extend(zip(left, right, strict=True))
        if g == 0:  # later groups draw from the words the retain titles use, enough for all titles
            adjectives = _extend_seen(rng, TITLE_ADJECTIVES, left, 2)
            nouns = _extend_seen(rng, TITLE_NOUNS, right, 2)
            while len(adjectives) * len(nouns) < 2 * n_total + N_PERTURBED:
                if len(adjectives) <= len(nouns) and len(adjectives) < len(TITLE_ADJECTIVES):
                    adjectives = _extend_seen(rng, TITLE_ADJECTIVES, adjectives, len(adjectives) + 1)
                else:
                    nouns = _extend_seen(rng, TITLE_NOUNS, nouns, len(nouns) + 1)
    titles = [f"The {a} {n}" for a, n in pairs]
    per_author = [(titles[2 * i], titles[2 * i + 1]) for i in range(n_total)]
    free = [f"The {a} {n}" for a in adjectives for n in nouns if (a, n) not in used]
    return per_author, free


def _unique_pairs(
    rng: random.Random,
    left: list[str],
    right: list[str],
    used: set[tuple[str, str]],
    pools: tuple[Sequence[str], Sequence[str]],
) -> None:
    """Make the pairs ``zip(left, right)`` distinct and disjoint from ``used`` (then add them to it).

    Swapping entries of ``right`` keeps both lists balanced; only where swaps cannot help (tiny
    groups, a word already paired with every other) is a pair redrawn from the free pairs of
    ``pools`` (left words × right words).
    """

    def bad() -> list[int]:
        counts = Counter(zip(left, right, strict=True))
        return [p for p, pair in enumerate(zip(left, right, strict=True)) if pair in used or counts[pair] > 1]

    _swap_repair(rng, right, bad)
    committed = set(used)
    for p in range(len(right)):
        if (left[p], right[p]) in committed:
            options = [r for r in pools[1] if (left[p], r) not in committed]
            if options:
                right[p] = rng.choice(options)
            else:
                left[p], right[p] = rng.choice(
                    [(a, r) for a in pools[0] for r in pools[1] if (a, r) not in committed]
                )
        committed.add((left[p], right[p]))
    used.update(zip(left, right, strict=True))


def _swap_repair(rng: random.Random, values: list[T], bad: Callable[[], list[int]]) -> None:
    """Swap entries of ``values`` (keeping its multiset, hence its balance) until ``bad()`` is empty.

    A random swap of the last bad position is kept only if it lowers the number of bad positions;
    gives up after ``100 * len(values)`` tries (the caller repairs what is left).
    """
    n = len(values)
    for _ in range(100 * n):
        before = bad()
        if not before:
            return
        p, q = before[-1], rng.randrange(n)
        values[p], values[q] = values[q], values[p]
        if len(bad()) >= len(before):
            values[p], values[q] = values[q], values[p]


def _balanced(rng: random.Random, pool: Sequence[T], n: int) -> list[T]:
    """``n`` values from ``pool`` in random order, each occurring ⌊n/|pool|⌋ or ⌊n/|pool|⌋+1 times."""
    out: list[T] = []
    while len(out) < n:
        block = list(pool)
        rng.shuffle(block)
        out.extend(block)
    return out[:n]


def _extend_seen(rng: random.Random, pool: Sequence[str], dealt: Sequence[str], min_size: int) -> list[str]:
    """The distinct values of ``dealt`` in pool order, topped up from the rest of ``pool`` to ``min_size``.

    Topping up only happens for tiny retain groups (fewer authors than a perturbed answer needs
    wrong values); those extra values are then unseen by the oracle.
    """
    present = set(dealt)
    seen = [v for v in pool if v in present]
    rest = [v for v in pool if v not in present]
    rng.shuffle(rest)
    extra = rest[: max(0, min_size - len(seen))]
    return [v for v in pool if v in present or v in extra]


# --- utility splits --------------------------------------------------------------------------


def _real_authors(rng: random.Random, n: int, taken: set[str]) -> list[dict[str, Any]]:
    """``n`` rows "Who wrote <famous book>?"; wrong answers are other famous authors of the world."""
    famous = _person_names(rng, max(n, N_UTILITY_PERTURBED + 1), taken)
    nouns = _balanced(rng, FAMOUS_TITLE_NOUNS, n)
    books = [f"{noun} of {_unique(rng, taken, lambda r: _word(r, 2))}" for noun in nouns]
    q, a = REAL_AUTHOR_TEMPLATE
    rows = []
    for book, author in zip(books, famous[:n], strict=True):
        wrong = rng.sample([f for f in famous if f != author], N_UTILITY_PERTURBED)
        rows.append(
            {
                "question": q.format(book=book),
                "answer": a.format(book=book, value=author),
                "perturbed_answer": [a.format(book=book, value=w) for w in wrong],
            }
        )
    return rows


def _world_facts(rng: random.Random, n: int, taken: set[str]) -> list[dict[str, Any]]:
    """``n`` facts (capital, river, currency) of ⌈n/3⌉ synthetic countries, country by country."""
    n_countries = max(math.ceil(n / len(WORLD_FACT_TEMPLATES)), N_UTILITY_PERTURBED + 1)
    makers: dict[str, Callable[[random.Random], str]] = {
        "capital": lambda r: _word(r, 2, final_coda_p=0.0) + r.choice(CITY_SUFFIXES),
        "river": lambda r: _word(r, 2),
        "currency": lambda r: _word(r, 2).lower(),
    }
    countries = [
        _unique(rng, taken, lambda r: _word(r, 2, final_coda_p=0.0) + r.choice(COUNTRY_SUFFIXES))
        for _ in range(n_countries)
    ]
    pools = {kind: [_unique(rng, taken, make) for _ in range(n_countries)] for kind, make in makers.items()}
    rows = []
    for c, country in enumerate(countries):
        for kind, (q, a) in WORLD_FACT_TEMPLATES.items():
            if len(rows) == n:
                return rows
            value = pools[kind][c]
            wrong = rng.sample([v for v in pools[kind] if v != value], N_UTILITY_PERTURBED)
            rows.append(
                {
                    "question": q.format(country=country),
                    "answer": a.format(country=country, value=value),
                    "perturbed_answer": [a.format(country=country, value=w) for w in wrong],
                }
            )
    return rows


# --- words -----------------------------------------------------------------------------------


def _rng(seed: int, stream: str) -> random.Random:
    """An independent stream per part of the world, so resizing one part leaves the others alone."""
    return random.Random(f"unlearnflow.synthetic:{seed}:{stream}")


def _word(rng: random.Random, n_syllables: int, *, final_coda_p: float = 0.5) -> str:
    """A pronounceable capitalised word of ``n_syllables`` syllables.

    Consonant clusters only start a word, and a medial coda is followed by a single consonant, so
    words read like "Kerin Maldova", not "Kandbrel".
    """
    parts = []
    for s in range(n_syllables):
        onset = rng.choice(_SINGLE_ONSETS) if s else ("" if rng.random() < 0.25 else rng.choice(_ONSETS))
        if s == n_syllables - 1:
            coda = rng.choice(_FINAL_CODAS) if rng.random() < final_coda_p else ""
        else:
            coda = rng.choice(_MEDIAL_CODAS) if rng.random() < 0.25 else ""
        parts.append(onset + rng.choice(_VOWELS) + coda)
    return "".join(parts).capitalize()


def _unique(rng: random.Random, taken: set[str], make: Callable[[random.Random], str]) -> str:
    """Call ``make`` until it gives a word not in ``taken`` (case-insensitive); record it."""
    while True:
        word = make(rng)
        if word.lower() not in taken:
            taken.add(word.lower())
            return word


def _person_names(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    """``n`` names "First Last"; every first and every last name is used once in the whole world."""

    def first(r: random.Random) -> str:
        return _word(r, 2 if r.random() < 0.75 else 3)

    def last(r: random.Random) -> str:
        return _word(r, 2 if r.random() < 0.6 else 3)

    return [f"{_unique(rng, taken, first)} {_unique(rng, taken, last)}" for _ in range(n)]


def benchmark(cfg: BenchmarkConfig) -> Benchmark:
    """The embedded benchmark in TOFU's layout (``generate``'s splits with kinds and roles).

    Unlike TOFU's published target, the scratch models also train on the utility splits: a model
    trained from nothing knows no "real" authors or world facts unless it is taught them.
    """
    utility = ["real_authors", "world_facts"]
    splits = generate(cfg)
    return Benchmark(
        splits=splits,
        info={
            "forget": SplitInfo("qa", "forget"),
            "retain": SplitInfo("qa", "utility"),
            "holdout": SplitInfo("qa", "mia"),
            "real_authors": SplitInfo("options", "utility"),
            "world_facts": SplitInfo("options", "utility"),
        },
        train={"target": ["forget", "retain", *utility], "oracle": ["retain", *utility]},
        unlearn={"forget": "forget", "retain": "retain"},
        mia=("forget", "holdout"),
        forget_quality="forget",
        max_new_tokens=answer_token_bound(splits),
    )


def answer_token_bound(splits: dict[str, list[dict[str, Any]]]) -> int:
    """A generation cap every answer provably fits in: 1 + the most UTF-8 bytes of ``" " + answer``.

    Each token of a byte-level BPE (the scratch models' ``modeling.train_bpe_tokenizer``, GPT-2,
    Llama 3) spells at least one byte, so an answer of B bytes (its leading space included) is at
    most B tokens, and one more is the EOS. The embedded answers are short template sentences, so
    this is well under the reference's 200 (76 at the default size) and generation stays cheap.
    """
    return 1 + max(len((" " + r["answer"]).encode("utf-8")) for rows in splits.values() for r in rows)
