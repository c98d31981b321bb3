"""Task data: read the study files, build TRL-style rows (``prompt``/``completion``,
``prompt``/``chosen``/``rejected``), split, hash. Every problem raises :class:`DataError`
with one line naming the file and, where it helps, the line or row.

Facts about the real files that the readers rely on: ``quora-pairs.tsv`` was written by
pandas from fields that were already CSV-quoted, so ~700 questions come out of ``csv``
wrapped once more (:func:`_unwrap_quoted`); its lines 2191 and 12101 are malformed (empty
label; empty second question and label) and skipped. The sonnet files have CRLF endings
and a 7-line Folger header; Folger's sonnet 99 has 15 lines and 126 has 12.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from prefnb.cache import file_version
from prefnb.session import Session

log = logging.getLogger(__name__)

QUORA_FILE = "quora-pairs.tsv"
SONNET_FILES = {"train": "sonnets-train.txt", "dev": "sonnets-dev.txt",
                "dev_prompts": "sonnets-dev-prompts.txt", "test_prompts": "sonnets-test-prompts.txt"}
DATA_HINT = "set `data_dir` in the params or the PREFNB_DATA environment variable"

# Paraphrase is a cloze: both questions in the prompt, the answer is the next word. The
# leading space makes " yes"/" no" ordinary word tokens for BPE tokenizers; evaluation
# scores each answer by the summed log-probability of its tokens, so multi-token is fine.
PARAPHRASE_PROMPT = 'Question 1: "{q1}"\nQuestion 2: "{q2}"\nAre these questions asking the same thing? Answer:'
ANSWERS = {True: " yes", False: " no"}
# Sonnets: the model sees the first PROMPT_LINES lines and continues with the rest.
PROMPT_LINES = 3


class DataError(ValueError):
    """The data is missing or malformed; the message names the file (and line/row)."""


@dataclass(frozen=True)
class QuoraPair:
    pair_id: str
    question1: str
    question2: str
    is_duplicate: bool

    @property
    def prompt(self) -> str:
        return PARAPHRASE_PROMPT.format(q1=self.question1, q2=self.question2)


@dataclass(frozen=True)
class Sonnet:
    number: int
    lines: tuple[str, ...]  # stripped; all of them, whatever their number (99 has 15, 126 has 12)

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"

    @property
    def prompt(self) -> str:  # the first PROMPT_LINES lines, newline-terminated
        return "\n".join(self.lines[:PROMPT_LINES]) + "\n"

    @property
    def continuation(self) -> str:  # the rest, so that prompt + continuation == text
        return "\n".join(self.lines[PROMPT_LINES:]) + "\n"


# --- where the data is
def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The study data folder: `data_dir`, else $PREFNB_DATA, else ../shared/data next to the
    project (:mod:`prefnb.project`), the package's checkout or the working directory.

    An explicit choice that does not exist is an error, not a fallback: a typo never trains on other data.
    """
    if data_dir:
        candidates, source = [Path(data_dir).expanduser()], "data_dir"
    elif os.environ.get("PREFNB_DATA"):
        candidates, source = [Path(os.environ["PREFNB_DATA"]).expanduser()], "PREFNB_DATA"
    else:
        from prefnb.project import find_project

        source = "default"
        roots = (find_project().parent, Path(__file__).resolve().parents[2], Path.cwd().parent)
        candidates = [root / "shared" / "data" for root in roots]
    for path in candidates:
        if path.is_dir():
            return path
    tried = ", ".join(str(p) for p in dict.fromkeys(candidates))
    raise DataError(f"data directory not found (from {source}; tried {tried}): {DATA_HINT}")


def data_file(data_dir: str | os.PathLike, name: str = "", hint: str = DATA_HINT) -> Path:
    """`data_dir / name` if it is a file, else a DataError naming the file and what to set."""
    path = Path(data_dir) / name
    if not path.is_file():
        raise DataError(f"{path}: data file not found: {hint}")
    return path


# --- Quora pairs
QUORA_COLUMNS = ["id", "sentence1", "sentence2", "is_duplicate"]  # after the pandas index
_LABELS = {"0": False, "1": True, "0.0": False, "1.0": True}


def _unwrap_quoted(text: str) -> str:
    """Undo one more level of CSV quoting: '"What does ""x"" mean?"' → 'What does "x" mean?'.

    Only a field wrapped in quotes with nothing but doubled quotes inside: a question that
    merely starts with a quotation is left alone.
    """
    if len(text) >= 2 and text[0] == text[-1] == '"' and '"' not in text[1:-1].replace('""', ""):
        return text[1:-1].replace('""', '"')
    return text


def _parse_quora_row(row: list[str]) -> QuoraPair | str:
    """A QuoraPair, or a string saying what is wrong with the row."""
    if len(row) != 5:
        return f"expected 5 tab-separated fields, got {len(row)}"
    _, pair_id, q1, q2, label = (_unwrap_quoted(x.strip()).strip() for x in row)
    problems = [f"empty {name}" for name, q in (("sentence1", q1), ("sentence2", q2)) if not q]
    if label not in _LABELS:
        problems.append(f"is_duplicate label {label!r} is not 0/1" if label else "missing is_duplicate label")
    return "; ".join(problems) if problems else QuoraPair(pair_id, q1, q2, _LABELS[label])


def read_quora(path: str | os.PathLike, problems: list[str] | None = None, session: Session | None = None
               ) -> list[QuoraPair]:
    """Read the Quora pairs TSV; malformed rows are logged (file:line), skipped and appended
    to `problems` (the `prefnb data` summary counts them). A missing file, a wrong header or
    no valid row is a DataError. A ``session`` keeps the parse while the file is unchanged, so
    the runs of an in-process sweep read (and log) it once.
    """
    path = data_file(path)

    def parse():
        found: list[str] = []
        return tuple(_parse_quora(path, found)), tuple(found)

    pairs, skipped = (session or Session()).memo("quora", file_version(path), parse, keep=1)
    if problems is not None:
        problems.extend(skipped)
    return list(pairs)


def _parse_quora(path: Path, skipped: list[str]) -> list[QuoraPair]:
    pairs: list[QuoraPair] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter="\t")
            header = next(reader, None)
            if header is None or header[1:] != QUORA_COLUMNS:
                expected = "\t".join(["<index>"] + QUORA_COLUMNS)
                raise DataError(f"{path}:1: expected the header {expected!r}, got {header!r}")
            last_line = reader.line_num
            for row in reader:
                first_line, last_line = last_line + 1, reader.line_num
                parsed = _parse_quora_row(row)
                if isinstance(parsed, QuoraPair):
                    pairs.append(parsed)
                    continue
                # a row over several lines is most likely an unclosed quote: say so
                span = "" if first_line == last_line else f"-{last_line} (unclosed quote?)"
                skipped.append(f"{path}:{first_line}{span}: {parsed}")
                log.warning("skipping malformed row: %s", skipped[-1])
    except (csv.Error, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot be read as UTF-8 tab-separated text ({err})") from None
    if skipped:
        log.warning("%s: skipped %d malformed row(s), kept %d", path, len(skipped), len(pairs))
    if not pairs:
        raise DataError(f"{path}: no valid question pairs found")
    return pairs


# --- Sonnets
_NUMBER = re.compile(r"\d+")


def read_sonnets(path: str | os.PathLike, n_lines: int = 14) -> list[Sonnet]:
    """Read a sonnet file: a header (all before the first bare number), then blocks of number,
    blank line, lines (stripped of CR and indent). Prompt files (n_lines <= 3) need exactly
    n_lines per block; full sonnets n_lines-2 to n_lines+1, as real ones vary, all lines kept.
    """
    path = data_file(path)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    i = next((k for k, line in enumerate(lines) if _NUMBER.fullmatch(line)), None)
    if i is None:
        raise DataError(f"{path}: no sonnet found (expected a sonnet number alone on a line)")
    log.debug("%s: skipping a %d-line header", path, i)
    allowed = range(n_lines, n_lines + 1) if n_lines <= PROMPT_LINES else range(n_lines - 2, n_lines + 2)
    sonnets: dict[int, Sonnet] = {}
    while i < len(lines):
        if not lines[i]:  # blank lines between sonnets
            i += 1
            continue
        if not _NUMBER.fullmatch(lines[i]):
            raise DataError(f"{path}:{i + 1}: expected a sonnet number alone on a line, got {lines[i]!r}")
        number, start = int(lines[i]), i + 1
        if number in sonnets:
            raise DataError(f"{path}:{start}: sonnet {number} appears twice")
        i += 1
        while i < len(lines) and not lines[i]:  # the blank line after the number
            i += 1
        body = []
        while i < len(lines) and lines[i]:
            if _NUMBER.fullmatch(lines[i]):
                raise DataError(f"{path}:{i + 1}: sonnet {number}: line is a bare number "
                                f"(missing blank line before sonnet {lines[i]}?)")
            body.append(lines[i])
            i += 1
        if len(body) not in allowed:
            accepted = f" (accepted: {allowed[0]}-{allowed[-1]})" if len(allowed) > 1 else ""
            raise DataError(f"{path}:{start}: sonnet {number} has {len(body)} lines, "
                            f"expected {n_lines}{accepted}")
        sonnets[number] = Sonnet(number, tuple(body))
    return list(sonnets.values())


# --- splits, row builders
def split_indices(n: int, data_seed: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, list[int]]:
    """A seeded permutation of range(n) cut into train/dev/test by `fractions`.

    Cuts are at rounded cumulative fractions; a split with a positive fraction gets at
    least one item when n allows it (so a small user file still has a dev split).
    """
    if n < 0 or len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0):
        raise ValueError(f"split_indices: need n >= 0 and 3 fractions >= 0 summing to 1, got {n}, {fractions}")
    sizes = np.diff([0] + [math.floor(c * n + 0.5) for c in np.cumsum(fractions)]).tolist()
    sizes[-1] = n - sum(sizes[:-1])
    for k, frac in enumerate(fractions):
        largest = int(np.argmax(sizes))
        if frac > 0 and sizes[k] == 0 and sizes[largest] > 1:
            sizes[k], sizes[largest] = 1, sizes[largest] - 1
    order = np.random.Generator(np.random.PCG64(data_seed)).permutation(n).tolist()
    ends = np.cumsum(sizes).tolist()
    return {name: order[e - s:e] for name, s, e in zip(("train", "dev", "test"), sizes, ends)}


def paraphrase_sft_rows(pairs: Iterable[QuoraPair]) -> list[dict]:
    return [{"prompt": p.prompt, "completion": ANSWERS[p.is_duplicate]} for p in pairs]


def paraphrase_preference_rows(pairs: Iterable[QuoraPair]) -> list[dict]:
    return [{"prompt": p.prompt, "chosen": ANSWERS[p.is_duplicate],
             "rejected": ANSWERS[not p.is_duplicate]} for p in pairs]


def paraphrase_eval_rows(pairs: Iterable[QuoraPair]) -> list[dict]:
    return [{"prompt": p.prompt, "label": int(p.is_duplicate)} for p in pairs]


def sonnet_sft_rows(sonnets: Iterable[Sonnet]) -> list[dict]:
    return [{"prompt": s.prompt, "completion": s.continuation} for s in sonnets]


def sonnet_preference_rows(sft_rows: Sequence[dict], rejected: Sequence[str]) -> list[dict]:
    """Pairs with the true continuation as chosen and the given texts (e.g. samples) as rejected."""
    if len(sft_rows) != len(rejected):
        raise ValueError(f"sonnet_preference_rows: {len(sft_rows)} rows but {len(rejected)} rejected texts")
    return _warn_if_identical([{"prompt": r["prompt"], "chosen": r["completion"], "rejected": x}
                               for r, x in zip(sft_rows, rejected)])


def _warn_if_identical(rows: list[dict]) -> list[dict]:
    same = sum(r["chosen"] == r["rejected"] for r in rows)
    if same:  # legitimate (a model that memorised the sonnet) but such a pair teaches nothing
        log.warning("%d of %d preference pairs have rejected == chosen", same, len(rows))
    return rows


def whole_lines(text: str, ended: bool, max_lines: int) -> tuple[str, bool]:
    """A generated continuation cut to whole lines: (its first ≤ ``max_lines`` complete lines,
    newline-terminated; whether it still ends where the model emitted EOS).

    A line is complete when a newline or EOS (``ended``) ends it. A sample cut off by the token
    budget loses its partial last line and its EOS; so does one cut to ``max_lines``.
    """
    lines = text.split("\n")
    partial = lines.pop()  # after the last newline: "" if the text ends with one
    if ended and partial.strip():
        lines.append(partial)
    lines = lines[:max_lines] if max_lines > 0 else lines
    kept = "".join(line + "\n" for line in lines)
    return kept, ended and kept.rstrip("\n") == text.rstrip("\n")


def sonnet_sampled_pairs(sft_rows: Sequence[dict], samples: Sequence[tuple[str, bool]]) -> list[dict]:
    """Preference pairs from sampled continuations that differ from the true ones in content only.

    Each sample (text, emitted EOS) is cut to whole lines, at most as many as the true
    continuation has, and the chosen side to as many as the rejected side kept; each side ends
    with EOS only where it truly ends. Otherwise DPO could tell the sides apart by length, a
    cut-off last line or EOS alone. A sample without a whole line is kept as it is (and logged).
    """
    if len(sft_rows) != len(samples):
        raise ValueError(f"sonnet_sampled_pairs: {len(sft_rows)} rows but {len(samples)} samples")
    rows, unlined = [], 0
    for row, (text, ended) in zip(sft_rows, samples):
        true_lines = row["completion"].rstrip("\n").split("\n")
        rejected, rejected_eos = whole_lines(text, ended, len(true_lines))
        if not rejected.strip():  # kept whole; an empty one keeps its EOS (the model stopped at once)
            unlined += 1
            rejected, rejected_eos = text, ended or not text
        k = max(1, min(rejected.count("\n"), len(true_lines)))
        rows.append({"prompt": row["prompt"], "chosen": "".join(line + "\n" for line in true_lines[:k]),
                     "rejected": rejected, "chosen_eos": k == len(true_lines), "rejected_eos": rejected_eos})
    if unlined:
        log.warning("%d of %d sampled continuations hold no whole line (raise max_new_tokens)", unlined, len(rows))
    return _warn_if_identical(rows)


def other_continuations(sft_rows: Sequence[dict], seed: int) -> list[str]:
    """For each row, the completion of a different row: rows in a seeded random order each take
    their successor's (a single random cycle, not a uniform derangement; enough here)."""
    if len(sft_rows) < 2:
        raise ValueError(f"other_continuations: need at least 2 rows, got {len(sft_rows)}")
    order = np.random.Generator(np.random.PCG64(seed)).permutation(len(sft_rows))
    successor = np.empty_like(order)
    successor[order] = np.roll(order, -1)
    return [sft_rows[j]["completion"] for j in successor.tolist()]


def sonnet_eval_rows(full_sonnets: Sequence[Sonnet], prompt_sonnets: Sequence[Sonnet],
                     source: str = "") -> list[dict]:
    """One row per prompt sonnet: its prompt, the true continuation and the whole true sonnet;
    `source` (e.g. the two file names) prefixes error messages."""
    prefix = f"{source}: " if source else ""
    by_number = {s.number: s for s in full_sonnets}
    rows = []
    for p in prompt_sonnets:
        full = by_number.get(p.number)
        if full is None:
            raise DataError(f"{prefix}sonnet {p.number} has a prompt but no full text to score against")
        if tuple(p.lines[:PROMPT_LINES]) != full.lines[:PROMPT_LINES]:
            raise DataError(f"{prefix}sonnet {p.number}: the prompt lines differ from the full sonnet's first "
                            f"{PROMPT_LINES} lines")
        rows.append({"prompt": full.prompt, "reference": full.continuation, "full_reference": full.text})
    return rows


# --- the user's own data
SFT_COLUMNS = ("prompt", "completion")
PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """One JSON object per line; blank lines are skipped; a bad line is 'file:line: ...'."""
    path = data_file(path, hint="check `data_path`")
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def validate_rows(rows: Sequence[dict], source: str) -> list[dict]:
    """Check that all rows are SFT (prompt, completion) or all preference (prompt, chosen,
    rejected) rows with non-empty strings; return them reduced to those columns."""
    if not rows:
        raise DataError(f"{source}: no rows")
    columns = PREFERENCE_COLUMNS if {"chosen", "rejected"} <= rows[0].keys() else SFT_COLUMNS
    for k, row in enumerate(rows, start=1):
        for col in columns:
            if col not in row:
                raise DataError(f"{source}: row {k}: missing column '{col}' (rows need "
                                f"{'+'.join(SFT_COLUMNS)} or {'+'.join(PREFERENCE_COLUMNS)})")
            if not isinstance(row[col], str) or not row[col].strip():
                raise DataError(f"{source}: row {k}: column '{col}' must be a non-empty string, "
                                f"got {row[col]!r:.60}")
    return [{col: row[col] for col in columns} for row in rows]


def load_user_rows(data_path: str) -> list[dict]:
    """A local JSONL file, or else a Hugging Face dataset (its train split); validated."""
    if str(data_path).endswith(".jsonl") or Path(data_path).is_file():
        return validate_rows(read_jsonl(data_path), str(data_path))
    try:
        import datasets
        rows = list(datasets.load_dataset(data_path, split="train"))
    except Exception as err:  # offline, unknown id, bad files: all the same advice
        why = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        raise DataError(f"{data_path}: the dataset could not be loaded ({why}); "
                        "pass a local JSONL file instead") from None
    return validate_rows(rows, str(data_path))


# --- hashing
def dataset_hash(rows: Iterable[Any]) -> str:
    """sha256 of the rows as canonical JSON (sorted keys), one row per line."""
    h = hashlib.sha256()
    for row in rows:
        h.update((json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n").encode())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- one run's data
@dataclass
class TaskData:
    """Everything one run reads; ``eval_*`` is the selection split, ``test_*`` the report split
    (DESIGN.md, Splits), neither trained on."""

    task: str
    train_sft: list[dict]           # {"prompt","completion"}; preference data: chosen as completion
    train_pairs: list[dict] | None  # {"prompt","chosen","rejected"}; None: SFT-only data, or (a task of
                                    # SAMPLED_REJECTIONS) the caller samples the rejected responses
    eval_rows: list[dict]           # selection split. paraphrase {"prompt","label"}; sonnets {"prompt",
                                    # "reference","full_reference"}; jsonl: the held-out rows themselves
    eval_pairs: list[dict]          # selection preference pairs, implicit-reward accuracy ([] for SFT-only data)
    test_rows: list[dict]           # report split, same form as eval_rows ([] where the data has none: jsonl)
    test_pairs: list[dict]          # report preference pairs
    unscored_prompts: list[str]     # sonnets 145-156: prompts without references (nothing can score them)
    source_files: dict[str, str]    # file name -> sha256
    stats: dict[str, int] = field(default_factory=dict)  # rows read / skipped / split sizes, for summaries

    def hashes(self) -> dict[str, str]:
        """sha256 of each non-empty split (the manifest's ``datasets_sha256``)."""
        splits = {"train_sft": self.train_sft, "train_pairs": self.train_pairs, "eval_rows": self.eval_rows,
                  "eval_pairs": self.eval_pairs, "test_rows": self.test_rows, "test_pairs": self.test_pairs,
                  "unscored_prompts": self.unscored_prompts}
        return {name: dataset_hash(rows) for name, rows in splits.items() if rows}


# Tasks whose rejected responses are sampled from the starting policy when rejected_source is
# 'sampled' (`prefnb.precompute.sampled_rejections`, then :func:`sonnet_sampled_pairs`).
SAMPLED_REJECTIONS = frozenset({"sonnets"})


def _train_subset(items: list, params) -> list:
    """The first round(train_size * n) items (at least one), then at most max_train_examples:
    a prefix of a seeded order, so smaller train sizes are nested subsets of larger ones."""
    k = max(1, math.floor(params.train_size * len(items) + 0.5))
    return _cap(items[:k], params.max_train_examples)


def _cap(rows: list, k: int) -> list:
    """At most k rows (k = 0: all)."""
    return rows[:k] if k > 0 else rows


def _stats(read: int, skipped: int, train: int, selection: int, report: int) -> dict[str, int]:
    return {"rows_read": read, "rows_skipped": skipped, "train_split": train, "selection_split": selection,
            "report_split": report}


def _load_paraphrase(params, session: Session | None) -> TaskData:
    path = data_file(resolve_data_dir(params.data_dir), QUORA_FILE)
    problems: list[str] = []
    pairs = read_quora(path, problems, session)
    split = split_indices(len(pairs), params.data_seed)  # selection = dev, report = test
    train = _train_subset([pairs[i] for i in split["train"]], params)
    dev = _cap([pairs[i] for i in split["dev"]], params.max_eval_examples)
    test = _cap([pairs[i] for i in split["test"]], params.max_test_examples)
    stats = _stats(len(pairs) + len(problems), len(problems), *(len(split[k]) for k in ("train", "dev", "test")))
    return TaskData("paraphrase", paraphrase_sft_rows(train), paraphrase_preference_rows(train),
                    paraphrase_eval_rows(dev), paraphrase_preference_rows(dev),
                    paraphrase_eval_rows(test), paraphrase_preference_rows(test), [],
                    {path.name: file_sha256(path)}, stats)


# Training sonnets held out (by data_seed) to select checkpoints on: dev 132-143 are the report
# split, and as many as there (12) make selection and report chrF equally noisy (README).
SONNET_SELECTION_SIZE = 12


def _sonnet_pairs(sonnets: Sequence[Sonnet], data_seed: int) -> list[dict]:
    """Implicit-reward pairs of held-out sonnets: rejected = another sonnet's continuation,
    seeded by data_seed (the yardstick must not move with the training seed)."""
    rows = sonnet_sft_rows(sonnets)
    return [] if len(rows) < 2 else sonnet_preference_rows(rows, other_continuations(rows, data_seed))


def _load_sonnets(params, session: Session | None) -> TaskData:
    data_dir = resolve_data_dir(params.data_dir)
    paths = {key: data_file(data_dir, name) for key, name in SONNET_FILES.items()}
    train_all = read_sonnets(paths["train"])
    dev_full = read_sonnets(paths["dev"])
    dev_prompts = read_sonnets(paths["dev_prompts"], n_lines=PROMPT_LINES)
    unscored = read_sonnets(paths["test_prompts"], n_lines=PROMPT_LINES)
    if len(train_all) <= SONNET_SELECTION_SIZE:
        raise DataError(f"{paths['train']}: {len(train_all)} sonnets; need more than {SONNET_SELECTION_SIZE} "
                        "(that many are held out for checkpoint selection)")
    # A seeded order: the selection sonnets are a random slice (not the first of the cycle:
    # 1-17 all urge a young man to marry), and train_size < 1 keeps a random subset of the rest.
    order = np.random.Generator(np.random.PCG64(params.data_seed)).permutation(len(train_all)).tolist()
    selection = [train_all[i] for i in order[:SONNET_SELECTION_SIZE]]
    train = _train_subset([train_all[i] for i in order[SONNET_SELECTION_SIZE:]], params)
    train_sft = sonnet_sft_rows(train)
    if params.rejected_source == "other" and len(train_sft) < 2:
        raise DataError("task 'sonnets': rejected_source 'other' needs at least 2 training sonnets; "
                        "raise train_size or max_train_examples")
    train_pairs = (sonnet_preference_rows(train_sft, other_continuations(train_sft, params.seed))
                   if params.rejected_source == "other" else None)
    selection = _cap(selection, params.max_eval_examples)
    eval_rows = sonnet_eval_rows(selection, selection)
    test_rows = sonnet_eval_rows(dev_full, dev_prompts, f"{paths['dev_prompts']} vs {paths['dev'].name}")
    numbers = {s.number for s in dev_prompts}
    report = _cap([s for s in dev_full if s.number in numbers], params.max_test_examples)
    stats = _stats(len(train_all) + len(dev_full) + len(dev_prompts) + len(unscored), 0,
                   len(train_all) - SONNET_SELECTION_SIZE, SONNET_SELECTION_SIZE, len(test_rows))
    return TaskData("sonnets", train_sft, train_pairs, eval_rows, _sonnet_pairs(selection, params.data_seed),
                    _cap(test_rows, params.max_test_examples), _sonnet_pairs(report, params.data_seed),
                    [s.prompt for s in unscored], {p.name: file_sha256(p) for p in paths.values()}, stats)


def _load_jsonl(params, session: Session | None) -> TaskData:
    if not params.data_path:
        raise DataError("task 'jsonl' needs `data_path` (a JSONL file or a dataset id)")
    rows = load_user_rows(params.data_path)
    split = split_indices(len(rows), params.data_seed, (0.9, 0.1, 0.0))
    train = _train_subset([rows[i] for i in split["train"]], params)
    dev = _cap([rows[i] for i in split["dev"]], params.max_eval_examples)  # selection; no report split
    is_pref = "chosen" in rows[0]
    train_sft = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in train] if is_pref else train
    path = Path(params.data_path)
    source = {path.name: file_sha256(path)} if path.is_file() else {params.data_path: dataset_hash(rows)}
    return TaskData("jsonl", train_sft, train if is_pref else None, dev, dev if is_pref else [], [], [], [], source,
                    _stats(len(rows), 0, len(split["train"]), len(split["dev"]), 0))


_LOADERS = {"paraphrase": _load_paraphrase, "sonnets": _load_sonnets, "jsonl": _load_jsonl}


def load_task(params, session: Session | None = None) -> TaskData:
    """Everything a run reads, from a `prefnb.config.RunParams`; ``session`` keeps parsed files
    for the next run of an in-process sweep."""
    if params.task not in _LOADERS:
        raise DataError(f"unknown task {params.task!r} (known: {', '.join(_LOADERS)})")
    data = _LOADERS[params.task](params, session)
    for name, rows in (("train", data.train_sft), ("dev", data.eval_rows)):
        if not rows:  # subsetting keeps >= 1 row of a non-empty split, so the data is too small
            raise DataError(f"task '{data.task}': the {name} split is empty ({data.stats.get('rows_read', 0)} "
                            f"rows read); the data needs more rows (at least one for train and one for dev)")
    return data
