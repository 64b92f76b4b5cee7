"""The built-in training text: a few original essays plus deterministic generated prose.

A node must be able to train with no dataset on disk (CI, laptops, smoke runs on the network), and
every rank must see the same corpus; so the text lives in the code. The hand-written part gives
natural English; the generated part (seeded, so identical everywhere) gives enough volume for long
sequences and many ranks, with regular structure a tiny model can visibly learn.
"""

from __future__ import annotations

import random
from functools import lru_cache

ESSAYS: tuple[str, ...] = (
    """The Lamp on the Breakwater

Every evening at the harbour the keeper climbed the iron stair with a can of oil and a rag. The lamp
did not need him any more; a clockwork motor turned the lens and a sensor lit the wick when the light
failed. Still he climbed, because the sea was not a machine and he did not trust it to behave like
one. From the gallery he could see the fishing boats coming round the point, small and patient, each
one following the white beam home. He counted them in. When the last hull slid past the breakwater he
wiped the brass, closed the hatch, and went down to his supper of bread and smoked fish.""",
    """On Rivers

A river is a slow argument between water and stone. The water always wins in the end, but the stone
decides the shape of the victory. Where the rock is hard the channel narrows and the current runs
fast and loud; where the ground is soft the river spreads out, wanders, and forgets where it was
going. Towns are built at the places where the argument pauses: a ford, a bend, a fall that can turn
a wheel. If you want to understand why a city stands where it does, walk upstream until the water
changes its voice.""",
    """Bread

Flour, water, salt, and time. The first three are cheap; the fourth is what the baker sells. A dough
left overnight in a cool room develops a flavour that no recipe can hurry, because the yeast and the
bacteria are working at their own pace. The crust forms in the last minutes of the bake, when the
sugars on the surface brown and crack. A good loaf sings when it comes out of the oven: the crust
contracts as it cools and makes a faint crackling sound. Bakers listen for it the way sailors listen
to the wind.""",
    """The Cartographer's Apprentice

She was given the coastline first, because coastlines are honest: they are exactly where the land
stops. Rivers came next, then roads, then the borders, which were the hardest of all, because a
border is only a promise drawn on paper. Her master told her to ink the borders last and lightly.
"Mountains will still be there in a thousand years," he said. "The lines between kingdoms will not.
Draw what the ground says before you draw what the kings say." She kept that rule for the rest of her
life, and her maps outlived three dynasties.""",
    """Counting Stars

On a clear winter night, far from any town, a patient observer can see about three thousand stars
with the naked eye. It seems like more, because the eye is quick to fill the dark with imagined
points of light. The ancient catalogues listed roughly a thousand, grouped into figures of hunters,
animals, and ships. Those figures mean nothing to the stars themselves, which are scattered at wildly
different distances, but they mean a great deal to us. A constellation is a story told about
strangers who happen to stand in the same direction.""",
    """The Workshop Rule

In the old workshop there was one rule painted above the door: put every tool back where you found
it. Apprentices thought it was about tidiness. It was about time. A chisel left on the bench costs a
minute to find tomorrow; a hundred chisels cost a morning. Worse, a tool that is not in its place
might be broken, lent out, or lost, and nobody knows which. The rule turned the wall of hooks into a
ledger: an empty hook was a question that had to be answered before the day was done.""",
    """Weather

Farmers read the sky the way clerks read accounts. A ring around the moon means moisture high in the
air; swallows flying low mean the insects have come down ahead of rain; a red morning sky in the east
means the clear weather has already passed overhead. None of these signs is certain. Each one shifts
the odds a little, and a farmer who has watched the same fields for forty years carries the odds in
his bones. Ask him how he knows it will rain and he will shrug. Ask him to bet against it and he will
refuse.""",
    """A Note on Patience

Most useful work is boring in the middle. The beginning is exciting because everything is possible,
and the end is satisfying because something is finished, but the middle is a long corridor of small
decisions that nobody will ever praise. Bridges, books, harvests, and programs are all built in that
corridor. The people who finish things are not always the most talented; they are the ones who can
keep walking when the corridor seems to have no end, trusting that the far door is still there.""",
)

_SUBJECTS = (
    "the miller",
    "a young clerk",
    "the old ferryman",
    "my neighbour",
    "the school teacher",
    "a travelling tinker",
    "the village doctor",
    "the harbour master",
    "a quiet shepherd",
)
_VERBS = ("carried", "repaired", "painted", "sold", "counted", "measured", "buried", "found", "polished")
_OBJECTS = (
    "a wooden chest",
    "three copper pots",
    "the broken gate",
    "a basket of apples",
    "the long rope",
    "an iron key",
    "seven wax candles",
    "the blue boat",
    "a map of the valley",
)
_PLACES = (
    "by the river",
    "in the market",
    "behind the chapel",
    "at the crossroads",
    "near the mill",
    "under the bridge",
    "on the hill",
    "beside the well",
    "along the coast road",
)
_TIMES = (
    "at dawn",
    "before noon",
    "in the evening",
    "on market day",
    "after the storm",
    "in early spring",
    "during the harvest",
    "late at night",
    "on the first frost",
)
_NUMBERS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
)


def _sentence(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return (
            f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
            f"{rng.choice(_PLACES)} {rng.choice(_TIMES)}."
        )
    if kind == 1:
        a, b = rng.randrange(10), rng.randrange(9)
        return f"{_NUMBERS[a].capitalize()} plus {_NUMBERS[b]} makes {_NUMBERS[a + b]}."
    if kind == 2:
        return f"{rng.choice(_TIMES).capitalize()}, {rng.choice(_SUBJECTS)} walked {rng.choice(_PLACES)}."
    a, b = rng.randrange(2, 60), rng.randrange(2, 40)
    return f"Ledger: {a} + {b} = {a + b}; {a + b} - {b} = {a}."


@lru_cache(maxsize=4)
def generated_documents(count: int = 400, seed: int = 20240601) -> tuple[str, ...]:
    """``count`` short paragraphs of templated prose and arithmetic, identical for a given seed."""
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        docs.append(" ".join(_sentence(rng) for _ in range(rng.randrange(4, 12))))
    return tuple(docs)


def builtin_documents() -> list[bytes]:
    """The built-in corpus as UTF-8 documents, essays first (≈ 150 KB in total)."""
    return [doc.encode("utf-8") for doc in (*ESSAYS, *generated_documents())]
