"""docs/contracts.md is generated from the code; it must not drift."""

from pathlib import Path

from shared import contracts, subjects

DOC = Path(__file__).resolve().parents[2] / "docs" / "contracts.md"


def test_contracts_doc_is_current() -> None:
    assert DOC.read_text() == contracts.markdown(), (
        "docs/contracts.md is stale: run `make docs` and commit it")


def test_every_endpoint_has_tagged_types_and_a_doc() -> None:
    for svc in subjects.SERVICES:
        verbs = [s.verb for s in contracts.endpoints(svc)]
        assert len(verbs) == len(set(verbs)), f"{svc} declares a verb twice"
        for s in contracts.endpoints(svc):
            subjects.token(s.verb)
            assert s.doc, f"{svc}.{s.verb} has no doc"
            for tp in (s.request, s.response):
                assert tp.__struct_config__.tag, f"{svc}.{s.verb}: {tp} has no tag"
