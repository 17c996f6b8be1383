"""The web app: a thin FastAPI layer over :class:`hat.index.Index` and one HTML page.

Endpoints: ``GET /`` (the page), ``POST /search/text``, ``POST /search/image``
(upload), ``GET /images/{id}`` (thumbnail, by id only), ``GET /explain/{id}?q=``
(PNG or JSON), ``GET /healthz``; OpenAPI docs at ``/docs``. Every request is
validated against the limits of :class:`~hat.config.ServeConfig`; an optional bearer
token guards every endpoint that reads the index (the page, ``/healthz`` and the
docs stay open).
"""

from __future__ import annotations

import functools
import hmac
import io
import logging
import os
import time
from importlib import resources
from typing import Annotated, Any, Literal

from PIL import Image, UnidentifiedImageError

from hat._optional import needs_extra
from hat.config import ServeConfig
from hat.data import DataError, load_image
from hat.explain import explain_indexed, render_png
from hat.index import Hit, Index, IndexFormatError
from hat.index.reader import open_image_file

with needs_extra("serve"):
    from fastapi import (
        APIRouter,
        Depends,
        FastAPI,
        File,
        Form,
        HTTPException,
        Path,
        Query,
        Request,
        UploadFile,
    )
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["create_app", "serve"]

log = logging.getLogger(__name__)

UPLOAD_CHUNK = 2**16
MAX_ID = 2**63 - 1  # SQLite's integer range
ImageId = Annotated[int, Path(ge=1, le=MAX_ID, description="an image id from a search result")]
THUMBNAIL_QUALITY = 85
THUMBNAIL_CACHE = 1024  # thumbnails kept in memory (~20 KB each at 320 px), by file version


class TextQuery(BaseModel):
    """A text search request. Strict: ``k`` must be a JSON integer (not ``true``,
    ``"3"`` or ``3.0``), ``exhaustive`` a JSON boolean, ``query`` valid Unicode."""

    model_config = ConfigDict(strict=True, extra="forbid")

    query: str = Field(min_length=1, description="what to look for")
    k: int = Field(default=10, ge=1, description="number of results")
    exhaustive: bool = Field(default=False, description="score every image exactly")

    @field_validator("query")
    @classmethod
    def _encodable(cls, value: str) -> str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate such as "\ud800"
            raise ValueError("query is not valid Unicode (a lone surrogate?)") from err
        return value


def _validation_details(err: RequestValidationError) -> list[dict[str, Any]]:
    """The errors of a rejected request WITHOUT the input they were about: echoing it
    back fails for values JSON cannot encode (NaN, 1e400, lone surrogates)."""
    return [
        {"loc": [str(part) for part in e.get("loc", ())], "msg": str(e.get("msg", "invalid")),
         "type": str(e.get("type", "value_error"))}
        for e in err.errors()
    ]  # fmt: skip


class HitModel(BaseModel):
    """One result."""

    id: int
    kind: Literal["image", "caption"]
    score: float
    level_scores: list[float]
    path: str | None = None
    text: str | None = None


class SearchResponse(BaseModel):
    """Results, best first, and the time the search took."""

    hits: list[HitModel]
    took_ms: float


def _hits(hits: list[Hit], started: float) -> SearchResponse:
    return SearchResponse(
        hits=[HitModel(**h.to_dict()) for h in hits], took_ms=(time.perf_counter() - started) * 1e3
    )


def _check_query(text: str, cfg: ServeConfig) -> str:
    if len(text) > cfg.max_query_chars:
        raise HTTPException(422, f"query longer than {cfg.max_query_chars} characters")
    if not text.strip():
        raise HTTPException(422, "query is empty")
    return text


def _check_k(k: int, cfg: ServeConfig) -> int:
    if not 1 <= k <= cfg.max_k:
        raise HTTPException(422, f"k must be between 1 and {cfg.max_k}")
    return k


async def _read_upload(upload: UploadFile, cfg: ServeConfig) -> Image.Image:
    """The uploaded image, refused (413) above the byte or pixel limits, 415 if not
    an image."""
    data = bytearray()
    while chunk := await upload.read(UPLOAD_CHUNK):
        data.extend(chunk)
        if len(data) > cfg.max_upload_bytes:
            raise HTTPException(413, f"upload larger than {cfg.max_upload_bytes} bytes")
    try:
        with Image.open(io.BytesIO(bytes(data))) as probe:
            width, height = probe.size
    except Image.DecompressionBombError as err:
        raise HTTPException(413, f"image has more than {cfg.max_pixels} pixels") from err
    except (UnidentifiedImageError, OSError) as err:
        raise HTTPException(415, "the upload is not a readable image") from err
    if width * height > cfg.max_pixels:
        raise HTTPException(413, f"image has {width * height} pixels, limit {cfg.max_pixels}")
    try:
        return load_image(io.BytesIO(bytes(data)), max_pixels=cfg.max_pixels)
    except DataError as err:
        raise HTTPException(415, "the upload is not a readable image") from err


def create_app(index: Index, cfg: ServeConfig = ServeConfig()) -> FastAPI:
    """The FastAPI application serving ``index`` under the limits of ``cfg``."""

    def authorize(request: Request) -> None:
        if cfg.token is None:
            return
        given = request.headers.get("authorization", "")
        expected = f"Bearer {cfg.token}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise HTTPException(401, "missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    app = FastAPI(
        title="hat",
        description="Search an image collection with HAT (hierarchical alignment).",
        version="1",
    )
    guarded = APIRouter(dependencies=[Depends(authorize)])

    @app.exception_handler(DataError)
    async def data_error(request: Request, err: DataError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=422)

    @app.exception_handler(IndexFormatError)
    async def damaged_index(request: Request, err: IndexFormatError) -> JSONResponse:
        # The server's own files, not the request: 503, with the file and the repair.
        log.error("%s", err)
        return JSONResponse({"detail": f"the index is damaged: {err}"}, status_code=503)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_details(err)}, status_code=422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return resources.files("hat").joinpath("web/index.html").read_text()

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        """Liveness and what is indexed."""
        return {"status": "ok", "images": len(index), "captions": index.store.count("caption")}

    @guarded.post("/search/text", response_model=SearchResponse)
    def search_text(body: TextQuery) -> SearchResponse:
        """Images best matching a text query."""
        started = time.perf_counter()
        query, k = _check_query(body.query, cfg), _check_k(body.k, cfg)
        return _hits(index.search_text(query, k, body.exhaustive), started)

    @guarded.post("/search/image", response_model=SearchResponse)
    async def search_image(
        file: Annotated[UploadFile, File(description="the query image")],
        k: Annotated[int, Form()] = 10,
        exhaustive: Annotated[bool, Form()] = False,
    ) -> SearchResponse:
        """Captions (or, without captions, images) best matching an uploaded image."""
        started = time.perf_counter()
        _check_k(k, cfg)
        image = await _read_upload(file, cfg)
        return _hits(index.search_image(image, k, exhaustive), started)

    @functools.lru_cache(maxsize=THUMBNAIL_CACHE)
    def thumbnail(image_id: int, path: str, version: tuple[int, int]) -> bytes:
        """JPEG bytes of the thumbnail of one version (size, mtime) of an indexed
        image's file; errors are raised, never cached. Only a regular file is read."""
        try:
            with open_image_file(path) as f:
                picture = load_image(f)
        except DataError as err:
            raise HTTPException(410, "the image file is no longer readable") from err
        picture.thumbnail((cfg.thumbnail_size, cfg.thumbnail_size))
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
        return buffer.getvalue()

    @guarded.get("/images/{image_id}", responses={200: {"content": {"image/jpeg": {}}}})
    def image(image_id: ImageId) -> Response:
        """A JPEG thumbnail of an indexed image, by id. The index is asked on every
        request: an image removed from it is 404 at once (even while another process
        removes it), a file changed on disk gets a new thumbnail, a file gone is 410."""
        try:
            path = index.image_path(image_id)
        except KeyError as err:
            raise HTTPException(404, f"no image with id {image_id}") from err
        try:
            st = os.stat(path)
        except OSError as err:
            raise HTTPException(410, "the image file is no longer readable") from err
        jpeg = thumbnail(image_id, path, (st.st_size, st.st_mtime_ns))
        return Response(jpeg, media_type="image/jpeg")

    @guarded.get("/explain/{image_id}", responses={200: {"content": {"image/png": {}}}})
    def explain(
        image_id: ImageId,
        q: Annotated[str, Query(min_length=1, description="the caption to explain")],
        format: Literal["png", "json"] = "png",
    ) -> Response:
        """Each word's attention over the image's regions at every level."""
        _check_query(q, cfg)
        try:
            explanation = explain_indexed(index, image_id, q)
        except KeyError as err:
            raise HTTPException(404, f"no image with id {image_id}") from err
        if format == "json":
            return JSONResponse(explanation.to_dict())
        return Response(render_png(explanation), media_type="image/png")

    app.include_router(guarded)
    return app


def serve(index: Index, cfg: ServeConfig = ServeConfig()) -> None:
    """Run the web app with uvicorn on ``cfg.host:cfg.port`` until interrupted."""
    with needs_extra("serve"):
        import uvicorn

    index.model  # noqa: B018 -- load the model now, not at the first request
    uvicorn.run(create_app(index, cfg), host=cfg.host, port=cfg.port, log_level="info")
