"""Packing: document boundaries, positions, targets, best fit, overlong pairs, state, shards, and a
failed `ds-data pack` leaving an existing output as it was."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from ds_train.data.batch import batch_spec, make_batch
from ds_train.data.encode import Encoder
from ds_train.data.pack import Doc, Packer, Shard, pack, pack_corpus, read_meta, shard_paths
from ds_train.data.sources import SkipCounter, read_pairs

ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="module")
def encoder():
    return Encoder(AutoTokenizer.from_pretrained(ASSETS / "tokenizer"))


@pytest.fixture(scope="module")
def docs(encoder) -> list[Doc]:
    pairs = list(read_pairs(ASSETS / "tiny_pairs.jsonl"))
    return [Doc(*laid) for laid in encoder.layout(pairs)]


def fake_docs(lengths: list[int]) -> list[Doc]:
    return [
        Doc(f"d{i}", np.full(n, 100 + i), np.r_[0, np.full(n - 2, 5), 6].astype(np.int8))
        for i, n in enumerate(lengths)
    ]


@pytest.mark.parametrize("objective", ["text_code_clm", "code_clm", "prefix_code_clm", "corrupt_code_clm"])
def test_packed_batch_keeps_documents_apart(encoder, docs, objective: str) -> None:
    T = 384
    rows = list(pack(docs, T, buffer_rows=4))
    batch = make_batch(rows, batch_spec(encoder, objective, T))
    ids, pos, doc, mod, tgt, pre = (
        batch[k] for k in ("input_ids", "position_ids", "doc_ids", "modality", "target", "prefix")
    )
    assert all(batch[k].shape == (len(rows), T) for k in ("input_ids", "position_ids", "doc_ids"))
    assert (ids.dtype, pos.dtype, doc.dtype, mod.dtype, tgt.dtype) == (
        torch.int64,
        torch.int64,
        torch.int32,
        torch.bool,
        torch.bool,
    )
    laid = {d.id: d for d in docs}
    for b, row_ids in enumerate(batch["ids"]):
        start = 0
        for k, pair_id in enumerate(row_ids):
            n = len(laid[pair_id])
            span = slice(start, start + n)
            assert (doc[b, span] == k).all()
            assert torch.equal(pos[b, span], torch.arange(n))  # positions restart per document
            assert not tgt[b, start]  # the first token of a document is never a target
            if objective != "corrupt_code_clm":
                assert ids[b, span].tolist() == laid[pair_id].ids.tolist()
            start += n
        pad = slice(start, T)
        assert (doc[b, pad] == -1).all() and (ids[b, pad] == encoder.pad_id).all()
        assert not (tgt[b, pad].any() or mod[b, pad].any() or pre[b, pad].any())
    assert sorted(i for row in batch["ids"] for i in row) == sorted(d.id for d in docs if len(d) <= T)
    # No loss crosses a boundary: a target's previous token belongs to its own document.
    b, t = torch.nonzero(tgt, as_tuple=True)
    assert (doc[b, t - 1] == doc[b, t]).all()


def test_greedy_and_best_fit_placement() -> None:
    greedy = [r.ids for r in pack(fake_docs([6, 5, 4, 3, 2]), 10, buffer_rows=1)]
    assert greedy == [["d0"], ["d1", "d2"], ["d3", "d4"]]
    best = [r.ids for r in pack(fake_docs([6, 5, 4, 3, 2]), 10, buffer_rows=2)]
    # 6 -> r0; 5 -> r1; 4 -> r0 (fills 10, closes); 3 -> r1 (8); 2 -> r1 (10, closes).
    assert best == [["d0", "d2"], ["d1", "d3", "d4"]]


def test_overlong_documents_are_dropped_or_cut_and_counted() -> None:
    skips = SkipCounter()
    rows = list(pack(fake_docs([4, 12, 3]), 10, skips=skips))
    assert [r.ids for r in rows] == [["d0", "d2"]] and skips.as_dict() == {"too_long": 1}
    skips = SkipCounter()
    rows = list(pack(fake_docs([4, 12, 3]), 10, drop_overlong=False, skips=skips))
    assert [r.ids for r in rows] == [["d0"], ["d1"], ["d2"]] and len(rows[1].input_ids) == 10
    assert skips.as_dict() == {"truncated": 1}


def test_packer_state_resumes_identically(docs) -> None:
    whole = [(r.ids, r.input_ids.tolist()) for r in pack(docs, 300, buffer_rows=3)]
    for cut in (1, 50, 200):
        first = Packer(300, buffer_rows=3)
        out = [r for d in docs[:cut] for r in first.add(d)]
        second = Packer(300, buffer_rows=3)
        second.load_state_dict(first.state_dict())
        out += [r for d in docs[cut:] for r in second.add(d)] + second.flush()
        assert [(r.ids, r.input_ids.tolist()) for r in out] == whole


def test_shards_hold_the_rows_packed_on_the_fly(tmp_path: Path, encoder, docs) -> None:
    meta = pack_corpus(
        ASSETS / "tiny_pairs.jsonl", ASSETS / "tokenizer", tmp_path, seq_len=512, num_shards=3, pack_buffer=4
    )
    expected = list(pack(docs, 512, buffer_rows=4))
    shards = [Shard(p) for p in shard_paths(tmp_path)]
    assert meta["rows"] == len(expected) == sum(len(s) for s in shards)
    assert meta["skipped"] == _too_long(docs, 512) and meta["docs"] == len(docs)
    for i, row in enumerate(expected):
        got = shards[i % 3].row(i // 3)
        assert got.ids == row.ids
        assert np.array_equal(got.input_ids, row.input_ids) and np.array_equal(got.segments, row.segments)
        assert np.array_equal(got.doc_lengths, row.doc_lengths)


def _too_long(docs, seq_len: int) -> dict[str, int]:
    n = sum(len(d) > seq_len for d in docs)
    return {"too_long": n} if n else {}


def test_parallel_packing_holds_every_document_once(tmp_path: Path, docs) -> None:
    meta = pack_corpus(
        ASSETS / "tiny_pairs.jsonl", ASSETS / "tokenizer", tmp_path, seq_len=512, num_shards=4, workers=2
    )
    rows = [s.row(i) for s in map(Shard, shard_paths(tmp_path)) for i in range(len(s))]
    packed_ids = [pair_id for row in rows for pair_id in row.ids]
    assert sorted(packed_ids) == sorted(d.id for d in docs if len(d) <= 512)
    assert meta["pairs"] == 325 and meta["docs"] == len(docs) and meta["skipped"] == _too_long(docs, 512)
    assert meta["rows"] == len(rows) and meta["tokens"] == sum(len(r.input_ids) for r in rows)
    laid = {d.id: d for d in docs}
    for row in rows:
        assert row.input_ids.tolist() == [t for pair_id in row.ids for t in laid[pair_id].ids.tolist()]


def test_a_failed_pack_leaves_the_existing_output_and_no_scratch(tmp_path: Path) -> None:
    out = tmp_path / "packed"
    first = pack_corpus(ASSETS / "tiny_pairs.jsonl", ASSETS / "tokenizer", out, seq_len=128, num_shards=2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"_id": "x"}\n')  # no valid pair: packing fails after it started writing
    with pytest.raises(ValueError, match="no valid pairs"):
        pack_corpus(empty, ASSETS / "tokenizer", out, seq_len=128, num_shards=3)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "packed"]
    # A successful pack replaces it whole: no shard of the old layout is left behind.
    pack_corpus(ASSETS / "tiny_pairs.jsonl", ASSETS / "tokenizer", out, seq_len=128, num_shards=3)
    assert sorted(p.name for p in out.iterdir()) == sorted(["meta.json", *(p.name for p in shard_paths(out))])
    assert read_meta(out)["docs"] == first["docs"] and read_meta(out)["num_shards"] == 3
    user = tmp_path / "notes"
    user.mkdir()
    (user / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a packed folder"):
        pack_corpus(ASSETS / "tiny_pairs.jsonl", ASSETS / "tokenizer", user, seq_len=128)
    assert (user / "keep.txt").read_text() == "mine"
