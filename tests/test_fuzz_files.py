"""Fuzzing the readers of files users hand to vdvl: array files (.npy, .npz, IDX, HDF5, Zarr),
image files, ACTIVE.json (and its .npz sidecar) and encoding-store attributes.

For any file: a correct result, or a UserError with one plain line naming the file
(tests/fuzzing.py); never another exception, and never an allocation sized by a number in a
header that the file cannot back (a header claiming 10**12 elements in a 100-byte file is
refused at once, without allocating).
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from fuzzing import allocation_peak, assert_one_sentence, outcome, refused, truncated_or_flipped, unique
from vdvae_latents.core.errors import UserError
from vdvae_latents.data.pack import pack_images
from vdvae_latents.data.splits import open_images
from vdvae_latents.latents.active_set import ActiveSet, load_active_set, save_active_set
from vdvae_latents.latents.encoder import column_map
from vdvae_latents.latents.stats import dimension_table
from vdvae_latents.stores.reader import open_encodings
from vdvae_latents.stores.schema import OWN_ATTRS
from vdvae_latents.stores.verify import verify_store
from vdvae_latents.stores.writer import StoreWriter

# A header may claim any size; reading a file of a few hundred bytes may never allocate more than this.
ALLOCATION_LIMIT = 32 << 20
HUGE = 10 ** 12

def read_everything(spec: str, names: str):
    """Open ``spec``'s 'all' split and read every image: the images, or the UserError naming ``names``,
    checked to allocate less than ALLOCATION_LIMIT on the way."""
    with allocation_peak() as peak:
        result = outcome(lambda: open_images(spec, "all").read())
    assert peak[0] < ALLOCATION_LIMIT, f"{spec}: {peak[0] / 2**20:.0f} MiB allocated"
    if refused(result):
        assert_one_sentence(result, names=names)
    else:
        assert result.dtype == np.uint8 and result.ndim == 4 and result.shape[3] in (1, 3) and 0 not in result.shape
    return result


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzzfiles")


# ----------------------------------------------------------------------------- .npy and .npz


def npy_bytes(shape, descr: str = "|u1", fortran: object = False, data: bytes = b"",
              header: str | None = None) -> bytes:
    """An .npy file as bytes, with whatever header it is given (numpy itself writes only true ones)."""
    if header is None:
        header = f"{{'descr': {descr!r}, 'fortran_order': {fortran!r}, 'shape': {shape!r}, }}"
    text = header + " " * (-(len(header) + 11) % 64) + "\n"
    encoded = text.encode("latin1", "replace")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(encoded)) + encoded + data


dims = st.one_of(st.integers(0, 6), st.sampled_from([HUGE, 2 ** 63 - 1, 2 ** 64, -1]))
shapes = st.one_of(st.lists(dims, max_size=5).map(tuple), st.sampled_from([(), (3,), "(3, 4", [2, 2, 2], None]))
descrs = st.sampled_from(["|u1", "|u1", "<u2", ">i4", "<i8", "<f4", "|b1", "O", "<U3", "|V4", "<c8", "|S2", "xyz",
                          "<M8[s]", [("a", "|u1")]])
payloads = st.one_of(st.binary(max_size=400), st.integers(0, 255).map(lambda v: bytes([v]) * 384))
headers = st.one_of(st.none(), st.text(max_size=40),
                    st.sampled_from(["{'descr': '|u1', 'shape': (2, 2, 2)}", "{}", "[1, 2]", "__import__('os')",
                                     "{'descr': '|u1', 'fortran_order': False, 'shape': (2, 2, 2), 'x': 1}"]))
npy_files = st.builds(npy_bytes, shapes, descrs, st.sampled_from([False, True, 1, "no"]), payloads, headers)


@st.composite
def damaged_npy(draw) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4))
    return truncated_or_flipped(buffer.getvalue(), draw)


@given(data=st.one_of(npy_files, damaged_npy()))
@settings(max_examples=150)
@example(data=npy_bytes((HUGE, 8, 8), data=b"\0" * 100))
@example(data=npy_bytes((), data=b"\x05"))
@example(data=b"\x93NUMPY\x00\x00v\x00{'descr'" + b"\0" * 200)  # version 0.0: a 4-byte header length of 660 MB
def test_any_npy_file_reads_or_is_refused_naming_it(folder, data):
    path = unique(folder, ".npy")
    path.write_bytes(data)
    read_everything(str(path), path.name)


npz_keys = st.sampled_from(["images", "labels", "x", "y", "x_train", "x_test", "y_train", "y_test", "data", "other"])
good_members = st.sampled_from([
    np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4), np.arange(2), np.array([1.5, 2.0]),
    np.zeros((2, 4, 4, 3), dtype=np.int16), np.array(["a", "b"]), np.zeros((2, 1)), np.zeros(0, dtype=np.uint8),
]).map(lambda a: _saved(a))


def _saved(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@st.composite
def npz_files(draw) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for key in draw(st.lists(npz_keys, min_size=0, max_size=4, unique=True)):
            member = draw(st.one_of(good_members, npy_files))
            compression = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
            archive.writestr(key + ".npy", member, compress_type=compression)
    data = buffer.getvalue()
    return truncated_or_flipped(data, draw) if draw(st.booleans()) else data


def npz_of(members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for key, member in members.items():
            archive.writestr(key + ".npy", member)
    return buffer.getvalue()


@given(data=npz_files())
@settings(max_examples=100)
@example(data=npz_of({"images": _saved(np.zeros((4, 8, 8), np.uint8)), "labels": npy_bytes((HUGE,), "<i8")}))
@example(data=npz_of({"images": npy_bytes((HUGE, 8, 8))}, zipfile.ZIP_DEFLATED))
@example(data=npz_of({"images": npy_bytes((10 ** 7, 8, 8))}, zipfile.ZIP_DEFLATED))
def test_any_npz_file_reads_or_is_refused_naming_it(folder, data):
    path = unique(folder, ".npz")
    path.write_bytes(data)
    read_everything(str(path), path.name)


# ----------------------------------------------------------------------------- IDX


@st.composite
def idx_files(draw) -> bytes:
    magic = draw(st.sampled_from([b"\0\0", b"\0\0", b"\x1f\x8b", b"\0\1"]))
    kind = draw(st.sampled_from([0x08, 0x08, 0x09, 0x0B, 0x0D, 0x42]))
    sizes = draw(st.lists(st.one_of(st.integers(0, 6), st.sampled_from([2 ** 32 - 1, 10 ** 9])), max_size=4))
    ndim = draw(st.one_of(st.just(len(sizes)), st.integers(0, 255)))
    data = draw(payloads)
    raw = magic + bytes([kind, ndim]) + b"".join(s.to_bytes(4, "big") for s in sizes) + data
    return gzip.compress(raw) if draw(st.booleans()) else raw


@given(images=idx_files(), labels=st.one_of(st.none(), idx_files()))
@settings(max_examples=100)
@example(images=bytes([0, 0, 8, 3]) + (2 ** 32 - 1).to_bytes(4, "big") * 3 + b"\0" * 100, labels=None)
def test_any_idx_file_reads_or_is_refused_naming_it(folder, images, labels):
    path = unique(folder, "-images-idx3-ubyte")
    path.write_bytes(images)
    if labels is not None:
        Path(str(path).replace("images-idx3", "labels-idx1")).write_bytes(labels)
    result = read_everything(str(path), "-idx")  # names the images file or its labels file
    if refused(result):
        assert path.name in str(result) or path.name.replace("images-idx3", "labels-idx1") in str(result)


# ----------------------------------------------------------------------------- HDF5 and Zarr


def _hdf5_bytes(chunked: bool) -> bytes:
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        options = {"chunks": (2, 4, 4), "compression": "gzip"} if chunked else {}
        f.create_dataset("images", data=np.arange(4 * 4 * 4, dtype=np.uint8).reshape(4, 4, 4), **options)
        f.create_dataset("labels", data=np.arange(4), **({"chunks": (2,), "compression": "gzip"} if chunked else {}))
    return buffer.getvalue()


HDF5_FILES = {True: _hdf5_bytes(True), False: _hdf5_bytes(False)}


@st.composite
def damaged_hdf5(draw) -> bytes:
    return truncated_or_flipped(HDF5_FILES[draw(st.booleans())], draw)


@given(data=damaged_hdf5())
@settings(max_examples=150)
def test_any_damaged_hdf5_file_reads_or_is_refused_naming_it(folder, data):
    path = unique(folder, ".h5")
    path.write_bytes(data)
    read_everything(str(path), path.name)


@pytest.mark.parametrize("chunks", [(1, 8, 8), (4096, 8, 8), None])
@pytest.mark.parametrize("which", ["images", "labels"])
def test_an_hdf5_array_claiming_more_rows_than_it_stores_is_refused(folder, chunks, which):
    path = unique(folder, ".h5")
    with h5py.File(path, "w") as f:  # only the claim is written: no data
        if which == "images":
            f.create_dataset("images", shape=(HUGE, 8, 8), dtype=np.uint8, chunks=chunks)
        else:
            f["images"] = np.ones((4, 8, 8), dtype=np.uint8)
            f.create_dataset("labels", shape=(HUGE,), dtype=np.int64, chunks=chunks and chunks[:1])
    assert path.stat().st_size < 100_000
    assert refused(read_everything(str(path), path.name))


def test_a_zarr_array_claiming_more_rows_than_it_stores_is_refused(folder):
    path = unique(folder, ".zarr")
    zarr.open_group(str(path), mode="w").create_array("images", shape=(HUGE, 8, 8), chunks=(1, 8, 8), dtype="uint8")
    assert refused(read_everything(str(path), path.name))


@pytest.fixture(scope="module")
def zarr_store(folder) -> Path:
    """A small Zarr store of images and labels, copied by each example that changes it."""
    path = folder / "template.zarr"
    root = zarr.open_group(str(path), mode="w")
    root.create_array("images", data=np.arange(4 * 4 * 4, dtype=np.uint8).reshape(4, 4, 4), chunks=(2, 4, 4))
    root.create_array("labels", data=np.arange(4), chunks=(2,))
    return path


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-3, 2 ** 64), st.sampled_from([HUGE, -1]),
                                     st.floats(), st.text(max_size=6)),
                           lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                   st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                           max_leaves=8)


@given(array=st.sampled_from(["images", "labels"]),
       key=st.sampled_from(["shape", "chunk_grid", "data_type", "fill_value", "codecs", "chunk_key_encoding",
                            "zarr_format", "node_type", "attributes", "dimension_names"]),
       value=st.one_of(json_values, st.sampled_from([[HUGE, 4, 4], [HUGE], [4, 4], "uint8", "float32", "int64"]),
                       st.just("<deleted>")))
@settings(max_examples=80)
@example(array="images", key="shape", value=[HUGE, 4, 4])
@example(array="labels", key="shape", value=[HUGE])
def test_any_zarr_array_metadata_reads_or_is_refused_naming_the_store(folder, zarr_store, array, key, value):
    path = unique(folder, ".zarr")
    shutil.copytree(zarr_store, path)
    meta_file = path / array / "zarr.json"
    meta = json.loads(meta_file.read_text())
    if value == "<deleted>":
        meta.pop(key, None)
    else:
        meta[key] = value
    meta_file.write_text(json.dumps(meta))
    read_everything(str(path), path.name)


# ----------------------------------------------------------------------------- image files


def png_bytes(width: int, height: int, idat: bytes = b"", mode_byte: int = 2) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels, with ``idat`` as its only data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, mode_byte, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _image_file(fmt: str, mode: str) -> bytes:
    buffer = io.BytesIO()
    pixels = np.arange(6 * 5 * 3, dtype=np.uint8).reshape(6, 5, 3)
    Image.fromarray(pixels).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


GOOD_IMAGES = {(fmt, mode): _image_file(fmt, mode) for fmt in ("PNG", "JPEG", "BMP") for mode in ("RGB", "L")}
SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp"}


@st.composite
def image_files(draw) -> tuple[str, bytes]:
    fmt, mode = draw(st.sampled_from(sorted(GOOD_IMAGES)))
    kind = draw(st.sampled_from(["damaged", "damaged", "random", "claim"]))
    if kind == "random":
        return SUFFIX[fmt], draw(st.binary(max_size=300))
    if kind == "claim":  # a header claiming any size, a few bytes of data
        size = st.one_of(st.integers(0, 8), st.sampled_from([10_000, 20_000, 2 ** 31 - 1, 2 ** 32 - 1]))
        return ".png", png_bytes(draw(size), draw(size), zlib.compress(draw(st.binary(max_size=50))),
                                 draw(st.sampled_from([0, 2, 3, 4, 6, 7])))
    return SUFFIX[fmt], truncated_or_flipped(GOOD_IMAGES[fmt, mode], draw)


@given(image=image_files())
@settings(max_examples=100)
@example(image=(".png", png_bytes(10_000, 10_000, zlib.compress(b"\0" * 100))))  # under Pillow's bomb limit
@example(image=(".png", png_bytes(50_000, 50_000, zlib.compress(b"\0" * 100))))  # a decompression bomb
@example(image=(".png", GOOD_IMAGES["PNG", "RGB"][:60]))  # truncated
def test_any_image_file_in_a_folder_reads_or_is_refused_naming_it(folder, image):
    suffix, data = image
    images = unique(folder, "-images")
    images.mkdir()
    Image.new("RGB", (5, 6)).save(images / "a-good.png")
    bad = images / f"b-fuzzed{suffix}"
    bad.write_bytes(data)
    read_everything(str(images), bad.name)  # a refusal names the fuzzed file, not the good one


# ----------------------------------------------------------------------------- ACTIVE.json


def an_active_set(layer_shapes, granularity: str, seed: int = 0) -> ActiveSet:
    rng = np.random.default_rng(seed)
    kl = [rng.exponential(1.0, shape) for shape in layer_shapes]
    table = dimension_table(layer_shapes, granularity, kl, [k / 2 for k in kl])
    selected = np.sort(rng.choice(len(table), max(1, len(table) // 3), replace=False))
    return ActiveSet(granularity=granularity, table=table, selected=selected, rule="keep", value=0.33,
                     layer_shapes=list(layer_shapes), n_images=17, data="digits", split="train",
                     checkpoint="run/ckpt.pt", checkpoint_sha256="ab" * 32)


SMALL_SHAPES = [(2, 1, 1), (3, 2, 2)]
BIG_SHAPES = [(2, 1, 1), (5001, 2, 2)]  # 20,006 elements: arrays go to the .npz sidecar


@pytest.fixture(scope="module")
def active_files(folder) -> dict[str, Path]:
    """ACTIVE.json files to copy and damage: variate and element granularity, and one with a sidecar."""
    out = {}
    for name, shapes, granularity in [("variate", SMALL_SHAPES, "variate"), ("element", SMALL_SHAPES, "element"),
                                      ("sidecar", BIG_SHAPES, "element")]:
        out[name] = save_active_set(an_active_set(shapes, granularity), folder / f"template-{name}" / "ACTIVE.json")
    return out


def assert_same_active_set(a: ActiveSet, b: ActiveSet) -> None:
    assert (a.granularity, a.rule, a.value, a.n_images, a.checkpoint_sha256) == \
        (b.granularity, b.rule, b.value, b.n_images, b.checkpoint_sha256)
    assert [tuple(s) for s in a.layer_shapes] == [tuple(s) for s in b.layer_shapes]
    assert np.array_equal(a.selected, b.selected)
    for key, values in a.table.arrays().items():
        assert np.array_equal(values, b.table.arrays()[key]), key


@pytest.mark.parametrize("shapes,granularity", [(SMALL_SHAPES, "variate"), (SMALL_SHAPES, "element"),
                                                 (BIG_SHAPES, "element")])
def test_an_active_set_reads_back_as_it_was_saved(folder, shapes, granularity):
    active = an_active_set(shapes, granularity, seed=3)
    path = save_active_set(active, unique(folder, "-active") / "ACTIVE.json")
    assert path.with_suffix(".npz").exists() == (len(active.table) > 20_000)
    assert_same_active_set(load_active_set(path), active)


ACTIVE_KEYS = ["schema", "schema_version", "granularity", "rule", "value", "n_images", "layer_shapes", "arrays",
               "data", "checkpoint_sha256", "summary"]
ARRAY_KEYS = ["layer", "variate", "y", "x", "resolution", "avg_kl", "active_units", "selected", "ranking", "sidecar"]


@st.composite
def active_set_damage(draw):
    """(where in the JSON, what is put there) or a change to the text or the sidecar."""
    kind = draw(st.sampled_from(["key", "key", "array", "array", "array item", "shape", "text", "sidecar"]))
    if kind == "key":
        return kind, draw(st.sampled_from(ACTIVE_KEYS + ["extra"])), draw(st.one_of(json_values, st.just("<deleted>")))
    if kind in ("array", "array item"):
        return kind, draw(st.sampled_from(ARRAY_KEYS)), draw(st.one_of(json_values, st.just("<deleted>")))
    if kind == "shape":
        return kind, draw(st.integers(0, 2)), draw(st.one_of(json_values, st.lists(st.integers(-2, 6), max_size=4)))
    if kind == "text":
        return kind, draw(st.integers(0, 400)), None
    return kind, draw(st.sampled_from(["random", "truncated", "missing", "wrong arrays"])), \
        draw(st.binary(max_size=200))


def _damage(path: Path, damage) -> None:
    kind, where, value = damage
    if kind == "text":
        path.write_text(path.read_text()[:where])
        return
    if kind == "sidecar":
        sidecar = path.with_suffix(".npz")
        if where == "random":
            sidecar.write_bytes(value)
        elif where == "truncated" and sidecar.exists():
            sidecar.write_bytes(sidecar.read_bytes()[:len(value)])
        elif where == "missing":
            sidecar.unlink(missing_ok=True)
        else:
            np.savez(sidecar, layer=np.arange(3), selected=np.array([5.5]), avg_kl=np.array(["a"]))
        return
    meta = json.loads(path.read_text())
    target, key = (meta, where) if kind == "key" else (meta["arrays"], where)
    if kind == "shape":
        target, key = meta["layer_shapes"], where
    if kind == "array item" and isinstance(target.get(key), list) and target[key]:
        target, key = target[key], 0
    if value == "<deleted>":
        if isinstance(target, dict):
            target.pop(key, None)
    elif isinstance(target, dict) or key < len(target):
        target[key] = value
    path.write_text(json.dumps(meta))


@given(template=st.sampled_from(["variate", "element", "sidecar"]), damage=active_set_damage())
@settings(max_examples=100)
@example(template="variate", damage=("shape", 1, [3, -2, 2]))
@example(template="element", damage=("array item", "variate", 7))
@example(template="variate", damage=("shape", 0, [2, 1]))
def test_any_damaged_active_set_loads_whole_or_is_refused_naming_it(folder, active_files, template, damage):
    source = active_files[template]
    copy = unique(folder, "-active")
    shutil.copytree(source.parent, copy)
    path = copy / "ACTIVE.json"
    _damage(path, damage)
    result = outcome(lambda: load_active_set(path))
    if refused(result):
        assert_one_sentence(result, names=str(path))
        return
    # What the encoder does with a loaded set must work: every selected dimension lies in its layer.
    columns = column_map(result)
    assert columns.n_features == result.kept_scalars_per_image()
    result.summary()


@pytest.mark.parametrize("damage", [("array", "selected", [1.5]), ("array", "selected", [1, 1]),
                                    ("array item", "layer", 1), ("shape", 1, [3, 1, 1])])
def test_an_active_set_that_says_something_else_than_it_was_is_refused(folder, active_files, damage):
    copy = unique(folder, "-active")
    shutil.copytree(active_files["variate"].parent, copy)
    _damage(copy / "ACTIVE.json", damage)
    with pytest.raises(UserError, match="ACTIVE.json"):
        load_active_set(copy / "ACTIVE.json")


# ----------------------------------------------------------------------------- store attributes


def _store(path: Path) -> Path:
    n, k = 6, 3
    dims = {"layer": np.zeros(k), "variate": np.arange(k), "y": np.full(k, -1), "x": np.full(k, -1),
            "avg_kl": np.ones(k)}
    writer = StoreWriter.create(path, n_rows=n, dims=dims, attrs={"granularity": "variate", "split": "test"},
                                dtype="float16" if path.suffix == ".h5" else "float32", has_labels=True,
                                chunk_rows=4)
    for i in range(writer.n_chunks):
        lo, hi = writer.chunk_range(i)
        values = np.arange(lo * k, hi * k, dtype=np.float32).reshape(hi - lo, k) / 10
        writer.write_chunk(i, values, labels=np.arange(lo, hi) % 2, sample_index=np.arange(lo, hi),
                           source_index=np.arange(lo, hi))
    writer.finalize()
    return path


@pytest.fixture(scope="module")
def stores(folder) -> dict[str, Path]:
    return {suffix: _store(folder / f"store-template{suffix}") for suffix in (".zarr", ".h5")}


def _set_attrs(path: Path, key: str, value) -> None:
    """Change (or, for '<deleted>', remove) one attribute of a store, as another tool or a bit flip might."""
    if path.suffix == ".zarr":
        meta_file = path / "zarr.json"
        meta = json.loads(meta_file.read_text())
        if value == "<deleted>":
            meta["attributes"].pop(key, None)
        else:
            meta["attributes"][key] = value
        meta_file.write_text(json.dumps(meta))
        return
    with h5py.File(path, "r+") as f:
        if value == "<deleted>":
            f.attrs.pop(key, None) if key in f.attrs else None
        elif isinstance(value, (bool, str, float)) or (isinstance(value, int) and abs(value) < 2 ** 63):
            f.attrs[key] = value
        else:  # what the store writes for lists, dicts and None: JSON text, its key listed
            f.attrs[key] = json.dumps(value)
            listed = set(json.loads(f.attrs.get("json_attrs", "[]")))
            f.attrs["json_attrs"] = json.dumps(sorted(listed | {key}))


store_attr_keys = st.sampled_from(list(OWN_ATTRS) + ["json_attrs", "dtype", "granularity", "split", "model_config",
                                                     "checkpoint", "n_dims_kept", "other"])


@given(suffix=st.sampled_from([".zarr", ".h5"]), key=store_attr_keys,
       value=st.one_of(json_values, st.just("<deleted>"), st.sampled_from([0, 1, 7, 2 ** 40, -5, True, "[", "x"])))
@settings(max_examples=40)
@example(suffix=".zarr", key="chunk_rows", value=2 ** 40)
@example(suffix=".h5", key="json_attrs", value="[")
def test_any_store_attribute_reads_or_is_refused_naming_the_store(folder, stores, suffix, key, value):
    path = unique(folder, suffix)
    shutil.copytree(stores[suffix], path) if suffix == ".zarr" else shutil.copy(stores[suffix], path)
    _set_attrs(path, key, value)

    def read_all():
        report = verify_store(path)
        with open_encodings(path, allow_incomplete=True) as enc:
            return report, enc.to_numpy(), enc.dims_table(), enc.error_summary(), enc.dtype

    result = outcome(read_all)
    if refused(result):
        assert_one_sentence(result, names=path.name)


# ----------------------------------------------------------------------------- packed image stores


@pytest.fixture(scope="module")
def packed_store(folder) -> Path:
    """An image folder of two classes packed by `vdvl pack` (names, labels, class names, own split: none)."""
    images = folder / "to-pack"
    for i in range(6):
        (images / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.new("L", (4, 4), color=i * 40).save(images / "ab"[i % 2] / f"{i}.png")
    out = folder / "packed-template.zarr"
    pack_images(str(images), out)
    return out


@given(target=st.sampled_from(["attrs", "attrs", "ok", "names", "labels"]),
       key=st.sampled_from(["n_train", "class_names", "complete", "schema", "shape", "chunk_rows", "source"]),
       value=st.one_of(json_values, st.just("<deleted>"), st.sampled_from([3, -1, 7, HUGE, ["a"], [HUGE]])))
@settings(max_examples=20)
@example(target="attrs", key="n_train", value="3")
@example(target="ok", key="shape", value=[HUGE])
def test_any_packed_store_metadata_reads_or_is_refused_naming_the_store(folder, packed_store, target, key, value):
    path = unique(folder, ".zarr")
    shutil.copytree(packed_store, path)
    meta_file = path / "zarr.json" if target == "attrs" else path / target / "zarr.json"
    meta = json.loads(meta_file.read_text())
    where = meta["attributes"] if target == "attrs" else meta
    if value == "<deleted>":
        where.pop(key, None)
    else:
        where[key] = value
    meta_file.write_text(json.dumps(meta))
    for split in ("all", "train"):
        read_everything_of(path, split)


def test_a_packed_store_of_blank_images_reads_although_zarr_stored_no_chunk(folder):
    images = unique(folder, "-blank")
    images.mkdir()
    for i in range(3):
        Image.new("L", (4, 4)).save(images / f"{i}.png")  # all fill value: Zarr writes no chunk
    pack_images(str(images), images.with_suffix(".zarr"))
    assert open_images(str(images.with_suffix(".zarr")), "all").read().shape == (3, 4, 4, 1)


def read_everything_of(path: Path, split: str):
    with allocation_peak() as peak:
        result = outcome(lambda: open_images(str(path), split).read())
    assert peak[0] < ALLOCATION_LIMIT
    if refused(result):
        assert_one_sentence(result, names=path.name)
