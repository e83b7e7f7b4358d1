"""Small datasets that kerasllm generates itself, so demos and tests need no downloads.

Everything here is deterministic for a given seed and imports no TensorFlow.

* `sample_corpus`: English-like short stories from templates (causal LM demo).
* `number_words_pairs`: numbers written in words -> digits (a seq2seq task).
* `sentiment_rows`: templated product reviews labelled positive/negative (classification).
* `ner_rows`: templated sentences with people, places and dates tagged in BIO (token classification).
"""

from __future__ import annotations

import random

_NAMES = ["Anna", "Ben", "Clara", "David", "Ella", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena", "Milo"]
_ANIMALS = ["cat", "dog", "fox", "owl", "rabbit", "horse", "duck", "bear", "mouse", "frog"]
_COLORS = ["red", "blue", "green", "yellow", "small", "old", "shiny", "soft"]
_THINGS = ["ball", "kite", "book", "hat", "box", "boat", "key", "lamp", "drum", "map"]
_PLACES = ["garden", "forest", "kitchen", "park", "river", "barn", "attic", "market", "beach", "hill"]
_FEELINGS = ["happy", "sleepy", "curious", "proud", "surprised", "hungry", "calm", "brave"]
_TEMPLATES = [
    "{name} had a {color} {thing}. One day {name} took the {thing} to the {place}.",
    "The {animal} lived near the {place}. Every morning the {animal} felt {feeling}.",
    "{name} saw a {animal} in the {place}. The {animal} was {feeling} and looked at the {color} {thing}.",
    "In the {place} there was a {color} {thing}. {name} picked it up and smiled.",
    "\"Where is my {thing}?\" asked {name}. The {animal} had hidden it in the {place}.",
    "{name} and the {animal} played with the {thing} until the sun went down. They were {feeling}.",
]


def sample_corpus(num_stories: int = 2000, seed: int = 0) -> str:
    """A corpus of short templated stories, one paragraph each, separated by blank lines."""
    rng = random.Random(seed)
    stories = []
    for _ in range(num_stories):
        slots = dict(name=rng.choice(_NAMES), animal=rng.choice(_ANIMALS), color=rng.choice(_COLORS),
                     thing=rng.choice(_THINGS), place=rng.choice(_PLACES), feeling=rng.choice(_FEELINGS))
        sentences = [rng.choice(_TEMPLATES).format(**slots) for _ in range(rng.randint(2, 4))]
        stories.append(" ".join(sentences))
    return "\n\n".join(stories) + "\n"


_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_to_words(n: int) -> str:
    """English words for 0 <= n < 1,000,000 ("four hundred and two")."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number out of range: {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_to_words(rest))
    rest = n % 1000
    head = number_to_words(n // 1000) + " thousand"
    if rest == 0:
        return head
    return head + (" and " if rest < 100 else " ") + number_to_words(rest)


def number_words_pairs(count: int = 5000, max_value: int = 9999, seed: int = 0) -> list[tuple[str, str]]:
    """`(words, digits)` pairs such as ("four hundred and two", "402")."""
    rng = random.Random(seed)
    return [(number_to_words(n), str(n)) for n in (rng.randint(0, max_value) for _ in range(count))]


_POSITIVE = ["great", "excellent", "wonderful", "lovely", "fantastic", "reliable", "comfortable", "perfect"]
_NEGATIVE = ["terrible", "awful", "broken", "disappointing", "useless", "flimsy", "noisy", "horrible"]
_PRODUCTS = ["phone", "chair", "kettle", "backpack", "lamp", "jacket", "printer", "blender", "watch", "tent"]
_REVIEW_TEMPLATES = [
    "This {product} is {adj}.",
    "I bought the {product} last week and it is {adj}.",
    "What a {adj} {product}, I would {verdict} it.",
    "The {product} arrived today. Honestly {adj}.",
    "My {product} turned out {adj} after a month.",
]


def sentiment_rows(count: int = 2000, seed: int = 0) -> list[tuple[str, str]]:
    """`(text, label)` rows with labels "positive" or "negative"."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        positive = rng.random() < 0.5
        text = rng.choice(_REVIEW_TEMPLATES).format(
            product=rng.choice(_PRODUCTS), adj=rng.choice(_POSITIVE if positive else _NEGATIVE),
            verdict="recommend" if positive else "never buy",
        )
        rows.append((text, "positive" if positive else "negative"))
    return rows


_FIRST_NAMES = ["Anna", "Ben", "Clara", "David", "Ella", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena", "Milo",
                "Nora", "Oscar", "Paula", "Ravi", "Sofia", "Tariq", "Uma", "Victor"]
_LAST_NAMES = ["Smith", "Garcia", "Kowalski", "Nguyen", "Okafor", "Rossi", "Schmidt", "Tanaka", "Dubois", "Larsen"]
_CITIES = ["Paris", "Berlin", "Lagos", "Lima", "Oslo", "Madrid", "Nairobi", "Tokyo", "Toronto", "Vienna",
           "New York", "San Francisco", "Buenos Aires", "Hong Kong", "Cape Town", "Rio de Janeiro"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
# {per}, {per2}: a person; {loc}: a city; {date}: a date. Every other word is tagged O.
_NER_TEMPLATES = [
    "{per} lives in {loc} .",
    "{per} flew to {loc} on {date} .",
    "On {date} , {per} met {per2} in {loc} .",
    "{per} was born in {loc} in {date} .",
    "The meeting in {loc} starts on {date} .",
    "{per} and {per2} visited {loc} last week .",
    "Yesterday {per} called {per2} from {loc} .",
    "The train from {loc} to {loc2} leaves on {date} .",
    "{per} will move to {loc} in {date} .",
    "A letter from {per} arrived on {date} .",
]


def _entity(words: str, kind: str) -> list[tuple[str, str]]:
    """`(word, tag)` pairs of one entity: B- on its first word, I- on the rest."""
    return [(word, ("B-" if i == 0 else "I-") + kind) for i, word in enumerate(words.split())]


def ner_rows(count: int = 2000, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """`(words, tags)` sentences with people (PER), cities (LOC) and dates (DATE) tagged in BIO (IOB2).

    Example: (["Anna", "Smith", "lives", "in", "New", "York", "."],
              ["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC", "O"])
    """
    rng = random.Random(seed)

    def person() -> str:
        return rng.choice(_FIRST_NAMES) + (f" {rng.choice(_LAST_NAMES)}" if rng.random() < 0.5 else "")

    def date() -> str:
        return rng.choice([f"{rng.randint(1, 28)} {rng.choice(_MONTHS)} {rng.randint(1950, 2030)}",
                           f"{rng.choice(_MONTHS)} {rng.randint(1950, 2030)}", rng.choice(_WEEKDAYS),
                           str(rng.randint(1950, 2030))])

    rows = []
    for _ in range(count):
        slots = {"per": _entity(person(), "PER"), "per2": _entity(person(), "PER"),
                 "loc": _entity(rng.choice(_CITIES), "LOC"), "loc2": _entity(rng.choice(_CITIES), "LOC"),
                 "date": _entity(date(), "DATE")}
        pairs = []
        for word in rng.choice(_NER_TEMPLATES).split():
            pairs.extend(slots[word[1:-1]] if word.startswith("{") else [(word, "O")])
        rows.append(([w for w, _ in pairs], [t for _, t in pairs]))
    return rows
