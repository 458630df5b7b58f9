"""Built-in plugins, built from their validated config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from elspeth_nb.engine.plugins.sinks import CsvSink, JsonArraySink, JsonlSink, ParquetSink, Sink
from elspeth_nb.engine.plugins.sources import CsvSource, FieldRule, JsonlSource, ParquetSource
from elspeth_nb.engine.plugins.transforms import (
    FieldMapper,
    KeywordFilter,
    Latency,
    Passthrough,
    PythonFunction,
    RowRejected,
    Truncate,
)

Source = CsvSource | JsonlSource | ParquetSource


def build_source(config: Any, resolve: Callable[[str], Path], where: str | None = None) -> Source:
    """The source plugin for ``config`` (a SourceConfig), its path resolved against the settings file;
    ``where`` locates its path setting in input errors."""
    options = config.options
    schema = options.schema_
    fields = [FieldRule(f.name, f.type, f.required) for f in schema.field_specs()] if schema.fields else []
    path = resolve(options.path)
    source: Source
    if config.plugin == "csv":
        source = CsvSource(path, schema.mode, fields, delimiter=options.delimiter, quotechar=options.quotechar,
                           encoding=options.encoding)
    elif config.plugin == "jsonl":
        source = JsonlSource(path, schema.mode, fields, encoding=options.encoding)
    else:
        source = ParquetSource(path, schema.mode, fields)
    if where is not None:
        source.where = where
    return source


def build_transform(config: Any, base_dir: Path, where: str | None = None) -> Any:
    """The transform plugin for ``config`` (a TransformConfig); ``where`` locates it in load errors."""
    options = config.options
    plugin = config.plugin
    if plugin == "passthrough":
        return Passthrough(options)
    if plugin == "field_mapper":
        return FieldMapper(options)
    if plugin == "truncate":
        return Truncate(options)
    if plugin == "keyword_filter":
        return KeywordFilter(options)
    if plugin == "latency":
        return Latency(options, config.name)
    return PythonFunction(options, base_dir, where=where or f"transforms[{config.name}].options.function")


def build_sink(config: Any, resolve: Callable[[str], Path]) -> Sink:
    """The sink plugin for ``config`` (a SinkConfig)."""
    options = config.options
    path = resolve(options.path)
    if config.plugin == "csv":
        return CsvSink(path, getattr(options, "delimiter", ","))
    if config.plugin == "parquet":
        schema = options.schema_
        declared = {f.name: f.type for f in schema.field_specs()} if schema is not None and schema.fields else {}
        return ParquetSink(path, declared)
    if config.plugin == "json" and getattr(options, "format", "json") == "json":
        return JsonArraySink(path)
    return JsonlSink(path)


__all__ = ["RowRejected", "Source", "build_sink", "build_source", "build_transform"]
