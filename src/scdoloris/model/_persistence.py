"""The saved-model file: tensors and plain data only, read without unpickling arbitrary objects.

One room of more than 600 lines because the writer and the reader of the one tagged format below
encode the same types and must change together.

A saved model is one file, ``model.pt``, written by :func:`torch.save` and read by
:func:`torch.load` with ``weights_only=True``, whose restricted unpickler builds nothing but
tensors, ``dict``, ``list``, ``str``, numbers, ``bool`` and ``None``: a crafted file cannot run
code. It holds::

    {
        "format": "scdoloris.model",
        "format_version": 1,
        "model_state_dict": {name: tensor},  # the module's weights and buffers
        "var_names": [str, ...],             # the genes, in order
        "attr_dict": {...},                  # the model's attributes, encoded as below
        "arrays": {key: tensor},             # the numeric arrays that attr_dict refers to
    }

``attr_dict`` is JSON-like data (scvi-tools' registry, ``init_params_``, ``history_``, the
training summary, ...). Values that are not plain data are encoded as tagged dicts
(``{"__type__": ..., ...}``): numeric numpy arrays as a reference into ``arrays`` with their
dtype, string and object arrays as lists with their dtype, ``DataFrame``, ``Series`` and
``Index`` as their parts, tuples, ``defaultdict`` and dicts with non-text keys as item lists.
Decoding checks every tag and type, so a damaged or foreign file is an error, never a surprise.

Damage is found before anything is used: torch writes a CRC-32 of every zip member, which
:func:`read_model` checks (torch does not), and the file also holds ``"sha256"``, the SHA-256
of each tensor (``{"model_state_dict": {name: hex}, "arrays": {key: hex}}``), checked after
reading; together they catch flipped bytes, truncation, and a member deleted or swapped in from
another file. Files written before the digests (no ``"sha256"``) get the CRC check only.
:func:`write_model` writes into a temporary directory beside ``path`` and renames the file into
place, so a write that fails (disk full, ...) keeps the previous file and leaves nothing behind.

Models saved before this format (scvi-tools' pickled layout, ``{"model_state_dict",
"var_names", "attr_dict"}`` with numpy arrays and pandas frames) are read by the same
restricted unpickler with a short allowlist of numpy and pandas data constructors
(:data:`LEGACY_GLOBALS`); a file that needs anything else is refused, unread.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import os
import pickle
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..train import damaged_member

FORMAT = "scdoloris.model"
FORMAT_VERSION = 1

_TAG = "__type__"
_NUMERIC_KINDS = "biufc"  # bool, signed/unsigned integers, floats, complex: stored as tensors
_TEXT_KINDS = "OUS"  # object, str, bytes: stored as lists
_DEFAULT_FACTORIES = {"dict": dict, "list": list, "set": set}


@dataclass
class SavedModel:
    """What :func:`read_model` returns."""

    state_dict: dict[str, torch.Tensor]
    attributes: dict[str, Any]
    var_names: np.ndarray
    legacy: bool  # read from scvi-tools' pickled layout


class ModelFileError(ValueError):
    """A model file that is damaged, foreign, or needs objects that are not data to be read."""


class ModelWriteError(OSError):
    """Writing a model file failed (disk full, I/O error, ...); the file it was to replace is kept.

    An ``OSError`` (the disk's), with the ``errno`` of the error that caused it, which stays
    chained as ``__cause__``.
    """


# ---------------------------------------------------------------------------------------- writing
def write_model(
    path: str,
    state_dict: dict[str, torch.Tensor],
    attributes: dict,
    var_names,
    *,
    target: str | os.PathLike | None = None,
) -> None:
    """Write a model file (see the module docstring) to ``path``, replacing it only once complete.

    Parameters
    ----------
    path
        The file to write.
    state_dict
        The module's weights and buffers.
    attributes
        The model's attributes (data only: see the module docstring).
    var_names
        The genes, in order.
    target
        What is being saved, named in the error when writing fails (``Doloris.save`` writes into a
        staging directory and passes the directory it saves to); ``path`` by default.

    Raises
    ------
    TypeError
        An attribute holds a value that is not data (named by its path), so it cannot be saved safely.
    ModelWriteError
        Writing failed (disk full, ...); the file at ``path``, if any, is unchanged.
    """
    path = os.fspath(path)
    arrays: dict[str, torch.Tensor] = {}
    state = {str(k): _state_tensor(k, v) for k, v in state_dict.items()}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_state_dict": state,
        "var_names": [str(v) for v in var_names],
        "attr_dict": {str(k): _encode(v, arrays, str(k)) for k, v in attributes.items()},
        "arrays": arrays,
    }
    # Readers of format 1 without digests ignore this key, so the format version stays.
    payload["sha256"] = {
        "model_state_dict": {k: tensor_digest(v) for k, v in state.items()},
        "arrays": {k: tensor_digest(v) for k, v in arrays.items()},
    }
    directory, name = os.path.split(os.path.abspath(path))
    staging = None
    try:
        # The file keeps its name while written: torch names the archive's members after it.
        staging = tempfile.mkdtemp(prefix=f".{name}.", dir=directory)
        written = os.path.join(staging, name)
        with _crc32_on():
            torch.save(payload, written)
        with open(written, "rb") as handle:
            os.fsync(handle.fileno())  # a delayed write error (full disk, NFS) shows here, not after the rename
        os.replace(written, path)
    except (OSError, RuntimeError) as error:  # torch reports a failed write as RuntimeError ("enforce fail ...")
        raise _write_failed(target if target is not None else path, error) from error
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _write_failed(target, error: Exception) -> ModelWriteError:
    hint = ""
    code = getattr(error, "errno", None)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)) or "unexpected pos" in str(error):
        hint = " Free some disk space (or choose another directory), then save again."
    failure = ModelWriteError(
        f"saving {os.fspath(target)} failed while writing ({type(error).__name__}: {error}); "
        f"the previous model is kept.{hint}"
    )
    failure.errno = code  # code that tests the disk's error (errno.ENOSPC) still can
    return failure


@contextlib.contextmanager
def _crc32_on():
    """Within: ``torch.save`` writes each member's CRC-32, which :func:`read_model` checks.

    torch writes them by default; ``torch.serialization.set_crc32_options(False)`` turns that off
    for the whole process, and a model saved so could not be checked for damage.
    """
    getter = getattr(torch.serialization, "get_crc32_options", None)
    setter = getattr(torch.serialization, "set_crc32_options", None)
    if getter is None or setter is None or getter():
        yield
        return
    setter(True)
    try:
        yield
    finally:
        setter(False)


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and values (its bytes in C order), as hex."""
    tensor = tensor.detach().cpu().resolve_conj().resolve_neg()
    digest = hashlib.sha256(f"{tensor.dtype}:{tuple(tensor.shape)}:".encode())
    try:
        array = tensor.numpy()
    except TypeError:  # dtypes numpy lacks (bfloat16, float8): their bits, as integers of the same size
        array = tensor.view(_SAME_SIZE_INTEGER[tensor.element_size()]).numpy()
    digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    return digest.hexdigest()


_SAME_SIZE_INTEGER = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _state_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"Cannot save the module's state {name!r}: {type(value).__name__} is not a tensor.")
    return value.detach().cpu()


def _encode(value, arrays: dict, path: str):
    """``value`` as plain data; numeric arrays go to ``arrays``."""
    if isinstance(value, np.generic):  # before the Python types: np.float64 is a float, np.str_ a str
        if value.dtype.kind not in _NUMERIC_KINDS + _TEXT_KINDS:
            raise TypeError(f"Cannot save {path}: numpy scalars of dtype {value.dtype} are not supported.")
        return {_TAG: "scalar", "dtype": value.dtype.str, "value": value.item()}
    if value is None or type(value) in (bool, int, float, str):
        return value
    for base in (bool, int, float, str):  # subclasses (enums, ...) are saved as their plain value
        if isinstance(value, base):
            return base(value) if base is not str else str.__str__(value)
    if isinstance(value, torch.Tensor):
        key = f"{len(arrays)}:{path}"
        arrays[key] = value.detach().cpu()
        return {_TAG: "tensor", "key": key}
    if isinstance(value, np.ndarray):
        return _encode_array(value, arrays, path)
    if isinstance(value, pd.DataFrame):
        return {
            _TAG: "dataframe",
            "index": _encode(value.index, arrays, f"{path}.index"),
            "columns": _encode(value.columns, arrays, f"{path}.columns"),
            "data": [_encode_column(value.iloc[:, i], arrays, f"{path}[{i}]") for i in range(value.shape[1])],
        }
    if isinstance(value, pd.Series):
        return {
            _TAG: "series",
            "index": _encode(value.index, arrays, f"{path}.index"),
            "name": _encode(value.name, arrays, f"{path}.name"),
            "values": _encode_column(value, arrays, path),
        }
    if isinstance(value, pd.MultiIndex):
        return {
            _TAG: "multi_index",
            "tuples": [_encode(tuple(t), arrays, path) for t in value],
            "names": [_encode(n, arrays, path) for n in value.names],
        }
    if isinstance(value, pd.RangeIndex):
        name = _encode(value.name, arrays, f"{path}.name")
        return {_TAG: "range_index", "start": value.start, "stop": value.stop, "step": value.step, "name": name}
    if isinstance(value, pd.Index):
        values = _encode_column(pd.Series(value, copy=False), arrays, path)
        return {_TAG: "index", "values": values, "name": _encode(value.name, arrays, f"{path}.name")}
    if isinstance(value, collections.defaultdict):
        factory = {v: k for k, v in _DEFAULT_FACTORIES.items()}.get(value.default_factory)
        if factory is None and value.default_factory is not None:
            raise TypeError(f"Cannot save {path}: a defaultdict of {value.default_factory!r}.")
        return {_TAG: "defaultdict", "factory": factory, "items": _encode_items(value, arrays, path)}
    if isinstance(value, dict):
        if type(value) is dict and all(isinstance(k, str) for k in value) and _TAG not in value:
            return {k: _encode(v, arrays, f"{path}.{k}") for k, v in value.items()}
        if type(value) is not dict:
            raise TypeError(f"Cannot save {path}: {type(value).__name__} is not supported.")
        return {_TAG: "dict", "items": _encode_items(value, arrays, path)}
    if isinstance(value, list) and type(value) is list:
        return [_encode(v, arrays, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple) and type(value) is tuple:
        return {_TAG: "tuple", "items": [_encode(v, arrays, f"{path}[{i}]") for i, v in enumerate(value)]}
    raise TypeError(
        f"Cannot save {path}: {type(value).__module__}.{type(value).__qualname__} is not data "
        "(saved models hold arrays, tables, text and numbers only)."
    )


def _encode_items(mapping: dict, arrays: dict, path: str) -> list:
    return [[_encode(k, arrays, path), _encode(v, arrays, f"{path}.{k}")] for k, v in mapping.items()]


def _encode_array(array: np.ndarray, arrays: dict, path: str) -> dict:
    kind = array.dtype.kind
    if kind in _NUMERIC_KINDS and array.dtype.fields is None:
        native = array.astype(array.dtype.newbyteorder("="), copy=False)
        key = f"{len(arrays)}:{path}"
        arrays[key] = torch.from_numpy(np.ascontiguousarray(native).copy())
        return {_TAG: "ndarray", "dtype": native.dtype.str, "key": key}
    if kind in _TEXT_KINDS:
        flat = array.ravel(order="C")
        values = [_encode(v, arrays, f"{path}[{i}]") for i, v in enumerate(flat.tolist())]
        return {_TAG: "ndarray", "dtype": array.dtype.str, "shape": list(array.shape), "values": values}
    raise TypeError(f"Cannot save {path}: arrays of dtype {array.dtype} are not supported.")


def _encode_column(column: pd.Series, arrays: dict, path: str) -> dict:
    dtype = column.dtype
    if isinstance(dtype, np.dtype):
        return _encode_array(column.to_numpy(), arrays, path)
    if isinstance(dtype, pd.CategoricalDtype):
        return {
            _TAG: "categorical",
            "categories": _encode(dtype.categories, arrays, f"{path}.categories"),
            "codes": _encode_array(np.asarray(column.cat.codes), arrays, f"{path}.codes"),
            "ordered": bool(dtype.ordered),
        }
    values = _encode_array(column.to_numpy(dtype=object), arrays, path)
    return {_TAG: "extension_array", "dtype": str(dtype), "values": values}


# ---------------------------------------------------------------------------------------- reading
def read_model(path: str) -> SavedModel:
    """Read a model file written by :func:`write_model`, or by scdoloris before it (scvi-tools' layout).

    Nothing in the file is executed: it is read by torch's ``weights_only`` unpickler, with the
    numpy and pandas data constructors of :data:`LEGACY_GLOBALS` allowed for the old layout only.

    Raises
    ------
    ModelFileError
        The file is damaged or truncated (a zip member fails its CRC-32 check, a tensor its
        SHA-256, a member is missing), is not a model file, or needs other objects to be read.
    """
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path} is corrupted or truncated: it is not a complete model archive.")
    try:
        damaged = damaged_member(path)
    except Exception as error:  # a damaged zip directory or member header
        raise _corrupted(path, error) from error
    if damaged is not None:
        raise _corrupted(path, ValueError(f"its member {damaged!r} fails its CRC-32 check: its bytes have changed"))
    try:
        payload = _load_weights_only(path, ())
    except pickle.UnpicklingError as error:
        payload = _read_legacy(path, error)
    except Exception as error:  # torch/zip errors of a damaged file; the cause stays chained
        raise _corrupted(path, error) from error
    if isinstance(payload, dict) and "format" in payload:
        return _decode_payload(path, payload)
    return _legacy_model(path, payload)


@contextlib.contextmanager
def _only_these_globals(allowed):
    """Within: torch's weights-only unpickler allows its own types and ``allowed``, nothing else.

    Other libraries widen torch's allowlist for the whole process when imported (torch_geometric
    adds ``dict``, ``list``, ``defaultdict`` and its graph classes); their entries are set aside
    meanwhile, so that what a model file may build does not depend on what else is imported,
    and restored after. (The allowlist is process-wide: threads loading at the same moment see it.)
    """
    previous = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(list(allowed))
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(previous)


def _load_weights_only(path: str, allowed) -> Any:
    with _only_these_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def _corrupted(path: str, error: Exception) -> ModelFileError:
    return ModelFileError(
        f"{path} is corrupted or truncated and cannot be read ({type(error).__name__}: {error}). "
        "Save the model again, or restore the file from a backup."
    )


def _read_legacy(path: str, error: Exception) -> Any:
    """A file of the old layout, read with the legacy allowlist; anything else is refused."""
    try:
        with _only_these_globals(()):
            needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception as cause:
        raise _corrupted(path, cause) from cause
    if not needed:  # the restricted unpickler failed for another reason than a global
        raise _corrupted(path, error) from error
    allowed = legacy_globals()
    refused = sorted(needed - {name for _, name in allowed})
    if refused:
        why = f"reading it would create objects that are not data ({', '.join(refused)}), which could run code"
        raise _refused(path, why) from error
    try:
        return _load_weights_only(path, allowed)
    except pickle.UnpicklingError as cause:
        raise _refused(path, f"it holds objects that the restricted reader does not build: {cause}") from cause
    except Exception as cause:
        raise _corrupted(path, cause) from cause


def _refused(path: str, why: str) -> ModelFileError:
    return ModelFileError(
        f"{path} was not loaded: {why}. Doloris.save never writes these, so the file was not written by "
        "Doloris.save or has been altered. If you trust its source, convert it once with "
        "scdoloris.model._persistence.convert_trusted_model(path) (this unpickles it: only for files you trust), "
        "then load it again."
    )


def _decode_payload(path: str, payload: dict) -> SavedModel:
    version = payload.get("format_version")
    if payload.get("format") != FORMAT or not isinstance(version, int):
        raise ModelFileError(f"{path} is corrupted or truncated: it is not a Doloris model file.")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} has model format {version}, written by a newer scdoloris; this version reads format "
            f"{FORMAT_VERSION}. Install a newer scdoloris to load it."
        )
    try:
        state_dict = _tensor_dict(payload["model_state_dict"])
        arrays = _tensor_dict(payload["arrays"])
        attributes = payload["attr_dict"]
        var_names = payload["var_names"]
        if not isinstance(attributes, dict) or not all(isinstance(k, str) for k in attributes):
            raise ValueError("attr_dict is not a dict of attributes")
        if not isinstance(var_names, list) or not all(isinstance(v, str) for v in var_names):
            raise ValueError("var_names is not a list of gene names")
        attributes = {k: _decode(v, arrays) for k, v in attributes.items()}
        if "sha256" in payload:  # files written before the digests have none: their CRCs were checked
            _check_digests(payload["sha256"], {"model_state_dict": state_dict, "arrays": arrays})
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise _corrupted(path, error) from error
    return SavedModel(state_dict, attributes, np.asarray(var_names, dtype=object), legacy=False)


def _check_digests(digests, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    """Each tensor matches the SHA-256 written with it (the same names, no more, no fewer)."""
    if not isinstance(digests, dict) or set(digests) != set(tensors):
        raise ValueError("the tensors' checksums are damaged")
    for group, members in tensors.items():
        expected = digests[group]
        if not isinstance(expected, dict) or set(expected) != set(members):
            raise ValueError(f"the {group} tensors are not those written with the file")
        for name, tensor in members.items():
            if tensor_digest(tensor) != expected[name]:
                raise ValueError(f"tensor {name!r} of {group} does not match the checksum written with it")


def _tensor_dict(value) -> dict[str, torch.Tensor]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    ):
        raise ValueError("expected a dict of tensors")
    return value


def _decode(value, arrays: dict[str, torch.Tensor]):
    """Inverse of :func:`_encode`; raises ``ValueError`` (or ``KeyError``/``TypeError``) on anything else."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, list):
        return [_decode(v, arrays) for v in value]
    if not isinstance(value, dict):
        raise ValueError(f"unexpected {type(value).__name__} in the attributes")
    tag = value.get(_TAG)
    if tag is None:
        return {k: _decode(v, arrays) for k, v in value.items()}
    decoder = _DECODERS.get(tag) if isinstance(tag, str) else None
    if decoder is None:
        raise ValueError(f"unknown value type {tag!r} in the attributes")
    return decoder(value, arrays)


def _decode_dtype(name, kinds: str) -> np.dtype:
    if not isinstance(name, str):
        raise ValueError(f"dtype {name!r} is not a dtype name")
    dtype = np.dtype(name)
    if dtype.kind not in kinds or dtype.fields is not None:
        raise ValueError(f"unexpected dtype {name!r}")
    return dtype


def _decode_array(value: dict, arrays) -> np.ndarray:
    if "key" in value:
        dtype = _decode_dtype(value["dtype"], _NUMERIC_KINDS)
        tensor = arrays[value["key"]]
        array = tensor.numpy()
        if array.dtype != dtype:
            raise ValueError(f"array {value['key']!r} is {array.dtype}, not {dtype}")
        return array
    dtype = _decode_dtype(value["dtype"], _TEXT_KINDS)
    shape = tuple(value["shape"])
    if not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError(f"bad array shape {shape!r}")
    values = [_decode(v, arrays) for v in value["values"]]
    if len(values) != int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"{len(values)} values for an array of shape {shape}")
    if dtype.kind == "O":
        out = np.empty(len(values), dtype=object)
        for i, v in enumerate(values):
            out[i] = v
        return out.reshape(shape)
    if not all(isinstance(v, str if dtype.kind == "U" else bytes) for v in values):
        raise ValueError(f"values of a {dtype} array are not all text")
    return np.array(values, dtype=dtype).reshape(shape)


def _decode_scalar(value: dict, arrays) -> np.generic:
    dtype = _decode_dtype(value["dtype"], _NUMERIC_KINDS + _TEXT_KINDS)
    item = value["value"]
    if not isinstance(item, (bool, int, float, complex, str, bytes)):
        raise ValueError(f"bad numpy scalar {item!r}")
    return dtype.type(item)


def _decode_tensor(value: dict, arrays) -> torch.Tensor:
    return arrays[value["key"]]


def _decode_items(value: dict, arrays) -> list[tuple]:
    items = value["items"]
    if not isinstance(items, list) or not all(isinstance(i, list) and len(i) == 2 for i in items):
        raise ValueError("bad items")
    return [(_decode(k, arrays), _decode(v, arrays)) for k, v in items]


def _decode_dict(value: dict, arrays) -> dict:
    return dict(_decode_items(value, arrays))


def _decode_defaultdict(value: dict, arrays) -> collections.defaultdict:
    factory = value["factory"]
    if factory is not None and factory not in _DEFAULT_FACTORIES:
        raise ValueError(f"bad defaultdict factory {factory!r}")
    return collections.defaultdict(_DEFAULT_FACTORIES.get(factory), _decode_items(value, arrays))


def _decode_tuple(value: dict, arrays) -> tuple:
    items = value["items"]
    if not isinstance(items, list):
        raise ValueError("bad tuple")
    return tuple(_decode(v, arrays) for v in items)


def _decode_column(value, arrays):
    """A column's values: an ndarray, a Categorical or an extension array."""
    if not isinstance(value, dict):
        raise ValueError("bad column")
    tag = value.get(_TAG)
    if tag == "ndarray":
        return _decode_array(value, arrays)
    if tag == "categorical":
        codes = _decode_array(value["codes"], arrays)
        categories = _decode(value["categories"], arrays)
        if not isinstance(categories, pd.Index) or codes.dtype.kind != "i":
            raise ValueError("bad categorical column")
        return pd.Categorical.from_codes(codes, dtype=pd.CategoricalDtype(categories, ordered=bool(value["ordered"])))
    if tag == "extension_array":
        dtype = value["dtype"]
        if not isinstance(dtype, str):
            raise ValueError("bad extension dtype")
        return pd.array(_decode_array(value["values"], arrays), dtype=pd.api.types.pandas_dtype(dtype))
    raise ValueError(f"bad column type {tag!r}")


def _decode_index(value: dict, arrays) -> pd.Index:
    return pd.Index(_decode_column(value["values"], arrays), name=_decode_name(value["name"], arrays))


def _decode_name(value, arrays):
    name = _decode(value, arrays)
    if isinstance(name, (list, dict, np.ndarray, pd.Index)):
        raise ValueError("bad name")
    return name


def _decode_range_index(value: dict, arrays) -> pd.RangeIndex:
    start, stop, step = value["start"], value["stop"], value["step"]
    if not all(type(x) is int for x in (start, stop, step)):
        raise ValueError("bad RangeIndex")
    return pd.RangeIndex(start, stop, step, name=_decode_name(value["name"], arrays))


def _decode_multi_index(value: dict, arrays) -> pd.MultiIndex:
    tuples = [_decode(t, arrays) for t in value["tuples"]]
    names = [_decode_name(n, arrays) for n in value["names"]]
    if not all(isinstance(t, tuple) and len(t) == len(names) for t in tuples):
        raise ValueError("bad MultiIndex")
    if not tuples:
        return pd.MultiIndex.from_arrays([[] for _ in names], names=names)
    return pd.MultiIndex.from_tuples(tuples, names=names)


def _decode_series(value: dict, arrays) -> pd.Series:
    index = _decode(value["index"], arrays)
    if not isinstance(index, pd.Index):
        raise ValueError("bad Series index")
    return pd.Series(_decode_column(value["values"], arrays), index=index, name=_decode_name(value["name"], arrays))


def _decode_dataframe(value: dict, arrays) -> pd.DataFrame:
    index, columns = _decode(value["index"], arrays), _decode(value["columns"], arrays)
    data = value["data"]
    if not isinstance(index, pd.Index) or not isinstance(columns, pd.Index) or not isinstance(data, list):
        raise ValueError("bad DataFrame")
    if len(data) != len(columns):
        raise ValueError(f"{len(data)} columns of data for {len(columns)} column names")
    values = [_decode_column(column, arrays) for column in data]
    if any(len(v) != len(index) for v in values):
        raise ValueError(f"a column's length differs from the {len(index)} rows")
    frame = pd.DataFrame(dict(enumerate(values)), index=index)
    frame.columns = columns
    return frame


_DECODERS = {
    "ndarray": _decode_array,
    "scalar": _decode_scalar,
    "tensor": _decode_tensor,
    "dict": _decode_dict,
    "defaultdict": _decode_defaultdict,
    "tuple": _decode_tuple,
    "index": _decode_index,
    "range_index": _decode_range_index,
    "multi_index": _decode_multi_index,
    "series": _decode_series,
    "dataframe": _decode_dataframe,
}


# ------------------------------------------------------------------------------- the legacy layout
def _restricted_bytes(*args) -> bytes:
    """``builtins.bytes`` for the legacy reader: copies bytes, never allocates a size the file names."""
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytes(args[0])
    raise pickle.UnpicklingError("bytes() is only allowed on bytes in a model file")


def _defaultdict_as_dict(*args) -> dict:
    """``collections.defaultdict`` for the legacy reader: a plain dict (its factory is never called).

    torch's restricted unpickler fills only plain dicts; :func:`_legacy_model` turns scvi-tools'
    ``field_registries`` back into the ``defaultdict(dict)`` it is.
    """
    if len(args) > 1:
        raise pickle.UnpicklingError("defaultdict takes only a factory in a model file")
    return {}


def legacy_globals() -> list[tuple[Any, str]]:
    """The numpy and pandas data constructors allowed when reading the legacy (pickled) layout.

    Each is a class or rebuild function of numpy arrays, numpy dtypes, pandas ``Index``,
    ``RangeIndex`` and ``DataFrame`` (with its ``BlockManager``), or ``slice`` and ``dict``: they
    make data from data and call nothing that the file names. ``bytes`` and ``defaultdict`` are
    replaced by restricted versions. Flexible-size numpy dtypes (str, bytes, void) are not
    allowed: their pickled state sets the item size. Given as ``(object, name)`` pairs: the name
    is the one the file refers to.
    """
    from pandas.core.frame import DataFrame
    from pandas.core.indexes.base import Index, _new_Index
    from pandas.core.indexes.range import RangeIndex
    from pandas.core.internals.managers import BlockManager

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    allowed: list[tuple[Any, str]] = [
        (np.ndarray, "numpy.ndarray"),
        (np.dtype, "numpy.dtype"),
        (_reconstruct, "numpy._core.multiarray._reconstruct"),
        (_reconstruct, "numpy.core.multiarray._reconstruct"),  # files pickled under numpy < 2
        (DataFrame, "pandas.core.frame.DataFrame"),
        (BlockManager, "pandas.core.internals.managers.BlockManager"),
        (Index, "pandas.core.indexes.base.Index"),
        (_new_Index, "pandas.core.indexes.base._new_Index"),
        (RangeIndex, "pandas.core.indexes.range.RangeIndex"),
        (slice, "builtins.slice"),
        (dict, "builtins.dict"),
        (_restricted_bytes, "builtins.bytes"),
        (_defaultdict_as_dict, "collections.defaultdict"),
    ]
    try:
        from pandas._libs.internals import _unpickle_block

        allowed.append((_unpickle_block, "pandas._libs.internals._unpickle_block"))
    except ImportError:  # older pandas pickles blocks through BlockManager's state
        pass
    # Dtype instances are restored with BUILD, which the unpickler allows on allowlisted types only.
    for code in "?bBhHiIlLqQefdFDO":
        dtype_class = type(np.dtype(code))
        allowed.append((dtype_class, f"{dtype_class.__module__}.{dtype_class.__qualname__}"))
    return allowed


def _legacy_model(path: str, payload) -> SavedModel:
    """scvi-tools' layout, ``{"model_state_dict", "var_names", "attr_dict"}``, already read safely."""
    try:
        if not isinstance(payload, dict) or not {"model_state_dict", "var_names", "attr_dict"} <= set(payload):
            raise ModelFileError(
                f"{path} is corrupted or truncated, or not a Doloris model file: it lacks the model's weights and "
                "attributes. Pass the directory written by Doloris.save."
            )
        state_dict = dict(payload["model_state_dict"])
        state_dict.pop("pyro_param_store", None)  # scvi-tools' Pyro parameters; Doloris has none
        state_dict = _tensor_dict(state_dict)
        attributes = payload["attr_dict"]
        if not isinstance(attributes, dict):
            raise ValueError("attr_dict is not a dict")
        registry = attributes.get("registry_")
        if isinstance(registry, dict) and isinstance(registry.get("field_registries"), dict):
            registry["field_registries"] = collections.defaultdict(dict, registry["field_registries"])
        var_names = np.asarray(payload["var_names"], dtype=object)
        if var_names.ndim != 1 or not all(isinstance(v, str) for v in var_names):
            raise ValueError("var_names is not a list of gene names")
    except ModelFileError:
        raise
    except (TypeError, ValueError) as error:
        raise _corrupted(path, error) from error
    return SavedModel(state_dict, attributes, var_names, legacy=True)


def convert_trusted_model(path: str) -> None:
    """Rewrite a pickled model file that you trust in the current format, in place.

    This unpickles the file (``weights_only=False``), which runs any code it holds: use it only
    on files from a source you trust, once, then load them normally.
    """
    path = os.fspath(path)
    content = torch.load(path, map_location="cpu", weights_only=False)
    state_dict = {k: v for k, v in content["model_state_dict"].items() if k != "pyro_param_store"}
    write_model(path, state_dict, content["attr_dict"], content["var_names"])  # replaces the file once complete
