"""prefnb.data and `prefnb data`: real study files plus small synthetic ones (offline, fast)."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace

import pytest

from prefnb import data as D
from prefnb.config import RunParams
from prefnb.session import Session

QUORA_HEADER = "\tid\tsentence1\tsentence2\tis_duplicate\n"


def write(path, text, newline="\n"):
    path.write_bytes(text.replace("\n", newline).encode())
    return path


def sonnet_block(number, n_lines, indent_last=2):
    lines = [f"line {k} of sonnet {number}" for k in range(1, n_lines + 1)]
    lines = lines[:-indent_last] + ["  " + x for x in lines[-indent_last:]] if indent_last else lines
    return f"{number}\n\n" + "\n".join(lines) + "\n\n"


# 7 header lines and 4 blank lines, as in the real files (so sonnet 1's number is on line 12)
HEADER = "Sonnets\nby William Shakespeare\nEdited by A\n  with B\nA Library\nhttps://x\nCreated on a day\n" + "\n" * 4


# --- Quora -----------------------------------------------------------------------------
def test_real_quora_skips_exactly_the_two_malformed_rows(real_data_dir, caplog, monkeypatch):
    problems = []
    with caplog.at_level(logging.WARNING, logger="prefnb.data"):
        pairs = D.read_quora(real_data_dir / D.QUORA_FILE, problems)
    assert len(pairs) == 17214 - 2
    assert len(problems) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("quora-pairs.tsv:2191:" in w and "label" in w for w in warnings)
    assert any("quora-pairs.tsv:12101:" in w and "sentence2" in w for w in warnings)
    assert any("skipped 2 malformed" in w for w in warnings)
    assert {p.is_duplicate for p in pairs} == {True, False}
    assert all(p.question1 and p.question2 and p.question1 == p.question1.strip() for p in pairs)


def test_real_quora_doubled_quotes_are_decoded(real_data_dir):
    pairs = {p.pair_id: p for p in D.read_quora(real_data_dir / D.QUORA_FILE)}
    # raw: """Which is correct grammar: ... Do I need """"the"""" here?""" (quoted twice over)
    q = pairs["318658e273ac78f3b1e957b8b"].question1
    assert q.startswith("Which is correct grammar:") and q.endswith('Do I need "the" here?')
    assert pairs["98d19d73b11d52679505fde94"].question1 == 'What does "turning the ship slowly" mean?'


def test_synthetic_quora_quoting_and_malformed_rows(tmp_path, caplog):
    path = write(tmp_path / "q.tsv", QUORA_HEADER
                 + '0\ta\t"He said ""hi"""\t"""What does """"x"""" mean?"""\t1.0\n'  # line 2: ok, quoted twice
                 + "1\tb\tq1\t   \t0.0\n"  # line 3: blank sentence
                 + "2\tc\tq1\tq2\t2.0\n"  # line 4: bad label
                 + "3\td\tq1\tq2\n"  # line 5: 4 fields
                 + "4\te\tq1\tq2\t0\n", newline="\r\n")  # line 6: ok, integer label, CRLF
    with caplog.at_level(logging.WARNING, logger="prefnb.data"):
        pairs = D.read_quora(path)
    assert [(p.pair_id, p.question1, p.question2, p.is_duplicate) for p in pairs] == [
        ("a", 'He said "hi"', 'What does "x" mean?', True), ("e", "q1", "q2", False)]
    text = caplog.text
    assert "q.tsv:3: empty sentence2" in text and "q.tsv:4:" in text and "'2.0'" in text
    assert "q.tsv:5: expected 5 tab-separated fields, got 4" in text


def test_quora_is_parsed_once_per_file_version(tmp_path, monkeypatch):
    path = write(tmp_path / "q.tsv", QUORA_HEADER + "0\ta\tq1\tq2\t1\n1\tb\tq1\t \t0\n")
    parses = []
    monkeypatch.setattr(D, "_parse_quora", lambda *a, _real=D._parse_quora: parses.append(1) or _real(*a))
    first, second, session = [], [], Session()  # the runs of one in-process sweep
    assert D.read_quora(path, first, session) == D.read_quora(path, second, session) and len(parses) == 1
    assert first == second and len(first) == 1  # the skipped row is reported to every caller
    write(path, QUORA_HEADER + "0\ta\tq1\tq2\t1\n1\tb\tq3\tq4\t0\n")  # edited: read again
    assert [p.pair_id for p in D.read_quora(path, None, session)] == ["a", "b"] and len(parses) == 2


def test_quora_file_errors(tmp_path):
    with pytest.raises(D.DataError, match=r"nope\.tsv.*PREFNB_DATA"):
        D.read_quora(tmp_path / "nope.tsv")
    bad_header = write(tmp_path / "h.tsv", "id\tquestion1\tquestion2\tlabel\na\tb\tc\t1\n")
    with pytest.raises(D.DataError, match=r"h\.tsv:1: expected the header"):
        D.read_quora(bad_header)
    nothing_valid = write(tmp_path / "n.tsv", QUORA_HEADER + "0\ta\t\t\t\n")
    with pytest.raises(D.DataError, match=r"n\.tsv: no valid question pairs"):
        D.read_quora(nothing_valid)


# --- Sonnets ---------------------------------------------------------------------------
def test_real_sonnet_files_parse(real_data_dir):
    train = D.read_sonnets(real_data_dir / "sonnets-train.txt")
    dev = D.read_sonnets(real_data_dir / "sonnets-dev.txt")
    dev_prompts = D.read_sonnets(real_data_dir / "sonnets-dev-prompts.txt", n_lines=3)
    test = D.read_sonnets(real_data_dir / "sonnets-test-prompts.txt", n_lines=3)
    # The data README says 13 dev (132-144) and 10 test prompts (145-154); the files hold
    # 12 dev sonnets (132-143) and 12 test prompts (145-156). We test what is there.
    assert [s.number for s in train] == list(range(1, 132))
    assert [s.number for s in dev] == [s.number for s in dev_prompts] == list(range(132, 144))
    assert [s.number for s in test] == list(range(145, 157))
    every_line = [line for f in (train, dev, dev_prompts, test) for s in f for line in s.lines]
    assert not any("\r" in x or x != x.strip() or not x for x in every_line)
    assert not any("Folger" in x or "Shakespeare" in x for x in every_line)  # header skipped
    assert train[0].lines[0] == "From fairest creatures we desire increase,"
    assert train[0].lines[-1] == "To eat the world's due, by the grave and thee."  # indent stripped
    lengths = {s.number: len(s.lines) for s in train + dev}
    assert {n: k for n, k in lengths.items() if k != 14} == {99: 15, 126: 12}  # real variation
    assert all(len(s.lines) == 3 for s in dev_prompts + test)


def test_real_dev_prompts_match_dev_sonnets(real_data_dir):
    dev = D.read_sonnets(real_data_dir / "sonnets-dev.txt")
    prompts = D.read_sonnets(real_data_dir / "sonnets-dev-prompts.txt", n_lines=3)
    rows = D.sonnet_eval_rows(dev, prompts)
    assert len(rows) == 12
    for row, sonnet in zip(rows, dev):
        assert row["prompt"] == "\n".join(sonnet.lines[:3]) + "\n"
        assert row["prompt"] + row["reference"] == row["full_reference"] == sonnet.text
        assert row["reference"].count("\n") == 11


def test_sonnet_format_errors_name_file_sonnet_and_line(tmp_path):
    ok = write(tmp_path / "ok.txt", HEADER + sonnet_block(1, 14) + sonnet_block(2, 14), newline="\r\n")
    assert [len(s.lines) for s in D.read_sonnets(ok)] == [14, 14]
    no_header = write(tmp_path / "plain.txt", sonnet_block(7, 3, indent_last=0).rstrip("\n"))
    assert D.read_sonnets(no_header, n_lines=3)[0].number == 7
    short = write(tmp_path / "short.txt", HEADER + sonnet_block(1, 14) + sonnet_block(2, 10))
    with pytest.raises(D.DataError, match=r"short\.txt:29: sonnet 2 has 10 lines, expected 14"):
        D.read_sonnets(short)
    long_prompt = write(tmp_path / "p.txt", sonnet_block(5, 4))
    with pytest.raises(D.DataError, match=r"p\.txt:1: sonnet 5 has 4 lines, expected 3"):
        D.read_sonnets(long_prompt, n_lines=3)
    stray = write(tmp_path / "stray.txt", sonnet_block(1, 14) + "oops\n")
    with pytest.raises(D.DataError, match=r"stray\.txt:18: expected a sonnet number"):
        D.read_sonnets(stray)
    twice = write(tmp_path / "twice.txt", sonnet_block(3, 3) + sonnet_block(3, 3))
    with pytest.raises(D.DataError, match=r"sonnet 3 appears twice"):
        D.read_sonnets(twice, n_lines=3)


def test_sonnet_eval_rows_checks_prompts_against_full_text():
    full = [D.Sonnet(1, tuple(f"l{k}" for k in range(14)))]
    with pytest.raises(D.DataError, match="sonnet 1: the prompt lines differ"):
        D.sonnet_eval_rows(full, [D.Sonnet(1, ("l0", "l1", "changed"))])
    with pytest.raises(D.DataError, match="sonnet 2 has a prompt but no full text"):
        D.sonnet_eval_rows(full, [D.Sonnet(2, ("a", "b", "c"))])


# --- splits and row builders -----------------------------------------------------------
def test_split_indices_deterministic_disjoint_covering():
    a, b, c = D.split_indices(1000, 3), D.split_indices(1000, 3), D.split_indices(1000, 4)
    assert a == b and a != c
    assert [len(a[k]) for k in ("train", "dev", "test")] == [800, 100, 100]
    assert sorted(a["train"] + a["dev"] + a["test"]) == list(range(1000))
    small = D.split_indices(2, 0, (0.9, 0.1, 0.0))  # a tiny user file still gets a dev row
    assert (len(small["train"]), len(small["dev"]), small["test"]) == (1, 1, [])
    with pytest.raises(ValueError):
        D.split_indices(10, 0, (0.5, 0.1, 0.1))


def test_paraphrase_rows():
    pairs = [D.QuoraPair("a", "Q one?", "Q two?", True), D.QuoraPair("b", "x", "y", False)]
    sft, pref = D.paraphrase_sft_rows(pairs), D.paraphrase_preference_rows(pairs)
    ev = D.paraphrase_eval_rows(pairs)
    assert sft[0]["prompt"] == ('Question 1: "Q one?"\nQuestion 2: "Q two?"\n'
                                "Are these questions asking the same thing? Answer:")
    assert [r["completion"] for r in sft] == [" yes", " no"]
    assert [(r["chosen"], r["rejected"]) for r in pref] == [(" yes", " no"), (" no", " yes")]
    assert [r["label"] for r in ev] == [1, 0] and ev[1]["prompt"] == sft[1]["prompt"]


def test_other_continuations_is_a_seeded_derangement(real_data_dir):
    rows = D.sonnet_sft_rows(D.read_sonnets(real_data_dir / "sonnets-train.txt"))
    for seed in range(5):
        other = D.other_continuations(rows, seed)
        assert all(o != r["completion"] for o, r in zip(other, rows))
        assert sorted(other) == sorted(r["completion"] for r in rows)  # a permutation
    assert D.other_continuations(rows, 1) == D.other_continuations(rows, 1) != D.other_continuations(rows, 2)
    two = [{"prompt": "p", "completion": "a"}, {"prompt": "q", "completion": "b"}]
    assert D.other_continuations(two, 0) == ["b", "a"]
    with pytest.raises(ValueError):
        D.other_continuations(two[:1], 0)
    pairs = D.sonnet_preference_rows(two, ["x", "y"])
    assert pairs[1] == {"prompt": "q", "chosen": "b", "rejected": "y"}
    with pytest.raises(ValueError, match="2 rows but 1"):
        D.sonnet_preference_rows(two, ["x"])


# --- load_task -------------------------------------------------------------------------
def test_load_paraphrase_subsets_and_caps(real_data_dir):
    base = RunParams(task="paraphrase", data_dir=str(real_data_dir))
    full = D.load_task(base)
    assert (len(full.train_sft), len(full.eval_rows), len(full.test_rows), full.unscored_prompts) == (13770, 1721, 1721, [])
    assert full.stats["rows_skipped"] == 2 and full.source_files[D.QUORA_FILE].startswith("66279661d492")
    tenth = D.load_task(replace(base, train_size=0.1))
    assert len(tenth.train_sft) == 1377 and tenth.train_sft == full.train_sft[:1377]  # nested subsets
    capped = D.load_task(replace(base, train_size=0.1, max_train_examples=50, max_eval_examples=20,
                                 max_test_examples=30))
    assert len(capped.train_sft) == len(capped.train_pairs) == 50
    assert len(capped.eval_rows) == len(capped.eval_pairs) == 20 and len(capped.test_rows) == len(capped.test_pairs) == 30
    assert [r["prompt"] for r in capped.train_pairs] == [r["prompt"] for r in capped.train_sft]
    assert [p["chosen"] for p in capped.eval_pairs] == [D.ANSWERS[bool(r["label"])] for r in capped.eval_rows]
    assert [p["chosen"] for p in capped.test_pairs] == [D.ANSWERS[bool(r["label"])] for r in capped.test_rows]
    train, selection, report = ({r["prompt"] for r in rows} for rows in (full.train_sft, full.eval_rows, full.test_rows))
    assert not (train & selection or train & report or selection & report)  # three disjoint splits
    other_seed = D.load_task(replace(base, data_seed=1, max_train_examples=50))
    assert other_seed.train_sft != capped.train_sft
    assert other_seed.hashes()["train_sft"] != capped.hashes()["train_sft"]


def test_load_sonnets(real_data_dir):
    base = RunParams(task="sonnets", data_dir=str(real_data_dir))
    sampled = D.load_task(base)
    assert sampled.train_pairs is None  # the caller samples rejected continuations
    # Selection: 12 training sonnets held out (never trained on); report: dev sonnets 132-143.
    assert (len(sampled.train_sft), len(sampled.eval_rows), len(sampled.eval_pairs)) == (119, 12, 12)
    assert (len(sampled.test_rows), len(sampled.test_pairs)) == (12, 12)
    train_text = (real_data_dir / "sonnets-train.txt").read_text().replace("\r", "")
    dev_text = (real_data_dir / "sonnets-dev.txt").read_text().replace("\r", "")
    assert all(r["prompt"].split("\n")[0] in train_text and r["prompt"] not in dev_text for r in sampled.eval_rows)
    assert all(r["prompt"].split("\n")[0] in dev_text for r in sampled.test_rows)
    trained = {r["prompt"] for r in sampled.train_sft}
    assert not trained & {r["prompt"] for r in sampled.eval_rows}
    assert len(sampled.unscored_prompts) == 12 and all(p.count("\n") == 3 for p in sampled.unscored_prompts)
    assert set(sampled.source_files) == set(D.SONNET_FILES.values())
    for rows, pairs in ((sampled.eval_rows, sampled.eval_pairs), (sampled.test_rows, sampled.test_pairs)):
        assert all(p["chosen"] != p["rejected"] for p in pairs)
        assert [p["prompt"] for p in pairs] == [r["prompt"] for r in rows]
    # The selection sonnets are fixed by data_seed, not by the training seed.
    assert D.load_task(replace(base, seed=5)).eval_rows == sampled.eval_rows
    assert D.load_task(replace(base, data_seed=1)).eval_rows != sampled.eval_rows
    other = D.load_task(replace(base, rejected_source="other", train_size=0.5, max_eval_examples=5,
                                max_test_examples=4))
    assert len(other.train_sft) == len(other.train_pairs) == 60 and len(other.eval_rows) == 5
    assert len(other.test_rows) == len(other.test_pairs) == 4
    assert all(p["chosen"] != p["rejected"] for p in other.train_pairs)
    assert set(other.hashes()) == {"train_sft", "train_pairs", "eval_rows", "eval_pairs", "test_rows", "test_pairs",
                                   "unscored_prompts"}


# --- user data -------------------------------------------------------------------------
def jsonl(path, rows, extra=""):
    return write(path, "\n".join(json.dumps(r) for r in rows) + "\n" + extra)


def test_read_jsonl_errors_name_line_and_row(tmp_path):
    good = {"prompt": "p", "completion": "c"}
    bad_json = write(tmp_path / "bad.jsonl", json.dumps(good) + "\n\n{not json\n")
    with pytest.raises(D.DataError, match=r"bad\.jsonl:3: not valid JSON"):
        D.read_jsonl(bad_json)
    with pytest.raises(D.DataError, match=r"arr\.jsonl:1: expected a JSON object"):
        D.read_jsonl(write(tmp_path / "arr.jsonl", "[1, 2]\n"))
    missing = jsonl(tmp_path / "m.jsonl", [good, {"prompt": "p"}])
    with pytest.raises(D.DataError, match=r"m\.jsonl: row 2: missing column 'completion'"):
        D.load_user_rows(str(missing))
    wrong_type = jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "chosen": ["a"], "rejected": "r"}])
    with pytest.raises(D.DataError, match=r"t\.jsonl: row 1: column 'chosen' must be a non-empty string"):
        D.load_user_rows(str(wrong_type))
    with pytest.raises(D.DataError, match=r"absent\.jsonl: data file not found"):
        D.load_user_rows(str(tmp_path / "absent.jsonl"))


def test_load_jsonl_task_sft_and_preference(tmp_path):
    sft_rows = [{"prompt": f"p{i}", "completion": f"c{i}", "extra": i} for i in range(20)]
    sft = D.load_task(RunParams(task="jsonl", data_path=str(jsonl(tmp_path / "sft.jsonl", sft_rows, "\n"))))
    assert (len(sft.train_sft), len(sft.eval_rows), sft.train_pairs, sft.eval_pairs) == (18, 2, None, [])
    assert sft.test_rows == sft.test_pairs == []  # user data: selection split only
    assert set(sft.train_sft[0]) == {"prompt", "completion"}  # extra columns dropped
    assert {r["prompt"] for r in sft.train_sft + sft.eval_rows} == {r["prompt"] for r in sft_rows}
    pref_rows = [{"prompt": f"p{i}", "chosen": f"good{i}", "rejected": f"bad{i}"} for i in range(10)]
    pref = D.load_task(RunParams(task="jsonl", data_path=str(jsonl(tmp_path / "pref.jsonl", pref_rows))))
    assert len(pref.train_pairs) == 9 and pref.eval_pairs == pref.eval_rows and len(pref.eval_pairs) == 1
    assert all(s["completion"] == p["chosen"] for s, p in zip(pref.train_sft, pref.train_pairs))
    assert list(pref.source_files) == ["pref.jsonl"]


def test_empty_split_is_an_error(tmp_path):
    one = jsonl(tmp_path / "one.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(D.DataError, match=r"task 'jsonl': the dev split is empty.*more rows"):
        D.load_task(RunParams(task="jsonl", data_path=str(one)))


def test_hub_dataset_failure_is_a_data_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(D.DataError, match=r"some/dataset: the dataset could not be loaded.*local JSONL"):
        D.load_user_rows("some/dataset")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: [{"prompt": "p", "completion": "c"}])
    assert D.load_user_rows("some/dataset") == [{"prompt": "p", "completion": "c"}]


# --- data directory, hashing, CLI ------------------------------------------------------
def test_prefnb_data_env_var_and_missing_dir_message(tmp_path, monkeypatch, real_data_dir):
    copy = tmp_path / "mydata"
    copy.mkdir()
    shutil.copy(real_data_dir / "sonnets-train.txt", copy)
    monkeypatch.setenv("PREFNB_DATA", str(copy))
    assert D.resolve_data_dir(None) == copy
    assert D.resolve_data_dir(str(real_data_dir)) == real_data_dir  # the argument wins
    with pytest.raises(D.DataError, match=r"sonnets-dev\.txt: data file not found.*PREFNB_DATA"):
        D.load_task(RunParams(task="sonnets"))  # reads from the env var's folder
    monkeypatch.setenv("PREFNB_DATA", str(tmp_path / "missing"))
    with pytest.raises(D.DataError, match=r"from PREFNB_DATA; tried .*missing.*set `data_dir`.*PREFNB_DATA"):
        D.resolve_data_dir(None)


def test_dataset_hash_stable_and_sensitive(real_data_dir):
    rows = [{"prompt": "a", "completion": " yes"}, {"prompt": "b", "completion": " no"}]
    h = D.dataset_hash(rows)
    assert h == D.dataset_hash([{"completion": " yes", "prompt": "a"}, dict(rows[1])])  # key order
    assert h != D.dataset_hash([rows[0], {"prompt": "b", "completion": " yes"}])
    assert h != D.dataset_hash(rows[::-1]) and len(h) == 64
    assert D.file_sha256(real_data_dir / "sonnets-train.txt").startswith("722836995bea")


def test_cli_data_command(real_data_dir, tmp_path, capsys):
    from prefnb.cli import main

    assert main(["data", "--data-dir", str(real_data_dir)]) == 0
    out = capsys.readouterr().out
    assert "malformed rows skipped 2" in out and "66279661d492" in out and "train 119, selection 12, report 12" in out
    assert main(["data", "--data-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "PREFNB_DATA" in err and len(err.strip().splitlines()) == 1


def test_sampled_sonnet_negatives_differ_from_the_true_lines_in_content_only():
    """Sampled rejections are cut to whole lines (at most the true continuation's), the chosen
    side to as many lines, and EOS ends a side only where it truly ends."""
    truth = {"prompt": "a\nb\nc\n", "completion": "".join(f"true {i}\n" for i in range(4, 15))}  # 11 lines
    samples = [("one\ntwo\nthree is cut mid-li", False),          # budget ran out mid-line
               ("one\ntwo", True),                                 # the model stopped after two lines
               ("".join(f"x{i}\n" for i in range(13)), True),      # 13 lines: cut to 11, no longer its end
               ("no whole line", False)]
    rows = D.sonnet_sampled_pairs([truth] * 4, samples)
    assert rows[0] == {"prompt": truth["prompt"], "chosen": "true 4\ntrue 5\n", "rejected": "one\ntwo\n",
                       "chosen_eos": False, "rejected_eos": False}
    assert (rows[1]["rejected"], rows[1]["rejected_eos"], rows[1]["chosen"].count("\n")) == ("one\ntwo\n", True, 2)
    assert rows[2]["rejected"].count("\n") == 11 and not rows[2]["rejected_eos"]
    assert rows[2]["chosen"] == truth["completion"] and rows[2]["chosen_eos"]
    assert rows[3]["rejected"] == "no whole line" and not rows[3]["rejected_eos"] and rows[3]["chosen"] == "true 4\n"
    for row in rows[:3]:  # same number of whole lines on both sides
        assert row["chosen"].count("\n") == row["rejected"].count("\n") and row["rejected"].endswith("\n")


def test_encoders_add_eos_only_where_a_response_ends():
    from prefnb.models import build_tiny
    from prefnb.precompute import Encoders

    _, tokenizer = build_tiny(0)
    encoders = Encoders(tokenizer, 64, add_eos=True)
    chosen, rejected = encoders.pairs([{"prompt": "p\n", "chosen": "x\n", "rejected": "y\n", "rejected_eos": False}])
    assert chosen[0].ids[-1] == tokenizer.eos_token_id and rejected[0].ids[-1] != tokenizer.eos_token_id
    assert chosen[0].n_response == rejected[0].n_response + 1
