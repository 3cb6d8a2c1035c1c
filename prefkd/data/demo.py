"""A deterministic synthetic preference data set: the embedded offline demo.

Every pair is built as ``chosen = A + X + B`` and ``rejected = A + Y + B``: the two
responses share a prefix ``A`` and a suffix ``B`` byte for byte and differ only in
one "slot" sentence (``X`` versus ``Y``).  The slot is recorded as a half-open UTF-8
byte range ``[start, end)`` in ``chosen_planted`` / ``rejected_planted`` so later
stages can check that per-span weights concentrate where the preference lives.

Families (spread evenly over the rows, then shuffled):

* ``arithmetic`` - the correct versus a wrong result of a small sum or product.
* ``politeness`` - a polite sentence versus a rude one in the same slot.
* ``topic``      - an on-topic tip versus an off-topic aside.
* ``factual``    - the right versus a wrong capital of a country.
* ``safety``     - a safe, helpful suggestion versus a careless, harmful one.
* ``format``     - the answer in the requested unit versus a vague or wrong-unit one.

Cues are drawn from small, fixed sets within each family so that a tiny language
model can learn which response is preferred.  About 20% of rows carry non-ASCII
text (accents, CJK, emoji including ZWJ sequences) in the prompt and the responses,
sometimes inside the planted slot.  Only ``random.Random(seed)`` is used, so the
output depends on ``n`` and ``seed`` alone.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from prefkd.core.settings import setting
from prefkd.errors import PrefkdError

FAMILIES: tuple[str, ...] = ("arithmetic", "politeness", "topic", "factual", "safety", "format")

# Share of rows decorated with non-ASCII text (names, emoji, CJK).
NON_ASCII_SHARE = 0.20
# Prompt shapes: single user turn / multi-turn / system message first.
MULTI_TURN_SHARE = 0.25
SYSTEM_SHARE = 0.10

# --------------------------------------------------------------------------------------
# Shared pools
# --------------------------------------------------------------------------------------

ASCII_NAMES = ("Alex", "Sam", "Jordan", "Maria", "Tom", "Priya", "Lena", "Omar")
FANCY_NAMES = ("Zoë", "José", "Søren", "Chloé", "Mühlberg", "美咲", "Ñora", "Łukasz")
FANCY_PLACES = ("München", "Köln", "São Paulo", "Zürich", "東京", "Kraków", "Reykjavík")
EMOJI = ("👩‍💻", "🎉", "👍🏽", "🙂", "👨‍👩‍👧", "🇫🇷", "☕", "🧑‍🍳")

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a friendly and concise assistant.",
    "You are a careful assistant who answers accurately.",
    "Answer the user's questions clearly and politely.",
)

# Earlier (user, assistant) exchanges used to build multi-turn prompts.
EARLIER_TURNS = (
    ("Hi there!", "Hello! How can I help you today?"),
    ("I have a quick question.", "Sure, go ahead and ask."),
    ("Are you able to help me with something?", "Of course. What do you need?"),
    ("Good morning.", "Good morning! What can I do for you?"),
    ("Can I ask you a few things?", "Yes, ask as many questions as you like."),
    ("Thanks for your help earlier.", "You're welcome! Is there anything else?"),
)
FANCY_EARLIER_TURNS = (
    ("Hallo! I'm writing from {place}.", "Hello! Greetings to {place}. How can I help?"),
    ("Hi, it's {name} again {emoji}", "Welcome back, {name}! What would you like to know?"),
)

OPENERS = (
    "Sure, here is the answer.",
    "Good question, let me explain.",
    "Here is what I can tell you.",
    "Let me walk you through it.",
    "Happy to explain this briefly.",
)
CLOSERS = (
    "Let me know if you need anything else.",
    "I hope this helps.",
    "Feel free to ask a follow-up question.",
    "Tell me if something is unclear.",
    "Good luck with it.",
)
FILLERS = (
    "This is a common question and the answer is short.",
    "It is worth double checking important details yourself.",
    "Many people ask about this, so you are not alone.",
    "The details can vary a little from case to case.",
)

# --------------------------------------------------------------------------------------
# Family-specific pools
# --------------------------------------------------------------------------------------

POLITE = (
    "Thank you for asking, I'm happy to help with that.",
    "That's a great question, and I'm glad you asked.",
    "I'd be delighted to help you with this.",
    "Thanks so much for reaching out, happy to assist.",
)
POLITE_FANCY = (
    "Merci for asking, I'm happy to help {emoji}",
    "Thank you, {name}, I'm glad to help with this.",
)
RUDE = (
    "Ugh, this is a really stupid question.",
    "Honestly, you should have figured this out yourself.",
    "Fine, I'll answer, but stop wasting my time.",
    "Seriously? Anyone could look this up in seconds.",
)
RUDE_FANCY = (
    "Ugh, {name}, this is a really stupid question.",
    "Fine, I'll answer, but stop wasting my time {emoji}",
)
POLITENESS_QUESTIONS = (
    ("How do I reset my password?", "Open the settings page, choose security and follow the reset link."),
    ("How long should I steep green tea?", "Steep it for about two to three minutes in water just below boiling."),
    (
        "What is a good way to learn to type faster?",
        "Practise for ten minutes a day with a typing tutor and keep your eyes on the screen.",
    ),
    ("How do I keep bread fresh?", "Store it in a paper bag at room temperature and freeze slices you won't eat soon."),
    ("How can I make my phone battery last longer?", "Lower the screen brightness and close apps you are not using."),
    ("What should I pack for a day hike?", "Bring water, snacks, a rain jacket, a map and a charged phone."),
)

TOPICS = (
    # (question, on-topic tips, topic noun)
    (
        "How often should I water a cactus?",
        (
            "Water a cactus only when the soil is completely dry, about every two to three weeks.",
            "Cacti need very little water, so let the soil dry out fully between waterings.",
        ),
    ),
    (
        "How do I clean a cast iron pan?",
        (
            "Rinse the cast iron pan with hot water, scrub it gently and dry it straight away.",
            "Wipe the pan clean, dry it on the stove and rub in a thin layer of oil.",
        ),
    ),
    (
        "What is a good warm-up before running?",
        (
            "Start with five minutes of brisk walking and then a few leg swings before you run.",
            "A light jog and some dynamic stretches make a good warm-up before running.",
        ),
    ),
    (
        "How can I fall asleep more easily?",
        (
            "Keep a regular bedtime and avoid screens for an hour before you sleep.",
            "A dark, cool bedroom and a fixed sleep schedule make falling asleep easier.",
        ),
    ),
    (
        "How do I start learning the guitar?",
        (
            "Begin with a few basic chords and practise switching between them every day.",
            "Learn the open chords first and play slowly along with simple songs.",
        ),
    ),
)
TOPICS_FANCY_QUESTION = "{q} I live in {place}."
OFF_TOPIC = (
    "By the way, my favourite football team won a match yesterday.",
    "Unrelated, but penguins cannot fly even though they are birds.",
    "Anyway, the price of bananas has changed a lot this year.",
    "Random fact: the Eiffel Tower was painted many times.",
)
OFF_TOPIC_FANCY = (
    "By the way, I once had a great café au lait in {place} {emoji}",
    "Random fact: the word for cat in Japanese is 猫.",
)

# (country, correct capital, wrong city, fancy correct, fancy wrong)
CAPITALS = (
    ("France", "Paris", "Lyon", "Paris 🇫🇷", "Marseille"),
    ("Germany", "Berlin", "Munich", "Berlin", "München"),
    ("Japan", "Tokyo", "Osaka", "Tokyo (東京)", "Osaka (大阪)"),
    ("Italy", "Rome", "Milan", "Roma", "Milano"),
    ("Spain", "Madrid", "Barcelona", "Madrid", "Sevilla"),
    ("Canada", "Ottawa", "Toronto", "Ottawa", "Montréal"),
    ("Australia", "Canberra", "Sydney", "Canberra", "Sydney"),
    ("Brazil", "Brasilia", "Rio de Janeiro", "Brasília", "São Paulo"),
    ("Switzerland", "Bern", "Zurich", "Bern", "Zürich"),
    ("Turkey", "Ankara", "Istanbul", "Ankara", "İstanbul"),
    ("China", "Beijing", "Shanghai", "Beijing (北京)", "Shanghai (上海)"),
    ("Egypt", "Cairo", "Alexandria", "Cairo", "Alexandria"),
)

SAFETY = (
    # (question, safe suggestion, harmful suggestion)
    (
        "How do I get rid of a wasp nest near my door?",
        "Call a pest control service or use a spray labelled for wasps at dusk while wearing protective clothing.",
        "Just pour petrol on the nest and set it on fire, it is quick and nobody needs to know.",
    ),
    (
        "My kitchen drain is clogged. What should I do?",
        "Try a plunger or a drain snake first, and never mix different drain cleaners together.",
        "Mix bleach with every drain cleaner you have, the toxic fumes mean it is working.",
    ),
    (
        "How can I stay awake to study all night?",
        "Take short breaks, drink some water and plan to sleep properly after the exam.",
        "Take as many caffeine pills as you can find, the more the better for staying awake.",
    ),
    (
        "How should I deal with a small kitchen grease fire?",
        "Turn off the heat and cover the pan with a lid, and call emergency services if it spreads.",
        "Throw a bucket of water on it straight away, that always puts grease fires out.",
    ),
    (
        "What should I do if I feel dizzy while driving?",
        "Pull over safely as soon as you can, rest and call someone if the feeling does not pass.",
        "Just open the window and keep driving faster so you get home sooner.",
    ),
    (
        "How do I lose weight quickly?",
        "Aim for a modest calorie deficit with regular meals and exercise, and talk to a doctor first.",
        "Stop eating completely for a few weeks, starving yourself is the fastest way.",
    ),
)

FORMAT = (
    # (question with requested unit, correct answer in unit, vague or wrong-unit answer)
    (
        "How long does it take to soft-boil an egg? Answer in minutes.",
        "It takes about 6 minutes in boiling water.",
        "It takes a little while, depending on your stove.",
    ),
    (
        "How far is a marathon? Give the distance in kilometres.",
        "A marathon is about 42.2 kilometres long.",
        "A marathon is about 26.2 miles long.",
    ),
    (
        "How tall is Mount Everest in metres?",
        "Mount Everest is about 8849 metres tall.",
        "Mount Everest is very, very tall.",
    ),
    (
        "What is the boiling point of water in degrees Celsius?",
        "Water boils at 100 degrees Celsius at sea level.",
        "Water boils at 212 degrees Fahrenheit at sea level.",
    ),
    (
        "How many hours are there in a week? Give a number.",
        "There are 168 hours in a week.",
        "There are quite a lot of hours in a week.",
    ),
    (
        "How heavy is a litre of water in kilograms?",
        "A litre of water weighs about 1 kilogram.",
        "A litre of water weighs about 2.2 pounds.",
    ),
)

ARITH_QUESTIONS = (
    "What is {a} {op} {b}?",
    "Can you compute {a} {op} {b} for me?",
    "Please calculate {a} {op} {b}.",
    "I need the value of {a} {op} {b}.",
)
ARITH_INTROS = (
    "Let's work it out step by step.",
    "This is a simple calculation.",
    "We can do this in one step.",
)
ARITH_SLOT = "{a} {op} {b} = {r}, so the answer is {r}."
ARITH_OUTROS = (
    "You can check it with a calculator.",
    "Small sums like this are easy to verify.",
    "Arithmetic like this gets easier with practice.",
)


def _maybe_fancy_suffix(rng: random.Random, fancy: bool) -> str:
    """A short non-ASCII sentence for fancy rows, else the empty string."""
    if not fancy:
        return ""
    choice = rng.randrange(3)
    if choice == 0:
        return f"Greetings from {rng.choice(FANCY_PLACES)} {rng.choice(EMOJI)}"
    if choice == 1:
        return f"Thanks, {rng.choice(FANCY_NAMES)}."
    return f"Have a nice day {rng.choice(EMOJI)}"


def _family_arithmetic(rng: random.Random, fancy: bool):
    if rng.random() < 0.5:
        a, b, op = rng.randint(2, 49), rng.randint(2, 49), "+"
        result = a + b
    else:
        a, b, op = rng.randint(2, 12), rng.randint(2, 12), "×" if fancy else "*"
        result = a * b
    wrong = result + rng.choice((-3, -2, -1, 1, 2, 3, 10))
    question = rng.choice(ARITH_QUESTIONS).format(a=a, op=op, b=b)
    pre = [rng.choice(ARITH_INTROS)]
    post = [rng.choice(ARITH_OUTROS), rng.choice(CLOSERS)]
    good = ARITH_SLOT.format(a=a, op=op, b=b, r=result)
    bad = ARITH_SLOT.format(a=a, op=op, b=b, r=wrong)
    return question, pre, good, bad, post


def _family_politeness(rng: random.Random, fancy: bool, name: str, emoji: str):
    question, answer = rng.choice(POLITENESS_QUESTIONS)
    if fancy and rng.random() < 0.5:
        good = rng.choice(POLITE_FANCY).format(name=name, emoji=emoji)
        bad = rng.choice(RUDE_FANCY).format(name=name, emoji=emoji)
    else:
        good, bad = rng.choice(POLITE), rng.choice(RUDE)
    if rng.random() < 0.6:  # slot first
        pre, post = [], [answer, rng.choice(FILLERS)]
    else:  # slot last
        pre, post = [answer, rng.choice(FILLERS)], []
    return question, pre, good, bad, post


def _family_topic(rng: random.Random, fancy: bool, place: str, emoji: str):
    question, tips = rng.choice(TOPICS)
    if fancy:
        question = TOPICS_FANCY_QUESTION.format(q=question, place=place)
    on_topic = rng.choice(tips)
    if fancy and rng.random() < 0.5:
        off_topic = rng.choice(OFF_TOPIC_FANCY).format(place=place, emoji=emoji)
    else:
        off_topic = rng.choice(OFF_TOPIC)
    # The shared text carries the other tip so both answers are equally long-winded.
    other = [t for t in tips if t != on_topic][0]
    pre = [rng.choice(OPENERS), other]
    post = [rng.choice(CLOSERS)]
    return question, pre, on_topic, off_topic, post


def _family_factual(rng: random.Random, fancy: bool):
    country, right, wrong, right_fancy, wrong_fancy = rng.choice(CAPITALS)
    if fancy:
        right, wrong = right_fancy, wrong_fancy
    question = rng.choice(
        (
            f"What is the capital of {country}?",
            f"Which city is the capital of {country}?",
            f"Tell me the capital city of {country}.",
        )
    )
    good = f"The capital of {country} is {right}."
    bad = f"The capital of {country} is {wrong}."
    pre = [rng.choice(OPENERS)]
    post = [f"{country} has many other interesting cities to visit.", rng.choice(CLOSERS)]
    return question, pre, good, bad, post


def _family_safety(rng: random.Random, fancy: bool):
    question, safe, harmful = rng.choice(SAFETY)
    pre = [rng.choice(("Here is my advice.", "This is a situation to handle with care.", "Here is what I would do."))]
    post = [rng.choice(CLOSERS)]
    return question, pre, safe, harmful, post


def _family_format(rng: random.Random, fancy: bool):
    question, good, bad = rng.choice(FORMAT)
    pre = [rng.choice(OPENERS)]
    post = [rng.choice(FILLERS), rng.choice(CLOSERS)]
    return question, pre, good, bad, post


def _build_prompt(rng: random.Random, question: str, fancy: bool, name: str, place: str, emoji: str) -> list[dict]:
    shape = rng.random()
    messages: list[dict] = []
    if shape < SYSTEM_SHARE:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    elif shape < SYSTEM_SHARE + MULTI_TURN_SHARE:
        exchanges = rng.sample(EARLIER_TURNS, rng.choice((1, 1, 2)))
        if fancy and rng.random() < 0.5:
            exchanges[0] = tuple(t.format(name=name, place=place, emoji=emoji) for t in rng.choice(FANCY_EARLIER_TURNS))
        for user, assistant in exchanges:
            messages.append({"role": "user", "content": user})
            messages.append({"role": "assistant", "content": assistant})
    if fancy and (question.isascii() or rng.random() < 0.5):
        question = f"{question} {emoji}"
    messages.append({"role": "user", "content": question})
    return messages


def _make_pair(rng: random.Random, family: str) -> dict:
    fancy = rng.random() < NON_ASCII_SHARE
    name = rng.choice(FANCY_NAMES if fancy else ASCII_NAMES)
    place = rng.choice(FANCY_PLACES)
    emoji = rng.choice(EMOJI)
    if family == "arithmetic":
        question, pre, good, bad, post = _family_arithmetic(rng, fancy)
    elif family == "politeness":
        question, pre, good, bad, post = _family_politeness(rng, fancy, name, emoji)
    elif family == "topic":
        question, pre, good, bad, post = _family_topic(rng, fancy, place, emoji)
    elif family == "factual":
        question, pre, good, bad, post = _family_factual(rng, fancy)
    elif family == "safety":
        question, pre, good, bad, post = _family_safety(rng, fancy)
    elif family == "format":
        question, pre, good, bad, post = _family_format(rng, fancy)
    else:  # pragma: no cover - FAMILIES is closed
        raise ValueError(family)

    # Fancy rows get a non-ASCII sentence in the shared text (outside the slot),
    # which guarantees non-ASCII in the responses even when the slot is ASCII.
    extra = _maybe_fancy_suffix(rng, fancy)
    if extra:
        post = post + [extra]
    prompt = _build_prompt(rng, question, fancy, name, place, emoji)

    prefix = " ".join(pre) + " " if pre else ""
    suffix = " " + " ".join(post) if post else ""
    chosen = prefix + good + suffix
    rejected = prefix + bad + suffix
    start = len(prefix.encode("utf-8"))
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "chosen_planted": [[start, start + len(good.encode("utf-8"))]],
        "rejected_planted": [[start, start + len(bad.encode("utf-8"))]],
        "family": family,
    }


def generate_demo_pairs(n: int = 3000, seed: int = 1) -> list[dict]:
    """Return ``n`` synthetic preference pairs, a pure function of ``n`` and ``seed``.

    Families are assigned round-robin (so they are spread evenly), then shuffled.
    """
    if n < 0:
        raise PrefkdError(f"The number of demo pairs must be zero or more, not {n}.")
    rng = random.Random(seed)
    families = [FAMILIES[i % len(FAMILIES)] for i in range(n)]
    rng.shuffle(families)
    return [_make_pair(rng, family) for family in families]


def dumps_pair(pair: dict) -> str:
    """One JSONL line (without newline): UTF-8 text, keys sorted."""
    return json.dumps(pair, ensure_ascii=False, sort_keys=True)


def write_demo_pairs(path, n: int = 3000, seed: int = 1) -> Path:
    """Write the demo pairs as JSONL to ``path`` atomically; same ``n``/``seed`` -> same bytes."""
    path = Path(path)
    pairs = generate_demo_pairs(n, seed)
    data = "".join(dumps_pair(p) + "\n" for p in pairs).encode("utf-8")
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


@dataclass(kw_only=True)
class DemoDataSettings:
    """Settings of ``prefkd demo-data``."""

    out: str = setting(doc="JSONL file to write")
    pairs: int = setting(3000, "number of pairs (default: 3000)", config="data.demo_pairs")
    seed: int = setting(1, "random seed (default: 1)", config="seed")


def run(s: DemoDataSettings) -> int:
    """Entry point of ``prefkd demo-data``; returns the exit status."""
    path = write_demo_pairs(s.out, s.pairs, s.seed)
    print(f"wrote {s.pairs} demo pairs to {path}")
    return 0
