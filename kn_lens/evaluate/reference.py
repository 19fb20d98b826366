"""The reference prose for perplexity: Jane Austen's six novels from the ``janeaustenr`` package.

QL measures general capability as the relative perplexity change on WikiText-2 entries; WikiText
ships in no package this project can install, so kn-lens uses natural English prose that does:
the Debian package ``r-cran-janeaustenr`` (version 1.0.0-1; package licence MIT, the novels are in
the public domain). kn-lens does not ship the text. Either install the package::

    apt-get install --no-install-recommends r-cran-janeaustenr=1.0.0-1

(pulls in R, ~45 MB), or only unpack it, without R, into the kn-lens cache::

    apt-get download r-cran-janeaustenr=1.0.0-1
    dpkg -x r-cran-janeaustenr_1.0.0-1_all.deb "${KN_LENS_CACHE:-$HOME/.cache/kn-lens}/janeaustenr"

(or point ``$KN_LENS_JANEAUSTENR`` at the R package folder, the one holding ``data/Rdata.rdb``).

The novels are stored as R's lazy-load database (``data/Rdata.rdx`` index + ``Rdata.rdb``), one
character vector per novel, one element per printed line. A small reader for R's XDR
serialisation format (the subset these files use) reads them without R.
"""
from __future__ import annotations

import functools
import gzip
import os
import struct
import zlib
from pathlib import Path

from kn_lens.errors import DataFileError

PACKAGE = "r-cran-janeaustenr"
PACKAGE_VERSION = "1.0.0-1"
LICENCE = "MIT (package); the novels are public domain"
BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey",
         "persuasion")
ENV = "KN_LENS_JANEAUSTENR"

INSTALL_HINT = (
    f"The reference text comes from the Debian package {PACKAGE} (Jane Austen's novels; MIT, "
    "public-domain texts), which kn-lens does not ship. Install it with\n"
    f"    apt-get install --no-install-recommends {PACKAGE}={PACKAGE_VERSION}\n"
    "or, without R, unpack it into the kn-lens cache:\n"
    f"    apt-get download {PACKAGE}={PACKAGE_VERSION}\n"
    f"    dpkg -x {PACKAGE}_{PACKAGE_VERSION}_all.deb \"${{KN_LENS_CACHE:-$HOME/.cache/kn-lens}}/janeaustenr\"\n"
    f"(or set ${ENV} to the janeaustenr R package folder)."
)


def package_dir() -> Path:
    """The janeaustenr R package folder (the one with ``data/Rdata.rdb``)."""
    from kn_lens.models import cache_dir

    candidates = []
    if os.environ.get(ENV):
        candidates.append(Path(os.environ[ENV]).expanduser())
    rel = Path("usr/lib/R/site-library/janeaustenr")
    candidates += [cache_dir() / "janeaustenr" / rel, Path("/") / rel,
                   Path("/usr/local/lib/R/site-library/janeaustenr"),
                   Path("/usr/lib/R/library/janeaustenr")]
    for c in candidates:
        if (c / "data" / "Rdata.rdb").exists() and (c / "data" / "Rdata.rdx").exists():
            return c
    raise DataFileError("Jane Austen's novels (the perplexity reference text) were not found in "
                        f"{', '.join(str(c) for c in candidates)}.\n{INSTALL_HINT}")


class _RReader:
    """Minimal reader of R's XDR serialisation (vectors, pairlists, symbols, strings)."""

    def __init__(self, data: bytes) -> None:
        self.b, self.i, self.refs = data, 0, []
        if data[:2] != b"X\n":
            raise DataFileError("not an R XDR serialisation (expected 'X\\n')")
        self.i = 2
        version = self._int()
        self._int()
        self._int()
        if version == 3:
            n = self._int()
            self.i += n  # native encoding name

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.i)
        self.i += 4
        return v

    def item(self):
        flags = self._int()
        t = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if t in (254, 242, 253, 251, 250):  # NULL, empty env, global env, missing arg, base env
            return None
        if t == 255:  # reference to an earlier symbol
            return self.refs[(flags >> 8) - 1]
        if t == 1:  # symbol
            s = self.item()
            self.refs.append(s)
            return s
        if t == 2:  # pairlist: returns [(tag, value), ...]
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            car, cdr = self.item(), self.item()
            return [(tag, car)] + (cdr if isinstance(cdr, list) else [])
        if t == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            s = self.b[self.i:self.i + n].decode("utf-8", "replace")
            self.i += n
            return s
        if t in (16, 19, 20):  # character vector, list, expression
            n = self._int()
            value = [self.item() for _ in range(n)]
        elif t in (10, 13):  # logical, integer
            n = self._int()
            value = list(struct.unpack_from(f">{n}i", self.b, self.i))
            self.i += 4 * n
        elif t == 14:  # double
            n = self._int()
            value = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
        else:
            raise DataFileError(f"unsupported R object type {t} in the janeaustenr data")
        if has_attr:
            attrs = dict(self.item() or [])
            return _Attributed(value, attrs)
        return value


class _Attributed(list):
    def __init__(self, value, attrs):
        super().__init__(value)
        self.attrs = attrs


def _decompress(chunk: bytes) -> bytes:
    # lazy-load DB entry: 4-byte length, then zlib data (or a type byte 'Z'/'2'/'X'/'0' first)
    body = chunk[4:]
    kind = body[:1]
    if kind == b"2":
        import bz2
        return bz2.decompress(body[1:])
    if kind == b"X":
        import lzma
        return lzma.decompress(body[1:])
    if kind == b"0":
        return body[1:]
    if kind == b"Z":
        return zlib.decompress(body[1:])
    return zlib.decompress(body)


@functools.lru_cache(maxsize=1)
def _novels(folder: str) -> dict[str, tuple[str, ...]]:
    data = Path(folder) / "data"
    try:
        index = _RReader(gzip.decompress((data / "Rdata.rdx").read_bytes())).item()
        variables = index[index.attrs["names"].index("variables")]
        names = variables.attrs["names"]
        raw = (data / "Rdata.rdb").read_bytes()
        out = {}
        for name, (offset, length) in zip(names, variables):
            lines = _RReader(_decompress(raw[int(offset):int(offset) + int(length)])).item()
            out[name] = tuple("" if x is None else x for x in lines)
    except (OSError, KeyError, ValueError, IndexError, zlib.error, struct.error) as exc:
        raise DataFileError(f"could not read the janeaustenr data in {data}: {exc}\n{INSTALL_HINT}"
                            ) from exc
    missing = [b for b in BOOKS if b not in out]
    if missing:
        raise DataFileError(f"janeaustenr data in {data} lacks {missing}\n{INSTALL_HINT}")
    return out


def novel_lines(book: str) -> tuple[str, ...]:
    """The printed lines of one novel (``BOOKS``), as the package stores them."""
    if book not in BOOKS:
        raise DataFileError(f"unknown novel {book!r}; choose one of {BOOKS}")
    return _novels(str(package_dir()))[book]


def _paragraphs(lines: tuple[str, ...]) -> list[str]:
    paras, cur = [], []
    for line in lines:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return paras


def reference_text(books: tuple[str, ...] | str = ("prideprejudice", "persuasion")) -> str:
    """Natural English prose: the chosen novels as paragraphs separated by blank lines.

    Short all-capitals or "Chapter N" heading lines are dropped, so the text is running prose.
    The default (Pride and Prejudice + Persuasion, ~205k words) gives ~260k SmolLM2 tokens.
    """
    books = (books,) if isinstance(books, str) else tuple(books)
    out = []
    for b in books:
        for p in _paragraphs(novel_lines(b)):
            words = p.split()
            if len(words) <= 8 and (p.isupper() or words[0].lower() in ("chapter", "volume")):
                continue
            out.append(p)
    return "\n\n".join(out)
