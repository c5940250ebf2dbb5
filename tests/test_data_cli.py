"""``ds-data``: each subcommand end to end, and one-line errors with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from ds_train.config import Config
from ds_train.data.cli import build_parser, main
from ds_train.data.codec import delinearize, linearize
from ds_train.data.encode import Encoder
from ds_train.data.sources import Pair, read_pairs
from ds_train.data.tokenizer import DEFAULT_VOCAB_SIZE

ASSETS = Path(__file__).parent / "assets"
TOKENIZER = ASSETS / "tokenizer"
CORPUS = ASSETS / "tiny_pairs.jsonl"


def run(command: str) -> int:
    """``ds-data`` with a command line (no path here has spaces)."""
    return main(command.split())


def test_encode_writes_one_line_per_pair(tmp_path: Path, capsys) -> None:
    out = tmp_path / "enc.jsonl"
    command = f"encode --tokenizer {TOKENIZER} --in {CORPUS} --out {out} --objective corrupt_code_clm"
    assert run(f"{command} --seed 4 --epoch 2") == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    pairs = list(read_pairs(CORPUS))
    encoder = Encoder(AutoTokenizer.from_pretrained(TOKENIZER), "corrupt_code_clm", seed=4)
    expected = encoder.encode(pairs, epoch=2)
    assert len(records) == len(pairs) == len(expected)
    for record, enc in zip(records, expected):
        assert set(record) == {"_id", "input_ids", "modality", "target"}
        got = (record["_id"], record["input_ids"], record["modality"], record["target"])
        assert got == (enc.id, enc.input_ids, enc.modality, enc.target)
    assert f"wrote {len(pairs)} encoded pairs" in capsys.readouterr().out


def test_pack_then_inspect_shows_modality_and_targets(tmp_path: Path, capsys) -> None:
    packed = tmp_path / "p"
    options = "--seq-len 512 --num-shards 2 --workers 2"
    assert run(f"pack --tokenizer {TOKENIZER} --in {CORPUS} --out {packed} {options}") == 0
    meta = json.loads((packed / "meta.json").read_text())
    assert meta["num_shards"] == 2 and meta["seq_len"] == 512 and meta["rows"] > 0
    capsys.readouterr()
    assert run(f"inspect {packed} --tokenizer {TOKENIZER} --limit 400") == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0].startswith("row 0: ids [")
    tokens = [line.split()[-1] for line in shown[2:] if not line.strip().startswith("...")]
    assert tokens[0] == "'<bot>'" and "'<python>'" in tokens
    first_body = tokens.index("'<python>'") + 1
    assert " code   * " in shown[2 + first_body] and " text     " in shown[2]


def test_tokenizer_and_mine_subcommands(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "m.py").write_text(
        'def double(x):\n    """Return twice x, for any number x given."""\n    return 2 * x\n\n\n'
        'def half(x):\n    """Return half of x, for any number x given."""\n    y = x / 2\n    return y\n'
    )
    pairs = tmp_path / "pairs.jsonl"
    assert run(f"mine {src} --out {pairs} --no-progress --min-code-tokens 1 --min-docstring-chars 1") == 0
    assert [p.id for p in read_pairs(pairs)]
    assert run(f"tokenizer --corpus {CORPUS} {pairs} --out {tmp_path / 'tok'} --vocab-size 600") == 0
    assert (tmp_path / "tok" / "separation.json").is_file()
    assert 590 <= len(AutoTokenizer.from_pretrained(tmp_path / "tok")) <= 600
    args = build_parser().parse_args(f"tokenizer --corpus {CORPUS} --out x".split())
    assert args.vocab_size == DEFAULT_VOCAB_SIZE == Config().data.vocab_size


def test_encode_never_destroys_an_existing_file(tmp_path: Path, capsys) -> None:
    out = tmp_path / "enc.jsonl"
    out.write_text("precious\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"_id": "a", "docstring": "d", "code": "x = 1"}) + "\n{broken\n")
    assert run(f"encode --tokenizer {TOKENIZER} --in {bad} --out {out}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ds-data encode: error: nothing to write")
    assert out.read_text() == "precious\n" and sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "enc.jsonl"]
    assert run(f"encode --tokenizer {TOKENIZER} --in {CORPUS} --out {out}") == 0
    assert len(out.read_text().splitlines()) == len(list(read_pairs(CORPUS)))


def test_encode_linearizes_raw_python(tmp_path: Path) -> None:
    pairs = list(read_pairs(CORPUS))[:40]
    raw = tmp_path / "raw.jsonl"
    raw.write_text(
        "".join(json.dumps({"_id": p.id, "docstring": p.docstring, "code": delinearize(p.code)}) + "\n" for p in pairs)
    )
    out = tmp_path / "enc.jsonl"
    assert run(f"encode --tokenizer {TOKENIZER} --in {raw} --out {out}") == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    linearized = [Pair(p.id, p.docstring, linearize(delinearize(p.code))) for p in pairs]
    expected = Encoder(AutoTokenizer.from_pretrained(TOKENIZER)).encode(linearized)
    assert [r["input_ids"] for r in records] == [e.input_ids for e in expected]


@pytest.mark.parametrize(
    "command",
    [
        "encode --tokenizer /no/such/dir --in x.jsonl --out {tmp}/o.jsonl",
        f"encode --tokenizer {TOKENIZER} --in {{tmp}}/absent.jsonl --out {{tmp}}/o.jsonl",
        f"pack --tokenizer {TOKENIZER} --in {CORPUS} --out {{tmp}}/p --num-shards 0",
        f"pack --tokenizer {TOKENIZER} --in {CORPUS} --out {{tmp}}/p --num-shards 3 --workers 2",
        f"inspect {CORPUS} --tokenizer {TOKENIZER} --row 100000",
        "tokenizer --out {tmp}/t",
        f"tokenizer --corpus {CORPUS} --out {{tmp}}/t --vocab-size 100",
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path: Path, capsys, command: str) -> None:
    assert run(command.replace("{tmp}", str(tmp_path))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ds-data {command.split()[0]}: error: ")


def test_bad_flags_exit_2() -> None:
    with pytest.raises(SystemExit) as exit_info:
        run("encode --objective nope")
    assert exit_info.value.code == 2
