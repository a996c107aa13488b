"""Sentence generators for the synthetic corpora, deterministic for a seed.

English (continuation, inpainting, resynthesis): random strings of the 5,000 most frequent English
words (wordfreq) for broad phonetic coverage, faker sentences, and numbers, dates and times spelled
out by num2words. Spanish -> English pairs (translation): numbers, dates, times, quantities of
everyday things, and common phrases, each generated in both languages from the same values.
"""

from __future__ import annotations

import random

MONTHS = [("January", "enero"), ("February", "febrero"), ("March", "marzo"), ("April", "abril"), ("May", "mayo"),
          ("June", "junio"), ("July", "julio"), ("August", "agosto"), ("September", "septiembre"),
          ("October", "octubre"), ("November", "noviembre"), ("December", "diciembre")]
DAYS = [("Monday", "lunes"), ("Tuesday", "martes"), ("Wednesday", "miércoles"), ("Thursday", "jueves"),
        ("Friday", "viernes"), ("Saturday", "sábado"), ("Sunday", "domingo")]
THINGS = [("book", "books", "libro", "libros"), ("apple", "apples", "manzana", "manzanas"), ("car", "cars", "coche", "coches"),
          ("house", "houses", "casa", "casas"), ("dog", "dogs", "perro", "perros"), ("cat", "cats", "gato", "gatos"),
          ("chair", "chairs", "silla", "sillas"), ("table", "tables", "mesa", "mesas"), ("window", "windows", "ventana", "ventanas"),
          ("friend", "friends", "amigo", "amigos"), ("ticket", "tickets", "billete", "billetes"), ("letter", "letters", "carta", "cartas"),
          ("flower", "flowers", "flor", "flores"), ("bottle", "bottles", "botella", "botellas"), ("minute", "minutes", "minuto", "minutos"),
          ("hour", "hours", "hora", "horas"), ("day", "days", "día", "días"), ("week", "weeks", "semana", "semanas"),
          ("euro", "euros", "euro", "euros"), ("child", "children", "niño", "niños")]
PHRASES = [("good morning", "buenos días"), ("good night", "buenas noches"), ("thank you very much", "muchas gracias"),
           ("where is the station", "dónde está la estación"), ("I would like a coffee", "quiero un café"),
           ("see you tomorrow", "hasta mañana"), ("how are you", "cómo estás"), ("I do not understand", "no entiendo"),
           ("the weather is nice today", "hace buen tiempo hoy"), ("please speak slowly", "por favor habla despacio"),
           ("what time is it", "qué hora es"), ("the door is open", "la puerta está abierta"),
           ("I am very tired", "estoy muy cansado"), ("we are going home", "vamos a casa"), ("it is raining", "está lloviendo"),
           ("the water is cold", "el agua está fría"), ("my name is Paul", "me llamo Pablo"), ("I live in the city", "vivo en la ciudad"),
           ("the train is late", "el tren llega tarde"), ("call me later", "llámame más tarde")]
HAVE = [("I have", "tengo"), ("we have", "tenemos"), ("they need", "necesitan"), ("she bought", "ella compró"), ("he sold", "él vendió")]


def _num(n: int, lang: str, ordinal: bool = False) -> str:
    from num2words import num2words

    return num2words(n, lang=lang, to="ordinal" if ordinal else "cardinal")


class EnglishSentences:
    def __init__(self, seed: int):
        from faker import Faker
        from wordfreq import top_n_list

        self.rng = random.Random(seed)
        self.fake = Faker("en_US")
        self.fake.seed_instance(seed)
        self.words = [w for w in top_n_list("en", 5000) if w.isalpha()]

    def __call__(self) -> str:
        r, kind = self.rng, self.rng.random()
        if kind < 0.4:
            return " ".join(r.choice(self.words) for _ in range(r.randint(5, 10)))
        if kind < 0.7:
            return self.fake.sentence(nb_words=r.randint(5, 10)).rstrip(".")
        if kind < 0.8:
            return f"{r.choice(HAVE)[0]} {_num(r.randint(2, 999), 'en')} {r.choice(THINGS)[1]}"
        if kind < 0.9:
            day, month = r.choice(DAYS)[0], r.choice(MONTHS)[0]
            return f"on {day} the {_num(r.randint(1, 28), 'en', ordinal=True)} of {month} {_num(r.randint(1950, 2030), 'en')}"
        return f"the meeting starts at {_num(r.randint(1, 12), 'en')} {_num(r.randint(10, 59), 'en')}"


class SpanishEnglishPairs:
    """(Spanish, English) sentences with the same content."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def __call__(self) -> tuple[str, str]:
        r, kind = self.rng, self.rng.random()
        if kind < 0.25:
            n = r.randint(0, 9999)
            return _num(n, "es"), _num(n, "en")
        if kind < 0.5:
            n = r.randint(2, 99)
            en_v, es_v = r.choice(HAVE)
            one_en, many_en, one_es, many_es = r.choice(THINGS)
            return f"{es_v} {_num(n, 'es')} {many_es}", f"{en_v} {_num(n, 'en')} {many_en}"
        if kind < 0.7:
            d = r.randint(1, 28)
            (day_en, day_es), (mon_en, mon_es) = r.choice(DAYS), r.choice(MONTHS)
            return f"el {day_es} {_num(d, 'es')} de {mon_es}", f"{day_en} the {_num(d, 'en', ordinal=True)} of {mon_en}"
        if kind < 0.85:
            h, m = r.randint(1, 12), r.choice([5, 10, 20, 25])
            return f"son las {_num(h, 'es')} y {_num(m, 'es')}", f"it is {_num(m, 'en')} past {_num(h, 'en')}"
        en, es = r.choice(PHRASES)
        return es, en


def unique(gen, n: int, key=lambda x: x, max_tries: int = 100) -> list:
    """n distinct outputs of gen()."""
    out, seen, tries = [], set(), 0
    while len(out) < n:
        x = gen()
        if key(x) in seen:
            tries += 1
            if tries > max_tries * n:
                raise ValueError(f"the generator ran out of distinct sentences after {len(out)}")
            continue
        seen.add(key(x))
        out.append(x)
    return out
