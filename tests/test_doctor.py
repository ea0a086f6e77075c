"""The data doctor: duplicates, near duplicates, train/eval overlap, empty and repetitive replies, lengths per
source; reported by `sftune inspect` (text, --json, --html in a real browser), the log and the model card; cached
with the prepared data; `dedupe` removes what it finds and says so."""

from __future__ import annotations

import html.parser
import importlib.util
import json
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import WORDS, asset_folder, build_tokenizer, conversations, write_jsonl

from sftune import SFTConfig, train
from sftune.cli import main
from sftune.data import doctor
from sftune.data.prepare import prepare_train_data

STORY = ("once upon a time a small model lived in a blue house by the river it read every book it could find and "
         "wrote long letters to the mountain about the weather the trees and the fine red cats of the town")
COUNTS = ("exact_duplicates", "near_duplicates", "train_eval_overlap", "empty_replies", "repetitive_replies")


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def planted_rows() -> tuple[list[dict], list[dict], dict[str, list[int]]]:
    """Training and eval rows with known problems; the planted rows' numbers (1-based) per finding."""
    train_rows = conversations(20, seed=3)
    train_rows[1] = chat("what is the weather like today", "sunny with a little rain in the mountain")
    planted = {name: [] for name in COUNTS}

    def add(row: dict, finding: str | None) -> None:
        train_rows.append(row)
        if finding:
            planted[finding].append(len(train_rows))

    add(chat("tell me a story please", STORY), None)
    add(chat("tell  me a story\tplease ", "\n" + STORY.replace(" a ", "  a ") + "\n"), "exact_duplicates")
    add(chat("WHAT is the weather like, today?", "Sunny -- with a little rain in the mountain!"), "near_duplicates")
    add(chat("tell me a story please", STORY.replace("letters", "poems")), "near_duplicates")
    add(chat("hello", ""), "empty_replies")
    add(chat("hi", "  \n "), "empty_replies")
    add(chat("are you there", "I am so sorry about that. " * 5), "repetitive_replies")
    add(chat("and now", "I am so sorry about that. " * 3 + "the end"), None)  # three times: not a loop
    add(chat("describe it", "the cat sat on the mat and the dog sat on the rug and the bird sat on the tree by "
                            "the house and the fish sat in the river"), None)  # repeated words, no loop
    eval_rows = [train_rows[0], chat("What is the weather like today", "sunny, with a little rain in the mountain"),
                 chat("one more question", "five six seven")]
    return train_rows, eval_rows, planted


@pytest.fixture
def planted_data(tmp_path) -> tuple[Path, dict[str, list[int]]]:
    train_rows, eval_rows, planted = planted_rows()
    folder = tmp_path / "planted"
    write_jsonl(folder / "train.jsonl", train_rows)
    write_jsonl(folder / "test.jsonl", eval_rows)
    return folder, planted


def prepared(folder: Path, **settings):
    config = SFTConfig(model_name_or_path="tiny", dataset_name=str(folder), dataset_test_split="test",
                       max_length=256, **settings)
    return prepare_train_data(config, build_tokenizer())


def row_numbers(examples: list[str], file: str = "train.jsonl") -> list[int]:
    """The first row each example names."""
    return [int(example.split(f"{file} row ")[1].split()[0].rstrip(":")) for example in examples]


def test_each_finding_is_counted_and_names_its_rows(planted_data):
    folder, planted = planted_data
    report = prepared(folder).stats["doctor"]
    assert {name: report[name] for name in COUNTS} == {
        "exact_duplicates": 1, "near_duplicates": 2, "train_eval_overlap": 2, "empty_replies": 2,
        "repetitive_replies": 1}
    for name in ("exact_duplicates", "near_duplicates", "empty_replies", "repetitive_replies"):
        assert row_numbers(report["examples"][name]) == planted[name], name
    assert report["near_same_text"] == 1 and report["near_similar"] == 1
    exact, = report["examples"]["exact_duplicates"]
    assert exact.endswith("train.jsonl row 21")  # the story it repeats
    similar = report["examples"]["near_duplicates"][1]
    assert similar.endswith("train.jsonl row 21")
    assert float(similar.split("similarity ")[1].split(")")[0]) >= doctor.NEAR_SIMILARITY
    assert report["overlap_exact"] == 1 and report["eval_duplicates"] == 0
    overlap = report["examples"]["train_eval_overlap"]
    assert overlap[0].startswith("eval ") and "test.jsonl row 1 repeats" in overlap[0] and "train.jsonl row 1" in overlap[0]
    assert "test.jsonl row 2 is the same up to case" in overlap[1] and overlap[1].endswith("train.jsonl row 2")
    assert "message 2 (assistant) repeats 'i am so sorry about that' 5 times" in report["examples"]["repetitive_replies"][0]
    assert report["rows_checked"] == {"train": 29, "eval": 3}
    assert report["dedupe"] is None
    assert report["near_rule"]["threshold"] == doctor.NEAR_SIMILARITY


def test_per_source_lengths_truncation_and_trained_share(tmp_path):
    rng = random.Random(2)
    short = write_jsonl(tmp_path / "short.jsonl", [chat("hi", "yes")] * 2 + [chat(f"hi {i}", w) for i, w in
                                                                          enumerate(sorted(set(WORDS))[:30])])
    long = write_jsonl(tmp_path / "long.jsonl", [chat("tell me", " ".join(rng.choice(WORDS) for _ in range(300)))
                                                  for _ in range(12)])
    config = SFTConfig(model_name_or_path="tiny", datasets=[{"path": str(short)}, {"path": str(long)}],
                       max_length=200, assistant_only_loss=True)
    data = prepare_train_data(config, build_tokenizer())
    report = data.stats["doctor"]
    by_name = {s["name"]: s for s in report["sources"]}
    assert by_name[str(long)]["truncated"] == 12 and by_name[str(short)]["truncated"] == 0
    assert by_name[str(long)]["truncated_examples"] == [f"{long} row {i}" for i in (1, 2, 3)]
    assert by_name[str(long)]["lengths"]["max"] == 200
    assert sum(by_name[str(short)]["histogram"]["counts"]) == 32
    assert report["exact_duplicates"] == 1  # the repeated "hi"/"yes"
    trained = {s["name"]: s["trained_tokens"] for s in data.stats["sources"]}
    assert sum(trained.values()) == data.stats["trained_tokens"]
    assert trained[str(long)] > 10 * trained[str(short)] > 0

    lines = "\n".join(main_inspect_lines(data.stats))
    assert f"source {long}: 12 rows, " in lines and "12 rows truncated to max_length" in lines


def main_inspect_lines(stats: dict) -> list[str]:
    from sftune.data.doctor_report import inspect_lines

    return inspect_lines(stats)


def test_rows_far_from_the_median_length_are_named(tmp_path):
    rows = [chat("tell me", " ".join(WORDS[i:i + 6])) for i in range(30)]
    rows.append(chat("tell me", " ".join(WORDS * 4)))  # far longer than the rest
    data = prepare_train_data(SFTConfig(model_name_or_path="tiny", dataset_name=str(write_jsonl(
        tmp_path / "lengths.jsonl", rows)), max_length=None), build_tokenizer())
    source, = data.stats["doctor"]["sources"]
    assert source["long_rows"] == 1 and source["long_examples"][0].startswith(f"{tmp_path / 'lengths.jsonl'} row 31 (")
    assert source["short_rows"] == 0


def test_findings_are_cached_and_dedupe_is_part_of_the_fingerprint(planted_data):
    folder, _ = planted_data
    first = prepared(folder)
    again = prepared(folder)
    assert again.stats.get("cached") and not first.stats.get("cached")
    assert again.stats["doctor"] == first.stats["doctor"]
    assert not prepared(folder, dedupe="exact").stats.get("cached")  # dedupe changes the rows: prepared again


def test_dedupe_removes_duplicates_and_says_how_many(planted_data):
    folder, _ = planted_data
    kept = prepared(folder)
    exact = prepared(folder, dedupe="exact")
    near = prepared(folder, dedupe="near")
    assert len(kept.train_rows) == 29 and len(kept.eval_rows) == 3  # off by default: nothing is dropped
    assert exact.stats["doctor"]["dedupe"] == {"mode": "exact", "train_removed": 1, "eval_removed": 1}
    assert near.stats["doctor"]["dedupe"] == {"mode": "near", "train_removed": 3, "eval_removed": 2}
    assert len(exact.train_rows) == 28 and len(exact.eval_rows) == 2
    assert len(near.train_rows) == 26 and len(near.eval_rows) == 1
    assert exact.stats["rows_dropped"] == {"duplicates": 2} and near.stats["rows_dropped"] == {"duplicates": 5}
    assert sorted(r["index"] for r in kept.train_rows) == list(range(29))
    removed = {r["index"] for r in kept.train_rows} - {r["index"] for r in near.train_rows}
    assert removed == {21, 22, 23}  # 0-based: the whitespace copy, the shouted weather and the story with poems
    assert exact.stats["doctor"]["exact_duplicates"] == 1  # what was found stays reported


def test_checks_in_worker_processes_equal_checks_in_one_process(planted_data):
    folder, _ = planted_data
    one = prepared(folder, dataset_num_proc=1).stats["doctor"]
    two = prepared(folder, dataset_num_proc=2).stats["doctor"]
    assert one == two and one["near_duplicates"] == 2


def word_trigrams(text: str) -> set[tuple[str, ...]]:
    words = ["\x05"] + text.split()  # the doctor's mark for a text row, then the words
    return set(zip(words, words[1:], words[2:]))


def test_minhash_similarity_estimates_the_jaccard_similarity_of_word_trigrams():
    rng = random.Random(5)
    pairs = []
    for _ in range(40):
        base = [rng.choice(WORDS) for _ in range(120)]
        variant = list(base)
        for position in rng.sample(range(len(base)), rng.randint(0, 40)):
            variant[position] = rng.choice(WORDS)
        pairs.append((" ".join(base), " ".join(variant)))
    prints = doctor.fingerprints([{"text": text} for pair in pairs for text in pair])
    estimated, true = [], []
    for (a, b), pa, pb in zip(pairs, prints[0::2], prints[1::2]):
        sa, sb = np.frombuffer(pa.signature, dtype=np.uint32), np.frombuffer(pb.signature, dtype=np.uint32)
        estimated.append(float((sa == sb).mean()))
        ta, tb = word_trigrams(a), word_trigrams(b)
        true.append(len(ta & tb) / len(ta | tb))
    errors = np.abs(np.array(estimated) - np.array(true))
    assert len(set(np.round(true, 1))) >= 5  # the pairs span a range of similarities
    assert errors.mean() < 0.06 and errors.max() < 0.2

    # the same pairs through the whole check: a pair is a near duplicate where its similarity is clearly above
    # the threshold, and not where it is clearly below
    near_pairs = [k for k, t in enumerate(true) if t > doctor.NEAR_SIMILARITY + 0.1]
    far_pairs = [k for k, t in enumerate(true) if t < doctor.NEAR_SIMILARITY - 0.15]
    assert near_pairs and far_pairs
    flagged = _flagged_rows(prints)
    assert all(2 * k + 1 in flagged for k in near_pairs)
    assert not any(2 * k + 1 in flagged for k in far_pairs)


def _flagged_rows(prints: list[doctor.RowPrint]) -> set[int]:
    n = len(prints)
    _, remove = doctor.examine(prints, np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64),
                               np.ones(n, dtype=np.int64), np.zeros(n, dtype=bool), str, ["s"], "near")
    return set(np.flatnonzero(remove).tolist())


@pytest.mark.parametrize("reply, loop", [
    ("ha " * 20, "'ha' 20 times"),
    ("ok so " + "we can do it " * 4 + "fine", "'we can do it' 4 times"),
    ("the end " * 7, None),  # 14 words: too short to call a loop
    ("I am so sorry about that. " * 3, None),  # three times only
    (" ".join(WORDS), None),
])
def test_loops_in_replies(reply, loop):
    found = doctor.fingerprints([chat("hi", reply)])[0].repetition
    if loop is None:
        assert found is None
    else:
        assert found is not None and loop in found and found.startswith("message 2 (assistant) repeats")


def test_loops_in_a_user_message_are_not_reply_problems():
    prints = doctor.fingerprints([chat("ha " * 30, "fine thanks"), {"text": "ha " * 30},
                                  {"prompt": "ha " * 30, "completion": "no no no"}])
    assert prints[0].repetition is None and prints[2].repetition is None
    assert prints[1].repetition.startswith("the text repeats 'ha'")


def test_pretokenized_and_prompt_completion_rows(tmp_path):
    tokenized = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [5, 6, 7, 8]}, {"input_ids": [5, 6, 7, 8]},
                                                      {"input_ids": [5, 6, 7, 9]}])
    report = prepare_train_data(SFTConfig(model_name_or_path="tiny", dataset_name=str(tokenized)),
                                build_tokenizer()).stats["doctor"]
    assert report["exact_duplicates"] == 1 and report["near_duplicates"] == 0
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "say hi", "completion": "hi there"},
                                                   {"prompt": "Say hi!", "completion": "Hi, there."}])
    report = prepare_train_data(SFTConfig(model_name_or_path="tiny", dataset_name=str(pairs)),
                                build_tokenizer()).stats["doctor"]
    assert report["near_duplicates"] == report["near_same_text"] == 1 and report["exact_duplicates"] == 0


def test_the_real_chitchat_conversations(tmp_path):
    """Real data, with copies whose duplication is known: whitespace-changed copies are exact duplicates,
    lower-cased copies without punctuation near duplicates of the same text, one-word edits of long conversations
    near duplicates by similarity."""
    spec = importlib.util.spec_from_file_location("chitchat", Path(__file__).parents[1] / "bench" / "chitchat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.chitchat_conversations(asset_folder("chitchat"))[:1200]
    unique = {json.dumps(r): r for r in rows if any(m["role"] == "assistant" for m in r["messages"])}  # as trained
    examples = [{"messages": r["messages"], "completion_start": None, "tools": None, "chat_template_kwargs": None}
                for r in unique.values()]
    assert len(examples) > 600

    def edited(example: dict, change) -> dict:
        return {**example, "messages": [{**m, "content": change(m["content"])} for m in example["messages"]]}

    rng = random.Random(1)
    spaced = [edited(e, lambda c: "  " + c.replace(" ", "   ") + "\n") for e in examples[:100]]
    shouted = [edited(e, lambda c: c.upper().replace(".", "").replace(",", " ,")) for e in examples[100:200]]
    long_ones = [e for e in examples[200:] if sum(len(m["content"].split()) for m in e["messages"]) > 150][:100]

    def one_word_changed(example: dict) -> dict:
        messages = [dict(m) for m in example["messages"]]
        longest = max(messages, key=lambda m: len(m["content"].split()))
        words = longest["content"].split()
        words[rng.randrange(len(words))] = "zebra"
        longest["content"] = " ".join(words)
        return {**example, "messages": messages}

    edits = [one_word_changed(e) for e in long_ones]
    base = _report(examples)
    report = _report(examples + spaced + shouted + edits)
    assert report["exact_duplicates"] == base["exact_duplicates"] + 100
    assert report["near_same_text"] == base["near_same_text"] + 100
    assert report["near_similar"] >= base["near_similar"] + 0.95 * len(edits)
    assert len(edits) == 100
    assert base["exact_duplicates"] == 0 and base["near_duplicates"] < 10  # real conversations: rarely repeated


def _report(examples: list[dict]) -> dict:
    prints = doctor.fingerprints(examples)
    n = len(prints)
    report, _ = doctor.examine(prints, np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64),
                               np.ones(n, dtype=np.int64), np.zeros(n, dtype=bool), str, ["chitchat"], None)
    return report


# ---------------------------------------------------------------- where the findings are shown


def test_inspect_json_has_the_doctor_beside_the_statistics(tiny_model_dir, planted_data, capsys):
    folder, _ = planted_data
    code = main(["inspect", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(folder),
                 "--dataset_test_split", "test", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    stats = json.loads(out.out)  # stdout holds the one object, nothing else
    assert {"rows", "tokens", "trained_tokens", "template_checks", "sources"} <= set(stats)
    assert {name: stats["doctor"][name] for name in COUNTS} == {
        "exact_duplicates": 1, "near_duplicates": 2, "train_eval_overlap": 2, "empty_replies": 2,
        "repetitive_replies": 1}
    assert "data doctor: 29 training rows" in out.err  # the log, on stderr

    assert main(["inspect", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(folder),
                 "--dataset_test_split", "test", "--num_examples", "0"]) == 0
    text = capsys.readouterr().out
    for expected in ("data doctor: 29 training rows, 3 eval rows", "exact duplicates: 1 (the most repeated",
                     "train/eval overlap: 2 (1 exact, 1 near)", "empty replies: 2",
                     "train.jsonl row 27: message 2 (assistant) repeats", "tokens per row: min"):
        assert expected in text, expected


def test_training_log_and_model_card_summarise_the_findings(tiny_model_dir, planted_data, tmp_path, capsys):
    folder, _ = planted_data
    config = SFTConfig(model_name_or_path=str(tiny_model_dir), dataset_name=str(folder), dataset_test_split="test",
                       max_length=128, max_steps=1, save_strategy="no", output_dir=str(tmp_path / "run"),
                       per_device_train_batch_size=4)
    result = train(config)
    log = capsys.readouterr().err
    assert "data doctor: 29 training rows: exact duplicates 1, near duplicates 2, train/eval overlap 2, " \
           "empty replies 2, repetitive replies 1" in log
    assert "data doctor: empty replies: 2 (training rows with an empty or whitespace-only assistant reply), e.g. " in log
    card = (result.output_dir / "README.md").read_text()
    assert "- Data checks (sftune's data doctor, on 29 training rows): exact duplicates 1, near duplicates 2, " \
           "train/eval overlap 2, empty replies 2, repetitive replies 1" in card


class _Resources(html.parser.HTMLParser):
    """Anything in a page that a browser could fetch."""

    def __init__(self):
        super().__init__()
        self.fetches: list[str] = []
        self.tags: set[str] = set()
        self.css: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self._in_style = tag == "style"
        for name, value in attrs:
            if name in ("src", "href", "srcset", "poster", "data", "action", "background") or \
                    (name != "content" and value and ("://" in value or value.startswith("//"))):
                self.fetches.append(f"{tag} {name}={value}")
            if name == "style" and value and ("url(" in value or "@import" in value):
                self.fetches.append(f"{tag} style={value}")

    def handle_data(self, data):
        if self._in_style:
            self.css.append(data)

    def handle_endtag(self, tag):
        self._in_style = False


def find_chromium() -> str | None:
    return next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)


def test_html_report_is_one_offline_page_that_a_real_browser_renders(tiny_model_dir, planted_data, tmp_path):
    folder, _ = planted_data
    page = tmp_path / "report" / "report.html"
    assert main(["inspect", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(folder),
                 "--dataset_test_split", "test", "--assistant_only_loss", "--html", str(page)]) == 0
    text = page.read_text(encoding="utf-8")
    resources = _Resources()
    resources.feed(text)
    assert not resources.fetches
    assert not {"script", "link", "img", "iframe", "object", "embed"} & resources.tags
    assert not any("url(" in css or "@import" in css for css in resources.css)
    assert "Content-Security-Policy" in text and "default-src 'none'" in text
    for expected in ("Data doctor", "exact duplicates", "train.jsonl row 27: message 2 (assistant) repeats",
                     "tokens per row", "<svg", "Example 1:", 'class="t"'):
        assert expected in text, expected
    assert list(page.parent.iterdir()) == [page]  # written atomically: no temporary file left

    browser = find_chromium()
    if browser is None:
        pytest.skip("Chromium is not installed, so the page is not rendered in a browser (install the Debian "
                    "package: apt-get install chromium; .ci/run does so)")
    screenshot = tmp_path / "shot.png"
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=1200,2000", f"--screenshot={screenshot}", page.as_uri()],
        capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and screenshot.is_file(), done.stderr[-2000:]
    from PIL import Image

    from sftune.report_html import TRAINED_BACKGROUND

    pixels = np.asarray(Image.open(screenshot).convert("RGB")).reshape(-1, 3).astype(np.int64)
    assert len(pixels) == 1200 * 2000
    not_white = (pixels < 245).any(axis=1).mean()
    assert 0.02 < not_white < 0.9, not_white  # text, tables and charts on a white page: neither blank nor a block
    assert len(np.unique(pixels[::7], axis=0)) > 50
    highlight = np.array([int(TRAINED_BACKGROUND[i:i + 2], 16) for i in (1, 3, 5)])
    assert (np.abs(pixels - highlight).max(axis=1) <= 8).sum() > 200  # the trained tokens are highlighted


def test_similarity_and_loops_look_only_at_what_training_can_see():
    """Past max_length words (each at least one token) a row is cut off by keep_start truncation: a loop there is
    never trained, and two rows that differ only there are the same to training."""
    start = " ".join(WORDS[:40])
    looping = chat("hi", start + " ha" * 30)
    assert doctor.fingerprints([looping])[0].repetition is not None
    assert doctor.fingerprints([looping], max_words=40)[0].repetition is None
    a, b = chat("hi", start + " " + " ".join(WORDS[40:])), chat("hi", start + " " + " ".join(reversed(WORDS[40:])))
    full, cut = doctor.fingerprints([a, b]), doctor.fingerprints([a, b], max_words=42)
    assert full[0].signature != full[1].signature and cut[0].signature == cut[1].signature
    assert cut[0].exact != cut[1].exact  # the keys still cover the whole row
