"""The stream: disjoint, complete shares per (rank, worker); exact resume; too-small corpora."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from ds_train.data.encode import Encoder
from ds_train.data.pack import pack_corpus
from ds_train.data.sources import read_pairs
from ds_train.data.stream import RawRows, StreamConfig, build_dataloader

ASSETS = Path(__file__).parent / "assets"
TOKENIZER = ASSETS / "tokenizer"
CORPUS = ASSETS / "tiny_pairs.jsonl"
ALL_IDS = sorted(p.id for p in read_pairs(CORPUS))


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed")
    pack_corpus(CORPUS, TOKENIZER, out, seq_len=256, num_shards=5, pack_buffer=4)
    return out


def loader(source, **overrides):
    settings = {
        "objective": "code_clm",
        "seq_len": 256,
        "micro_batch_size": 1,
        "rank": 0,
        "world_size": 2,
        "num_workers": 2,
        "seed": 11,
        "pack_buffer": 4,
        "shuffle_block": 32,
    }
    settings.update(overrides)
    return build_dataloader(source, TOKENIZER, **settings)


def test_packed_shards_split_over_2_ranks_x_2_workers_cover_an_epoch_once(packed: Path) -> None:
    rows_per_consumer: dict[int, list[list[str]]] = {}
    meta = json.loads((packed / "meta.json").read_text())
    for rank in (0, 1):
        inner = loader(packed, rank=rank).loader  # the raw StatefulDataLoader shows each batch's consumer
        for n, batch in enumerate(inner):
            if batch["_epoch"] == 0:
                rows_per_consumer.setdefault(batch["_consumer"], []).append(batch["ids"][0])
            if n > meta["rows"] // 2 + 4:
                break
    assert sorted(rows_per_consumer) == [0, 1, 2, 3]
    assert all(rows for rows in rows_per_consumer.values())
    seen = [pair_id for rows in rows_per_consumer.values() for row in rows for pair_id in row]
    assert sorted(seen) == sorted(set(seen))  # disjoint
    dropped = [i for i in ALL_IDS if i not in set(seen)]
    assert len(dropped) == sum(meta["skipped"].values())  # complete, but for the pairs too long to pack
    assert sum(len(rows) for rows in rows_per_consumer.values()) == meta["rows"]


def test_raw_pairs_split_over_4_consumers_cover_an_epoch_once() -> None:
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    per_consumer = []
    for consumer in range(4):
        cfg = StreamConfig([str(CORPUS)], str(TOKENIZER), "code_clm", 256, 1, seed=5, shuffle_block=16)
        rows = RawRows(cfg, consumer, 4, Encoder(tok))
        ids = []
        while rows.epoch == 0:
            ids.append(rows._next_doc().id)
        per_consumer.append(ids[:-1])  # the last one read opened epoch 1
    seen = [i for ids in per_consumer for i in ids]
    assert sorted(seen) == ALL_IDS  # complete and disjoint
    assert all(abs(len(ids) - len(ALL_IDS) / 4) <= 1 for ids in per_consumer)
    assert per_consumer[0] != sorted(per_consumer[0], key=ALL_IDS.index)  # shuffled


def take(stream, n: int) -> list[dict]:
    out = []
    for batch in stream:
        out.append(batch)
        if len(out) == n:
            return out
    raise AssertionError("stream ended")


def same(a: list[dict], b: list[dict]) -> bool:
    keys = ("input_ids", "position_ids", "doc_ids", "modality", "target", "prefix")
    return all(
        x["ids"] == y["ids"] and all(torch.equal(x[k], y[k]) for k in keys) for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize(
    ("kind", "objective", "workers"),
    [("raw", "corrupt_code_clm", 2), ("packed", "prefix_code_clm", 2), ("raw", "text_code_clm", 0)],
)
def test_stop_and_resume_gives_the_uninterrupted_batches(
    packed: Path, kind: str, objective: str, workers: int
) -> None:
    source = CORPUS if kind == "raw" else packed
    settings = {"objective": objective, "rank": 1, "num_workers": workers, "micro_batch_size": 2}
    whole = take(loader(source, **settings), 44)  # > one epoch of this rank's share
    assert len({i for b in whole for row in b["ids"] for i in row}) < sum(
        len(r) for b in whole for r in b["ids"]
    )
    for cut in (1, 9, 30):
        first = loader(source, **settings)
        head = take(first, cut)
        saved = io.BytesIO()
        torch.save(first.state_dict(), saved)  # as checkpoints keep it
        saved.seek(0)
        state = torch.load(saved, weights_only=True)
        second = loader(source, **settings)
        second.load_state_dict(state)
        assert same(head + take(second, 44 - cut), whole), cut


def test_skipped_records_are_counted_once_over_ranks(tmp_path: Path) -> None:
    corpus = tmp_path / "pairs.jsonl"
    lines = CORPUS.read_text().splitlines()
    corpus.write_text("\n".join(lines[:40] + ["{broken", '{"_id": "q"}'] + lines[40:80]) + "\n")
    total: dict[str, int] = {}
    for rank in (0, 1):
        stream = loader(corpus, rank=rank, num_workers=0, micro_batch_size=4)
        take(stream, 30)  # several epochs of this rank's share
        for reason, count in stream.skip_counts().items():
            total[reason] = total.get(reason, 0) + count
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    too_long = sum(len(ids) > 256 for _, ids, _ in Encoder(tok).layout(list(read_pairs(corpus))))
    assert total == {"malformed_json": 1, "missing_field": 1, **({"too_long": too_long} if too_long else {})}


def test_a_corpus_too_small_for_every_rank_is_one_clear_error(tmp_path: Path, packed: Path) -> None:
    corpus = tmp_path / "three.jsonl"
    corpus.write_text("\n".join(CORPUS.read_text().splitlines()[:3]) + "\n")
    with pytest.raises(ValueError, match=r"3 records .* cannot feed 2 rank\(s\) x 2 worker\(s\)"):
        loader(corpus)
    with pytest.raises(ValueError, match="packed with seq_len 256"):
        loader(packed, seq_len=512)
    with pytest.raises(ValueError, match="cannot stream hub dataset 'huawei-noah/python_text2code'"):
        loader("huawei-noah/python_text2code")
    with pytest.raises(ValueError, match="another stream configuration"):
        other = loader(CORPUS, num_workers=0)
        other.load_state_dict(loader(CORPUS, num_workers=0, seed=12).state_dict())
