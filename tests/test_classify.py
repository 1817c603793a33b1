"""Classification: detectors on values, suggestions on data inserted into PostgreSQL, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from policy.classify import classify_values, detect, luhn_ok, mask
from policy.labels import LabelRules
from proxy.cli import main
from proxy.sandbox.cluster import Cluster, schema_sql

DB = "analysis_classify"


@pytest.mark.parametrize(
    ("value", "label"),
    [
        ("ann.example@mail.example", "pii.email"),
        ("O'Brien+tag@sub.example.co.uk", "pii.email"),
        ("+31 6 1234 5678", "pii.phone"),
        ("(020) 555-1234", "pii.phone"),
        ("020-5551234", "pii.phone"),
        ("4111 1111 1111 1111", "pii.card"),
        ("5500-0000-0000-0004", "pii.card"),
        ("192.168.10.4", "pii.ip"),
        ("2001:db8::42", "pii.ip"),
        ("Maria Gonzalez", "pii.name"),
        ("Jan van der Berg", "pii.name"),
        ("12 Baker Street", "pii.address"),
        ("Keizersgracht 123", "pii.address"),
        ("Hauptstraße 5", "pii.address"),
    ],
)
def test_detectors_recognise(value: str, label: str) -> None:
    assert label in detect(value)


@pytest.mark.parametrize(
    "value",
    ["4111 1111 1111 1112", "2024-01-05", "123456", "Widget Pro", "open", "T-000123", "v1.2.3.4"],
)
def test_detectors_leave_ordinary_values_alone(value: str) -> None:
    assert detect(value) == set()


def test_luhn() -> None:
    assert luhn_ok("79927398713") and not luhn_ok("79927398710")


def test_mask_never_shows_the_value() -> None:
    for v in ("ann.example@mail.example", "+31 6 1234 5678", "Maria Gonzalez", "4111111111111111"):
        m = mask(v)
        assert m != v and len(m) <= len(v) + 4
    assert mask("ann.example@mail.example") == "a***@m***.example"
    assert "1234" not in mask("+31 6 1234 5678")


def test_name_column_of_product_names_is_not_a_personal_name() -> None:
    assert classify_values(["Widget Pro", "Gadget Max", "Cable Kit"], "name") == []
    (s,) = classify_values(["Tom Hardy", "Xavi Ruiz", "Li Na"], "full_name")
    assert s.label == "pii.name" and s.by_name and s.share == 1.0


def test_free_text_carrying_contact_details_is_reported() -> None:
    bodies = [
        "Please call me back on +31 6 1234 5678 about my order",
        "My new address is ann@x.example, please update it",
        "The widget broke again after the update",
        "Card 4111 1111 1111 1111 was charged twice!",
    ]
    got = {s.label: s for s in classify_values(bodies, "body")}
    assert set(got) == {"pii.phone", "pii.email", "pii.card"}
    assert got["pii.email"].embedded_in and "contain one" in got["pii.email"].evidence


def test_mixed_column_reports_share() -> None:
    values = ["ann@x.example"] * 7 + ["n/a"] * 3
    (s,) = classify_values(values, "contact")
    assert s.label == "pii.email" and s.share == pytest.approx(0.7) and s.sampled == 10


@pytest.fixture(scope="module")
def classify_db(pg: Cluster) -> str:
    pg.psql(f"DROP DATABASE IF EXISTS {DB}; CREATE DATABASE {DB};", database="postgres")
    rows = ",\n".join(
        f"({i}, '{n}', 'user{i}@mail.example', '+44 20 7946 {i:04d}', '{i} High Street',"
        f" 'London', 'SW1A {i % 9}AA', 'GB', 'standard', now())"
        for i, n in enumerate(
            ["Alice Smith", "Bob Jones", "Carol White", "David Brown", "Emma Green"] * 8, 1
        )
    )
    pg.psql(
        schema_sql()
        + f"\nINSERT INTO customers VALUES {rows};\n"
        + "INSERT INTO products VALUES (1, 'Widget Pro', 'tools'), (2, 'Gadget Max', 'toys');\n"
        + "INSERT INTO tickets VALUES (1, 'T-1', 1, NULL, 'help', 'open', 'normal', now(),"
        + " now());\n"
        + "INSERT INTO ticket_messages SELECT g, 1, 'customer', NULL,"
        + " 'reach me at user' || g || '@mail.example or later', now()"
        + " FROM generate_series(1, 20) g;\n"
        + "CREATE TABLE payments (id int, card text, client_addr text, memo text);\n"
        + "INSERT INTO payments SELECT g, '4111 1111 1111 1111', '10.1.2.' || g, 'thanks'"
        + " FROM generate_series(1, 30) g;\n",
        database=DB,
    )
    return f"postgresql://postgres@{pg.host}:{pg.port}/{DB}"


def test_classify_command_suggests_labels_from_sampled_data(
    classify_db: str, tmp_path: Path
) -> None:
    out = tmp_path / "labels.yaml"
    result = CliRunner().invoke(
        main, ["classify", "--dsn", classify_db, "--sample", "50", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    rules = LabelRules.from_yaml(out)
    got = set(rules.rules)
    for expected in [
        ("public.customers.email", "pii.email"),
        ("public.customers.phone", "pii.phone"),
        ("public.customers.full_name", "pii.name"),
        ("public.customers.street", "pii.address"),
        ("public.payments.card", "pii.card"),
        ("public.payments.client_addr", "pii.ip"),
        ("public.tickets.ticket_number", "support.ticket"),
        ("public.ticket_messages.body", "pii.email"),
    ]:
        assert expected in got
    assert not any(col.startswith("public.products.") for col, _l in got)
    assert not any(col == "public.payments.memo" for col, _l in got)
    # Evidence is printed, values are not.
    assert "user1@mail.example" not in result.output and "user1@mail.example" not in out.read_text()
    assert "100% of 40 sampled values match" in out.read_text()


def test_explain_command_on_the_reference_schema() -> None:
    runner = CliRunner()
    result = runner.invoke(
        main,
        ["policy", "explain", "--json", "SELECT name, contact FROM reporting.vip_contacts LIMIT 5"],
    )
    assert result.exit_code == 0, result.output
    (f,) = json.loads(result.output)
    assert f["output_labels"] == ["pii.email", "pii.name"]
    assert f["limit"] == 5
    assert f["output"][1] == {
        "name": "contact",
        "labels": ["pii.email"],
        "combined_labels": [],
        "sources": ["public.customers.email"],
    }
    human = runner.invoke(main, ["policy", "explain", "SELECT c FROM customers c"])
    assert human.exit_code == 0 and "pii.phone" in human.output and "whole rows of" in human.output


def test_explain_says_what_a_limited_subject_would_be_refused() -> None:
    runner = CliRunner()
    unknown = runner.invoke(main, ["policy", "explain", "SELECT email FROM crm.customers"])
    assert unknown.exit_code == 0, unknown.output
    assert "UNKNOWN" in unknown.output and "crm.customers" in unknown.output
    assert "fail-closed" in unknown.output
    packed = runner.invoke(
        main, ["policy", "explain", "--json", "SELECT string_agg(email, ',') FROM customers"]
    )
    (f,) = json.loads(packed.output)
    assert f["output"][0]["combined_labels"] == ["pii.email"]
    assert f["output"][0]["sources"] == ["public.customers.email (combined from many rows)"]
    human = runner.invoke(main, ["policy", "explain", "SELECT max(phone) FROM customers"])
    assert "COMBINED" in human.output and "one-record-per-row" in human.output


def test_explain_with_search_path_and_live_catalog(classify_db: str) -> None:
    result = CliRunner().invoke(
        main,
        ["policy", "explain", "--dsn", classify_db, "--search-path", "reporting,public", "--json",
         "SELECT * FROM customer_contacts"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (f,) = json.loads(result.output)
    assert "reporting.customer_contacts" in f["relations_read"]
    assert f["output_labels"] == ["pii.email", "pii.name", "pii.phone"]


def test_explain_with_schema_file_and_labels_file(tmp_path: Path) -> None:
    labels = tmp_path / "labels.yaml"
    labels.write_text("labels:\n  - column: public.products.name\n    label: catalog.product\n")
    result = CliRunner().invoke(
        main,
        ["policy", "explain", "--schema-sql", "config/support_schema.sql", "--labels", str(labels),
         "--json", "SELECT name FROM products; SET search_path = reporting;"
         " SELECT * FROM open_tickets"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    first, setp, third = json.loads(result.output)
    assert first["output_labels"] == ["catalog.product"]
    assert setp["search_path"] == ["reporting"]
    assert third["output_labels"] == ["support.ticket"]


def test_explain_rejects_a_bad_labels_file(tmp_path: Path) -> None:
    labels = tmp_path / "labels.yaml"
    labels.write_text("labels:\n  - column: public.products.name\n    label: Not A Label\n")
    result = CliRunner().invoke(main, ["policy", "explain", "--labels", str(labels), "SELECT 1"])
    assert result.exit_code != 0 and "not a dotted lowercase name" in result.output
