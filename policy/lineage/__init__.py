"""Column lineage over libpg_query's JSON parse tree: which stored columns each output
column of a statement derives from, and what the statement reads, writes, copies and packs.

The model follows PostgreSQL's parse analysis closely enough to stay a *superset*: where we
cannot tell which of several sources a name means (ambiguity PostgreSQL would reject, a
relation missing from the catalog), we union them rather than guess.
``walker.StatementWalker`` analyses one statement and fills the accumulators that
``policy.statement_facts`` turns into a ``QueryFacts``.  It is built in layers, one module
each, each using the ones below it: ``base`` (what a walk accumulates), ``relations`` (names
to relations, views expanded), ``functions`` (into user functions' bodies), ``expressions``,
``from_clause`` (with ``conditions``: what ON and WHERE equalities tell) and ``walker``
(statements).  The values they pass around are in ``model``, the parse-tree accessors in
``tree``, what PostgreSQL's own functions and views do with data in ``builtin``, and the
per-snapshot memo of labels and view expansions in ``shared``.
"""
