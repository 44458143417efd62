"""README.md's performance table is generated from bench/results/ (flm_rt.benchmarks.readme, `make readme-perf`):
a hand edit of the table, or a new result set committed without regenerating it, fails here."""
import json
from pathlib import Path

import pytest

from flm_rt.benchmarks import readme

ROOT = Path(__file__).resolve().parents[1]


def test_readme_table_is_what_the_committed_results_give():
    text = (ROOT / "README.md").read_text()
    table = readme.render_table(str(ROOT / "bench" / "results"), str(ROOT))
    assert readme.replace_section(text, table) == text, "README.md's perf table is stale: run `make readme-perf`"
    assert readme.main(["--check"]) == 0


def _result_set(path: Path, date: str, ref_s: float, flm_s: float, match: float = 1.0) -> None:
    rows = [{"shape": "lm1b", "row": "reference", "steps": 1, "batch": 1, "status": "ok", "median_s": ref_s},
            {"shape": "lm1b", "row": "flm_rt", "steps": 1, "batch": 1, "status": "ok", "median_s": flm_s,
             "tokens_match_reference": match},
            {"shape": "lm1b", "row": "onnx", "steps": 1, "batch": 1, "status": "error", "median_s": None}]
    meta = {"date_utc": date, "device": "cpu", "device_name": f"CPU {path.parts[-2]}", "dtype": "float32",
            "threads": 2, "loadavg_start": [0.5, 0.4, 0.3], "git_commit": "abc1234",
            "cpu_isa": {"torch_cpu_capability": "AVX2", "flags": ["avx2", "fma"]}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": rows}))


def test_the_newest_result_set_of_each_machine_fills_the_table(tmp_path):
    res = tmp_path / "bench" / "results"
    _result_set(res / "cpu-a" / "results.json", "2026-01-02T00:00:00Z", 0.300, 0.200)
    _result_set(res / "cpu-a" / "older" / "results.json", "2026-01-01T00:00:00Z", 0.900, 0.100)
    _result_set(res / "cpu-b" / "deep" / "run" / "results.json", "2026-01-03T00:00:00Z", 2.5, 1.25, match=0.75)
    (res / "cpu-b" / "serve").mkdir(parents=True)
    (res / "cpu-b" / "serve" / "results.json").write_text(json.dumps({"meta": None, "levels": []}))  # not a set
    table = readme.render_table(str(res), str(tmp_path))
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 2
    assert rows[0].startswith("| CPU cpu-a, fp32, 2 threads (`cpu-a`) | AVX2 | 2026-01-02, 0.5 | lm1b, 1 step, B 1 | 300 ms | "
                              "**200 ms (1.50x)** |")
    assert "900 ms" not in table  # the older set of the same machine
    assert "| 2.50 s | **1.25 s (2.00x)**, ids 75.0% = reference |" in rows[1]
    assert "`bench/results/cpu-a/results.json` (commit abc1234)" in table
    # the fastest mode's column, and the autoregressive baseline against both flm_rt rows
    extra = [{"shape": "owt", "row": "flm_rt", "steps": 1, "batch": 1, "status": "ok", "median_s": 2.0},
             {"shape": "owt", "row": readme.FASTEST, "steps": 1, "batch": 1, "status": "ok", "median_s": 0.5},
             {"shape": "owt", "row": "autoregressive", "steps": None, "batch": 1, "status": "ok", "median_s": 50.0}]
    data = json.loads((res / "cpu-a" / "results.json").read_text())
    data["results"] += extra
    (res / "cpu-a" / "results.json").write_text(json.dumps(data))
    owt = [line for line in readme.render_table(str(res), str(tmp_path)).splitlines() if "| owt, 1 step, B 1 |" in line]
    assert len(owt) == 1 and "| 500 ms | 50.0 s (flm_rt 25x faster; bf16 + embedding 100x faster) |" in owt[0]
    assert "bench/results/cpu-b/deep/run/results.json" in table and "serve" not in table
    # a CPU without native bf16 (the run recorded why): its bf16 figure says it is emulated
    data["results"][-2]["extra"] = {"native_bf16": "the CPU lacks avx512_bf16 and amx_bf16"}
    (res / "cpu-a" / "results.json").write_text(json.dumps(data))
    owt = [line for line in readme.render_table(str(res), str(tmp_path)).splitlines() if "| owt, 1 step, B 1 |" in line]
    assert "| 500 ms (bf16 emulated: slower than fp32) |" in owt[0]
    # a newer set of fewer table cases (an A/B of one change) does not replace the fuller one; one as full does
    _result_set(res / "cpu-a" / "ab" / "results.json", "2026-02-01T00:00:00Z", 0.700, 0.600)
    table = readme.render_table(str(res), str(tmp_path))
    assert "`bench/results/cpu-a/results.json`" in table and "700 ms" not in table
    partial = json.loads((res / "cpu-a" / "ab" / "results.json").read_text())
    partial["results"] += extra
    (res / "cpu-a" / "ab" / "results.json").write_text(json.dumps(partial))
    table = readme.render_table(str(res), str(tmp_path))
    assert "`bench/results/cpu-a/ab/results.json`" in table and "700 ms" in table


def test_rewrite_replaces_only_the_marked_section(tmp_path):
    res = tmp_path / "bench" / "results"
    _result_set(res / "cpu-a" / "results.json", "2026-01-02T00:00:00Z", 0.300, 0.200)
    md = tmp_path / "README.md"
    md.write_text(f"# x\n\nbefore\n{readme.BEGIN}\n| old | table |\n{readme.END}\n\nafter\n")
    args = ["--results", str(res), "--readme", str(md)]
    assert readme.main(args + ["--check"]) == 1
    assert readme.main(args) == 0
    text = md.read_text()
    assert text.startswith("# x\n\nbefore\n" + readme.BEGIN + "\n| machine |") and text.endswith(readme.END + "\n\nafter\n")
    assert "old" not in text and "**200 ms (1.50x)**" in text
    assert readme.main(args + ["--check"]) == 0
    # a new, newer run of the machine makes the README stale again
    _result_set(res / "cpu-a" / "new" / "results.json", "2026-02-01T00:00:00Z", 0.400, 0.100)
    assert readme.main(args + ["--check"]) == 1


def test_missing_markers_or_results_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="perf-table:begin"):
        readme.replace_section("no markers here\n", "| t |\n")
    md = tmp_path / "README.md"
    md.write_text("no markers\n")
    res = tmp_path / "results"
    _result_set(res / "cpu-a" / "results.json", "2026-01-02T00:00:00Z", 0.3, 0.2)
    assert readme.main(["--results", str(res), "--readme", str(md)]) == 2
    assert md.read_text() == "no markers\n"
    (res / "cpu-a" / "results.json").write_text("{not json")
    md.write_text(f"{readme.BEGIN}\n{readme.END}\n")
    assert readme.main(["--results", str(res), "--readme", str(md)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "perf-table:begin" in err[0] and "results.json: not a readable JSON file" in err[1]
