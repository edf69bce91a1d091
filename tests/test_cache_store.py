"""The training cache's storage on disk (`training/cache_store.py`, `training/caching.py`'s `StoredRows` /
`StoredCaptions`): what goes in comes back with the same bits and dtype, in shards of bounded size, in
DataLoader workers too, and the files go when training ends."""

import os
import pickle

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from diffusers_ant.training.cache_store import TensorStore


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "latents/0": torch.randn(8, 4, 4, generator=g),
        "text/0/prompt_embeds": torch.randn(7, 16, generator=g).bfloat16(),
        "text/0/pooled": torch.randn(16, generator=g, dtype=torch.float64).half(),
        "text/0/ids": torch.arange(7),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 16),
    }


def test_store_returns_every_tensor_bit_for_bit_in_shards_of_bounded_size(tmp_path):
    tensors = _tensors()
    store = TensorStore(str(tmp_path / "store"), shard_bytes=600)
    whole = torch.randn(10, 10)
    for name, value in tensors.items():
        store.add(name, value)
    store.add("view", whole[2:4])  # a view of a larger tensor: stored alone (safetensors refuses shared memory)
    assert store.get("scalar").item() == 2.5  # not yet written: served from memory
    store.flush()
    shards = sorted(set(os.listdir(tmp_path / "store")) - {"owner"})
    assert len(shards) >= 2 and all(name.endswith(".safetensors") for name in shards)
    # no shard holds much more than the bound (a shard closes once it reaches it; the largest tensor is 512 bytes)
    assert max(os.path.getsize(tmp_path / "store" / name) for name in shards) < 600 + 512 + 1024  # (+ the header)
    for name, value in tensors.items():
        got = store.get(name)
        assert got.dtype == value.dtype and got.shape == value.shape and torch.equal(got, value), name
    assert torch.equal(store.get("view"), whole[2:4])
    assert store.nbytes == sum(t.numel() * t.element_size() for t in tensors.values()) + 2 * 10 * 4
    with pytest.raises(KeyError, match="already in the store"):
        store.add("scalar", torch.tensor(1.0))
    store.remove()
    assert not (tmp_path / "store").exists()


def test_a_new_store_empties_what_a_crashed_run_left(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "shard-00000.safetensors").write_bytes(b"half-written")
    store = TensorStore(str(tmp_path / "store"))
    assert os.listdir(tmp_path / "store") == ["owner"]  # (the store's token, below)
    store.add("a", torch.ones(3))
    store.flush()
    assert torch.equal(store.get("a"), torch.ones(3))


class _Rows(Dataset):
    def __init__(self, store, names):
        self.store, self.names = store, names

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        return self.store.get(self.names[i])


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_read_the_store_through_their_own_handles(tmp_path, context):
    """A worker gets a copy of the dataset (forked, or pickled for spawn) after the parent has opened shards:
    safetensors' handles cannot be pickled, and a forked copy of the parent's is not the worker's own."""
    store = TensorStore(str(tmp_path / "store"), shard_bytes=64)
    values = [torch.full((4, 4), float(i)) for i in range(6)]
    for i, value in enumerate(values):
        store.add(f"row/{i}", value)
    store.flush()
    assert torch.equal(store.get("row/0"), values[0])  # the parent holds an open handle now
    assert pickle.loads(pickle.dumps(store)).get("row/5").eq(5).all()
    loader = DataLoader(_Rows(store, [f"row/{i}" for i in range(6)]), batch_size=2, num_workers=1,
                        multiprocessing_context=context)
    assert torch.equal(torch.cat(list(loader)), torch.stack(values))
    del loader
    import gc

    gc.collect()  # the worker's copy ended with the worker: the files are the parent's, still there
    assert torch.equal(store.get("row/3"), values[3]) and os.listdir(tmp_path / "store")
    if context == "fork":  # a forked copy that is removed or freed deletes nothing: the files are the parent's
        pid = os.fork()
        if pid == 0:
            try:
                store.remove()
                del store
                gc.collect()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert torch.equal(store.get("row/4"), values[4])
        assert sorted(os.listdir(tmp_path / "store")) == ["owner"] + [f"shard-{i:05d}.safetensors" for i in range(6)]


def test_a_run_that_ends_in_an_error_leaves_no_cache_files(tmp_path):
    """The files go with the interpreter when a run ends in an exception (or Ctrl-C), not only at the end of
    training, and when the store is dropped."""
    import subprocess
    import sys

    folder = tmp_path / "store"
    code = ("import torch\nfrom diffusers_ant.training.cache_store import TensorStore\n"
            f"store = TensorStore({str(folder)!r})\nstore.add('a', torch.ones(3))\nstore.flush()\n"
            "import os\nassert os.listdir(store.directory)\nraise RuntimeError('a step failed')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "RuntimeError: a step failed" in result.stderr
    assert not folder.exists()
    dropped = TensorStore(str(tmp_path / "dropped"))
    dropped.add("a", torch.ones(3))
    dropped.flush()
    del dropped
    assert not (tmp_path / "dropped").exists()


def test_an_earlier_store_freed_late_leaves_a_later_store_of_the_same_folder_alone(tmp_path):
    """A run started again in the same process (a notebook, a retry after an error whose traceback keeps the
    first store alive) makes a new store in the same folder; freeing the first one afterwards must not delete
    the second's files. A copy (a worker's) deletes nothing, and copies of copies pickle."""
    import copy

    first = TensorStore(str(tmp_path / "cache"))
    first.add("a", torch.ones(3))
    first.flush()
    second = TensorStore(str(tmp_path / "cache"))
    second.add("a", torch.full((3,), 2.0))
    second.flush()
    del first
    import gc

    gc.collect()
    assert torch.equal(second.get("a"), torch.full((3,), 2.0))
    twice = copy.deepcopy(copy.deepcopy(second))
    twice.remove()
    assert torch.equal(second.get("a"), torch.full((3,), 2.0))
    second.remove()
    assert not (tmp_path / "cache").exists()


def test_cache_folders_of_processes_this_run_lacks_are_removed(tmp_path):
    """A killed 8-process run resumed on 4 processes: nobody writes `.training_cache_4` .. `_7` again."""
    from diffusers_ant.training.caching import remove_unused_caches

    for name in (".training_cache_0", ".training_cache_3", ".training_cache_4", ".training_cache_7", "checkpoint-4"):
        (tmp_path / name).mkdir()
    remove_unused_caches(str(tmp_path), 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".training_cache_0", ".training_cache_3", "checkpoint-4"]


def test_stored_cache_parts_read_as_the_in_memory_ones(tmp_path):
    """`cache_text` / `cache_latents` into a store give what they give in memory: the same captions, keys, bits,
    dtypes and size."""
    from types import SimpleNamespace

    from diffusers_ant.training.caching import StoredCaptions, StoredRows, TrainingCache, cache_latents, cache_text

    g = torch.Generator().manual_seed(0)
    from_bf16 = torch.randn(3, 4, 8, generator=g).to(torch.bfloat16).float()
    captions = ["", "a cat", "seven"]
    adapter = SimpleNamespace(
        encode_text=lambda batch: {"prompt_embeds": from_bf16[[captions.index(c) for c in batch["captions"]]]},
        encode_moments=lambda pixels: pixels * 2)  # (stand-ins: what is tested is the storage, not the encoders)
    images = [torch.randn(2, 4, 4, generator=g) for _ in range(5)]

    class Data:  # what the caching functions read of a TrainingDataset
        crop_coords = False

        def __len__(self):
            return len(images)

        def caption_variants(self):
            return list(captions)

        def text_fields(self, caption):
            return {"captions": caption}

        def bucket_size(self, row):
            return (4, 4)

        def transformed_image(self, row, with_crop_coords):
            return (images[row],)

    dataset = Data()
    memory = TrainingCache(**cache_text(adapter, dataset, batch_size=2, disable_progress=True))
    memory.latents, _ = cache_latents(adapter, dataset, 2, disable_progress=True)
    store = TensorStore(str(tmp_path / "cache"))
    stored = TrainingCache(**cache_text(adapter, dataset, batch_size=2, disable_progress=True, store=store))
    stored.latents, _ = cache_latents(adapter, dataset, 2, disable_progress=True, store=store)
    store.flush()
    assert isinstance(stored.text, StoredCaptions) and isinstance(stored.latents, StoredRows)
    assert list(stored.text) == captions and len(stored.latents) == 5
    for caption in captions:
        a, b = memory.text_fields(caption), stored.text_fields(caption)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert all(torch.equal(a, b) for a, b in zip(memory.latents, stored.latents))
    with pytest.raises(IndexError):
        stored.latents[5]
    assert stored.nbytes() == memory.nbytes() > 0
    stored.remove_files()
    assert not (tmp_path / "cache").exists()
