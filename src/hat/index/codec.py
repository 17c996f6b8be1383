"""Token codecs: how an index stores each level's image region tokens.

One codec per level, named in :attr:`hat.config.IndexConfig.token_codecs` and
recorded in the index's manifest:

========  =====================================  ==================  =======================
name      faiss quantizer                        bytes per token     error bound (per value)
========  =====================================  ==================  =======================
float16   none (``levelK.npy``, as format 1)     ``2 d``             ``|x| * 2**-11``
int8      ``ScalarQuantizer`` ``QT_8bit``        ``d``               ``range_j / 255``
int4      ``ScalarQuantizer`` ``QT_4bit``        ``d / 2``           ``range_j / 15``
pq        ``ProductQuantizer`` (``IndexPQ``)     ``d / dims_per_b``  none (mean: see tests)
========  =====================================  ==================  =======================

``range_j``: the span (max - min) of dimension ``j`` over the tokens the codec was
trained on; values outside it are clipped to it. ``pq`` has ``d / dims_per_byte``
sub-quantizers of 8 bits (256 centroids each), so with the default 4 dims per byte a
token takes 1/8 of its float16 bytes; its error has no per-value bound, only a
mean one on data like its training data.

Training rule: a trained codec (every one but ``float16``) is trained, per level, on
the first image segment whose level holds at least :attr:`TokenCodec.min_train`
tokens (``pq``: 39 x 256 = 9,984, what faiss's k-means asks for; ``int8``/``int4``:
:data:`SQ_MIN_TRAIN`); segments committed before it keep that level in float16 and
stay readable. At most :data:`MAX_TRAIN_TOKENS` tokens (a seeded sample) are used.

Codes are ``(n, T_k, code_size)`` uint8 arrays; :class:`CodedLevel` decodes only the
rows it is indexed with (the Searcher's shortlist). faiss is imported when a codec
is first used, so ``import hat.index.store`` does not import it.

Shape legend: ``n`` items, ``T`` tokens, ``d`` joint width, ``c`` code bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hat._optional import needs_extra
from hat.config import TOKEN_CODECS

if TYPE_CHECKING:
    import faiss

__all__ = [
    "CODECS",
    "FLOAT16",
    "MAX_TRAIN_TOKENS",
    "PQ_MIN_TRAIN",
    "SQ_MIN_TRAIN",
    "CodedLevel",
    "TokenCodec",
    "codec_bytes_per_token",
    "level_codecs",
]

FLOAT16 = "float16"
# Every codec name, in increasing compression (pq's depends on codec_dims_per_byte).
CODECS = TOKEN_CODECS
# faiss's factory string of each trained codec ({m}: pq's number of sub-quantizers).
# "np": no polysemous training, which the factory's "PQ" turns on (it reorders centroids
# for Hamming-distance search, which decoding never uses) and which took 5-6x the
# k-means itself at d = 768 (README, "Token codecs"); the codes decode the same way.
FACTORY = {"int8": "SQ8", "int4": "SQ4", "pq": "PQ{m}x8np"}
# Bits per value of the scalar quantizers.
SQ_BITS = {"int8": 8, "int4": 4}
# PQ: 8-bit sub-quantizers (256 centroids); faiss's k-means wants 39 points per centroid.
PQ_BITS = 8
PQ_CENTROIDS = 2**PQ_BITS
KMEANS_MIN_POINTS_PER_CENTROID = 39
PQ_MIN_TRAIN = KMEANS_MIN_POINTS_PER_CENTROID * PQ_CENTROIDS
# Scalar quantizers learn each dimension's range: a few hundred tokens give it.
SQ_MIN_TRAIN = 256
# Tokens a codec is trained on at most (a seeded sample of the segment's).
MAX_TRAIN_TOKENS = 65_536
TRAIN_SEED = 0
FLOAT16_BYTES = 2


def level_codecs(names: tuple[str, ...], levels: int, field: str = "index.token_codecs") -> tuple:
    """One codec name per level from ``names`` (one for all levels, or one per level).

    Raises:
        ValueError: an unknown name, or neither one nor ``levels`` names.
    """
    for name in names:
        if name not in CODECS:
            raise ValueError(f"{field}: unknown codec {name!r}; one of {', '.join(CODECS)}")
    if len(names) == 1:
        return tuple(names) * levels
    if len(names) != levels:
        raise ValueError(
            f"{field}: {len(names)} codecs {list(names)} for a model of {levels} levels; give "
            f"one for all levels or one per level"
        )
    return tuple(names)


def check_dims_per_byte(name: str, dim: int, dims_per_byte: int) -> None:
    """Refuse a ``pq`` codec whose ``dims_per_byte`` does not divide the width ``dim``."""
    if name == "pq" and dim % dims_per_byte:
        raise ValueError(
            f"index.codec_dims_per_byte: {dims_per_byte} does not divide the model's joint "
            f"width {dim} (pq needs d / codec_dims_per_byte sub-quantizers)"
        )


def codec_bytes_per_token(name: str, dim: int, dims_per_byte: int) -> int:
    """Bytes one ``dim``-wide token takes under codec ``name``."""
    if name == FLOAT16:
        return FLOAT16_BYTES * dim
    if name == "pq":
        return dim // dims_per_byte
    return -(-dim * SQ_BITS[name] // 8)


@dataclass
class TokenCodec:
    """A trained (or, for ``float16``, trivial) codec of ``dim``-wide tokens.

    Attributes:
        name: one of :data:`CODECS`.
        dim: token width ``d``.
        dims_per_byte: ``pq``'s dims per code byte.
        index: the trained faiss index (``None`` for ``float16`` and before training).
    """

    name: str
    dim: int
    dims_per_byte: int
    index: Any = None

    @property
    def trained(self) -> bool:
        """Whether tokens can be encoded: ``float16`` always, the others once trained."""
        return self.name == FLOAT16 or self.index is not None

    @property
    def min_train(self) -> int:
        """Tokens a segment's level must hold to train this codec (0: needs none)."""
        return {FLOAT16: 0, "pq": PQ_MIN_TRAIN}.get(self.name, SQ_MIN_TRAIN)

    @property
    def code_size(self) -> int:
        """Bytes per token."""
        return codec_bytes_per_token(self.name, self.dim, self.dims_per_byte)

    def can_train(self, tokens: np.ndarray) -> bool:
        """Whether ``(n, T, d)`` tokens are enough to train this codec on."""
        return tokens.shape[0] * tokens.shape[1] >= self.min_train

    def train(self, tokens: np.ndarray) -> None:
        """Train on ``(n, T, d)`` tokens (at least :attr:`min_train` of them)."""
        with needs_extra("index"):
            import faiss

        flat = tokens.reshape(-1, self.dim)  # (n T, d)
        if not self.can_train(tokens):
            raise ValueError(f"{self.name} needs {self.min_train} tokens to train, got {len(flat)}")
        if len(flat) > MAX_TRAIN_TOKENS:
            pick = np.random.default_rng(TRAIN_SEED).choice(len(flat), MAX_TRAIN_TOKENS, False)
            flat = flat[np.sort(pick)]
        spec = FACTORY[self.name].format(m=self.dim // self.dims_per_byte)
        index = faiss.index_factory(self.dim, spec)
        index.train(np.ascontiguousarray(flat, dtype=np.float32))
        self.index = index

    def encode(self, tokens: np.ndarray) -> np.ndarray:
        """``(n, T, c)`` uint8 codes of ``(n, T, d)`` tokens."""
        n, t, _ = tokens.shape
        flat = np.ascontiguousarray(tokens.reshape(-1, self.dim), dtype=np.float32)  # (n T, d)
        codes = self.index.sa_encode(flat)  # (n T, c)
        return codes.reshape(n, t, self.code_size)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """``(n, T, d)`` float32 tokens of ``(n, T, c)`` uint8 codes."""
        n, t, _ = codes.shape
        flat = np.ascontiguousarray(codes.reshape(-1, self.code_size))  # (n T, c)
        return self.index.sa_decode(flat).reshape(n, t, self.dim)  # (n, T, d)

    def serialize(self) -> bytes:
        """The trained faiss index, as ``faiss.serialize_index`` writes it."""
        with needs_extra("index"):
            import faiss

        return faiss.serialize_index(self.index).tobytes()

    @classmethod
    def deserialize(cls, name: str, dim: int, dims_per_byte: int, data: bytes) -> TokenCodec:
        """A codec from :meth:`serialize`'s bytes (``RuntimeError`` if faiss cannot read
        them; ``ValueError`` if they are another codec's)."""
        with needs_extra("index"):
            import faiss

        index: faiss.Index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        codec = cls(name, dim, dims_per_byte, index)
        if index.d != dim or index.sa_code_size() != codec.code_size:
            raise ValueError(
                f"a codebook of width {index.d} and {index.sa_code_size()} code bytes, "
                f"expected {name} of width {dim} and {codec.code_size} bytes"
            )
        return codec


class CodedLevel:
    """A lazy ``(n, T, d)`` float32 view of one segment level's ``(n, T, c)`` codes:
    indexing it with rows decodes those rows only."""

    def __init__(self, codes: np.ndarray, codec: TokenCodec) -> None:
        self.codes, self.codec = codes, codec
        self.shape = (*codes.shape[:2], codec.dim)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: Any) -> np.ndarray:
        """``(m, T, d)`` decoded tokens of ``rows`` (an index array or a slice)."""
        codes = np.asarray(self.codes[rows])  # (m, T, c)
        if codes.ndim == len(self.shape) - 1:  # a single row
            return self.codec.decode(codes[None])[0]
        return self.codec.decode(codes)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        decoded = self[:]
        return decoded if dtype is None else decoded.astype(dtype)
