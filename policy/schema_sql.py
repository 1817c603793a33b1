"""A catalog snapshot from CREATE statements, without a database.

``pgwarden policy explain --schema-sql config/support_schema.sql`` and the unit tests use it.
It understands what schema files for pgwarden contain: ``CREATE SCHEMA``, ``CREATE TABLE``
(column names, types, primary keys), ``CREATE VIEW`` (definition kept, columns derived by the
analyser), ``COMMENT ON COLUMN`` and ``SET search_path``. Other statements are skipped.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from pglast import parser as _pg

from policy.catalog import CatalogColumn, CatalogRelation, CatalogSnapshot
from policy.labels import parse_comment_labels
from policy.lineage.shared import Shared
from policy.lineage.tree import names, node_type
from policy.lineage.walker import StatementWalker
from policy.parse import parse_json
from policy.search_path import DEFAULT_SEARCH_PATH


def snapshot_from_sql(sql: str, search_path: tuple[str, ...] = ("public",)) -> CatalogSnapshot:
    """Build a snapshot by reading CREATE statements (raises ``ValueError`` on parse errors)."""
    try:
        tree = parse_json(sql)
    except _pg.ParseError as exc:
        raise ValueError(f"schema SQL does not parse: {exc}") from exc
    raw_bytes = sql.encode()
    path = search_path
    schemas: set[str] = {"public", "pg_catalog"}
    rels: dict[tuple[str, str], CatalogRelation] = {}
    next_oid = [16384]

    def oid() -> int:
        next_oid[0] += 1
        return next_oid[0]

    def current() -> CatalogSnapshot:
        return CatalogSnapshot.build(rels.values(), schemas)

    def qualify(rv: dict[str, Any]) -> tuple[str, str]:
        schema = rv.get("schemaname")
        name = str(rv["relname"])
        if schema:
            return str(schema), name
        for s in path:
            if (s, name) in rels:
                return s, name
        return next((s for s in path if s in schemas), "public"), name

    for raw in tree.get("stmts") or ():
        kind, n = node_type(raw["stmt"])
        if kind == "CreateSchemaStmt":
            schemas.add(n["schemaname"])
        elif kind == "VariableSetStmt" and n.get("name") == "search_path":
            vals = [a["A_Const"]["sval"]["sval"] for a in n.get("args") or () if "A_Const" in a]
            path = tuple(vals) if vals else DEFAULT_SEARCH_PATH
        elif kind == "CreateStmt":
            schema, name = qualify(n["relation"])
            cols: list[CatalogColumn] = []
            pk: list[str] = []
            rel_oid = oid()
            for elt in n.get("tableElts") or ():
                ek, e = node_type(elt)
                if ek == "ColumnDef":
                    tname = ".".join(names(e.get("typeName", {}).get("names")))
                    cols.append(
                        CatalogColumn(
                            schema,
                            name,
                            e["colname"],
                            len(cols) + 1,
                            tname.removeprefix("pg_catalog."),
                            rel_oid,
                        )
                    )
                    for c in e.get("constraints") or ():
                        if c.get("Constraint", {}).get("contype") == "CONSTR_PRIMARY":
                            pk.append(e["colname"])
                elif ek == "Constraint" and e.get("contype") == "CONSTR_PRIMARY":
                    pk.extend(names(e.get("keys")))
            rels[(schema, name)] = CatalogRelation(
                rel_oid, schema, name, "r", tuple(cols), primary_key=tuple(pk)
            )
        elif kind == "ViewStmt":
            schema, name = qualify(n["view"])
            query = n["query"]
            start = raw.get("stmt_location", 0)
            length = raw.get("stmt_len", 0)
            text = raw_bytes[start : start + length if length else None].decode()
            view_sql = _view_body(text)
            walker = StatementWalker(Shared(current(), lambda *_: frozenset()), path)
            out = walker.query(query, None, {})
            aliases = names(n.get("aliases"))
            rel_oid = oid()
            vcols = tuple(
                CatalogColumn(
                    schema, name, aliases[i] if i < len(aliases) else c, i + 1, "", rel_oid
                )
                for i, (c, _lin) in enumerate(out)
            )
            rels[(schema, name)] = CatalogRelation(
                rel_oid, schema, name, "v", vcols, view_sql=view_sql, view_search_path=path
            )
        elif kind == "CommentStmt" and n.get("objtype") == "OBJECT_COLUMN":
            parts = [x["String"]["sval"] for x in n["object"]["List"]["items"]]
            col = parts[-1]
            schema, table = qualify(
                {"relname": parts[-2], **({"schemaname": parts[-3]} if len(parts) > 2 else {})}
            )
            rel = rels.get((schema, table))
            if rel is None:
                continue
            comment = n.get("comment")
            new_cols = tuple(
                replace(c, comment=comment, labels=parse_comment_labels(comment))
                if c.name == col
                else c
                for c in rel.columns
            )
            rels[(schema, table)] = replace(rel, columns=new_cols)
    return current()


def _view_body(text: str) -> str:
    """The query of ``CREATE VIEW name [(cols)] [WITH (...)] AS query``."""
    depth = 0
    for t in _pg.scan(text):
        if t.name == "ASCII_40":
            depth += 1
        elif t.name == "ASCII_41":
            depth -= 1
        elif depth == 0 and t.name == "AS":
            return text[t.end + 1 :].strip().rstrip(";")
    raise ValueError(f"cannot find the query of view definition: {text[:60]}")


def snapshot_from_file(path: str | Path) -> CatalogSnapshot:
    return snapshot_from_sql(Path(path).read_text(encoding="utf-8"))
