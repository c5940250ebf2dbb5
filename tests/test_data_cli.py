"""``ds-data``: each subcommand end to end, and one-line errors with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from ds_train.data.cli import main
from ds_train.data.encode import Encoder
from ds_train.data.sources import read_pairs

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
    assert run(f"tokenizer --corpus {CORPUS} --out {tmp_path / 'tok'} --vocab-size 600") == 0
    assert (tmp_path / "tok" / "separation.json").is_file()
    assert len(AutoTokenizer.from_pretrained(tmp_path / "tok")) == 600


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
