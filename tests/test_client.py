"""The Python client and the `codelen score | submit | matrix | plot` commands, against a real
server on a free port (embedded mode, classical compressors: fast and deterministic)."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from client import matrix as matrices
from client.api import AsyncClient, Client, CodelenError, RetryPolicy
from client.plot import clusters
from codelen.cli import main
from codelen.datasets import canonical
from tests.conftest import fast_settings, serve
from workers.compute import pair_tasks

CLASSICAL = "gzip,zstd,lzma"
SCORE_FIELDS = {"model", "bytes", "code_lengths", "conditional", "shared_information", "ncd", "bits_per_byte", "window"}

# Twelve short documents: four topics in three languages. A compressor should group them by
# language (shared words and spelling), whatever the topic.
DOCS = {
    "en_weather": "The weather this week has been unusually cold for the season. On Monday it rained all day, and "
    "the wind was so strong that many trees fell across the roads. The forecast says the sun will return at the "
    "weekend, but the nights will stay cold and there may be frost in the mountains.",
    "en_cooking": "To make a good soup, you should first cut the onions and the carrots into small pieces and cook "
    "them slowly in butter. Then add the potatoes, the water and a little salt, and let everything simmer for "
    "about forty minutes. Serve the soup hot with fresh bread and a piece of cheese.",
    "en_trains": "The train to the capital leaves the station every hour, and the journey takes a little more than "
    "two hours. Passengers who travel often can buy a monthly ticket, which is much cheaper. This morning the "
    "train was late because of a problem with the signals, and many people missed their meetings.",
    "en_football": "The football match on Saturday was exciting from the first minute to the last. The home team "
    "scored twice in the first half, but the visitors played much better after the break and scored three goals. "
    "The fans were disappointed, and the coach said that his players had made too many mistakes.",
    "fr_weather": "Le temps cette semaine a été inhabituellement froid pour la saison. Lundi, il a plu toute la "
    "journée, et le vent était si fort que beaucoup d'arbres sont tombés sur les routes. La météo annonce le retour "
    "du soleil pour le week-end, mais les nuits resteront froides et il pourrait geler en montagne.",
    "fr_cooking": "Pour faire une bonne soupe, il faut d'abord couper les oignons et les carottes en petits morceaux "
    "et les faire cuire doucement dans le beurre. Ensuite, on ajoute les pommes de terre, l'eau et un peu de sel, et "
    "on laisse mijoter pendant environ quarante minutes. Servez la soupe bien chaude avec du pain frais.",
    "fr_trains": "Le train pour la capitale quitte la gare toutes les heures, et le voyage dure un peu plus de deux "
    "heures. Les voyageurs qui se déplacent souvent peuvent acheter un abonnement mensuel, qui coûte beaucoup moins "
    "cher. Ce matin, le train était en retard à cause d'un problème de signalisation.",
    "fr_football": "Le match de football de samedi a été passionnant de la première à la dernière minute. L'équipe "
    "locale a marqué deux fois en première mi-temps, mais les visiteurs ont bien mieux joué après la pause et ont "
    "marqué trois buts. Les supporters étaient déçus, et l'entraîneur a dit que ses joueurs avaient fait trop "
    "d'erreurs.",
    "de_weather": "Das Wetter war in dieser Woche für die Jahreszeit ungewöhnlich kalt. Am Montag hat es den ganzen "
    "Tag geregnet, und der Wind war so stark, dass viele Bäume auf die Straßen gefallen sind. Der Wetterbericht "
    "sagt, dass am Wochenende die Sonne zurückkommt, aber die Nächte bleiben kalt.",
    "de_cooking": "Um eine gute Suppe zu kochen, schneidet man zuerst die Zwiebeln und die Karotten in kleine Stücke "
    "und lässt sie langsam in Butter garen. Dann gibt man die Kartoffeln, das Wasser und ein wenig Salz dazu und "
    "lässt alles etwa vierzig Minuten köcheln. Die Suppe wird heiß mit frischem Brot serviert.",
    "de_trains": "Der Zug in die Hauptstadt fährt jede Stunde vom Bahnhof ab, und die Fahrt dauert etwas mehr als "
    "zwei Stunden. Wer oft reist, kann eine Monatskarte kaufen, die viel billiger ist. Heute Morgen hatte der Zug "
    "wegen eines Problems mit den Signalen Verspätung, und viele Leute haben ihre Termine verpasst.",
    "de_football": "Das Fußballspiel am Samstag war von der ersten bis zur letzten Minute spannend. Die "
    "Heimmannschaft hat in der ersten Halbzeit zweimal getroffen, aber die Gäste haben nach der Pause viel besser "
    "gespielt und drei Tore geschossen. Die Fans waren enttäuscht, und der Trainer war unzufrieden.",
}


def settings(**overrides: object):
    return fast_settings(models=CLASSICAL, default_model="zstd", **overrides)


def write_pairs(path: Path, n: int, seed: int = 0) -> list[dict]:
    """n pairs over a pool of 40 texts, so many pairs share a dataset (and its C(X))."""
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
    pool = [" ".join(rng.choices(words, k=rng.randint(10, 60))) + f" #{seed}-{i}" for i in range(40)]
    pairs = []
    for i in range(n):
        y = [rng.choice(pool), rng.choice(pool)] if i % 7 == 0 else rng.choice(pool)  # some multi-record datasets
        pairs.append({"custom_id": f"pair-{i:04d}", "x": rng.choice(pool), "y": y})
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return pairs


def distinct_tasks(pairs: list[dict], model: str) -> int:
    """Code lengths the pairs need: C(X), C(Y), C(Y|X), C(X|Y), minus those shared between pairs."""
    limits = dict(max_record_bytes=1 << 20, max_records=1000, max_bytes=1 << 22)
    tasks = set()
    for p in pairs:
        x, y = canonical(p["x"], **limits), canonical(p["y"], **limits)
        tasks.update(pair_tasks(model, x.sha256, y.sha256))
    return len(tasks)


def metric(text: str, name: str) -> float:
    """Sum of every sample of a Prometheus metric (all label values)."""
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def read_output(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- the library --------------------------------------------------------------------------------


def test_client_covers_api_v1() -> None:
    with serve(settings()) as url, Client(url) as api:
        assert api.healthz() == {"status": "ok"}
        assert api.readyz()["status"] == "ready"
        assert {m["id"] for m in api.models()} == set(CLASSICAL.split(","))

        first = api.score("the cat sat on the mat", ["the cat sat", "on the hat"], model="gzip")
        again = api.score("the cat sat on the mat", ["the cat sat", "on the hat"], model="gzip")
        assert SCORE_FIELDS | {"cached"} <= set(first) and not first["cached"] and again["cached"]
        assert again["ncd"] == first["ncd"]

        pairs = [{"id": f"p{i}", "x": f"text number {i}", "y": "a shared text"} for i in range(5)]
        job = api.submit_pairs(pairs, model="zstd", idempotency_key="k-1")
        assert api.submit_pairs(pairs, model="zstd", idempotency_key="k-1")["id"] == job["id"]
        progress = api.wait(job["id"])["progress"]
        assert (progress["done"], progress["total"]) == (5, 5) and progress["tokens_done"] > 0
        doc = api.results(job["id"])
        assert doc["complete"] and [r["id"] for r in doc["results"]] == [p["id"] for p in pairs]
        assert api.results_ndjson(job["id"]) == doc["results"]
        assert api.cancel(job["id"])["status"] == "succeeded"  # too late to cancel: it stays succeeded

        matrix = api.submit_matrix({"a": "one text", "b": ["two", "records"]}, model="zstd")
        api.wait(matrix["id"])
        assert api.results(matrix["id"])["matrix"]["ids"] == ["a", "b"]
        assert metric(api.metrics(), "codelen_tasks_computed_total") > 0

        with pytest.raises(CodelenError) as err:
            api.score("x", "y", model="no-such-model")
        assert err.value.status == 404 and "unknown model" in err.value.detail and err.value.title == "Not found"
        with pytest.raises(CodelenError) as err:
            api.job("job_missing")
        assert err.value.status == 404
        with pytest.raises(CodelenError) as err:
            api.score("x", "", model="gzip")
        assert err.value.status == 422 and err.value.extra.get("pointer") == "/y"


def test_async_client_and_connection_errors() -> None:
    async def use(url: str) -> None:
        async with AsyncClient(url) as api:
            scores = await asyncio.gather(*(api.score(f"text {i}", "other text", model="zstd") for i in range(8)))
            assert all(SCORE_FIELDS <= set(s) for s in scores)
            job = await api.submit_pairs([{"id": "a", "x": "1", "y": "2"}])
            assert (await api.wait(job["id"]))["status"] == "succeeded"
            assert len(await api.results_ndjson(job["id"])) == 1

    with serve(settings()) as url:
        asyncio.run(use(url))
    # Nobody listens there any more: retried with backoff, then a CodelenError without a status.
    with Client(url, retry=RetryPolicy(retries=2, backoff=0.01)) as api:
        with pytest.raises(CodelenError) as err:
            api.healthz()
    assert err.value.status is None and api.retries_made == 2


def test_score_follows_a_202_to_its_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCS["en_weather"])
    with serve(settings(score_wait_s=0.0)) as url:  # every uncached score becomes a job
        with Client(url) as api:
            s = api.score(DOCS["en_cooking"], DOCS["en_trains"])
        assert SCORE_FIELDS <= set(s) and s["cached"] is False
        assert main(["score", str(doc), DOCS["fr_weather"], "--url", url, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["bytes"]["x"] == len(DOCS["en_weather"].encode())
        assert out["bytes"]["y"] == len(DOCS["fr_weather"].encode())
        assert main(["score", "same words", "same words", "--url", url, "--model", "gzip"]) == 0
        text = capsys.readouterr().out
        assert "NCD" in text and "shared info" in text and "gzip" in text


def test_score_prints_what_is_left_of_each_code_length() -> None:
    from client.cli import format_scores

    doc = {
        "model": {"id": "m", "revision": "r" * 64}, "bytes": {"x": 100, "y": 50},
        "code_lengths": {"x": 800.0, "y": 400.0, "xy": 900.0, "yx": None},
        "conditional": {"y_given_x": 100.0, "x_given_y": None},
        "shared_information": 300.0, "ncd": 0.625, "bits_per_byte": {"x": 8.0, "y": 8.0},
        "window": {"policy": "whole"}, "conditioning": {"mode": "memory"}, "cached": False,
    }  # fmt: skip
    row = next(line for line in format_scores(doc).splitlines() if line.startswith("/C(Y), /C(X)"))  # type: ignore[arg-type]
    assert row.split()[2:] == ["0.2500", "(not", "computed)"]
    doc["conditional"] = {"y_given_x": 100.0, "x_given_y": 600.0}
    row = next(line for line in format_scores(doc).splitlines() if line.startswith("/C(Y), /C(X)"))  # type: ignore[arg-type]
    assert row.split()[2:] == ["0.2500", "0.7500"]


# -- codelen submit -------------------------------------------------------------------------


def test_submit_500_pairs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pairs = write_pairs(tmp_path / "pairs.jsonl", 500)
    out = tmp_path / "results.jsonl"
    with serve(settings()) as url:
        started = time.perf_counter()
        args = ["submit", str(tmp_path / "pairs.jsonl"), "-o", str(out), "--url", url, "--chunk-size", "100"]
        assert main(args) == 0
        elapsed = time.perf_counter() - started
        rows = read_output(out)
        assert [r["custom_id"] for r in rows] != [] and len(rows) == 500
        assert {r["custom_id"] for r in rows} == {p["custom_id"] for p in pairs}
        assert all(SCORE_FIELDS <= set(r) for r in rows)
        assert not (tmp_path / "results.jsonl.state.json").exists()  # nothing in flight any more
        print(f"500 pairs through `codelen submit` (zstd): {500 / elapsed:.0f} pairs/s", file=sys.stderr)

        assert main(args) == 0  # a rerun finds everything done and adds nothing
        assert len(read_output(out)) == 500
        assert "500 of 500 pairs already" in capsys.readouterr().err


def test_submit_killed_and_resumed_scores_each_pair_once(tmp_path: Path) -> None:
    pairs = write_pairs(tmp_path / "pairs.jsonl", 500, seed=1)
    out = tmp_path / "results.jsonl"
    with serve(settings()) as url:
        cmd = [sys.executable, "-m", "codelen.cli", "submit", str(tmp_path / "pairs.jsonl"), "-o", str(out),
               "--chunk-size", "10", "--concurrency", "2"]
        env = {**os.environ, "CODELEN_URL": url}
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            if out.exists() and out.read_bytes().count(b"\n") >= 150:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode() if proc.stderr else ""
        proc.stderr.close()
        written = out.read_bytes().count(b"\n")
        assert 150 <= written < 500
        with out.open("ab") as f:  # as if killed in the middle of a write
            f.write(b'{"custom_id":"pair-0499","model":{"id":"zs')

        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert rerun.returncode == 0, rerun.stderr
        assert f"resuming: {written} of 500" in rerun.stderr

        rows = read_output(out)
        ids = [r["custom_id"] for r in rows]
        assert len(ids) == len(set(ids)) == 500 and set(ids) == {p["custom_id"] for p in pairs}
        assert all(SCORE_FIELDS <= set(r) for r in rows)
        with Client(url) as api:
            text = api.metrics()
        # Every code length was computed once: the rerun re-attached to the jobs in flight (one job
        # per chunk, never a second) and everything else came from the cache.
        assert metric(text, "codelen_tasks_computed_total") == distinct_tasks(pairs, "zstd")
        assert metric(text, "codelen_jobs_total") == 50


def test_submit_input_checks_and_bad_pairs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"custom_id": "a", "x": "1", "y": "2"}\n\n{"custom_id": "a", "x": "3", "y": "4"}\n')
    assert main(["submit", str(dup), "-o", str(tmp_path / "o.jsonl"), "--url", "http://127.0.0.1:9"]) == 2
    assert "dup.jsonl:3: duplicate custom_id 'a' (first on line 1)" in capsys.readouterr().err

    lines = [{"custom_id": f"c{i}", "x": f"text {i}", "y": "y"} for i in range(6)]
    lines[3]["x"] = "a NUL \u0000 is not allowed"
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in lines))
    out = tmp_path / "out.jsonl"
    with serve(settings()) as url:
        assert main(["submit", str(src), "-o", str(out), "--url", url, "-q"]) == 1
    assert sorted(r["custom_id"] for r in read_output(out)) == ["c0", "c1", "c2", "c4", "c5"]
    errors = read_output(tmp_path / "out.jsonl.errors.jsonl")
    assert [e["custom_id"] for e in errors] == ["c3"] and "NUL" in errors[0]["error"]


# -- back-pressure ------------------------------------------------------------------------------


def test_client_waits_out_429_from_the_rate_limit(tmp_path: Path) -> None:
    key = "s3cret"
    limited = settings(api_keys=hashlib.sha256(key.encode()).hexdigest(), rate_limit_per_s=5.0, rate_limit_burst=3)
    write_pairs(tmp_path / "pairs.jsonl", 40, seed=2)
    out = tmp_path / "results.jsonl"
    with serve(limited) as url:
        with Client(url, api_key="") as anonymous, pytest.raises(CodelenError) as err:
            anonymous.models()
        assert err.value.status == 401 and "API key" in err.value.detail

        args = ["submit", str(tmp_path / "pairs.jsonl"), "-o", str(out), "--url", url, "--api-key", key,
                "--chunk-size", "10", "--concurrency", "4", "-q"]
        assert main(args) == 0
        assert len(read_output(out)) == 40
        with Client(url, api_key=key) as api:
            answered_429 = sum(float(v) for v in re.findall(
                r'^codelen_http_requests_total{[^}]*status="429"[^}]*} (\S+)$', api.metrics(), re.M))
    assert answered_429 > 0  # the server did push back, and the client waited it out


def test_client_waits_out_429_from_a_full_queue() -> None:
    # lzma (preset 9) takes ~50 ms a code length: while the worker runs one pair, the queue
    # (4 items = one pair) is full and further pairs get 429 with Retry-After: 1.
    async def burst(url: str) -> int:
        async with AsyncClient(url) as api:
            scores = await asyncio.gather(*(api.score(f"text {i} " * 5, "other", model="lzma") for i in range(5)))
            assert all(SCORE_FIELDS <= set(s) for s in scores)
            return api.retries_made

    with serve(settings(max_queue_items=4, retry_after_s=1)) as url:
        assert asyncio.run(burst(url)) > 0


# -- codelen matrix and plot ----------------------------------------------------------------


def test_matrix_of_three_languages_and_its_picture(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / f"{name}.txt").write_text(text)
    by_language = tmp_path / "languages"
    for name, text in DOCS.items():
        (by_language / name[:2]).mkdir(parents=True, exist_ok=True)
        (by_language / name[:2] / f"{name}.txt").write_text(text)

    with serve(settings()) as url:
        for suffix in ("csv", "npy", "json"):
            assert main(["matrix", str(docs), "-o", str(tmp_path / f"m.{suffix}"), "--url", url, "-q"]) == 0
        assert main(["matrix", str(by_language), "-o", str(tmp_path / "lang.csv"), "--metric", "shared",
                     "--url", url, "-q"]) == 0

    with (tmp_path / "m.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ncd", *sorted(DOCS)] and [r[0] for r in rows[1:]] == sorted(DOCS)
    m = matrices.read(tmp_path / "m.csv")
    assert np.allclose(m.values, m.values.T) and m.values.shape == (12, 12)
    assert np.array_equal(matrices.read(tmp_path / "m.npy").values, m.values)
    both = json.loads((tmp_path / "m.json").read_text())
    assert both["ids"] == m.ids and np.allclose(both["ncd"], m.values) and "shared_information" in both

    # The dendrogram cut into three clusters gives back the three languages.
    assignment = dict(zip(m.ids, clusters(m, 3), strict=True))
    groups = {lang: {assignment[d] for d in m.ids if d.startswith(lang)} for lang in ("en", "fr", "de")}
    assert all(len(g) == 1 for g in groups.values()) and len(set.union(*groups.values())) == 3

    lang = matrices.read(tmp_path / "lang.csv")
    assert lang.ids == ["de", "en", "fr"] and lang.metric == "shared_information"
    assert (lang.values > 0).all()

    png = tmp_path / "m.png"
    assert main(["plot", str(tmp_path / "m.csv"), "-o", str(png), "--clusters", "3"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
