"""The CI-sized chaos run (``python -m bench chaos``, bench/chaos.py): the main job and then
the assign job on the digits, each killed at seeded random times (train worker, centroid
server, Ray Data task, assignment actor or the driver, which is then started again), and
nothing is lost or assigned twice."""

from __future__ import annotations

from bench.chaos import DIGITS, chaos, ingest_job, summarise


def test_random_kills_lose_nothing_and_duplicate_nothing(tmp_path):
    shards = str(tmp_path / "digits")
    ingest_job("sklearn-digits", shards)
    settings = [s for s in DIGITS if not s.startswith("train.epochs")] + ["train.epochs=2"]
    result = chaos(shards, settings, kills=4, seed=0, work=tmp_path / "chaos",
                   reference=False)
    s = summarise(result)
    assert s["kills"] == 4 and len(s["kills_by_kind"]) >= 2, s
    assert s["rows_lost"] == 0 and s["duplicates"] == 0, s
    assert result["main"]["rows_in"] == 1797 and s["metrics_complete"], result["main"]
    assert result["assign"]["assigned"] + result["assign"]["rejected"] == 1797
    # Unkilled, this config scores NMI 0.55-0.65 on the digits; a run that lost its
    # training state to a kill and collapsed would score near 0.
    assert s["nmi"] >= 0.35, s
