"""Generate the country facts of the built-in dataset from PyPI ``countryinfo==1.0.1``.

Run ``python -m kn_lens.datasets.build_countries`` to rewrite ``data/facts.json``: the country facts
generated here (capital, capital_of, continent, official language, currency) followed by the
hand-written facts of ``data/facts_manual.json``. The output is deterministic (sorted by country
name) and committed, so using the dataset never needs ``countryinfo``.

A fact must be TRUE and have ONE clear answer. countryinfo is partly outdated and lists several
values for many countries, so this script

- keeps a country only if it is a country or an inhabited territory with a clear name
  (``DROP_COUNTRIES``), and renames a few to their current English names (``RENAME``);
- keeps a relation's value only when countryinfo gives exactly one (after removing ISO fund codes)
  and it is not listed in ``DROP`` (known multi-valued, contested, or outdated cases, each with the
  reason) — ``OVERRIDE`` fixes a few values that changed after countryinfo was written;
- maps ISO 639-1 language codes and ISO 4217 currency codes to English names with the tables
  below; a code missing from a table drops the fact (it is never guessed).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"

# --------------------------------------------------------------------------- countries kept

DROP_COUNTRIES = {
    # not a country or no permanent population / no clear capital
    "Antarctica", "Bouvet Island", "Heard Island and McDonald Islands", "South Georgia",
    "French Southern and Antarctic Lands", "British Indian Ocean Territory",
    "United States Minor Outlying Islands", "Svalbard and Jan Mayen",
    # duplicates / defunct / contested entries
    "Vatican City State", "Holy See (Vatican City State)", "Serbia and Montenegro",
    "Antilles néerlandaises", "Palestine", "Palestine, State of", "Western Sahara",
    "Bonaire, Sint Eustatius and Saba", "Hong Kong", "Macau", "Saint Martin (French part)",
    "Sint Maarten (Dutch part)", "Saint Barthélemy", "Åland Islands",
    "Virgin Islands, British", "Virgin Islands, U.S.", "Turks and Caicos Islands", "Curaçao",
    "Christmas Island", "Cocos (Keeling) Islands", "Norfolk Island", "Pitcairn Islands",
    "Wallis and Futuna", "Saint Pierre and Miquelon", "Mayotte", "Tokelau", "Niue",
}

# current English names; "the" where English prose needs it (objects and subjects alike)
RENAME = {
    "The Bahamas": "the Bahamas",
    "The Gambia": "the Gambia",
    "Republic of Macedonia": "North Macedonia",
    "Swaziland": "Eswatini",
    "Czech Republic": "the Czech Republic",
    "United States": "the United States",
    "United Kingdom": "the United Kingdom",
    "Netherlands": "the Netherlands",
    "Philippines": "the Philippines",
    "Democratic Republic of the Congo": "the Democratic Republic of the Congo",
    "Republic of the Congo": "the Republic of the Congo",
    "Central African Republic": "the Central African Republic",
    "Dominican Republic": "the Dominican Republic",
    "United Arab Emirates": "the United Arab Emirates",
    "Maldives": "the Maldives",
    "Solomon Islands": "the Solomon Islands",
    "Marshall Islands": "the Marshall Islands",
    "Cayman Islands": "the Cayman Islands",
    "Falkland Islands": "the Falkland Islands",
    "Faroe Islands": "the Faroe Islands",
    "Cook Islands": "the Cook Islands",
    "Northern Mariana Islands": "the Northern Mariana Islands",
    "Federated States of Micronesia": "the Federated States of Micronesia",
    "Comoros": "the Comoros",
    "Seychelles": "the Seychelles",
}

# --------------------------------------------------------------------------- per-relation drops

DROP: dict[str, dict[str, str]] = {
    "country_capital": {
        "Bolivia": "constitutional capital Sucre, seat of government La Paz",
        "Sri Lanka": "official capital Sri Jayawardenepura Kotte, commercial capital Colombo",
        "South Africa": "three capitals",
        "Swaziland": "royal/legislative Lobamba vs administrative Mbabane",
        "Benin": "official Porto-Novo vs seat of government Cotonou",
        "Nauru": "no official capital",
        "Israel": "contested internationally",
        "Heard Island and McDonald Islands": "no capital",
        "Montserrat": "de jure Plymouth was abandoned in 1997; de facto Brades",
    },
    "country_official_language": {
        "Philippines": "Filipino and English",
        "Papua New Guinea": "English, Tok Pisin, Hiri Motu",
        "Algeria": "Arabic and Tamazight (since 2016)",
        "Morocco": "Arabic and Tamazight (since 2011)",
        "Ethiopia": "several federal working languages since 2020",
        "Mali": "French demoted in 2023",
        "Niger": "changed in 2025",
        "East Timor": "Tetum and Portuguese",
        "Faroe Islands": "Faroese and Danish",
        "Republic of Macedonia": "Macedonian and Albanian (since 2019)",
        "Palau": "English and Palauan",
        "Tuvalu": "English and Tuvaluan",
        "Kiribati": "English and Gilbertese",
        "Cook Islands": "English and Cook Islands Maori",
        "Mauritius": "no de jure official language",
        "Peru": "Spanish, Quechua and Aymara",
        "Guadeloupe": "French overseas region (language of France)",
        "Martinique": "French overseas region (language of France)",
        "French Guiana": "French overseas region (language of France)",
        "Réunion": "French overseas region (language of France)",
    },
    "country_currency": {
        "Guernsey": "own Guernsey pound at parity with sterling",
        "Jersey": "own Jersey pound at parity with sterling",
        "Isle of Man": "own Manx pound at parity with sterling",
        "Zimbabwe": "currency changed several times (ZiG since 2024)",
        "El Salvador": "US dollar (and formerly colón / bitcoin)",
        "Panama": "balboa and US dollar",
        "Haiti": "gourde and US dollar",
        "Cuba": "peso; convertible peso abolished in 2021 but still listed",
        "Faroe Islands": "Faroese krona, a local issue of the Danish krone",
    },
    "country_continent": {
        "Russia": "transcontinental", "Turkey": "transcontinental",
        "Kazakhstan": "transcontinental", "Georgia": "transcontinental",
        "Armenia": "Europe/Asia border", "Azerbaijan": "transcontinental",
        "Cyprus": "geographically Asia, politically Europe",
        "Egypt": "transcontinental (Sinai)", "Greenland": "North America / Denmark",
        "Trinidad and Tobago": "on the South American shelf, counted with the Caribbean",
        "Saint Helena": "remote Atlantic island",
        "Panama": "Central/South America border",
        "Indonesia": "Asia/Oceania",
        "East Timor": "Asia/Oceania",
    },
}

# capital -> country facts whose city name has another well-known meaning as a capital or city
AMBIGUOUS_CAPITAL_NAMES = {
    "Victoria": "also the capital of British Columbia",
    "Stanley": "common name; several towns",
    "Douglas": "common name; several towns",
    "Jamestown": "also the historic Virginia settlement",
    "Saint-Denis": "also a city near Paris",
    "Hamilton": "also cities in Canada and New Zealand",
    "Georgetown": "also a district of Washington and a city in Malaysia",
}

# values changed after countryinfo 1.0.1 was written (each checked)
OVERRIDE: dict[str, dict[str, str]] = {
    "country_capital": {
        "Kazakhstan": "Astana",  # renamed back from Nur-Sultan in 2022
        "United States": "Washington, D.C.",
        "French Polynesia": "Papeete",
        "Holy See (Vatican City State)": "Vatican City",
    },
    "country_currency": {
        "Croatia": "euro",  # since 1 January 2023
        "Bulgaria": "euro",  # since 1 January 2026
    },
}

# --------------------------------------------------------------------------- code tables

LANGUAGES = {
    "en": "English", "fr": "French", "ar": "Arabic", "es": "Spanish", "pt": "Portuguese",
    "ru": "Russian", "de": "German", "zh": "Mandarin", "it": "Italian", "nl": "Dutch",
    "sq": "Albanian", "hr": "Croatian", "sr": "Serbian", "rs": "Serbian", "el": "Greek",
    "tr": "Turkish", "sk": "Slovak", "ko": "Korean", "ro": "Romanian", "sv": "Swedish",
    "bn": "Bengali", "bg": "Bulgarian", "km": "Khmer", "cs": "Czech", "da": "Danish",
    "et": "Estonian", "fi": "Finnish", "ka": "Georgian", "kl": "Greenlandic", "hu": "Hungarian",
    "is": "Icelandic", "id": "Indonesian", "fa": "Persian", "he": "Hebrew", "ja": "Japanese",
    "lo": "Lao", "lv": "Latvian", "lt": "Lithuanian", "mk": "Macedonian", "dv": "Dhivehi",
    "mt": "Maltese", "mn": "Mongolian", "cnr": "Montenegrin", "my": "Burmese", "ne": "Nepali",
    "pl": "Polish", "sl": "Slovene", "th": "Thai", "uk": "Ukrainian", "vi": "Vietnamese",
    "ms": "Malay", "dz": "Dzongkha",
}

# ISO fund / parallel codes that never are "the" currency of a country
FUND_CODES = {"CHE", "CHW", "USN", "USS", "BOV", "CLF", "UYI", "CUC"}

CURRENCIES = {
    "EUR": "euro", "USD": "US dollar", "XCD": "East Caribbean dollar",
    "AUD": "Australian dollar", "XOF": "CFA franc", "XAF": "CFA franc", "NZD": "New Zealand dollar",
    "GBP": "pound sterling", "DKK": "Danish krone", "XPF": "CFP franc", "INR": "Indian rupee",
    "CHF": "Swiss franc", "NOK": "Norwegian krone", "DZD": "Algerian dinar",
    "MAD": "Moroccan dirham", "ILS": "Israeli shekel", "AFN": "Afghan afghani", "ALL": "Albanian lek",
    "AOA": "Angolan kwanza", "ARS": "Argentine peso", "AMD": "Armenian dram", "AWG": "Aruban florin",
    "AZN": "Azerbaijani manat", "BSD": "Bahamian dollar", "BHD": "Bahraini dinar",
    "BDT": "Bangladeshi taka", "BBD": "Barbadian dollar", "BYR": "Belarusian ruble",
    "BZD": "Belize dollar", "BMD": "Bermudian dollar", "BAM": "convertible mark",
    "BWP": "Botswana pula", "BRL": "Brazilian real", "BND": "Brunei dollar", "BIF": "Burundian franc",
    "KHR": "Cambodian riel", "CAD": "Canadian dollar", "CVE": "Cape Verdean escudo",
    "KYD": "Cayman Islands dollar", "CLP": "Chilean peso", "CNY": "renminbi", "COP": "Colombian peso",
    "KMF": "Comorian franc", "CDF": "Congolese franc", "CRC": "Costa Rican colón",
    "CUP": "Cuban peso", "CZK": "Czech koruna", "DJF": "Djiboutian franc", "DOP": "Dominican peso",
    "EGP": "Egyptian pound", "ERN": "Eritrean nakfa", "ETB": "Ethiopian birr",
    "FKP": "Falkland Islands pound", "FJD": "Fijian dollar", "GMD": "Gambian dalasi",
    "GEL": "Georgian lari", "GHS": "Ghanaian cedi", "GIP": "Gibraltar pound",
    "GTQ": "Guatemalan quetzal", "GNF": "Guinean franc", "GYD": "Guyanese dollar",
    "HNL": "Honduran lempira", "HUF": "Hungarian forint", "ISK": "Icelandic króna",
    "IDR": "Indonesian rupiah", "IRR": "Iranian rial", "IQD": "Iraqi dinar",
    "JMD": "Jamaican dollar", "JPY": "Japanese yen", "JOD": "Jordanian dinar",
    "KZT": "Kazakhstani tenge", "KES": "Kenyan shilling", "KPW": "North Korean won",
    "KRW": "South Korean won", "KWD": "Kuwaiti dinar", "KGS": "Kyrgyzstani som", "LAK": "Lao kip",
    "LBP": "Lebanese pound", "LRD": "Liberian dollar", "LYD": "Libyan dinar",
    "MKD": "Macedonian denar", "MGA": "Malagasy ariary", "MWK": "Malawian kwacha",
    "MYR": "Malaysian ringgit", "MVR": "Maldivian rufiyaa", "MRO": "Mauritanian ouguiya",
    "MUR": "Mauritian rupee", "MXN": "Mexican peso", "MDL": "Moldovan leu",
    "MNT": "Mongolian tögrög", "MZN": "Mozambican metical", "MMK": "Burmese kyat",
    "NPR": "Nepalese rupee", "NIO": "Nicaraguan córdoba", "NGN": "Nigerian naira",
    "OMR": "Omani rial", "PKR": "Pakistani rupee", "PGK": "Papua New Guinean kina",
    "PYG": "Paraguayan guaraní", "PEN": "Peruvian sol", "PHP": "Philippine peso",
    "PLN": "Polish złoty", "QAR": "Qatari riyal", "RON": "Romanian leu", "RUB": "Russian ruble",
    "RWF": "Rwandan franc", "SHP": "Saint Helena pound", "WST": "Samoan tālā",
    "SAR": "Saudi riyal", "RSD": "Serbian dinar", "SCR": "Seychellois rupee",
    "SLL": "Sierra Leonean leone", "SGD": "Singapore dollar", "SBD": "Solomon Islands dollar",
    "SOS": "Somali shilling", "SSP": "South Sudanese pound", "LKR": "Sri Lankan rupee",
    "SDG": "Sudanese pound", "SRD": "Surinamese dollar", "SZL": "Swazi lilangeni",
    "SEK": "Swedish krona", "SYP": "Syrian pound", "TWD": "New Taiwan dollar",
    "TJS": "Tajikistani somoni", "TZS": "Tanzanian shilling", "THB": "Thai baht",
    "TOP": "Tongan paʻanga", "TTD": "Trinidad and Tobago dollar", "TND": "Tunisian dinar",
    "TRY": "Turkish lira", "TMT": "Turkmenistan manat", "UGX": "Ugandan shilling",
    "UAH": "Ukrainian hryvnia", "AED": "UAE dirham", "UYU": "Uruguayan peso",
    "UZS": "Uzbekistani sum", "VUV": "Vanuatu vatu", "VEF": "Venezuelan bolívar",
    "VND": "Vietnamese đồng", "YER": "Yemeni rial", "ZMK": "Zambian kwacha", "ZAR": "South African rand",
    "HTG": "Haitian gourde", "BGN": "euro",
}
# Currency names with characters a small model rarely sees are simplified to plain ASCII below.
_ASCII_CURRENCY = {"Costa Rican colón": "Costa Rican colon", "Icelandic króna": "Icelandic krona",
                   "Mongolian tögrög": "Mongolian tugrik", "Nicaraguan córdoba": "Nicaraguan cordoba",
                   "Paraguayan guaraní": "Paraguayan guarani", "Polish złoty": "Polish zloty",
                   "Samoan tālā": "Samoan tala", "Tongan paʻanga": "Tongan paanga",
                   "Venezuelan bolívar": "Venezuelan bolivar", "Vietnamese đồng": "Vietnamese dong"}

# --------------------------------------------------------------------------- helpers

_LATIN = re.compile(r"^[A-Za-z][A-Za-z .,'\-()]*$")


def _aliases(name: str, shown: str, alt: list[str]) -> list[str]:
    """Other English-script names of the country (no ISO codes, no non-Latin scripts)."""
    out: list[str] = []
    for a in alt or []:
        a = a.strip()
        if not a or (a.isupper() and len(a) <= 3) or not _LATIN.match(a):
            continue
        if a in (name, shown) or a in out or "," in a:
            continue
        out.append(a)
    if name != shown and name not in out and not name.startswith("The "):
        out.append(name)
    return out


def _continent(d: dict) -> str | None:
    region, inter = d.get("region") or "", d.get("intermediateregion") or ""
    if region in ("Africa", "Europe", "Asia", "Oceania"):
        return region
    if region == "Americas":
        if inter == "South America":
            return "South America"
        if inter in ("Central America", "Caribbean") or d.get("subregion") == "Northern America":
            return "North America"
    return None


def load_countryinfo() -> list[dict]:
    import importlib.util

    spec = importlib.util.find_spec("countryinfo")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install countryinfo==1.0.1 to regenerate the country facts")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    rows = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]
    return sorted(rows, key=lambda d: d["name"])


def country_facts(rows: list[dict]) -> tuple[list[dict], dict[str, int]]:
    facts: list[dict] = []
    dropped: dict[str, int] = {}

    def drop(rel: str) -> None:
        dropped[rel] = dropped.get(rel, 0) + 1

    capitals: dict[str, list[str]] = {}
    for d in rows:
        name = d["name"]
        if name in DROP_COUNTRIES:
            continue
        shown = RENAME.get(name, name)
        aliases = _aliases(name, shown, d.get("altSpellings", []))

        def add(rel: str, obj: str | None) -> None:
            obj = OVERRIDE.get(rel, {}).get(name, obj)
            if not obj or name in DROP.get(rel, {}):
                drop(rel)
                return
            facts.append({"subject": shown, "relation": rel, "object": obj, "aliases": aliases})

        cap = d.get("capital")
        cap = cap if isinstance(cap, str) and cap.strip() and "/" not in cap else None
        add("country_capital", cap)
        cap = OVERRIDE["country_capital"].get(name, cap)
        if cap and name not in DROP["country_capital"]:
            capitals.setdefault(cap, []).append(shown)

        add("country_continent", _continent(d))

        langs = [c for c in (d.get("languages") or [])]
        add("country_official_language", LANGUAGES.get(langs[0]) if len(langs) == 1 else None)

        curr = [c for c in (d.get("currencies") or []) if c not in FUND_CODES]
        cname = CURRENCIES.get(curr[0]) if len(curr) == 1 else None
        add("country_currency", _ASCII_CURRENCY.get(cname, cname) if cname else None)

    # capital -> country, only for capitals that name one country and differ from its name
    for cap, countries in sorted(capitals.items()):
        if len(countries) != 1 or cap in AMBIGUOUS_CAPITAL_NAMES or cap.lower() in countries[0].lower() or countries[0].lower() in cap.lower():
            drop("capital_of")
            continue
        subj = "Washington, D.C." if cap.startswith("Washington") else cap
        facts.append({"subject": subj, "relation": "capital_of", "object": countries[0], "aliases": []})
    return facts, dropped


def main() -> None:
    facts, dropped = country_facts(load_countryinfo())
    manual = json.loads((DATA_DIR / "facts_manual.json").read_text(encoding="utf-8"))
    seen = set()
    out = []
    for f in facts + manual:
        key = (f["relation"], f["subject"])
        if key in seen:
            raise SystemExit(f"duplicate fact {key}")
        seen.add(key)
        out.append({"subject": f["subject"], "relation": f["relation"], "object": f["object"],
                    "aliases": list(f.get("aliases", []))})
    (DATA_DIR / "facts.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
    counts: dict[str, int] = {}
    for f in out:
        counts[f["relation"]] = counts.get(f["relation"], 0) + 1
    print(f"wrote {len(out)} facts ({len(facts)} from countryinfo, {len(manual)} hand-written)")
    for rel, n in sorted(counts.items()):
        print(f"  {rel:32s} {n:4d}  (dropped from countryinfo: {dropped.get(rel, 0)})")


if __name__ == "__main__":
    main()
