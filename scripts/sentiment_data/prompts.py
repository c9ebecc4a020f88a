"""Prompt material and the deterministic prompt splits (templated and open-ended)."""

from __future__ import annotations

import itertools
import random

# ----------------------------------------------------------------------------------------------------------------
# Prompt material. Subjects are noun phrases that fit every template; they lean neutral / negative (complaints,
# delays, bad weather, mundane chores) so the base policy's mean VADER compound sits well below its ~0.65 on open
# prompts and a sentiment-RLHF run has room to move it up. Every template asks for one short sentence (most add
# "Keep it under 15 words."): in pilots that put the EOS rate (<|im_end|> before the 48-token budget) near 90%;
# looser wordings ("one-sentence diary entry", "two-sentence email") ended only ~50% of the time.
# ----------------------------------------------------------------------------------------------------------------
TEMPLATES = [
    "Sum up {s} in one short sentence.",
    "In one short sentence, tell me how you feel about {s}.",
    "Write a one-sentence review of {s}. Keep it under 15 words.",
    "Write a one-line comment about {s}. Keep it under 15 words.",
    "Describe {s} in one short sentence.",
    "Write a one-line text message to a friend about {s}. Keep it under 15 words.",
    "Write a one-line text message to a neighbour about {s}. Keep it under 15 words.",
    "Write a one-line social media post about {s}. Keep it under 15 words.",
    "Write a one-sentence complaint about {s}. Keep it under 15 words.",
    "What do you think of {s}? Answer in one short sentence.",
    "Write a short, one-sentence note about {s}. Keep it under 15 words.",
    "Write a one-sentence text to your partner about {s}. Keep it under 15 words.",
]

SUBJECTS_NEGATIVE = [
    "a rainy weekend at the beach",
    "the train delay this morning",
    "a broken washing machine",
    "waiting on hold with customer service",
    "the noise from next door last night",
    "a flat tyre on the way to work",
    "a parking ticket you got yesterday",
    "a cold, soggy takeaway pizza",
    "a cancelled flight",
    "a leaking kitchen tap",
    "a long queue at the post office",
    "a hotel room with a broken heater",
    "a package that arrived damaged",
    "a power cut during dinner",
    "a traffic jam on the motorway",
    "a dentist appointment that ran late",
    "a phone with a cracked screen",
    "a noisy open-plan office",
    "a missed bus in the rain",
    "a sore throat on a Monday morning",
    "a slow internet connection",
    "an overbooked restaurant",
    "a lost umbrella",
    "a meeting that could have been an email",
    "a burnt piece of toast",
    "a printer that keeps jamming",
    "a rent increase",
    "a late grocery delivery",
    "a crowded commuter train",
    "a heatwave in a flat with no air conditioning",
    "a confusing tax form",
    "coffee spilled on your keyboard",
    "a rude waiter",
    "a broken lift in your building",
    "a sleepless night",
    "a grey, drizzly November afternoon",
    "an overpriced taxi ride",
    "a faulty phone charger",
    "a muddy football pitch",
    "the queue at airport security",
    "a blocked drain",
    "a wasp in the kitchen",
    "a shrinking paycheck",
    "a laptop that crashed before you saved",
]

SUBJECTS_NEUTRAL = [
    "your commute this morning",
    "doing the laundry",
    "the weekly grocery shop",
    "cleaning the bathroom",
    "filling in a form at the bank",
    "sorting the recycling",
    "ironing shirts",
    "a routine team meeting",
    "waiting for the kettle to boil",
    "taking out the bins",
    "a visit to the dry cleaner",
    "renewing a passport",
    "a Tuesday afternoon at the office",
    "a trip to the hardware store",
    "vacuuming the stairs",
    "doing the dishes",
    "a software update on your laptop",
    "a routine dental check-up",
    "a standard hotel breakfast",
    "the new bus timetable",
    "a multi-storey car park",
    "a petrol-station sandwich",
    "a fire drill at work",
    "defrosting the freezer",
    "a supermarket self-checkout",
    "replacing a light bulb",
    "a lukewarm cup of tea",
    "an overcast Sunday",
    "a quarterly budget spreadsheet",
    "waiting at the doctor's surgery",
    "a parcel collection point",
    "a long walk to the car park",
    "the office printer queue",
    "changing the bed sheets",
    "the lift music in your building",
    "a council meeting about bin collections",
]

# ----------------------------------------------------------------------------------------------------------------
# Open-ended prompt family (prompts only, for online training): the templates above all ask for one short sentence,
# and a policy trained only on them learned nothing that showed on open questions (the benchmark's transfer set).
# These widen the *training prompts*: conversational questions and replies about other everyday subjects, half with
# a brevity hint and half without. They share no subject with the templates above and no text with the hand-written
# transfer prompts (`prompts_transfer.jsonl`), which stay evaluation-only. No preference pairs are sampled for them:
# the proxy reward models stay those trained on the templated labels.
# ----------------------------------------------------------------------------------------------------------------
OPEN_TEMPLATES = [
    "What are your thoughts on {s}?",
    "Someone tells you about {s}. How do you respond?",
    "Give me a quick opinion on {s}.",
    "How would you react to {s}?",
    "Write a few words to a friend dealing with {s}.",
    "Explain how {s} would make you feel.",
    "What would you tell a friend about {s}?",
    "Share your view on {s}.",
    "Is {s} really that bad? Answer in a sentence or two.",
    "Describe {s} to someone who wasn't there. Use two sentences at most.",
    "Post an update about {s}. Keep it brief.",
    "React to {s} in a sentence or two.",
    "What is the best way to look at {s}? Answer briefly.",
    "Leave a comment about {s} in two sentences.",
    "Reply to a message about {s}. Keep it short.",
    "Talk briefly about {s}.",
]

OPEN_SUBJECTS = [
    "a weekend spent painting the spare room",
    "a camping trip where the tent leaked",
    "a gym membership you hardly use",
    "a friend who is always late",
    "a haircut that went wrong",
    "a bicycle with a broken chain",
    "a rejected job application",
    "a board game night that ran too long",
    "a neighbour's loud renovation",
    "a dinner party where the oven broke",
    "a new phone that keeps freezing",
    "a cooking class for beginners",
    "a long drive to visit family",
    "a team-building day at work",
    "a school reunion",
    "a volunteering shift at a food bank",
    "a lost set of house keys",
    "a sprained ankle before a race",
    "a kitchen renovation over budget",
    "a garden full of weeds",
    "a puppy that chews everything",
    "a noisy hotel next to a nightclub",
    "a marathon training plan",
    "a double-booked holiday rental",
    "a car that failed its inspection",
    "a landlord who ignores repairs",
    "a piano recital",
    "a first attempt at baking bread",
    "a village fete in the drizzle",
    "a new manager at work",
    "a cancelled football match",
    "a broken games console",
    "a sunburn after a day at the lake",
    "a late-night study session",
    "a group chat that never stops buzzing",
    "a surprise bill from the vet",
    "a trip to the zoo with toddlers",
    "a flooded basement",
    "a slow cashier at the bakery",
    "a cold that ruined a holiday",
    "a queue for a theme park ride",
    "a neighbour's overgrown hedge",
    "a speech at a colleague's leaving party",
    "a diet that did not last",
    "an overdue library book",
    "a power bank that will not charge",
    "a bird that sings outside your window at dawn",
    "a jigsaw puzzle with a missing piece",
]


def _split_subjects(subjects, test_subject_frac: float, rng: random.Random):
    """(train, test) subjects: a seeded shuffle of the sorted list, the first `test_subject_frac` of it held out."""
    pool = sorted(subjects)  # sorted first, so the split does not depend on the order the list is written in
    rng.shuffle(pool)
    k = round(len(pool) * test_subject_frac)
    return pool[k:], pool[:k]


def _combine(templates, subjects, n: int, rng: random.Random, flag: str = "--n-train-prompts / --n-test-prompts"):
    """The first n of the shuffled template x subject combinations."""
    combos = [t.format(s=s) for s, t in itertools.product(subjects, templates)]
    if n > len(combos):
        raise ValueError(f"Asked for {n} prompts but only {len(combos)} template x subject combinations exist; "
                         f"lower {flag}.")
    rng.shuffle(combos)
    return combos[:n]


def build_prompts(seed: int, n_train: int, n_test: int, test_subject_frac: float):
    """Deterministic templates x subjects, with train/test on disjoint subjects (stratified by lean)."""
    rng = random.Random(seed)
    train_subj, test_subj = [], []
    for pool in (SUBJECTS_NEGATIVE, SUBJECTS_NEUTRAL):  # one rng across both pools: the shipped split depends on it
        train_part, test_part = _split_subjects(pool, test_subject_frac, rng)
        train_subj += train_part
        test_subj += test_part

    train = _combine(TEMPLATES, train_subj, n_train, random.Random(f"{seed}-train"))
    test = _combine(TEMPLATES, test_subj, n_test, random.Random(f"{seed}-test"))
    assert not set(train) & set(test)
    return train, test, sorted(train_subj), sorted(test_subj)


def build_open_prompts(seed: int, n_train: int, n_test: int, test_subject_frac: float):
    """Open-ended templates x their own subjects, train/test on disjoint subjects; deterministic."""
    train_subj, test_subj = _split_subjects(OPEN_SUBJECTS, test_subject_frac, random.Random(f"{seed}-open"))

    train = _combine(OPEN_TEMPLATES, train_subj, n_train, random.Random(f"{seed}-open-train"), "--n-open-train-prompts")
    test = _combine(OPEN_TEMPLATES, test_subj, n_test, random.Random(f"{seed}-open-test"), "--n-open-test-prompts")
    assert not set(train) & set(test)
    return train, test, sorted(train_subj), sorted(test_subj)

