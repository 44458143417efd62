"""flm_rt.benchmarks.ab: the interleaved in-process A/B of one switch."""
import json
import os

import pytest

from flm_rt.benchmarks import ab


def test_ab_times_both_arms_and_restores_the_switch(monkeypatch, tmp_path):
    monkeypatch.setenv("FLM_RT_FUSED_VOCAB", "1")
    out = tmp_path / "ab.json"
    assert ab.main(["FLM_RT_FUSED_VOCAB", "--shape", "tiny", "--batches", "1,2", "--pairs", "3",
                    "--spaces", "vocab,embedding", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["meta"]["switch"] == "FLM_RT_FUSED_VOCAB" and res["meta"]["pairs"] == 3
    assert [(c["space"], c["batch"]) for c in res["cases"]] == [("vocab", 1), ("vocab", 2), ("embedding", 1),
                                                                ("embedding", 2)]
    for c in res["cases"]:
        assert len(c["on_ms"]) == len(c["off_ms"]) == 3 and min(c["on_ms"] + c["off_ms"]) > 0
        assert c["on_median_ms"] == sorted(c["on_ms"])[1]
        # the fused vocabulary pass keeps the ids exactly (fp32)
        assert c["ids_equal"] == 1.0
    assert os.environ["FLM_RT_FUSED_VOCAB"] == "1"
    assert not (tmp_path / "ab.json.tmp").exists()
    table = ab.format_table(res)
    assert table.count("\n") == 1 + len(res["cases"]) and "100.00%" in table


def test_ab_rejects_unknown_switches_and_arguments(capsys):
    with pytest.raises(ValueError, match="switch must be one of"):
        ab.run_ab("FLM_RT_TURBO", shape="tiny")
    with pytest.raises(ValueError, match="pairs"):
        ab.run_ab("FLM_RT_SCREEN", shape="tiny", pairs=0)
    for bad in (["FLM_RT_SCREEN", "--batches", "one"], ["FLM_RT_SCREEN", "--dtypes", "int8"],
                ["FLM_RT_SCREEN", "--spaces", "latent"]):
        with pytest.raises(SystemExit) as e:
            ab.main(bad)
        assert e.value.code == 2
    assert "--spaces" in capsys.readouterr().err
