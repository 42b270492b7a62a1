"""Writes the demo's data (everything under data/ except this script and README.md), deterministically.

    python data/make_data.py            # rewrites the files
    python data/make_data.py --check    # exits 1 if the committed files differ from what it would write

Nothing is downloaded or copied: every word list, sentence template and product below was written for
lorafuse, and the texts are recombined from them with a fixed seed (Python's random.Random, whose
sequence for a given seed is stable across Python versions for the calls used here).

Written:
  corpus/town.txt, corpus/workshops.txt, corpus/market.txt
      plain English prose about a market town, its makers and the goods they make (the base model's
      pre-training corpus); the words of the product tasks (materials, items, rooms) occur in it.
  product_descriptions.json, product_descriptions_eval.json
      task A (Alpaca format): product name and category -> a two-sentence description in one house style.
  product_features.json, product_features_eval.json
      task B (Alpaca format): the same kind of input -> three key features as a bulleted list.
  The eval files hold products that appear in neither training file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 20261122
N_TRAIN = 480  # training records per task
N_EVAL = 60  # held-out records per task (products not in any training file)

# ---------------------------------------------------------------------------------------------------------
# Products: brand + material + item. Each item has the category it belongs to, what it is for (task A) and
# features (task B); each material has the phrase of the house style (task A) and a feature line (task B).
# ---------------------------------------------------------------------------------------------------------

BRANDS = [
    "Harbor", "Summit", "Meadow", "Northwind", "Willow", "Ember", "Cedar", "Juniper", "Lark", "Maple Hill",
    "Riverstone", "Fernhill", "Bluebell", "Copperfield", "Oakridge", "Saltmarsh", "Thistle", "Kestrel",
    "Brightwater", "Hollow Pine", "Wren", "Tidewater", "Falcon", "Aster", "Granite Bay", "Sunhaven",
    "Foxglove", "Heron", "Moorland", "Quayside",
]  # fmt: skip

MATERIALS = {
    # name: (task A phrase, task B feature, kind)
    "oak": ("solid oak", "Made from solid oak", "wood"),
    "walnut": ("rich dark walnut", "Rich dark walnut finish", "wood"),
    "bamboo": ("sustainable bamboo", "Sustainable bamboo that grows back fast", "wood"),
    "steel": ("brushed stainless steel", "Stainless steel that never rusts", "metal"),
    "copper": ("polished copper", "Polished copper with a warm glow", "metal"),
    "enamel": ("chip-resistant enamel", "Tough enamel that resists chips", "metal"),
    "ceramic": ("hand-glazed ceramic", "Hand-glazed ceramic, no two alike", "earth"),
    "stone": ("honed natural stone", "Honed natural stone, heavy and calm", "earth"),
    "glass": ("clear tempered glass", "Clear tempered glass that takes the heat", "earth"),
    "cork": ("light natural cork", "Light natural cork, soft to the touch", "earth"),
    "linen": ("soft washed linen", "Soft washed linen that breathes", "cloth"),
    "cotton": ("organic cotton", "Organic cotton, soft and strong", "cloth"),
    "wool": ("warm merino wool", "Warm merino wool", "cloth"),
    "leather": ("full-grain leather", "Full-grain leather that softens with use", "cloth"),
    "canvas": ("heavy waxed canvas", "Waxed canvas that sheds the rain", "cloth"),
}

ADJECTIVES = {
    "wood": ["handsome", "sturdy", "classic"],
    "metal": ["durable", "sleek", "hard-wearing"],
    "earth": ["elegant", "timeless", "beautiful"],
    "cloth": ["soft", "cosy", "practical"],
}

# category: [(item, what it is for, [three features], [materials])]
ITEMS = {
    "Kitchen": [
        ("cutting board", "chopping vegetables and slicing bread",
         ["Juice groove around the edge", "Reversible work surface", "Rubber feet that stop slipping"],
         ["oak", "walnut", "bamboo"]),
        ("mixing bowl", "whisking batter and tossing salads",
         ["Wide rim for an easy grip", "Nests inside the other bowls", "Flat base that stays steady"],
         ["ceramic", "steel", "glass"]),
        ("tea kettle", "boiling water for tea",
         ["Whistles when the water boils", "Cool-touch handle", "Works on every stove"],
         ["steel", "copper", "enamel"]),
        ("chef knife", "slicing, dicing and mincing",
         ["Razor sharp blade", "Perfectly balanced weight", "Comfortable grip"],
         ["steel"]),
        ("spice rack", "keeping jars of spice in order",
         ["Holds twelve jars", "Hangs on a wall or stands on a shelf", "Labels included"],
         ["bamboo", "oak", "steel"]),
        ("coffee mug", "morning coffee and evening cocoa",
         ["Holds a generous cup", "Keeps drinks warm for longer", "Microwave safe"],
         ["ceramic", "enamel", "glass"]),
        ("bread box", "keeping bread fresh for days",
         ["Roll-top lid", "Air vents at the back", "Room for two loaves"],
         ["bamboo", "oak", "enamel"]),
        ("salad bowl", "serving salads at the family table",
         ["Generous size for six people", "Matching servers included", "Easy to clean"],
         ["walnut", "bamboo", "ceramic"]),
    ],
    "Garden": [
        ("watering can", "watering seedlings and potted plants",
         ["Long spout for gentle watering", "Holds five litres", "Removable rose head"],
         ["steel", "copper", "enamel"]),
        ("plant pot", "growing herbs and houseplants",
         ["Drainage hole with a saucer", "Frost resistant", "Comes in three sizes"],
         ["ceramic", "stone", "cork"]),
        ("pruning shears", "trimming roses and shrubs",
         ["Sharp bypass blades", "Safety lock", "Spring-loaded handles"],
         ["steel"]),
        ("garden trowel", "planting bulbs and digging small holes",
         ["Depth marks on the blade", "Hanging hole in the handle", "Rust resistant"],
         ["steel", "copper"]),
        ("bird feeder", "feeding garden birds all year",
         ["Weatherproof roof", "Easy to refill", "Hangs from any branch"],
         ["oak", "bamboo", "copper"]),
        ("garden kneeler", "kneeling in comfort while weeding",
         ["Thick padding for your knees", "Carry handle", "Wipes clean in seconds"],
         ["cork", "canvas"]),
    ],
    "Office": [
        ("desk lamp", "reading and late-night work",
         ["Adjustable arm", "Warm white light", "Weighted base"],
         ["steel", "copper", "oak"]),
        ("notebook", "notes, sketches and lists",
         ["Two hundred lined pages", "Lies flat when open", "Ribbon bookmark"],
         ["leather", "linen", "cork"]),
        ("pen holder", "keeping pens and pencils at hand",
         ["Four compartments", "Weighted so it never tips", "Felt-lined base"],
         ["oak", "ceramic", "cork", "walnut"]),
        ("letter tray", "sorting papers and mail",
         ["Stackable design", "Fits A4 paper", "Raised edges"],
         ["oak", "bamboo", "steel"]),
        ("bookend", "holding books upright on a shelf",
         ["Sold as a pair", "Non-slip base", "Heavy enough for large books"],
         ["stone", "walnut", "steel"]),
    ],
    "Home": [
        ("throw blanket", "cosy evenings on the sofa",
         ["Generous size", "Fringed edges", "Machine washable"],
         ["wool", "cotton", "linen"]),
        ("wall clock", "keeping time in the living room",
         ["Silent sweep movement", "Easy-to-read numbers", "Runs on one battery"],
         ["oak", "walnut", "copper"]),
        ("candle holder", "lighting up the dinner table",
         ["Fits standard candles", "Catches dripping wax", "Stable wide base"],
         ["copper", "glass", "ceramic", "stone"]),
        ("picture frame", "showing off favourite photos",
         ["Stands or hangs", "Glass front", "Holds a ten by fifteen photo"],
         ["oak", "walnut", "copper"]),
        ("storage basket", "tidying toys, blankets and magazines",
         ["Sturdy handles", "Folds flat when empty", "Soft inner lining"],
         ["cotton", "canvas", "bamboo"]),
        ("floor cushion", "extra seats on movie nights",
         ["Removable cover", "Firm filling that keeps its shape", "Carry strap"],
         ["linen", "wool", "cotton"]),
    ],
    "Bath": [
        ("bath towel", "drying off after a hot bath",
         ["Extra absorbent", "Quick drying", "Hanging loop"],
         ["cotton", "linen"]),
        ("soap dish", "keeping soap dry between uses",
         ["Drainage slots", "Easy to clean", "Non-slip base"],
         ["ceramic", "bamboo", "stone"]),
        ("bath mat", "stepping out of the shower",
         ["Absorbs water fast", "Non-slip backing", "Machine washable"],
         ["cotton", "cork", "bamboo"]),
        ("toothbrush cup", "keeping toothbrushes tidy by the sink",
         ["Holds four brushes", "Drains dry", "Wide mouth for easy cleaning"],
         ["ceramic", "glass", "stone"]),
    ],
    "Travel": [
        ("backpack", "day trips and daily commutes",
         ["Padded laptop sleeve", "Water resistant", "Side bottle pockets"],
         ["canvas", "leather"]),
        ("duffel bag", "weekend trips away",
         ["Detachable shoulder strap", "Fits in overhead lockers", "Separate shoe pocket"],
         ["canvas", "leather"]),
        ("water bottle", "staying hydrated on the go",
         ["Keeps drinks cold all day", "Leak-proof lid", "Fits cup holders"],
         ["steel", "glass"]),
        ("passport wallet", "keeping tickets and passports together",
         ["Six card slots", "Zip pocket for coins", "Slim enough for a pocket"],
         ["leather", "canvas", "cork"]),
        ("toiletry bag", "packing soap, brushes and bottles",
         ["Waterproof lining", "Hanging hook", "Mesh pockets inside"],
         ["canvas", "leather", "cotton"]),
    ],
    "Outdoor": [
        ("camping lantern", "lighting the campsite after dark",
         ["Three brightness levels", "Folding carry handle", "Runs for twenty hours"],
         ["steel", "copper"]),
        ("picnic blanket", "lunches in the park",
         ["Waterproof backing", "Folds into a carry case", "Seats four people"],
         ["wool", "cotton", "canvas"]),
        ("hammock", "lazy afternoons between two trees",
         ["Holds up to two hundred kilos", "Hanging straps included", "Packs into its own pouch"],
         ["cotton", "canvas"]),
        ("folding stool", "resting on long walks and fishing trips",
         ["Folds flat in one move", "Light enough to carry all day", "Strong steady legs"],
         ["oak", "steel", "bamboo"]),
        ("camp mug", "hot drinks around the fire",
         ["Stackable", "Handle stays cool", "Hangs from a backpack"],
         ["enamel", "steel"]),
    ],
    "Pets": [
        ("dog bowl", "mealtimes for dogs of every size",
         ["Non-slip rubber ring", "Dishwasher safe", "Heavy enough not to tip"],
         ["ceramic", "steel"]),
        ("cat bed", "naps in a warm corner",
         ["Raised sides", "Removable cushion", "Washable cover"],
         ["wool", "cotton", "linen"]),
        ("dog lead", "daily walks in town and country",
         ["Padded handle", "Strong brass clip", "Reflective stitching"],
         ["leather", "canvas"]),
        ("pet blanket", "keeping sofas and car seats clean",
         ["Machine washable", "Soft on both sides", "Folds small for travel"],
         ["wool", "cotton"]),
    ],
}  # fmt: skip

CLOSERS = {
    "Kitchen": ["it will earn its place in your kitchen", "it is built for years of daily cooking"],
    "Garden": ["it is made to handle every season outdoors", "it makes garden work a pleasure"],
    "Office": ["it keeps your desk calm and tidy", "it brings quiet order to your workspace"],
    "Home": ["it adds warmth to any room", "it makes every room feel like home"],
    "Bath": ["it turns bath time into a small treat", "it brings a spa feeling to your bathroom"],
    "Travel": ["it is ready for every journey", "it goes wherever you go"],
    "Outdoor": ["it is made for life outdoors", "it is ready for your next adventure"],
    "Pets": ["your pet will love it", "it is made for happy pets and their people"],
}

# Instructions. SHARED appears in both tasks (a quarter of the records), so the same prompt can be answered
# in either style: which one is up to the adapter. The demo's prompt uses it.
SHARED_INSTRUCTION = "Write copy for this product."
INSTRUCTIONS = {
    "descriptions": [
        "Write a product description.",
        "Describe this product for the catalogue.",
        "Write a short description of this item.",
    ],
    "features": [
        "List three key features.",
        "Give three selling points for this item.",
        "What are the key features of this product?",
    ],
}


def title(words: str) -> str:
    return " ".join(w[:1].upper() + w[1:] for w in words.split(" "))


def all_products() -> List[Dict[str, str]]:
    products = []
    for category, items in ITEMS.items():
        for item, use, features, materials in items:
            for material in materials:
                for brand in BRANDS:
                    products.append(
                        dict(
                            name=f"{brand} {title(material)} {title(item)}",
                            category=category,
                            item=item,
                            material=material,
                            use=use,
                        )
                    )
    return products


def features_of(item: str) -> List[str]:
    for items in ITEMS.values():
        for name, _, features, _ in items:
            if name == item:
                return features
    raise KeyError(item)


def description(p: Dict[str, str], rng: random.Random) -> str:
    phrase, _, kind = MATERIALS[p["material"]]
    adjective = rng.choice(ADJECTIVES[kind])
    article = "an" if adjective[0] in "aeiou" else "a"
    closer = rng.choice(CLOSERS[p["category"]])
    return (
        f"The {p['name']} is {article} {adjective} {p['item']} made of {phrase}. "
        f"It is perfect for {p['use']}, and {closer}."
    )


def feature_list(p: Dict[str, str], rng: random.Random) -> str:
    _, material_feature, _ = MATERIALS[p["material"]]
    picked = rng.sample(features_of(p["item"]), 2)
    return "\n".join(f"- {line}" for line in [material_feature] + picked)


def product_input(p: Dict[str, str]) -> str:
    return f"Product: {p['name']}\nCategory: {p['category']}"


def instruction_sets(rng: random.Random) -> Dict[str, List[Dict[str, str]]]:
    products = all_products()
    rng.shuffle(products)
    chosen = products[: N_TRAIN + N_EVAL]
    out: Dict[str, List[Dict[str, str]]] = {}
    for task, render in (("descriptions", description), ("features", feature_list)):
        records = []
        for i, p in enumerate(chosen):
            shared = rng.random() < 0.25 or i == N_TRAIN  # the first eval record: the demo's prompt
            instruction = SHARED_INSTRUCTION if shared else rng.choice(INSTRUCTIONS[task])
            records.append(dict(instruction=instruction, input=product_input(p), output=render(p, rng)))
        out[f"product_{task}.json"] = records[:N_TRAIN]
        out[f"product_{task}_eval.json"] = records[N_TRAIN:]
    return out


# ---------------------------------------------------------------------------------------------------------
# The corpus: three kinds of prose about a market town, its makers and their goods.
# ---------------------------------------------------------------------------------------------------------

NAMES = [
    "Ada", "Tomas", "Mira", "Jonah", "Elsa", "Rafael", "Nell", "Oskar", "Lena", "Hugo", "Ines", "Pavel",
    "Greta", "Bram", "Ottilie", "Silas", "Marta", "Felix", "Rosa", "Anton",
]  # fmt: skip
TRADES = [
    "baker", "potter", "weaver", "carpenter", "blacksmith", "tailor", "glassblower", "shoemaker", "gardener",
    "miller", "cooper", "bookbinder", "candlemaker", "tanner", "coppersmith", "basket maker",
]  # fmt: skip
PLACES = [
    "in the market square", "down by the harbour", "at the mill by the river", "on the old stone bridge",
    "in the orchard behind the church", "in the workshop on Lantern Street", "near the clock tower",
    "at the inn on the hill", "by the town well", "under the arches of the covered market",
    "along the canal path", "in the walled garden", "outside the school",
]  # fmt: skip
TIMES = [
    "In the morning", "At dawn", "Before the market opened", "On rainy afternoons", "In late autumn",
    "Every Saturday", "Long after dark", "At the start of spring", "During the harvest",
    "On the first cold day", "When the bells rang noon", "Once a month",
]  # fmt: skip
ACTIONS = [
    "sanded an oak cutting board until it was smooth", "glazed a row of ceramic bowls",
    "stitched the seams of a leather bag", "wove a linen blanket on the big loom",
    "polished a copper kettle until it shone", "sharpened the kitchen knives", "mended a broken chair",
    "packed baskets of apples for the market", "carved a spoon from a piece of walnut",
    "hammered a steel hinge into shape", "dyed a length of wool in a pot of onion skins",
    "cut canvas for a new set of sails", "fired the kiln and waited", "counted the coins in the till",
    "swept the shavings from the workshop floor", "hung a lantern over the door",
    "planted herbs in clay pots along the window", "tied bundles of bamboo canes",
    "pressed cork into the necks of bottles", "wrapped a glass vase in straw",
]  # fmt: skip
SAYINGS = [
    "a good tool pays for itself twice", "wood remembers every cut", "a tidy bench makes a calm mind",
    "nothing is finished until it is useful", "cheap things are dear in the end",
    "the river takes its time and so should we", "a gift made by hand is a gift twice over",
    "you can tell a town by its bread", "the best work is done before breakfast",
]  # fmt: skip
WEATHER = [
    "The wind came off the sea and smelled of salt.", "Rain drummed on the tiled roofs all day.",
    "A thin frost covered the cobbles.", "The sun warmed the stones of the square.",
    "Fog rolled up the river and hid the bridge.", "Swallows circled above the granary.",
    "Snow fell softly on the market stalls.", "The evening light turned the canal to gold.",
]  # fmt: skip
GOODS = [
    "cutting boards", "mixing bowls", "copper kettles", "linen towels", "wool blankets", "leather bags",
    "glass jars", "clay plant pots", "bamboo baskets", "candle holders", "wall clocks", "notebooks",
    "garden trowels", "watering cans", "picnic blankets", "coffee mugs", "soap dishes", "dog bowls",
    "spice racks", "bread boxes", "lanterns", "canvas backpacks", "cork mats", "stone bookends",
]  # fmt: skip
MATERIAL_NOTES = {
    "oak": "Oak is heavy and strong, and it darkens slowly as the years pass.",
    "walnut": "Walnut is dark and fine, and it takes a polish like still water.",
    "bamboo": "Bamboo grows back in a few years, so a bamboo board costs the forest very little.",
    "steel": "Steel does not rust when it is kept clean and dry, and it keeps an edge for a long time.",
    "copper": "Copper carries heat quickly, which is why cooks love copper pans and kettles.",
    "enamel": "Enamel is glass melted onto metal, hard and bright, though a hard knock can chip it.",
    "ceramic": "Clay becomes ceramic in the kiln, and the glaze makes it smooth and easy to wash.",
    "stone": "Stone is heavy and cool, and a stone bookend will hold up the largest books.",
    "glass": "Glass lets the light through, and tempered glass can take boiling water.",
    "cork": "Cork is the bark of an oak tree, light and springy, and it grows back after harvest.",
    "linen": "Linen is spun from flax; it is cool in summer and softer with every wash.",
    "cotton": "Cotton is soft and strong, and it drinks up water, which makes it right for towels.",
    "wool": "Wool keeps you warm even when it is damp, and it hardly ever smells.",
    "leather": "Good leather softens with use and lasts for many years if it is oiled.",
    "canvas": "Canvas is a heavy cloth; rubbed with wax, it sheds the rain like a duck.",
}
STEPS = {
    # thing: (who makes it, the four steps)
    "cutting board": ("carpenter", ["chose a dry plank of hardwood", "cut it to size", "sanded both faces",
                                    "rubbed in food-safe oil"]),
    "mixing bowl": ("potter", ["threw the clay on the wheel", "trimmed the foot", "dipped it in glaze",
                               "fired it in the kiln"]),
    "tea kettle": ("coppersmith", ["cut the copper sheet", "raised the body with a hammer",
                                   "fitted the spout", "riveted on the handle"]),
    "linen blanket": ("weaver", ["spun the flax into thread", "set up the loom", "wove the cloth",
                                 "washed it until it was soft"]),
    "leather bag": ("tanner", ["cut the hide with a sharp knife", "punched the stitching holes",
                               "sewed the seams with waxed thread", "oiled the finished bag"]),
    "glass jar": ("glassblower", ["gathered molten glass on the pipe", "blew it into a bubble",
                                  "shaped the neck", "let it cool slowly overnight"]),
    "watering can": ("blacksmith", ["cut the steel sheet", "rolled the body", "soldered the spout",
                                    "painted the seams"]),
    "bamboo basket": ("basket maker", ["split the bamboo canes", "soaked the strips", "wove the base",
                                       "bound the rim"]),
    "wool blanket": ("weaver", ["washed the fleece", "carded and spun the wool", "wove the blanket",
                                "brushed it to raise the nap"]),
    "candle holder": ("coppersmith", ["cast the brass in a sand mould", "filed away the rough edges",
                                      "drilled the socket", "polished it to a shine"]),
}  # fmt: skip
PRICES = [
    "two coins",
    "three coins",
    "five coins",
    "half a silver piece",
    "one silver piece",
    "a basket of eggs",
]
FOR_CATEGORY = {
    "Kitchen": "for the kitchen",
    "Garden": "for the garden",
    "Office": "for the office",
    "Home": "for the home",
    "Bath": "for the bathroom",
    "Travel": "for travelling",
    "Outdoor": "for the outdoors",
    "Pets": "for a pet",
}
ROOMS = ["kitchen", "garden", "office", "bathroom", "living room", "bedroom", "workshop", "hallway"]


def sentence_town(rng: random.Random) -> str:
    kind = rng.randrange(6)
    name, trade = rng.choice(NAMES), rng.choice(TRADES)
    if kind == 0:
        return f"{rng.choice(TIMES)}, {name} the {trade} {rng.choice(ACTIONS)} {rng.choice(PLACES)}."
    if kind == 1:
        return f"{name} always said that {rng.choice(SAYINGS)}."
    if kind == 2:
        return rng.choice(WEATHER)
    if kind == 3:
        other = rng.choice([n for n in NAMES if n != name])
        return f"{name} met {other} {rng.choice(PLACES)}, and they talked about {rng.choice(GOODS)}."
    if kind == 4:
        return f"The {trade} lived {rng.choice(PLACES)} and worked from first light until supper."
    return f"Children ran {rng.choice(PLACES)} while the {trade} {rng.choice(ACTIONS)}."


def sentence_workshop(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        thing, (trade, steps) = rng.choice(sorted(STEPS.items()))
        return (
            f"To make a {thing}, the {trade} {steps[0]}, then {steps[1]}, {steps[2]}, and finally {steps[3]}."
        )
    if kind == 1:
        return MATERIAL_NOTES[rng.choice(sorted(MATERIAL_NOTES))]
    if kind == 2:
        category = rng.choice(sorted(ITEMS))
        item, _, _, materials = rng.choice(ITEMS[category])
        material = rng.choice(materials)
        adjective = rng.choice(ADJECTIVES[MATERIALS[material][2]])
        article = "an" if adjective[0] in "aeiou" else "a"
        return f"With patience, {material} makes {article} {adjective} {item} {FOR_CATEGORY[category]}."
    if kind == 3:
        category = rng.choice(sorted(ITEMS))
        item, use, features, _ = rng.choice(ITEMS[category])
        return f"A {item} is made for {use}. {features[rng.randrange(3)]} is what buyers ask about first."
    room = rng.choice(ROOMS)
    return f"Every {room} needs a few good things that are {rng.choice(['simple', 'honest', 'well made'])}."


def sentence_market(rng: random.Random) -> str:
    kind = rng.randrange(6)
    name, trade = rng.choice(NAMES), rng.choice(TRADES)
    goods = rng.choice(GOODS)
    if kind == 0:
        return f"At the {trade}'s stall, {goods} sold for {rng.choice(PRICES)} each."
    if kind == 1:
        return f'"Are these {goods} made of {rng.choice(sorted(MATERIALS))}?" asked {name}.'
    if kind == 2:
        return f'"They will last you for years," said the {trade}, and wrapped the {goods} in paper.'
    if kind == 3:
        return f"Buyers came from the villages to look at {goods} and {rng.choice(GOODS)}."
    if kind == 4:
        room = rng.choice(ROOMS)
        return f"{name} bought {goods} for the {room} and carried them home {rng.choice(PLACES)}."
    return f"By noon the {trade} had sold every one of the {goods}, and {rng.choice(WEATHER).lower()}"


def corpus_file(rng: random.Random, make_sentence, target_chars: int, width: int = 100) -> str:
    paragraphs, size = [], 0
    while size < target_chars:
        text = " ".join(make_sentence(rng) for _ in range(rng.randint(3, 6)))
        lines, line = [], ""
        for word in text.split(" "):  # wrap like a text file, at most `width` characters a line
            if line and len(line) + 1 + len(word) > width:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line)
        paragraph = "\n".join(lines)
        paragraphs.append(paragraph)
        size += len(paragraph) + 2
    return "\n\n".join(paragraphs) + "\n"


def corpus(rng: random.Random) -> Dict[str, str]:
    return {
        "corpus/town.txt": corpus_file(rng, sentence_town, 70_000),
        "corpus/workshops.txt": corpus_file(rng, sentence_workshop, 70_000),
        "corpus/market.txt": corpus_file(rng, sentence_market, 70_000),
    }


def build() -> Dict[str, str]:
    """{path relative to data/: file contents}."""
    files = corpus(random.Random(SEED))
    for name, records in instruction_sets(random.Random(SEED + 1)).items():
        files[name] = json.dumps(records, indent=1, ensure_ascii=True) + "\n"
    for name, text in files.items():
        if not text.isascii():
            raise AssertionError(f"{name}: non-ASCII text (the demo's tokenizer is ASCII)")
    return files


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="compare with the files on disk, write nothing")
    args = parser.parse_args()
    files = build()
    stale = []
    for name, text in files.items():
        path = os.path.join(HERE, name)
        if args.check:
            try:
                with open(path, encoding="ascii") as f:
                    if f.read() != text:
                        stale.append(name)
            except FileNotFoundError:
                stale.append(name)
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="ascii", newline="\n") as f:
            f.write(text)
        print(f"wrote data/{name} ({len(text):,d} bytes)")
    if stale:
        print("differs from make_data.py's output: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
