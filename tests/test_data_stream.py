"""The stream's guarantees, on the data alone: every epoch trains each document once over any number of
ranks and workers; a resume yields the uninterrupted batches; a resume on other ranks, workers or micro
batch size loses and repeats nothing; the held-out share never trains; the one-stream micro batch gives
the loss of row packing and of each document alone; bad input is counted once."""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from pathlib import Path

import pytest
import torch

from ds_train.data.batch import batch_spec, make_batch, make_stream_batch
from ds_train.data.encode import Encoder
from ds_train.data.pack import Doc, Shard, pack, pack_corpus, shard_paths
from ds_train.data.sources import read_pairs
from ds_train.data.stream import build_dataloader, validation_batches
from ds_train.data.tokenizer import load_tokenizer

ASSETS = Path(__file__).parent / "assets"
TOKENIZER = ASSETS / "tokenizer"
CORPUS = ASSETS / "tiny_pairs.jsonl"
SEQ = 128
KEYS = ("input_ids", "position_ids", "doc_ids", "modality", "target", "prefix")


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "p"
    pack_corpus(CORPUS, TOKENIZER, out, seq_len=SEQ, num_shards=4, pack_buffer=4, workers=2)
    return out


@pytest.fixture(scope="module")
def fitting() -> list[str]:
    """The `_id`s whose layout fits SEQ tokens, laid out here independently of the packer."""
    encoder = Encoder(load_tokenizer(TOKENIZER))
    return sorted(i for i, ids, _ in encoder.layout(list(read_pairs(CORPUS))) if len(ids) <= SEQ)


def loader(source, **overrides):
    settings = {"objective": "code_clm", "seq_len": SEQ, "micro_batch_size": 2, "rank": 0, "world_size": 1,
                "num_workers": 0, "seed": 11}
    settings.update(overrides)
    return build_dataloader(source, TOKENIZER, **settings)


def ids_of(batch: dict) -> list[str]:
    return [i for row in batch["ids"] for i in row]


def read(world: int, workers: int, micro: int, steps: int, source, state=None, **kw) -> tuple[list, dict]:
    """`steps` micro batches from every rank (as the Trainer takes them); (batches by step, then rank;
    the state after them, which every rank must report alike)."""
    loaders = [loader(source, rank=r, world_size=world, num_workers=workers, micro_batch_size=micro, **kw)
               for r in range(world)]
    out = []
    iters = []
    for ld in loaders:
        if state is not None:
            ld.load_state_dict(state)
        iters.append(iter(ld))
    for _ in range(steps):
        out += [next(it) for it in iters]
    states = [ld.state_dict() for ld in loaders]
    for it in iters:
        it.close()
    for ld in loaders:
        ld.close()
    assert all(s == states[0] for s in states)
    return out, states[0]


def first_epochs(batches: list[dict], fitting: list[str]) -> list[list[str]]:
    """The trained sequence of `_id`s cut into epochs of len(fitting) documents."""
    seq = [i for b in batches for i in ids_of(b)]
    n = len(fitting)
    return [seq[k:k + n] for k in range(0, len(seq) - n + 1, n)]


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 1)])
def test_every_epoch_trains_each_fitting_pair_once(packed, fitting, world, workers):
    batches, _ = read(world, workers, 2, 180 // world, packed)
    epochs = first_epochs(batches, fitting)
    assert len(epochs) >= 2
    for epoch in epochs:
        assert sorted(epoch) == fitting
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    assert all(b["input_ids"].shape == (1, 2 * SEQ) for b in batches)  # one stream per micro batch
    assert all(b["num_tokens"] == int((b["doc_ids"] >= 0).sum()) for b in batches)


def test_the_order_does_not_depend_on_ranks_workers_or_the_packing(packed, fitting, tmp_path):
    other = tmp_path / "other"
    pack_corpus(CORPUS, TOKENIZER, other, seq_len=SEQ, num_shards=1, pack_buffer=1)
    one, _ = read(1, 0, 2, 30, packed)
    two, _ = read(2, 2, 2, 15, other)
    assert [ids_of(b) for b in one] == [ids_of(b) for b in two]


def test_raw_pairs_are_packed_first(fitting):
    batches, _ = read(1, 0, 2, 90, CORPUS)
    assert sorted(first_epochs(batches, fitting)[0]) == fitting


@pytest.mark.parametrize("objective", ["corrupt_code_clm", "prefix_code_clm"])
def test_stop_and_resume_gives_the_uninterrupted_batches(packed, objective):
    whole, _ = read(2, 2, 2, 30, packed, objective=objective)
    for cut in (1, 9, 22):
        head, state = read(2, 2, 2, cut, packed, objective=objective)
        buffer = io.BytesIO()
        torch.save(state, buffer)  # as checkpoints keep it
        buffer.seek(0)
        tail, _ = read(2, 2, 2, 30 - cut, packed, torch.load(buffer, weights_only=True), objective=objective)
        got = head + tail
        assert [ids_of(b) for b in got] == [ids_of(b) for b in whole], cut
        assert all(torch.equal(x[k], y[k]) for x, y in zip(got, whole) for k in KEYS), cut


@pytest.mark.parametrize("before,after", [((2, 2, 2), (3, 0, 2)), ((1, 0, 2), (2, 1, 1)), ((3, 1, 1), (1, 2, 3))])
def test_resume_on_other_ranks_workers_or_micro_batch_loses_and_repeats_nothing(packed, fitting, before, after):
    """(world, workers, micro batch) before and after the resume: the documents trained before the stop
    and after it, read as one sequence, hold every fitting pair once per epoch."""
    head, state = read(*before, 7, packed)
    tail, _ = read(*after, 360 // (after[0] * after[2]), packed, state)
    assert all(b["input_ids"].shape == (1, after[2] * SEQ) for b in tail)
    epochs = first_epochs(head + tail, fitting)
    assert len(epochs) >= 2
    for epoch in epochs:
        assert sorted(epoch) == fitting


def test_held_out_pairs_never_train_and_are_validated_once(packed, fitting):
    share = 0.2
    # The split, transcribed: blake2b-64 of the `_id`, little-endian, below share * 2**64.
    held = {i for i in fitting
            if int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") < share * 2**64}
    assert 0 < len(held) < len(fitting) // 2
    batches, _ = read(2, 1, 2, 40, packed, val_share=share)
    trained = {i for b in batches for i in ids_of(b)}
    assert not trained & held and trained == set(fitting) - held
    seen, rounds = [], set()
    for rank in range(3):
        runs = list(validation_batches([packed], TOKENIZER, objective="code_clm", seq_len=SEQ,
                                       micro_batch_size=2, rank=rank, world_size=3, val_share=share))
        rounds.add(len(runs))  # every rank runs as many forward passes (ZeRO-3's are collective)
        seen += [i for batch, counts in runs if counts for i in ids_of(batch)]
    assert len(rounds) == 1 and sorted(seen) == sorted(held)


def test_one_stream_gives_the_loss_of_row_packing_and_of_each_document_alone(packed):
    """The same documents as one (1, B*T) stream, as B padded rows, and one by one through the model:
    the same summed loss (to float32 rounding of the loss kernel) and target counts."""
    from ds_train.model import GPTNeo, GPTNeoConfig

    tok = load_tokenizer(TOKENIZER)
    torch.manual_seed(0)
    model = GPTNeo(GPTNeoConfig.from_flavor("tiny", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                            separated_ids=(5, 9, 40))).double().eval()
    shard = Shard(shard_paths(packed)[0])
    docs = [d for r in range(6) for d in _docs(shard.row(r))]
    for objective in ("code_clm", "prefix_code_clm", "corrupt_code_clm"):
        spec = batch_spec(Encoder(tok, objective, seed=3), objective, SEQ)
        rows = list(pack(docs, SEQ))
        by_rows = make_batch(rows, spec, 1)
        stream = make_stream_batch(docs, [1] * len(docs), spec, len(rows) * SEQ)
        assert stream["input_ids"].shape == (1, len(rows) * SEQ)
        assert stream["num_tokens"] == sum(len(d) for d in docs)
        alone = torch.zeros(4, dtype=torch.float64)
        with torch.no_grad():
            for d in docs:
                one = make_stream_batch([d], [1], spec, len(d))
                alone += model(**{k: one[k] for k in KEYS})[1].double()
            got_rows = model(**{k: by_rows[k] for k in KEYS})[1].double()
            got_stream = model(**{k: stream[k] for k in KEYS})[1].double()
        assert alone[1] + alone[3] > 100
        assert torch.allclose(got_stream, alone, rtol=1e-6, atol=1e-6), objective
        assert torch.allclose(got_rows, alone, rtol=1e-6, atol=1e-6), objective


def _docs(row) -> list[Doc]:
    out, start = [], 0
    for pair_id, n in zip(row.ids, row.doc_lengths.tolist()):
        out.append(Doc(pair_id, row.input_ids[start:start + n], row.segments[start:start + n]))
        start += n
    return out


def test_skipped_records_are_counted_once(tmp_path):
    corpus = tmp_path / "pairs.jsonl"
    lines = CORPUS.read_text().splitlines()
    corpus.write_text("\n".join(lines[:40] + ["{broken", '{"_id": "q"}'] + lines[40:80]) + "\n")
    too_long = sum(len(ids) > SEQ for _, ids, _ in Encoder(load_tokenizer(TOKENIZER)).layout(list(read_pairs(corpus))))
    for rank in (0, 1):  # the corpus's counts, the same on every rank
        counts = loader(corpus, rank=rank, world_size=2).skip_counts()
        assert counts == {"malformed_json": 1, "missing_field": 1, **({"too_long": too_long} if too_long else {})}


def test_bad_settings_and_states_are_one_clear_error(tmp_path, packed):
    with pytest.raises(ValueError, match=f"packed with seq_len {SEQ}, not 256"):
        loader(packed, seq_len=256)
    with pytest.raises(ValueError, match="another stream configuration"):
        loader(packed).load_state_dict(loader(packed, seed=12).state_dict())
    with pytest.raises(ValueError, match="older ds_train stream"):
        loader(packed).load_state_dict({"loader": {}, "config": {}})
    with pytest.raises(ValueError, match="no training documents"):
        loader(packed, val_sources=[packed])
    with pytest.raises(ValueError, match="cannot stream hub dataset 'huawei-noah/python_text2code'"):
        loader("huawei-noah/python_text2code")
    before = sorted(tmp_path.iterdir())
    with pytest.raises(ValueError, match="mix of packed folders and raw pair sources"):
        loader([packed, CORPUS])
    assert sorted(tmp_path.iterdir()) == before


def test_counter_of_rank_batches_matches_the_global_cut(packed):
    """Rank r of R takes micro batches r, r + R, ... of the one-rank stream."""
    one, _ = read(1, 0, 2, 12, packed)
    three, _ = read(3, 2, 2, 4, packed)
    assert Counter(map(tuple, map(ids_of, one))) == Counter(map(tuple, map(ids_of, three)))
    assert [ids_of(b) for b in three] == [ids_of(b) for b in one]
