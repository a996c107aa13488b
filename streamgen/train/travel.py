"""Spanish -> English translation pairs over a bounded travel domain, with a compositional test split.

The domain, which a demo can show: numbers, clock times, dates, prices in euros, weekdays, directions
and short travel phrases (asking the way, buying tickets and food, opening hours, departures,
bookings). Every sentence comes from a *frame* (`dónde está {place}` -> `where is {place}`) whose
slots are filled from shared tables (22 places, 7 vehicles, 13 items, 12 directions, 6 relations,
weekdays, months, and generated times, dates, prices and counts), in both languages from the same
values, so thousands of distinct pairs come from a few hundred words.

Split (SCAN-style, "unseen combinations"): for every frame and slot, a seeded share of that slot's
values is held out *in that frame* for the test set (another share for dev). A pair whose
(frame, slot, value) is held out goes to test (or dev), every other pair to training. So each test
pair holds a combination training never had (`the bus leaves at quarter to five` when training had
the bus leaving at other times and other vehicles leaving at quarter to five), while its words all
occur in training: test pairs with a word (Spanish or English) that no training sentence has are
dropped. Training also gets the fixed phrases (`la cuenta, por favor` -> `the bill, please`).

    OUT/es2en_{train,dev,test}_src.tsv   Spanish, espeak-ng (es)   } same ids; columns id, audio,
    OUT/es2en_{train,dev,test}_tgt.tsv   English, piper joe        } n_frames, text, frame, held

(`held`: the held-out combinations of a dev/test pair, `frame:slot=value;...`.) These are the
manifests `streamgen units` and `streamgen data pairs --task translation` read.
`python -m streamgen.train.travel --out DIR [--train 4000 --dev 200 --test 300]`; rerunning it skips
audio already written (resumable).
"""

from __future__ import annotations

import argparse
import random
import re
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf

from ..atomic_file import write_atomic
from ..progress import Progress
from .synth import RATE, Espeak, Piper, stamp_corpus, write_manifests
from .text import _num

SPLITS = ("train", "dev", "test")

# --- tables: (key, Spanish, English) ----------------------------------------------------------
PLACES = [("station", "la estación", "the station"), ("airport", "el aeropuerto", "the airport"),
          ("hotel", "el hotel", "the hotel"), ("museum", "el museo", "the museum"), ("beach", "la playa", "the beach"),
          ("bank", "el banco", "the bank"), ("pharmacy", "la farmacia", "the pharmacy"),
          ("hospital", "el hospital", "the hospital"), ("market", "el mercado", "the market"),
          ("cathedral", "la catedral", "the cathedral"), ("restaurant", "el restaurante", "the restaurant"),
          ("bus stop", "la parada de autobús", "the bus stop"), ("centre", "el centro", "the city center"),
          ("port", "el puerto", "the port"), ("post office", "la oficina de correos", "the post office"),
          ("supermarket", "el supermercado", "the supermarket"), ("library", "la biblioteca", "the library"),
          ("park", "el parque", "the park"), ("castle", "el castillo", "the castle"),
          ("square", "la plaza mayor", "the main square"), ("tourist office", "la oficina de turismo", "the tourist office"),
          ("cinema", "el cine", "the cinema")]
VEHICLES = [("train", "el tren", "the train"), ("bus", "el autobús", "the bus"), ("flight", "el vuelo", "the flight"),
            ("boat", "el barco", "the boat"), ("metro", "el metro", "the metro"), ("tram", "el tranvía", "the tram"),
            ("night bus", "el autobús nocturno", "the night bus")]
# key, Spanish indefinite, Spanish definite, English indefinite, English definite
ITEMS = [("coffee", "un café", "el café", "a coffee", "the coffee"),
         ("beer", "una cerveza", "la cerveza", "a beer", "the beer"),
         ("return", "un billete de ida y vuelta", "el billete de ida y vuelta", "a return ticket", "the return ticket"),
         ("double room", "una habitación doble", "la habitación doble", "a double room", "the double room"),
         ("sandwich", "un bocadillo", "el bocadillo", "a sandwich", "the sandwich"),
         ("water", "una botella de agua", "la botella de agua", "a bottle of water", "the bottle of water"),
         ("map", "un mapa de la ciudad", "el mapa de la ciudad", "a map of the city", "the map of the city"),
         ("ice cream", "un helado", "el helado", "an ice cream", "the ice cream"),
         ("museum ticket", "una entrada para el museo", "la entrada para el museo", "a ticket for the museum",
          "the ticket for the museum"),
         ("juice", "un zumo de naranja", "el zumo de naranja", "an orange juice", "the orange juice"),
         ("salad", "una ensalada", "la ensalada", "a salad", "the salad"),
         ("metro card", "una tarjeta de metro", "la tarjeta de metro", "a metro card", "the metro card"),
         ("umbrella", "un paraguas", "el paraguas", "an umbrella", "the umbrella")]
DIRECTIONS = [("left", "gire a la izquierda", "turn left"), ("right", "gire a la derecha", "turn right"),
              ("straight", "siga todo recto", "go straight ahead"), ("street", "cruce la calle", "cross the street"),
              ("bridge", "cruce el puente", "cross the bridge"),
              ("first left", "tome la primera calle a la izquierda", "take the first street on the left"),
              ("second right", "tome la segunda calle a la derecha", "take the second street on the right"),
              ("third left", "tome la tercera calle a la izquierda", "take the third street on the left"),
              ("up", "suba por esta calle", "go up this street"), ("river", "baje hasta el río", "go down to the river"),
              ("lights", "siga hasta el semáforo", "continue to the traffic lights"),
              ("corner", "gire en la esquina", "turn at the corner")]
RELATIONS = [("next to", "al lado de", "next to"), ("opposite", "enfrente de", "opposite"), ("behind", "detrás de", "behind"),
             ("near", "cerca de", "near"), ("in front of", "delante de", "in front of"), ("far from", "lejos de", "far from")]
DAYS = [("Monday", "lunes", "lunes"), ("Tuesday", "martes", "martes"), ("Wednesday", "miércoles", "miércoles"),
        ("Thursday", "jueves", "jueves"), ("Friday", "viernes", "viernes"), ("Saturday", "sábado", "sábados"),
        ("Sunday", "domingo", "domingos")]  # English, Spanish, Spanish plural
MONTHS = [("January", "enero"), ("February", "febrero"), ("March", "marzo"), ("April", "abril"), ("May", "mayo"),
          ("June", "junio"), ("July", "julio"), ("August", "agosto"), ("September", "septiembre"),
          ("October", "octubre"), ("November", "noviembre"), ("December", "diciembre")]
# minutes -> (Spanish after the hour, English; True where the clock names the next hour)
MINUTES = {0: ("", "o'clock", False), 5: ("y cinco", "five past", False), 10: ("y diez", "ten past", False),
           15: ("y cuarto", "quarter past", False), 20: ("y veinte", "twenty past", False),
           25: ("y veinticinco", "twenty five past", False), 30: ("y media", "half past", False),
           35: ("menos veinticinco", "twenty five to", True), 40: ("menos veinte", "twenty to", True),
           45: ("menos cuarto", "quarter to", True), 50: ("menos diez", "ten to", True), 55: ("menos cinco", "five to", True)}
CENTS = [0, 20, 50, 75]
PHRASES = [("buenos días", "good morning"), ("buenas noches", "good night"), ("muchas gracias", "thank you very much"),
           ("la cuenta, por favor", "the bill, please"), ("no entiendo", "I do not understand"),
           ("hable más despacio, por favor", "please speak more slowly"), ("¿habla usted inglés?", "do you speak English?"),
           ("¿dónde están los servicios?", "where are the toilets?"), ("perdone", "excuse me"),
           ("hasta mañana", "see you tomorrow"), ("¿qué hora es?", "what time is it?"), ("estoy perdido", "I am lost"),
           ("necesito ayuda", "I need help"), ("¿puede ayudarme?", "can you help me?"), ("sí, por favor", "yes, please"),
           ("no, gracias", "no, thank you")]


# --- numbers, times, dates, prices in both languages --------------------------------------------
def es_count(n: int, feminine: bool = False) -> str:
    """A Spanish cardinal before a noun: `un euro`, `veintiún euros`, `una noche`, `veintiuna noches`."""
    w = _num(n, "es")
    if w == "uno" or w.endswith(("iuno", " uno")):
        w = w[:-3] + ("una" if feminine else ("ún" if w.endswith("iuno") else "un"))
    return w


def en_num(n: int, ordinal: bool = False) -> str:
    return _num(n, "en", ordinal).replace("-", " ")


def time_pair(h: int, m: int) -> tuple[str, str]:
    """(Spanish with its article, English) for h:m on a 12-hour clock: `las cuatro menos cuarto`, `quarter to four`."""
    es_m, en_m, nxt = MINUTES[m]
    hh = h % 12 + 1 if nxt else h
    es_h = "la una" if hh == 1 else f"las {_num(hh, 'es')}"
    if m == 0:
        return es_h, f"{en_num(hh)} o'clock"
    return f"{es_h} {es_m}", f"{en_m} {en_num(hh)}"


def date_pair(d: int, month: int) -> tuple[str, str]:
    mon_en, mon_es = MONTHS[month]
    return f"el {'primero' if d == 1 else _num(d, 'es')} de {mon_es}", f"the {en_num(d, ordinal=True)} of {mon_en}"


def price_pair(euros: int, cents: int) -> tuple[str, str]:
    es = f"{es_count(euros)} {'euro' if euros == 1 else 'euros'}"
    en = f"{en_num(euros)} {'euro' if euros == 1 else 'euros'}"
    if cents:
        es, en = f"{es} con {_num(cents, 'es')}", f"{en} {en_num(cents)}"
    return es, en


# --- slots: each maps a value key to (Spanish, English) -----------------------------------------
@dataclass(frozen=True)
class Slot:
    name: str
    keys: tuple
    render: object  # key -> (es, en)


def _table(name, rows, es=1, en=2):
    d = {r[0]: (r[es], r[en]) for r in rows}
    return Slot(name, tuple(d), d.__getitem__)


def _counted(name, lo, hi, es_noun, en_noun, feminine=False):
    return Slot(name, tuple(range(lo, hi + 1)), lambda n: (f"{es_count(n, feminine)} {es_noun}", f"{en_num(n)} {en_noun}"))


SLOTS = {s.name: s for s in [
    _table("place", PLACES), _table("vehicle", VEHICLES), _table("direction", DIRECTIONS), _table("relation", RELATIONS),
    _table("item", ITEMS, 1, 3), _table("item_def", ITEMS, 2, 4),
    Slot("day", tuple(d[0] for d in DAYS), lambda k: next((es, en) for en, es, _ in DAYS if en == k)),
    Slot("days", tuple(d[0] for d in DAYS), lambda k: next((f"los {pl}", f"{en}s") for en, _, pl in DAYS if en == k)),
    Slot("time", tuple((h, m) for h in range(1, 13) for m in MINUTES), lambda k: time_pair(*k)),
    Slot("date", tuple((d, m) for m in range(12) for d in range(1, 29)), lambda k: date_pair(*k)),
    Slot("price", tuple((e, c) for e in range(2, 121) for c in CENTS), lambda k: price_pair(*k)),
    _counted("minutes", 2, 30, "minutos", "minutes"), _counted("tickets", 2, 12, "billetes", "tickets"),
    _counted("people", 2, 12, "personas", "people", feminine=True), _counted("nights", 2, 14, "noches", "nights", feminine=True),
    _counted("days_stay", 2, 21, "días", "days"),
    Slot("platform", tuple(range(1, 21)), lambda n: (_num(n, "es"), en_num(n))),
    Slot("room", tuple(range(101, 131)) + tuple(range(201, 231)), lambda n: (_num(n, "es"), en_num(n))),
]}
SLOTS["place2"] = Slot("place2", SLOTS["place"].keys, SLOTS["place"].render)
SLOTS["direction2"] = Slot("direction2", SLOTS["direction"].keys, SLOTS["direction"].render)

# (name, Spanish, English); {slot} names a slot of SLOTS
FRAMES = [
    ("where_is", "¿dónde está {place}?", "where is {place}?"),
    ("how_get", "¿cómo llego a {place}?", "how do I get to {place}?"),
    ("is_far", "¿está lejos {place}?", "is {place} far?"),
    ("walk", "{place} está a {minutes} a pie", "{place} is {minutes} on foot"),
    ("to_get", "para ir a {place}, {direction}", "to get to {place}, {direction}"),
    ("then", "{direction} y luego {direction2}", "{direction} and then {direction2}"),
    ("relative", "{place} está {relation} {place2}", "{place} is {relation} {place2}"),
    ("leaves", "{vehicle} sale a {time}", "{vehicle} leaves at {time}"),
    ("arrives", "{vehicle} llega a {time}", "{vehicle} arrives at {time}"),
    ("leaves_day", "{vehicle} sale el {day} a {time}", "{vehicle} leaves on {day} at {time}"),
    ("goes_to", "¿{vehicle} va a {place}?", "does {vehicle} go to {place}?"),
    ("platform", "{vehicle} sale del andén {platform}", "{vehicle} leaves from platform {platform}"),
    ("opens", "{place} abre a {time}", "{place} opens at {time}"),
    ("closes", "{place} cierra a {time}", "{place} closes at {time}"),
    ("closed_on", "{place} cierra {days}", "{place} is closed on {days}"),
    ("would_like", "quisiera {item}, por favor", "I would like {item}, please"),
    ("how_much", "¿cuánto cuesta {item_def}?", "how much is {item_def}?"),
    ("costs", "{item_def} cuesta {price}", "{item_def} costs {price}"),
    ("that_is", "son {price}, por favor", "that is {price}, please"),
    ("tickets_to", "necesito {tickets} para {place}", "I need {tickets} to {place}"),
    ("table", "una mesa para {people}, por favor", "a table for {people}, please"),
    ("room_nights", "quiero una habitación para {nights}", "I want a room for {nights}"),
    ("stay", "nos quedamos {days_stay}", "we are staying for {days_stay}"),
    ("arrive_day", "llegamos el {day}", "we arrive on {day}"),
    ("leave_date", "nos vamos {date}", "we leave on {date}"),
    ("flight_date", "mi vuelo es {date} a {time}", "my flight is on {date} at {time}"),
    ("meet", "nos vemos en {place} a {time}", "see you at {place} at {time}"),
    ("meet_day", "nos vemos el {day} en {place}", "see you on {day} at {place}"),
    ("room_number", "mi habitación es la {room}", "my room is number {room}"),
    ("have", "solo tengo {price}", "I only have {price}"),
]
_SLOT_RE = re.compile(r"\{(\w+)\}")


def frame_slots(es: str) -> list[str]:
    return _SLOT_RE.findall(es)


def contract(es: str) -> str:
    """Spanish `a el` -> `al`, `de el` -> `del` (the article, not the accented pronoun `él`)."""
    return re.sub(r"\b(a|de) el\b", lambda m: m.group(1) + "l" if m.group(1) == "a" else "del", es)


@dataclass(frozen=True)
class TravelPair:
    es: str
    en: str
    frame: str
    values: tuple  # ((slot, key), ...) in the frame's slot order

    def combos(self) -> set:
        return {(self.frame, s, k) for s, k in self.values}


def render(frame: str, values: dict) -> TravelPair:
    _, es_t, en_t = next(f for f in FRAMES if f[0] == frame)
    es_v = {s: SLOTS[s].render(k)[0] for s, k in values.items()}
    en_v = {s: SLOTS[s].render(k)[1] for s, k in values.items()}
    es, en = contract(es_t.format(**es_v)), en_t.format(**en_v)
    return TravelPair(es, en, frame, tuple((s, values[s]) for s in frame_slots(es_t)))


def sample(rng: random.Random) -> TravelPair:
    name, es_t, _ = rng.choice(FRAMES)
    values = {}
    for s in frame_slots(es_t):
        keys = SLOTS[s].keys
        k = rng.choice(keys)
        while s.endswith("2") and k == values.get(s[:-1]):  # `the bank is next to the bank`
            k = rng.choice(keys)
        values[s] = k
    return render(name, values)


def held_out(seed: int, test_share: float = 0.15, dev_share: float = 0.08) -> tuple[set, set]:
    """Seeded (frame, slot, value) combinations kept out of training: (for test, for dev)."""
    rng = random.Random(seed * 7919 + 17)
    test, dev = set(), set()
    for name, es_t, _ in FRAMES:
        for s in frame_slots(es_t):
            keys = list(SLOTS[s].keys)
            rng.shuffle(keys)
            n_test, n_dev = max(1, round(test_share * len(keys))), max(1, round(dev_share * len(keys)))
            test |= {(name, s, k) for k in keys[:n_test]}
            dev |= {(name, s, k) for k in keys[n_test : n_test + n_dev]}
    return test, dev


def words(text: str) -> set[str]:
    return set(re.findall(r"[^\W\d_]+(?:'\w+)?", text.lower()))


def travel_pairs(n_train: int, n_dev: int, n_test: int, seed: int = 0, max_draws: int = 1_000_000) -> dict[str, list[TravelPair]]:
    """Distinct pairs split by held-out combinations (see the module docstring); the fixed phrases go to training."""
    test_held, dev_held = held_out(seed)
    rng = random.Random(seed)
    out: dict[str, list[TravelPair]] = {s: [] for s in SPLITS}
    out["train"] = [TravelPair(es, en, "phrase", (("phrase", en),)) for es, en in PHRASES][:n_train]
    seen = {p.es for p in out["train"]}
    # dev and test are drawn half again as large: the vocabulary filter below drops a few
    want = {"train": n_train, "dev": -(-3 * n_dev // 2), "test": -(-3 * n_test // 2)}
    for _ in range(max_draws):
        if all(len(out[s]) >= want[s] for s in SPLITS):
            break
        p = sample(rng)
        if p.es in seen:
            continue
        c = p.combos()
        split = "test" if c & test_held else "dev" if c & dev_held else "train"
        if len(out[split]) < want[split]:
            seen.add(p.es)
            out[split].append(p)
    else:
        raise ValueError(f"the domain ran out of distinct pairs: {[len(out[s]) for s in SPLITS]} of {[want[s] for s in SPLITS]}")
    # every word of a dev/test pair must occur in training: the combination is new, its words are not
    es_vocab = set().union(*(words(p.es) for p in out["train"]))
    en_vocab = set().union(*(words(p.en) for p in out["train"]))
    for s in ("dev", "test"):
        out[s] = [p for p in out[s] if words(p.es) <= es_vocab and words(p.en) <= en_vocab][: n_dev if s == "dev" else n_test]
    return out


def held_label(p: TravelPair, held: set) -> str:
    hits = sorted(p.combos() & held, key=str)
    return ";".join(f"{f}:{s}={k if not isinstance(k, tuple) else '/'.join(map(str, k))}" for f, s, k in hits)


def travel_corpus(out: str | Path, n_train: int = 4000, n_dev: int = 200, n_test: int = 300, seed: int = 0,
                  progress: bool = True) -> dict[str, Path]:
    """Speak the pairs (Spanish: espeak-ng es; English: piper joe) into manifests; audio already on disk is kept."""
    out = Path(out)
    stamp_corpus(out, "travel.json", {"seed": seed, "train": n_train, "dev": n_dev, "test": n_test})
    pairs = travel_pairs(n_train, n_dev, n_test, seed)
    tts = {"src": Espeak("es"), "tgt": Piper()}
    rng = random.Random(seed + 1)
    held = set().union(*held_out(seed))
    jobs = [(split, side, f"tv{split[:2]}{i:05d}", p) for split in SPLITS for i, p in enumerate(pairs[split]) for side in ("src", "tgt")]
    manifests: dict[str, list[dict]] = {}
    with Progress("travel pairs", len(jobs), enabled=progress) as bar:
        for split, side, uid, p in jobs:
            speed = rng.uniform(0.9, 1.1)  # drawn for every job, so a resumed run speaks the rest alike
            text = p.es if side == "src" else p.en
            rel = Path("audio") / f"es2en_{split}_{side}" / f"{uid}.flac"
            path = out / rel
            if path.is_file():
                n = sf.info(str(path)).frames
            else:
                audio = tts[side](text, speed)
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, lambda tmp: sf.write(tmp, audio, RATE, subtype="PCM_16"))
                n = len(audio)
            manifests.setdefault(f"es2en_{split}_{side}", []).append(
                {"id": uid, "audio": str(rel), "n_frames": n, "text": text, "frame": p.frame, "held": held_label(p, held)})
            bar.update(advance=1)
    return write_manifests(out, manifests)


def main() -> None:
    ap = argparse.ArgumentParser(description="Spanish -> English travel-domain pairs, spoken (see the module docstring)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--dev", type=int, default=200)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text-only", action="store_true", help="print the pairs as TSV (split, frame, es, en) and stop")
    args = ap.parse_args()
    if args.text_only:
        for split, ps in travel_pairs(args.train, args.dev, args.test, args.seed).items():
            for p in ps:
                print(f"{split}\t{p.frame}\t{p.es}\t{p.en}")
        return
    for name, path in travel_corpus(args.out, args.train, args.dev, args.test, args.seed).items():
        print(name, path)


if __name__ == "__main__":
    main()
